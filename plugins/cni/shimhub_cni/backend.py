"""CniNetwork: pod networks from the CNI plugin binaries.

Options (all optional):

    conf_dir = "/etc/cni/net.d"                  # the first valid file (name order) is the network
    bin_dirs = ["/opt/cni/bin", "/usr/lib/cni"]
    ifname = "eth0"
    timeout = 30.0                               # seconds per plugin call

Each pod gets a network namespace pinned under /run/netns; ADD runs the
network's plugins in order, each given the previous one's result. The final
result, the exact config and the arguments are cached on disk so that DEL,
in reverse order, gets them even after a shimhub restart; DEL is idempotent
and works when the namespace is already gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shimhub.sdk import (
    FailedPrecondition,
    PluginContext,
    PodNetwork,
    Readiness,
    SandboxRecord,
    hookimpl,
    netns,
    plugin_options,
    write_atomically,
)
from shimhub_cni import invoke
from shimhub_cni.conf import ConfigDirectory, NetworkList
from shimhub_proto.cri.v1 import api_pb2 as cri

OPTIONS: dict[str, Any] = {
    "conf_dir": "/etc/cni/net.d",
    "bin_dirs": ["/opt/cni/bin", "/usr/lib/cni"],
    "ifname": "eth0",
    "timeout": 30.0,
}
_PROTOCOLS = {cri.TCP: "tcp", cri.UDP: "udp", cri.SCTP: "sctp"}
BANDWIDTH_ANNOTATIONS = ("kubernetes.io/ingress-bandwidth", "kubernetes.io/egress-bandwidth")


def _quantity(text: str) -> int:
    """Bits per second of a Kubernetes quantity such as "10M" or "1Gi"."""
    units = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * units[suffix])
    return int(float(text))


def capability_values(config: cri.PodSandboxConfig) -> dict[str, Any]:
    """The runtime values a plugin may ask for through its "capabilities"."""
    values: dict[str, Any] = {
        "portMappings": [
            {
                "hostPort": p.host_port,
                "containerPort": p.container_port,
                "protocol": _PROTOCOLS[p.protocol],
                **({"hostIP": p.host_ip} if p.host_ip else {}),
            }
            for p in config.port_mappings
            if p.host_port > 0
        ],
        "dns": {
            "nameservers": list(config.dns_config.servers),
            "search": list(config.dns_config.searches),
            "options": list(config.dns_config.options),
        },
    }
    ingress, egress = (config.annotations.get(key) for key in BANDWIDTH_ANNOTATIONS)
    if ingress or egress:
        values["bandwidth"] = {
            **({"ingressRate": _quantity(ingress), "ingressBurst": 2**31 - 1} if ingress else {}),
            **({"egressRate": _quantity(egress), "egressBurst": 2**31 - 1} if egress else {}),
        }
    requested = config.annotations.get("cni.shimhub.io/ips")
    if requested:
        values["ips"] = [ip.strip() for ip in requested.split(",") if ip.strip()]
    return values


class CniNetwork:
    """The `cni` network backend."""

    shimhub_api = "1.0"

    def __init__(self) -> None:
        self.options: dict[str, Any] = dict(OPTIONS)
        self.configs = ConfigDirectory(Path(OPTIONS["conf_dir"]))
        self.cache = Path()
        self.log = logging.getLogger(__name__)

    @hookimpl
    def network_setup(self, options: Mapping[str, Any], context: PluginContext) -> Readiness:
        self.options = plugin_options.validated(options, OPTIONS)
        self.configs = ConfigDirectory(Path(self.options["conf_dir"]))
        self.cache = context.state_dir / "results"
        self.cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log = context.log
        return self.network_readiness()

    @hookimpl
    def network_readiness(self) -> Readiness:
        network, problem = self.configs.network()
        if network is None:
            return Readiness(ready=False, reason=problem)
        missing = [p["type"] for p in network.plugins if not _findable(p["type"], self.options["bin_dirs"])]
        if missing:
            return Readiness(
                ready=False,
                reason=f"network {network.name} ({network.source}) needs CNI plugin(s) "
                f"{', '.join(missing)}, not found in {', '.join(self.options['bin_dirs'])}",
            )
        return Readiness(ready=True, info={"network": network.name, "config": network.source})

    def _args(self, sandbox: SandboxRecord, config: cri.PodSandboxConfig) -> str:
        metadata = config.metadata
        return (
            f"IgnoreUnknown=1;K8S_POD_NAMESPACE={metadata.namespace};K8S_POD_NAME={metadata.name};"
            f"K8S_POD_INFRA_CONTAINER_ID={sandbox.id};K8S_POD_UID={metadata.uid}"
        )

    def _stdin(
        self,
        network: NetworkList,
        plugin: dict[str, Any],
        capabilities: dict[str, Any],
        previous: dict[str, Any] | None,
    ) -> dict[str, Any]:
        stdin = {**plugin, "name": network.name, "cniVersion": network.cni_version}
        wanted = {name for name, enabled in (plugin.get("capabilities") or {}).items() if enabled}
        runtime_config = {name: value for name, value in capabilities.items() if name in wanted}
        if runtime_config:
            stdin["runtimeConfig"] = runtime_config
        if previous:
            stdin["prevResult"] = previous
        return stdin

    def _call(
        self, command: str, plugin: dict[str, Any], *, sandbox_id: str, path: str, args: str, stdin: dict[str, Any]
    ) -> dict[str, Any]:
        return invoke.run(
            command,
            plugin,
            bin_dirs=list(self.options["bin_dirs"]),
            container_id=sandbox_id,
            netns=path,
            ifname=self.options["ifname"],
            args=args,
            stdin=stdin,
            timeout=float(self.options["timeout"]),
        )

    @hookimpl
    def network_pod_setup(self, sandbox: SandboxRecord, config: cri.PodSandboxConfig) -> PodNetwork:
        network, problem = self.configs.network()
        if network is None:
            raise FailedPrecondition(f"pod network is not ready: {problem}")
        path = netns.create(netns.pod_name(sandbox.id))
        args = self._args(sandbox, config)
        capabilities = capability_values(config)
        cached = {
            "network": network.document,
            "args": args,
            "ifname": self.options["ifname"],
            "capabilities": capabilities,
            "result": None,
        }
        cache_file = self.cache / f"{sandbox.id}.json"
        write_atomically(cache_file, json.dumps(cached).encode())  # DEL can undo a half-done ADD after a crash
        result: dict[str, Any] | None = None
        try:
            for plugin in network.plugins:
                stdin = self._stdin(network, plugin, capabilities, result)
                result = self._call("ADD", plugin, sandbox_id=sandbox.id, path=path, args=args, stdin=stdin) or result
        except BaseException:
            try:
                self._delete(sandbox.id, path, cached)
            except Exception as cleanup:  # noqa: BLE001 - the ADD error is the one to report
                self.log.warning("undoing the failed ADD of pod %s: %s", sandbox.id[:12], cleanup)
                cache_file.unlink(missing_ok=True)
            raise
        cached["result"] = result
        write_atomically(cache_file, json.dumps(cached).encode())
        ips = invoke.result_ips(result or {})
        self.log.info("pod %s on network %s: %s", sandbox.id[:12], network.name, ", ".join(ips) or "no IP")
        return PodNetwork(netns_path=path, ips=ips, data={"network": network.name})

    def _delete(self, sandbox_id: str, path: str, cached: dict[str, Any]) -> None:
        network = _cached_network(cached)
        problems = []
        netns_path = path if path and os.path.exists(path) else ""
        for plugin in reversed(network.plugins):
            try:
                stdin = self._stdin(network, plugin, cached.get("capabilities", {}), cached.get("result"))
                self._call("DEL", plugin, sandbox_id=sandbox_id, path=netns_path, args=cached["args"], stdin=stdin)
            except Exception as exc:  # noqa: BLE001 - every plugin gets its DEL; the failures are reported together
                problems.append(str(exc))
        netns.delete(path)
        if problems:
            raise FailedPrecondition("pod network teardown failed: " + "; ".join(problems))
        (self.cache / f"{sandbox_id}.json").unlink(missing_ok=True)

    @hookimpl
    def network_pod_teardown(self, sandbox: SandboxRecord, network: PodNetwork) -> None:
        path = network.netns_path or netns.pod_path(sandbox.id)  # no path: shimhub crashed during setup
        cache_file = self.cache / f"{sandbox.id}.json"
        try:
            cached = json.loads(cache_file.read_text())
        except FileNotFoundError:
            netns.delete(path)  # nothing was added, or it was all deleted already
            return
        self._delete(sandbox.id, path, cached)

    @hookimpl
    def network_pod_check(self, sandbox: SandboxRecord, network: PodNetwork) -> None:
        cached = json.loads((self.cache / f"{sandbox.id}.json").read_text())
        listed = _cached_network(cached)
        for plugin in listed.plugins:
            stdin = self._stdin(listed, plugin, cached.get("capabilities", {}), cached.get("result"))
            self._call(
                "CHECK", plugin, sandbox_id=sandbox.id, path=network.netns_path, args=cached["args"], stdin=stdin
            )


def _cached_network(cached: dict[str, Any]) -> NetworkList:
    """The network list a pod was set up with, from its cached ADD."""
    document = cached["network"]
    return NetworkList(
        name=document["name"],
        cni_version=document["cniVersion"],
        plugins=document["plugins"],
        source="cache",
        document=document,
    )


def _findable(kind: str, bin_dirs: list[str]) -> bool:
    with contextlib.suppress(FailedPrecondition):
        invoke.find_plugin(kind, bin_dirs)
        return True
    return False
