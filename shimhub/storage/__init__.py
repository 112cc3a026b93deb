"""Storage drivers: image layers and container root filesystems, one module per driver."""
