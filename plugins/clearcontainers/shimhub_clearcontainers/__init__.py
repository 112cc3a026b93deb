"""shimhub runtime plugin for Clear-Containers-style VM pods."""

__version__ = "0.1.0"
