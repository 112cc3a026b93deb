"""ExecSync, and Exec, Attach and PortForward, which answer a URL of the streaming server."""

from __future__ import annotations

import grpc

from shimhub.services.runtime.room import Room
from shimhub_proto.cri.v1 import api_pb2 as cri


class StreamingCalls(Room):
    """ExecSync, and Exec, Attach and PortForward, which answer a URL of the streaming server."""

    def ExecSync(self, request: cri.ExecSyncRequest, context: grpc.ServicerContext) -> cri.ExecSyncResponse:
        result = self.daemon.containers.exec_sync(request.container_id, list(request.cmd), request.timeout)
        return cri.ExecSyncResponse(stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code)

    def Exec(self, request: cri.ExecRequest, context: grpc.ServicerContext) -> cri.ExecResponse:
        return cri.ExecResponse(url=self.streaming.url("exec", self.daemon.containers.exec_request(request)))

    def Attach(self, request: cri.AttachRequest, context: grpc.ServicerContext) -> cri.AttachResponse:
        return cri.AttachResponse(url=self.streaming.url("attach", self.daemon.containers.attach_request(request)))

    def PortForward(self, request: cri.PortForwardRequest, context: grpc.ServicerContext) -> cri.PortForwardResponse:
        forward = self.daemon.pods.port_forward_request(request)
        return cri.PortForwardResponse(url=self.streaming.url("portforward", forward))
