"""shimhub's runtime plugin for OCI runtimes with a runc-compatible command line, monitored by conmon."""

__version__ = "0.1.0"
