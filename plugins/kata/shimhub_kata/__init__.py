"""shimhub runtime plugin for Kata-style VM pods."""

__version__ = "0.1.0"
