"""What ./install leaves on a node: the default pod network, only where there is none."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT

ROOT = Path(__file__).parent.parent
INSTALL_DEFAULT = ROOT / "contrib" / "cni" / "install-default"


def test_a_directory_without_a_network_gets_the_default(tmp_path: Path) -> None:
    conf_dir = tmp_path / "net.d"
    subprocess.run([INSTALL_DEFAULT, str(conf_dir)], check=True, capture_output=True)
    installed = json.loads((conf_dir / "10-shimhub.conflist").read_text())
    assert installed == json.loads((ROOT / "contrib" / "cni" / "10-shimhub.conflist").read_text())
    readme = (ROOT / "README.md").read_text()
    block = readme.split("The default, `/etc/cni/net.d/10-shimhub.conflist`:", 1)[1].split("```json\n", 1)[1]
    assert json.loads(block.split("```", 1)[0]) == installed, "README shows another default network"


@NEEDS_ROOT
def test_with_the_default_network_a_fresh_daemon_is_network_ready(daemon_factory, tmp_path: Path) -> None:
    conf_dir = tmp_path / "net.d"
    subprocess.run([INSTALL_DEFAULT, str(conf_dir)], check=True, capture_output=True)
    config = (
        'default_runtime = "proc"\n[runtimes.proc]\nplugin = "proc"\n'
        f'[network]\nbackend = "cni"\n[network.options]\nconf_dir = "{conf_dir}"\nbin_dirs = ["/usr/lib/cni"]\n'
    )
    daemon = daemon_factory(config).start()
    conditions = daemon.runtime.Status(cri.StatusRequest()).status.conditions
    assert {c.type: c.status for c in conditions}["NetworkReady"] is True


def test_an_existing_network_is_never_touched(tmp_path: Path) -> None:
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    ours = conf_dir / "05-operator.conf"
    ours.write_text('{"cniVersion": "1.0.0", "name": "operator", "type": "bridge"}')
    done = subprocess.run([INSTALL_DEFAULT, str(conf_dir)], check=True, capture_output=True, text=True)
    assert sorted(p.name for p in conf_dir.iterdir()) == ["05-operator.conf"]
    assert "left as it is" in done.stdout
