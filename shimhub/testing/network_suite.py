"""The conformance suite for network backends, through their hooks as shimhub calls them.

Subclass `NetworkConformance`, set `backend`, and override `backend_options()` when
the options depend on the test's temporary directory (a CNI config dir, say). A
backend that says it is not ready (`network_setup` returning ``ready=False``) is
skipped with its reason, or fails where SHIMHUB_REQUIRE_READY names it (see `readiness`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from shimhub import mountinfo, plugins
from shimhub.config import converter
from shimhub.hooktypes import PodNetwork
from shimhub.plugins import LoadedPlugin
from shimhub.records import SandboxRecord, proto_to_dict
from shimhub.testing.context import scratch_context
from shimhub.testing.daemon import pod_config
from shimhub.testing.readiness import not_ready

#: Set up a pod on a backend: `(backend, name)` -> (the pod's record, its network).
PodSetup = Callable[[LoadedPlugin, str], tuple[SandboxRecord, PodNetwork]]


def addresses_inside(netns_path: str) -> list[str]:
    """The addresses configured in a network namespace, loopback's included."""
    shown = subprocess.run(
        ["nsenter", f"--net={netns_path}", "ip", "-j", "addr", "show"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return [a["local"] for link in json.loads(shown) for a in link.get("addr_info", [])]


def namespace_alive(netns_path: str) -> bool:
    """Whether `netns_path` still names a network namespace (a bind mount of one)."""
    return mountinfo.is_mount_point(netns_path)


class NetworkConformance:
    """The network backend contract. Subclass and set `backend`."""

    #: The backend's entry point name (group ``shimhub.network``).
    backend: ClassVar[str] = ""
    #: Whether pods get addresses from this backend (the built-in `host` gives only loopback).
    gives_addresses: ClassVar[bool] = True

    def backend_options(self, request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
        """The backend's options table for one test (default: none)."""
        return {}

    @pytest.fixture
    def new_backend(self, request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], LoadedPlugin]:
        """Make a set-up instance of the backend, as shimhub does at (re)start; all share one state dir."""
        if not self.backend:
            pytest.fail(f"{type(self).__name__}: set `backend` to the network backend's entry point name")
        options = self.backend_options(request, tmp_path)

        def make() -> LoadedPlugin:
            loaded = plugins.load("network", self.backend)
            context = scratch_context(self.backend, tmp_path)
            readiness = loaded.call("network_setup", options=options, context=context)
            if not readiness.ready:
                not_ready("network", self.backend, readiness.reason)
            return loaded

        return make

    @pytest.fixture
    def pod_setup(self) -> Iterator[PodSetup]:
        """Set up pods; whatever a test did not tear down is torn down after it, and must be gone."""
        made: list[tuple[LoadedPlugin, SandboxRecord, PodNetwork]] = []

        def setup(backend: LoadedPlugin, name: str) -> tuple[SandboxRecord, PodNetwork]:
            config = pod_config(name=name, uid=f"uid-{name}")
            sandbox = SandboxRecord(
                id=secrets.token_hex(32),
                name=f"{name}_default_uid-{name}_0",
                handler="conformance",
                created_at=time.time_ns(),
                config=proto_to_dict(config),
            )
            network = backend.call("network_pod_setup", sandbox=sandbox, config=config)
            made.append((backend, sandbox, network))
            return sandbox, network

        yield setup
        for backend, sandbox, network in made:
            backend.call("network_pod_teardown", sandbox=sandbox, network=network)
            assert not namespace_alive(network.netns_path), "network_pod_teardown: the namespace is still mounted"

    def test_each_pod_gets_a_namespace_of_its_own_with_its_addresses(
        self, new_backend: Callable[[], LoadedPlugin], pod_setup: PodSetup
    ) -> None:
        """network_pod_setup: a new namespace per pod, holding the addresses it reports, none shared."""
        backend = new_backend()
        host_namespace = os.stat("/proc/self/ns/net").st_ino
        seen: dict[str, list[str]] = {}
        namespaces = set()
        for name in ("first", "second"):
            _sandbox, network = pod_setup(backend, name)
            assert network.netns_path and namespace_alive(network.netns_path), (
                f"network_pod_setup: netns_path {network.netns_path!r} is not a mounted namespace"
            )
            inode = os.stat(network.netns_path).st_ino
            assert inode != host_namespace, "network_pod_setup: the pod got the node's own network namespace"
            namespaces.add(inode)
            inside = addresses_inside(network.netns_path)
            assert "127.0.0.1" in inside, f"network_pod_setup: loopback is not up in the pod ({inside})"
            if self.gives_addresses:
                assert network.ips, "network_pod_setup: no pod IP reported"
            for ip in network.ips:
                ipaddress.ip_address(ip)  # a bare address, no prefix length
                assert ip in inside, f"network_pod_setup: reported IP {ip} is not in the pod's namespace ({inside})"
            seen[name] = list(network.ips)
        assert len(namespaces) == 2, "network_pod_setup: two pods share a namespace"
        assert not set(seen["first"]) & set(seen["second"]), f"network_pod_setup: two pods share an address: {seen}"

    def test_teardown_removes_the_namespace_and_is_idempotent(
        self, new_backend: Callable[[], LoadedPlugin], pod_setup: PodSetup
    ) -> None:
        """network_pod_teardown: the namespace is gone, and a second teardown (a retried RPC) succeeds."""
        backend = new_backend()
        sandbox, network = pod_setup(backend, "once")
        backend.call("network_pod_teardown", sandbox=sandbox, network=network)
        assert not namespace_alive(network.netns_path), "network_pod_teardown: the namespace is still mounted"
        backend.call("network_pod_teardown", sandbox=sandbox, network=network)

    def test_teardown_after_a_restart(self, new_backend: Callable[[], LoadedPlugin], pod_setup: PodSetup) -> None:
        """network_pod_teardown on a new instance, with the PodNetwork as shimhub persisted it."""
        sandbox, network = pod_setup(new_backend(), "kept")
        persisted = json.loads(json.dumps(converter.unstructure(network)))
        restarted = new_backend()
        restored = converter.structure(persisted, PodNetwork)
        assert restored == network, "network_pod_setup: PodNetwork.data does not survive JSON"
        restarted.call("network_pod_teardown", sandbox=sandbox, network=restored)
        assert not namespace_alive(network.netns_path), "network_pod_teardown after a restart left the namespace"
        if self.gives_addresses:
            again, renewed = pod_setup(restarted, "kept-again")
            assert renewed.ips, "network_pod_setup after a restart: no pod IP"
            assert again.id != sandbox.id

    def test_teardown_after_a_crash_during_setup(
        self, new_backend: Callable[[], LoadedPlugin], pod_setup: PodSetup
    ) -> None:
        """network_pod_teardown with an empty PodNetwork: shimhub died before it could save what setup returned."""
        sandbox, network = pod_setup(new_backend(), "crashed")
        restarted = new_backend()
        restarted.call("network_pod_teardown", sandbox=sandbox, network=PodNetwork())
        assert not namespace_alive(network.netns_path), (
            "network_pod_teardown: given no PodNetwork (a crash during setup), the namespace was left; "
            "find it from the sandbox id"
        )
        if self.gives_addresses:
            again, renewed = pod_setup(restarted, "after-crash")
            assert renewed.ips and again.id != sandbox.id, "network_pod_setup after a crash: no pod IP"
