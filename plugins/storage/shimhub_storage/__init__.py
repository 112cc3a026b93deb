"""Storage drivers: image layers and container root filesystems, one module per driver."""

__version__ = "0.1.0"
