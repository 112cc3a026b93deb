"""The built-in network backend "host".

Pods with ``network: NODE`` (hostNetwork) share the node's network; shimhub
never calls a backend for them. Pods that ask for a network of their own get
an isolated network namespace with only loopback: they can run, but have no
pod IP and no connectivity. Use the CNI backend for real pod networking.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from typing import Any

from shimhub.sdk import ConfigError, PluginContext, PodNetwork, Readiness, SandboxRecord, hookimpl, netns
from shimhub_proto.cri.v1 import api_pb2 as cri

__version__ = "0.1.0"


class HostNetwork:
    """Network backend for host-network pods; loopback-only namespaces for the rest."""

    shimhub_api = "1.0"

    @hookimpl
    def network_setup(self, options: Mapping[str, Any], context: PluginContext) -> Readiness:
        if options:
            raise ConfigError(f"the host backend takes no options, got {', '.join(sorted(options))}")
        if shutil.which("ip") is None:
            return Readiness(ready=False, reason="the ip command (iproute2) is not installed")
        return Readiness(ready=True)

    @hookimpl
    def network_pod_setup(self, sandbox: SandboxRecord, config: cri.PodSandboxConfig) -> PodNetwork:
        return PodNetwork(netns_path=netns.create(netns.pod_name(sandbox.id)))

    @hookimpl
    def network_pod_teardown(self, sandbox: SandboxRecord, network: PodNetwork) -> None:
        netns.delete(network.netns_path or netns.pod_path(sandbox.id))  # no path: shimhub crashed in setup
