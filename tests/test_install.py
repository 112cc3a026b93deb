"""What ./install leaves on a node: the default pod network, only where there is none."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

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


def _packages(*args: str, config: Path | None = None) -> set[str]:
    env = {"PATH": "/usr/bin:/bin", "SHIMHUB_CONFIG": str(config or "/nonexistent.toml")}
    done = subprocess.run([ROOT / "install", "--packages", *args], env=env, capture_output=True, text=True, check=True)
    return set(done.stdout.split())


VM = {"qemu-system-x86", "qemu-system-common", "linux-image-cloud-amd64", "busybox-static", "cpio"}


@pytest.mark.unit
def test_a_runc_node_gets_no_kernel_and_no_qemu() -> None:
    base = _packages()
    assert {"runc", "conmon", "containernetworking-plugins", "python3-venv"} <= base
    assert base.isdisjoint(VM | {"criu", "crun", "runsc"}), base


@pytest.mark.unit
@pytest.mark.parametrize(
    ("feature", "added"), [("vm", VM), ("criu", {"criu"}), ("crun", {"crun"}), ("gvisor", {"runsc"})]
)
def test_with_a_feature_adds_its_packages(feature: str, added: set[str]) -> None:
    assert _packages("--with", feature) - _packages() == added


@pytest.mark.unit
def test_the_handlers_of_an_existing_config_bring_what_they_need(tmp_path: Path) -> None:
    config = tmp_path / "shimhub.toml"
    config.write_text('[runtimes.kata]\nplugin = "kata"\n')
    (tmp_path / "shimhub.d").mkdir()
    crun = '[runtimes.crun]\nplugin = "runc"\noptions = {binary = "crun"}\n'
    (tmp_path / "shimhub.d" / "10-crun.toml").write_text(crun)
    assert _packages(config=config) - _packages() == VM | {"crun"}


@pytest.mark.unit
def test_an_unknown_feature_is_refused_by_name() -> None:
    argv = [ROOT / "install", "--packages", "--with", "vmm"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert (done.returncode, done.stderr.strip()) == (2, "install: unknown feature vmm (vm, criu, crun, gvisor or all)")


@pytest.mark.unit
def test_install_and_the_daemon_state_the_same_minimum_python() -> None:
    import re

    import shimhub

    stated = re.search(r"^minimum_python=(\S+)$", (ROOT / "install").read_text(), re.M)
    assert stated and stated.group(1) == ".".join(map(str, shimhub.MINIMUM_PYTHON))
    setup = (ROOT / "setup.cfg").read_text()
    assert f"python_requires = >={stated.group(1)}" in setup
