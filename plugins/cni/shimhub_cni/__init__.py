"""shimhub's CNI network backend."""

__version__ = "0.1.0"
