"""Version, Status, RuntimeConfig, UpdateRuntimeConfig."""

from __future__ import annotations

import json

import grpc

from shimhub import __version__, userns
from shimhub.services.runtime.room import Room
from shimhub_proto.cri.v1 import api_pb2 as cri

#: CRI API version reported by Version.
CRI_VERSION = "v1"


class NodeCalls(Room):
    """Version, Status, RuntimeConfig, UpdateRuntimeConfig."""

    def Version(self, request: cri.VersionRequest, context: grpc.ServicerContext) -> cri.VersionResponse:
        return cri.VersionResponse(
            version="0.1.0", runtime_name="shimhub", runtime_version=__version__, runtime_api_version=CRI_VERSION
        )

    def Status(self, request: cri.StatusRequest, context: grpc.ServicerContext) -> cri.StatusResponse:
        daemon = self.daemon
        registry = daemon.handlers
        default = registry.handlers[registry.config.default_runtime]
        default_ready = default.backend.readiness()
        network_ready = daemon.network.readiness()
        conditions = [
            cri.RuntimeCondition(
                type="RuntimeReady",
                status=default_ready.ready,
                reason="" if default_ready.ready else "DefaultHandlerNotReady",
                message="" if default_ready.ready else f"runtime handler {default.name!r}: {default_ready.reason}",
            ),
            cri.RuntimeCondition(
                type="NetworkReady",
                status=network_ready.ready,
                reason="" if network_ready.ready else "NetworkPluginNotReady",
                message="" if network_ready.ready else f"{daemon.network.role}: {network_ready.reason}",
            ),
        ]
        handlers: list[cri.RuntimeHandler] = []
        disabled: list[str] = []
        for name, handler in sorted(registry.handlers.items()):
            readiness = handler.backend.readiness()
            if not readiness.ready:
                disabled.append(f"{name}: {readiness.reason}")
                continue
            features = cri.RuntimeHandlerFeatures(
                recursive_read_only_mounts=readiness.features.recursive_read_only_mounts,
                user_namespaces=not userns.unsupported(readiness.features),
            )
            handlers.append(cri.RuntimeHandler(name=name, features=features))
            if handler is default:
                handlers.append(cri.RuntimeHandler(name="", features=features))
        conditions.append(
            cri.RuntimeCondition(
                type="RuntimeHandlersReady",
                status=not disabled,
                reason="HandlersDisabled" if disabled else "",
                message="; ".join(disabled),
            )
        )
        info = {"status": json.dumps(daemon.status_info(), sort_keys=True)} if request.verbose else {}
        return cri.StatusResponse(
            status=cri.RuntimeStatus(conditions=conditions),
            runtime_handlers=handlers,
            info=info,
            features=cri.RuntimeFeatures(supplemental_groups_policy=True),
        )

    def RuntimeConfig(
        self, request: cri.RuntimeConfigRequest, context: grpc.ServicerContext
    ) -> cri.RuntimeConfigResponse:
        driver = cri.SYSTEMD if self.daemon.config.cgroup_driver == "systemd" else cri.CGROUPFS
        return cri.RuntimeConfigResponse(linux=cri.LinuxRuntimeConfiguration(cgroup_driver=driver))

    def UpdateRuntimeConfig(
        self, request: cri.UpdateRuntimeConfigRequest, context: grpc.ServicerContext
    ) -> cri.UpdateRuntimeConfigResponse:
        self.daemon.pod_cidr = request.runtime_config.network_config.pod_cidr
        return cri.UpdateRuntimeConfigResponse()
