"""NRI, the Node Resource Interface: the runtime side, for the node's unmodified NRI plugins.

NRI plugins are processes of their own that connect to ``[nri] socket`` (or
that shimhub starts from ``[nri] plugin_path`` on a socket it hands them).
Each connection is multiplexed (`mux`): the plugin serves the NRI Plugin
service over ttrpc on connection 1, shimhub serves the Runtime service on
connection 2 (`plugin`). Plugins register, are configured, synchronized with
the pods and containers of the node, then told of the lifecycle events they
subscribed to (`runtime`); what they ask of a container being created is
applied to its OCI spec where shimhub's own extensions adjust it, and checked
the same way (`adjust`).
"""
