"""The devicemapper driver on a node with device-mapper (inside the node tests.booted_node boots)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from shimhub.testing import StorageConformance
from shimhub.testing.daemon import Pod
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.test_node_cgroup2 import NODE_MARKS

pytestmark = NODE_MARKS


class TestDevicemapperOnNode(StorageConformance):
    driver = "devicemapper"
    options: ClassVar[dict[str, Any]] = {"loop_data_size_gib": 4, "base_size_gib": 1}


def test_a_container_runs_from_a_devicemapper_rootfs(daemon_factory, shimhub_registry, tmp_path: Path) -> None:
    config = (
        'default_runtime = "runc"\n[runtimes.runc]\nplugin = "runc"\n[network]\nbackend = "host"\n'
        '[storage]\ndriver = "devicemapper"\n[storage.options]\nloop_data_size_gib = 4\nbase_size_gib = 1\n'
        f"{shimhub_registry.config()}"
    )
    daemon = daemon_factory(config).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    pod = Pod(daemon, tmp_path)
    container = pod.run("app", ["sh", "-c", "grep ' / ' /proc/mounts; echo written > /hello; cat /hello"])
    assert pod.wait_exit(container).exit_code == 0
    lines = pod.lines("app")
    assert lines[-1] == "written"
    assert lines[0].startswith("/dev/mapper/"), lines
