"""The plugin author kit: a pytest plugin with shimhub fixtures and conformance suites.

Loaded by pytest through the ``pytest11`` entry point (or ``pytest -p shimhub.testing``).
A plugin distribution's own test file subclasses a suite and names its plugin::

    from shimhub.testing import RuntimeConformance

    class TestMyRuntime(RuntimeConformance):
        plugin = "myruntime"

Every test of a suite runs against the real plugin, installed in the Python that
runs pytest: runtimes through a real ``shimhub serve`` with the plugin as its default
handler, storage drivers and network backends through their hooks as shimhub calls
them. A failure names the hook that broke the contract. Fixtures:

* ``shimhub_daemon_factory``: ``make(config_toml, name="d")`` starts nothing yet and
  returns a ``shimhub.testing.daemon.Daemon``; at the end of the test every pod is
  removed through the CRI and anything left on the node fails the test;
* ``shimhub_registry``: a Debian ``docker-registry`` on 127.0.0.1 (session-wide)
  holding ``test/busybox:1``, an image built from the node's static busybox.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shimhub import __version__, mountinfo, mounts
from shimhub.hookspecs import API_VERSION
from shimhub.testing.daemon import BUSYBOX, Daemon
from shimhub.testing.network_suite import NetworkConformance
from shimhub.testing.registry import Pusher, Registry, busybox_layer
from shimhub.testing.runtime_suite import RuntimeConformance
from shimhub.testing.storage_suite import StorageConformance

__all__ = ["BUSYBOX", "DaemonFactory", "KitRegistry", "NetworkConformance", "RuntimeConformance", "StorageConformance"]


class KitRegistry:
    """A registry on 127.0.0.1 with the kit's images; `host` goes into a daemon's config."""

    def __init__(self, root: Path) -> None:
        self.registry = Registry(root, root / "storage")
        self.host = self.registry.host
        repository, tag = BUSYBOX.split(":")
        Pusher(self.registry).image(repository, tag, [busybox_layer()], {"Env": ["PATH=/bin"]})

    def config(self) -> str:
        """The `[images]` tables that make a daemon pull short names from this registry over plain HTTP."""
        return self.registry.images_config()

    def stop(self) -> None:
        self.registry.stop()


@pytest.fixture(scope="session")
def shimhub_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KitRegistry]:
    """A docker-registry on 127.0.0.1 holding the kit's images (skips when docker-registry is not installed)."""
    for tool in ("docker-registry", "busybox"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian packages docker-registry and busybox-static)")
    registry = KitRegistry(tmp_path_factory.mktemp("kit-registry"))
    yield registry
    registry.stop()


class DaemonFactory:
    """Makes daemons under one directory and keeps them (`daemons`) for the end of the test."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.daemons: list[Daemon] = []

    def __call__(
        self, config: str, name: str = "d", python: str = sys.executable, env: dict[str, str] | None = None
    ) -> Daemon:
        """A daemon (not started) rooted at `directory`/`name` with this configuration."""
        root = self.directory / name
        root.mkdir(exist_ok=True)
        daemon = Daemon(root, config, python, env)
        self.daemons.append(daemon)
        return daemon

    def remove_everything(self) -> dict[str, list[str]]:
        """Remove every pod of every daemon made; what is left on the node."""
        problems: dict[str, list[str]] = {}
        for daemon in self.daemons:
            problems.update(daemon.remove_everything())
        return problems


@pytest.fixture
def shimhub_daemon_factory(tmp_path: Path) -> Iterator[DaemonFactory]:
    """Make daemons under the test's temporary directory; at the end all pods are removed and nothing may be left."""
    factory = DaemonFactory(tmp_path)
    yield factory
    problems = factory.remove_everything()
    for daemon in factory.daemons:
        daemon.stop()
        daemon.kill()
    # what a failed test left mounted under a daemon goes before any cleanup of the temporary directory walks in
    for daemon in factory.daemons:
        for point in sorted(mountinfo.under(str(daemon.root)), key=len, reverse=True):
            mounts.unmount(point)
    assert not problems, f"the test left things behind: {problems}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """In a conformance test, a failed CRI call fails the test with its code and details (which name the hook)."""
    try:
        return (yield)
    except grpc.RpcError as exc:
        if not isinstance(
            getattr(item, "instance", None), (RuntimeConformance, StorageConformance, NetworkConformance)
        ):
            raise
        raise AssertionError(f"CRI call failed: {exc.code().name}: {exc.details()}") from exc


def pytest_report_header() -> str:
    """Say which shimhub the kit tests against."""
    return f"shimhub.testing: shimhub {__version__}, plugin API {API_VERSION}"
