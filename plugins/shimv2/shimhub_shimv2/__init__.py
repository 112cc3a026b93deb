"""shimhub runtime plugin for containerd shim v2 binaries (runc v2 shim, runsc's, Kata's), driven over ttrpc."""

__version__ = "0.1.0"
