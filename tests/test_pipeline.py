"""One creation pipeline for every handler: the core builds the spec, the extensions and NRI adjust it, and
the runtime (runc under conmon, a shim v2, a VM) runs what it is handed. A refusal fails on each alike."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import grpc
import pytest

from shimhub.testing.daemon import Pod
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT, Network
from tests.test_plugin_loading import install_fake_distribution
from tests.test_shimv2 import SHIM
from tests.test_vm import VM_MARKS

pytestmark = NEEDS_ROOT

EXTENSION = """
from shimhub.sdk import Refused, hookimpl

class Pipeline:
    shimhub_api = "2.0"

    @hookimpl
    def shimhub_adjust_oci_spec(self, container, spec):
        if container.name.startswith("refused_"):
            raise Refused("containers named refused are not welcome")
        spec["process"]["env"].append("ADDED_BY=extension")
"""

HANDLERS = {
    "runc": 'plugin = "runc"\n',
    "shim": f'plugin = "shimv2"\n[runtimes.shim.options]\nshim = "{SHIM}"\n',
    "kata": 'plugin = "kata"\n[runtimes.kata.options]\nmax_vcpus = 2\nmax_memory_mib = 512\n',
}
PARAMETERS = [
    pytest.param("runc", id="runc"),
    pytest.param(
        "shim", id="shimv2", marks=pytest.mark.skipif(shutil.which(SHIM) is None, reason=f"{SHIM} is not installed")
    ),
    pytest.param("kata", id="vm", marks=VM_MARKS),
]


def _config(handler: str, network: Network, registry, tmp_path: Path) -> str:
    """A daemon with the handler, the extension, and NRI running the test plugin in its adjusting mode."""
    plugins, configs = tmp_path / "nri-plugins", tmp_path / "nri-conf"
    plugins.mkdir()
    configs.mkdir()
    program = plugins / "10-adjuster"
    program.write_text(f"#!/bin/sh\nexec {sys.executable} -m shimhub.testing.nri_plugin\n")
    program.chmod(0o755)
    shared = tmp_path / "from-nri"
    shared.mkdir()
    (shared / "note").write_text("mounted by NRI\n")
    (configs / "10-adjuster.conf").write_text(json.dumps({"mode": "adjust", "mount_source": str(shared)}))
    network.conflist()
    return (
        f'default_runtime = "{handler}"\nextensions = ["pipeline"]\n[runtimes.{handler}]\n{HANDLERS[handler]}'
        f'[nri]\nenable = true\nsocket = "{tmp_path / "nri.sock"}"\nplugin_path = "{plugins}"\n'
        f'plugin_config_path = "{configs}"\n'
        f'{network.table()}[storage]\ndriver = "overlay"\n{registry.config()}'
    )


@pytest.mark.parametrize("handler", PARAMETERS)
def test_every_handler_runs_the_spec_the_extension_and_nri_adjusted(
    daemon_factory, registry, network: Network, tmp_path: Path, handler: str
) -> None:
    site = tmp_path / "site"
    entry_point = "[shimhub.extension]\npipeline = pipeline_extension:Pipeline\n"
    install_fake_distribution(site, "shimhub-pipeline", "pipeline_extension", EXTENSION, entry_point)
    daemon = daemon_factory(_config(handler, network, registry, tmp_path), env={"PYTHONPATH": str(site)}).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    pod = Pod(daemon, tmp_path / "pod", handler=handler)
    container = pod.run("app", ["sleep", "600"])
    found = pod.rt.ExecSync(cri.ExecSyncRequest(container_id=container, cmd=["env"], timeout=60), timeout=90)
    environment = found.stdout.decode().splitlines()
    assert "ADDED_BY=extension" in environment, environment
    assert "NRI_ADDED=by-adjuster" in environment, environment
    mounted = pod.rt.ExecSync(cri.ExecSyncRequest(container_id=container, cmd=["cat", "/nri-mount/note"], timeout=60))
    assert mounted.stdout == b"mounted by NRI\n"

    with pytest.raises(grpc.RpcError) as refused:
        pod.create("refused_app", ["true"])
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "extension 'pipeline' refused container 'refused_app_" in refused.value.details()
    assert refused.value.details().endswith(": containers named refused are not welcome")
    listed = pod.rt.ListContainers(cri.ListContainersRequest()).containers
    assert [c.metadata.name for c in listed] == ["app"], "a refused container leaves no record"
