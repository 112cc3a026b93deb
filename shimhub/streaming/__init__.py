"""The streaming server: Exec, Attach and PortForward sessions over SPDY/3.1 and WebSocket.

The CRI's Exec, Attach and PortForward RPCs do no streaming themselves: each
stores its request under a single-use token (``requests``) and answers with a
URL on this server. The kubelet (or kubectl, crictl) connects there and
upgrades the connection either to SPDY/3.1 (``spdy``) or to a WebSocket (the
``websockets`` library, wrapped in ``websocket``); ``remotecommand`` and
``portforward`` speak the Kubernetes protocols on top of either, and
``server`` ties it together. What runs is the runtime plugin's business,
reached through the runtime_exec / runtime_attach / runtime_port_forward hooks.
"""
