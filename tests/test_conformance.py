"""Every in-tree plugin passes the plugin author kit's conformance suite of its kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from shimhub.testing import NetworkConformance, RuntimeConformance, StorageConformance
from tests.conftest import NEEDS_ROOT, Network
from tests.test_vm import VM_MARKS

pytestmark = NEEDS_ROOT


class TestRunc(RuntimeConformance):
    plugin = "runc"


class TestRunsc(RuntimeConformance):
    plugin = "runc"
    options: ClassVar[dict[str, Any]] = {"binary": "runsc", "runtime_args": ["--network=host"]}


class TestShimV2(RuntimeConformance):
    plugin = "shimv2"
    options: ClassVar[dict[str, Any]] = {"shim": "containerd-shim-runc-v2"}


class TestKata(RuntimeConformance):
    plugin = "kata"
    patience = 120.0
    pytestmark = VM_MARKS


class TestClearContainers(RuntimeConformance):
    plugin = "clearcontainers"
    patience = 120.0
    pytestmark = VM_MARKS


class TestHostNetwork(NetworkConformance):
    backend = "host"
    gives_addresses = False


@pytest.mark.skipif(not Path("/usr/lib/cni/bridge").exists(), reason="containernetworking-plugins is not installed")
class TestCni(NetworkConformance):
    backend = "cni"

    def backend_options(self, request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
        network: Network = request.getfixturevalue("network")
        network.conflist()
        return {"conf_dir": str(network.conf_dir), "bin_dirs": ["/usr/lib/cni"]}


class TestVfs(StorageConformance):
    driver = "vfs"


class TestOverlay(StorageConformance):
    driver = "overlay"


class TestBtrfs(StorageConformance):
    driver = "btrfs"

    def root(self, request: pytest.FixtureRequest, tmp_path: Path) -> Path:
        return request.getfixturevalue("btrfs_root") / tmp_path.name


class TestDevicemapper(StorageConformance):
    driver = "devicemapper"


class TestAufs(StorageConformance):
    driver = "aufs"
