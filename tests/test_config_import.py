"""`shimhub config import`: CRI-O's and containerd's configurations as shimhub's, and what has no equivalent."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
import tomllib
from pathlib import Path

import pytest

from shimhub import cli, config
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT

#: A crio.conf as crio.conf(5) documents its tables, with the handlers a CRI-O node typically has.
CRIO = """
[crio]
storage_driver = "overlay"
[crio.api]
listen = "/var/run/crio/crio.sock"
[crio.runtime]
default_runtime = "crun"
cgroup_manager = "systemd"
conmon_cgroup = "pod"
seccomp_use_default_when_empty = true
[crio.runtime.runtimes.runc]
runtime_path = "/usr/bin/runc"
runtime_type = "oci"
runtime_root = "/run/runc"
[crio.runtime.runtimes.crun]
runtime_path = "/usr/bin/crun"
allowed_annotations = ["io.kubernetes.cri-o.Devices"]
[crio.runtime.runtimes.kata]
runtime_path = "/usr/bin/containerd-shim-kata-v2"
runtime_type = "vm"
runtime_config_path = "/etc/kata-containers/configuration.toml"
privileged_without_host_devices = true
[crio.image]
pause_image = "registry.k8s.io/pause:3.10"
insecure_registries = ["127.0.0.1:5000"]
signature_policy = "/etc/crio/policy.json"
[crio.network]
network_dir = "/etc/cni/net.d/"
plugin_dirs = ["/opt/cni/bin/", "/usr/lib/cni"]
"""
#: What containerd's CRI docs add to `containerd config default` for a Kata handler, systemd cgroups and a mirror.
CONTAINERD_ADDITIONS = """
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
runtime_type = "io.containerd.kata.v2"
privileged_without_host_devices = true
pod_annotations = ["io.katacontainers.*"]
[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
endpoint = ["http://127.0.0.1:5000", "https://registry-1.docker.io"]
"""


def imported(tmp_path: Path, source: str, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[str, Path]:
    given = tmp_path / f"{source}.conf"
    given.write_text(text)
    assert cli.main(["config", "import", "--from", source, str(given)]) == 0
    printed = tmp_path / "shimhub.toml"
    printed.write_text(capsys.readouterr().out)
    return printed.read_text(), printed


@pytest.mark.unit
def test_crio_handlers_cgroups_conmon_and_registries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, printed = imported(tmp_path, "crio", CRIO, capsys)
    loaded = config.load(printed, required=True)
    assert sorted(loaded.runtimes) == ["crun", "kata", "runc"]
    assert (loaded.default_runtime, loaded.cgroup_driver, loaded.seccomp_use_default_when_empty) == (
        "crun",
        "systemd",
        True,
    )
    runc, crun, kata = loaded.runtimes["runc"], loaded.runtimes["crun"], loaded.runtimes["kata"]
    assert runc.plugin == crun.plugin == "runc"
    assert runc.options == {"binary": "/usr/bin/runc", "runtime_args": ["--root", "/run/runc"], "conmon_cgroup": "pod"}
    assert crun.allowed_annotations == ["io.kubernetes.cri-o.Devices"]
    assert (kata.plugin, kata.privileged_without_host_devices) == ("shimv2", True)
    assert kata.options == {
        "shim": "/usr/bin/containerd-shim-kata-v2",
        "shim_config": "/etc/kata-containers/configuration.toml",
    }
    assert loaded.images.registries["127.0.0.1:5000"].insecure
    assert loaded.network.options == {"conf_dir": "/etc/cni/net.d/", "bin_dirs": ["/opt/cni/bin/", "/usr/lib/cni"]}
    comments = [line for line in text.splitlines() if line.startswith("#   ")]
    assert comments == [
        f"#   {tmp_path / 'crio.conf'}: crio.api.listen = '/var/run/crio/crio.sock'",
        f"#   {tmp_path / 'crio.conf'}: crio.image.pause_image = 'registry.k8s.io/pause:3.10'",
    ]


@pytest.mark.unit
def test_containerd_v3_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = """
    version = 3
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "gvisor"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.gvisor]
    runtime_type = "io.containerd.runsc.v1"
    [plugins.'io.containerd.cri.v1.images']
    snapshotter = "native"
    [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "/etc/containerd/certs.d"
    """
    _text, printed = imported(tmp_path, "containerd", textwrap.dedent(source), capsys)
    loaded = config.load(printed, required=True)
    assert loaded.default_runtime == "gvisor"
    assert (loaded.runtimes["gvisor"].plugin, loaded.runtimes["gvisor"].options) == (
        "shimv2",
        {"shim": "containerd-shim-runsc-v1"},
    )
    assert (loaded.storage.driver, loaded.images.hosts_dir) == ("vfs", "/etc/containerd/certs.d")


@NEEDS_ROOT
@pytest.mark.skipif(shutil.which("containerd") is None, reason="containerd is not installed (./install --dev)")
def test_containerds_default_config_gives_a_daemon_with_its_handlers(
    daemon_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    default = subprocess.run(["containerd", "config", "default"], capture_output=True, text=True, check=True).stdout
    text, _printed = imported(tmp_path, "containerd", default + CONTAINERD_ADDITIONS, capsys)
    source = tomllib.loads(default + CONTAINERD_ADDITIONS)
    handlers = source["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    data = tomllib.loads(text)
    assert data["runtimes"]["kata"] == {
        "plugin": "shimv2",
        "options": {"shim": "containerd-shim-kata-v2"},
        "allowed_annotations": ["io.katacontainers.*"],
        "privileged_without_host_devices": True,
    }
    assert data["images"]["registries"]["docker.io"]["mirrors"] == ["127.0.0.1:5000", "registry-1.docker.io"]
    assert data["images"]["registries"]["127.0.0.1:5000"] == {"insecure": True}
    assert "sandbox_image = 'registry.k8s.io/pause" in text, "the pause image is not listed as left out"

    # the daemon the imported file configures, on this test's own directories and a host network
    data["network"] = {"backend": "host"}
    data.pop("storage", None)
    daemon = daemon_factory(_toml(data)).start()
    info = json.loads(daemon.runtime.Status(cri.StatusRequest(verbose=True)).info["status"])
    assert sorted(info["handlers"]) == sorted(handlers)


def _toml(data: dict) -> str:
    import tomli_w

    return tomli_w.dumps(data)
