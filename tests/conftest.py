"""Fixtures: a virtual environment with the test runtime plugin installed, and daemons."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shimhub.testing import DaemonFactory
from shimhub.testing.daemon import Daemon

HERE = Path(__file__).parent
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, /run)")


EXAMPLE_PLUGIN = HERE.parent / "plugins" / "procrun"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test not marked `unit` needs root and real parts: mark it `root`, so `-m unit` and `-m "not root"`
    select the fast in-process layer."""
    for item in items:
        if item.get_closest_marker("unit") is None:
            item.add_marker(pytest.mark.root)


def install_in_venv(source: Path, base: Path) -> str:
    """A fresh virtual environment under `base` (seeing shimhub's own install) with the
    distribution at `source` pip-installed into it, as a plugin author would; its python."""
    venv = base / "venv"
    # No pip of its own: ensurepip's old setuptools would shadow the one the build needs.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(source),
        ],
        check=True,
    )
    return python


@pytest.fixture(scope="session")
def plugin_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A virtual environment with the example third-party plugin `shimhub-procrun` installed; its python."""
    base = tmp_path_factory.mktemp("plugin-venv")
    shutil.copytree(EXAMPLE_PLUGIN, base / "src")
    return install_in_venv(base / "src", base)


class ProcDaemonFactory(DaemonFactory):
    """The kit's daemon factory, running daemons with the Python that has the example plugin installed."""

    def __init__(self, kit: DaemonFactory, python: str) -> None:
        super().__init__(kit.directory)
        self.daemons = kit.daemons
        self.python = python

    def __call__(
        self, config: str, name: str = "d", python: str | None = None, env: dict[str, str] | None = None
    ) -> Daemon:
        return super().__call__(config, name, python or self.python, env)


@pytest.fixture
def daemon_factory(shimhub_daemon_factory: DaemonFactory, plugin_python: str) -> ProcDaemonFactory:
    """Daemons that can run the example `proc` runtime; the kit's fixture removes and checks them at the end."""
    return ProcDaemonFactory(shimhub_daemon_factory, plugin_python)


def _unrouted_octet() -> int:
    """A random N in 100..249 whose 10.231.N.0/24 the node has no route to: a bridge that an aborted run left
    with the same subnet would take the replies to this test's pods."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
    routed = {int(octet) for octet in re.findall(r"^10\.231\.(\d+)\.", routes, re.MULTILINE)}
    return secrets.choice([octet for octet in range(100, 250) if octet not in routed])


class Network:
    """A CNI config directory for one test: its own bridge, subnets and IPAM directory."""

    def __init__(self, root: Path) -> None:
        self.conf_dir = root / "net.d"
        self.conf_dir.mkdir(parents=True)
        self.ipam = root / "ipam"
        self.bridge = f"sht{secrets.token_hex(4)}"
        self.octet = _unrouted_octet()
        self.subnet = f"10.231.{self.octet}.0/24"

    def conflist(self, name: str = "10-test.conflist", plugins: list | None = None, **overrides: object) -> Path:
        document = {
            "cniVersion": "1.0.0",
            "name": "shimtest",
            "plugins": plugins
            if plugins is not None
            else [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(self.ipam),
                        "ranges": [[{"subnet": self.subnet}], [{"subnet": f"fd00:231:{self.octet:x}::/64"}]],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
            **overrides,
        }
        path = self.conf_dir / name
        path.write_text(json.dumps(document))
        return path

    def table(self) -> str:
        """The daemon's `[network]` table for this network."""
        options = f'conf_dir = "{self.conf_dir}"\nbin_dirs = ["/usr/lib/cni"]\n'
        return f'[network]\nbackend = "cni"\n[network.options]\n{options}'

    def daemon_config(self) -> str:
        return f'default_runtime = "proc"\n[runtimes.proc]\nplugin = "proc"\n{self.table()}'

    def allocations(self) -> list[str]:
        """Addresses host-local has handed out (one file per address; its bookkeeping files start otherwise)."""
        if not self.ipam.exists():
            return []
        return [p.name for p in self.ipam.rglob("*") if p.is_file() and (p.name[0].isdigit() or ":" in p.name)]

    def cleanup(self) -> None:
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, check=False)


@pytest.fixture
def network(daemon_factory: ProcDaemonFactory, tmp_path: Path) -> Iterator[Network]:
    """A CNI network (no conflist written yet); at the end the test's pods are removed and no IP may stay allocated."""
    net = Network(tmp_path)
    yield net
    try:
        assert not daemon_factory.remove_everything()
    finally:
        net.cleanup()  # the bridge goes even when pods were left: the next test must not meet its subnet
    assert net.allocations() == [], "pod removal left IP allocations"


PROC_CONFIG = """
default_runtime = "proc"
[runtimes.proc]
plugin = "proc"
[network]
backend = "host"
"""


@pytest.fixture
def daemon(daemon_factory) -> Daemon:
    """A running daemon whose default handler is the test plugin's `proc` runtime."""
    return daemon_factory(PROC_CONFIG).start()


class RegistryFixture:
    """Registries on 127.0.0.1 sharing one storage: open, Basic auth, token auth; and the test images."""

    USER, PASSWORD = "alice", "wonderland"

    def __init__(self, root: Path) -> None:
        from shimhub.testing.layers import tar
        from shimhub.testing.registry import Pusher, Registry, busybox_layer
        from tests.registry import TokenService

        storage = root / "storage"
        self.open = Registry(root, storage)
        htpasswd = root / "htpasswd"
        subprocess.run(["htpasswd", "-Bbc", str(htpasswd), self.USER, self.PASSWORD], check=True, capture_output=True)
        self.basic = Registry(root, storage, {"htpasswd": {"realm": "shimhub-test", "path": str(htpasswd)}})
        self.token_service = TokenService(root, self.USER, self.PASSWORD)
        self.token = Registry(root, storage, self.token_service.registry_auth())
        self.storage = storage
        push = Pusher(self.open)
        base = busybox_layer()
        app = tar(
            ("etc/.wh.group", "file", ""), ("srv", "dir", None), ("srv/hello.txt", "file", "hello from the image\n")
        )
        config = {"Cmd": ["cat", "/srv/hello.txt"], "User": "1000", "Env": ["PATH=/bin"]}
        self.busybox = push.image("test/busybox", "1", [base, app], config)
        self.docker = push.image(
            "test/docker",
            "1",
            [base],
            {"User": "app"},
            media_type="application/vnd.docker.distribution.manifest.v2+json",
        )
        self.plain = push.image("test/plain", "1", [tar(("only.txt", "file", "plain layer\n"))], compress="none")
        self.zstd = push.image("test/zstd", "1", [tar(("z.txt", "file", "zstd layer\n"))], compress="zstd")
        arm = push.image("test/armonly", "arm64", [tar(("arch", "file", "arm64\n"))], architecture="arm64")
        s390 = push.image("test/armonly", "s390x", [tar(("arch", "file", "s390x\n"))], architecture="s390x")
        amd = push.image("test/multi", "amd64", [tar(("arch", "file", "amd64\n"))])
        arm_multi = push.image("test/multi", "arm64", [tar(("arch", "file", "arm64\n"))], architecture="arm64")
        self.multi_amd64 = amd
        push.index(
            "test/multi",
            "1",
            [
                ("linux/arm64", arm_multi["manifest"], int(arm_multi["size"])),
                ("linux/amd64", amd["manifest"], int(amd["size"])),
            ],
        )
        push.index(
            "test/armonly",
            "1",
            [("linux/arm64", arm["manifest"], int(arm["size"])), ("linux/s390x", s390["manifest"], int(s390["size"]))],
        )
        push.image("test/escape", "1", [tar(("../../escaped-from-layer", "file", "x"))])
        self.corrupt = push.image("test/corrupt", "1", [tar(("data", "file", "good content\n"))])
        layer_digest = self._layer_digests("test/corrupt", self.corrupt["manifest"])[0]
        data = storage / "docker/registry/v2/blobs/sha256" / layer_digest[7:9] / layer_digest[7:] / "data"
        tampered = bytearray(data.read_bytes())
        tampered[-5] ^= 0xFF
        data.write_bytes(bytes(tampered))
        self.corrupt_layer = layer_digest

    def config(self) -> str:
        """The `[images]` tables that pull short names from the open registry over plain HTTP."""
        return self.open.images_config()

    def _layer_digests(self, repository: str, manifest_digest: str) -> list[str]:
        hexd = manifest_digest[7:]
        blob = self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
        return [layer["digest"] for layer in json.loads(blob.read_bytes())["layers"]]

    def stop(self) -> None:
        for registry in (self.open, self.basic, self.token):
            registry.stop()
        self.token_service.stop()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryFixture]:
    """Test registries on 127.0.0.1 holding the test images."""
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (./install --dev installs it)")
    fixture = RegistryFixture(tmp_path_factory.mktemp("registry"))
    yield fixture
    fixture.stop()


def assert_image_store_empty(daemon: Daemon, driver: str) -> None:
    """No blob, no layer mark (nor marker of one being applied), no layer or scratch directory of `driver`."""
    state = daemon.root / "state" / "images"
    assert list((state / "content").rglob("sha256/*")) == [], "a blob is left"
    assert [p for p in (state / "layers").rglob("*") if p.is_file()] == [], "a layer mark or marker is left"
    storage = daemon.root / "storage" / driver
    assert list((storage / "layers").iterdir()) == [], "a layer is left"
    assert list((storage / "tmp").iterdir()) == [], "a half-unpacked layer is left"


def image_config(registry: RegistryFixture, driver: str = "vfs", extra: str = "") -> str:
    """Daemon config pulling from the test registries (plain http) with the `proc` runtime."""
    hosts = "".join(
        f'[images.registries."{host}"]\ninsecure = true\n'
        for host in (registry.open.host, registry.basic.host, registry.token.host)
    )
    return (
        f'default_runtime = "proc"\n[runtimes.proc]\nplugin = "proc"\n[network]\nbackend = "host"\n'
        f'[storage]\ndriver = "{driver}"\n[images]\nsearch_registries = ["{registry.open.host}"]\n{extra}\n{hosts}'
    )


@pytest.fixture(scope="session")
def btrfs_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A btrfs filesystem on a loop file, mounted for the session."""
    base = tmp_path_factory.mktemp("btrfs")
    image, mountpoint = base / "fs.img", base / "mnt"
    mountpoint.mkdir()
    with image.open("wb") as sparse:
        sparse.truncate(300 << 20)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
    yield mountpoint
    subprocess.run(["umount", str(mountpoint)], check=True)
