"""shimhub: a CRI v1 container runtime whose runtimes, storage and networking are plugins."""

__version__ = "0.1.0"
