"""Validation of a plugin instance's options table against the plugin's defaults."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shimhub.errors import ConfigError


def validated(options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """`defaults` updated with `options`; ConfigError for an unknown key or a value of the wrong type.

    A value must have exactly its default's type (a boolean is no integer), except
    that an integer may stand for a float; a list default takes a list of strings.
    """
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(defaults)) or 'none'}")
    for key, value in options.items():
        expected = type(defaults[key])
        if expected is list:
            if type(value) is not list or not all(isinstance(item, str) for item in value):
                raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        elif type(value) is not expected and not (expected is float and type(value) is int):
            raise ConfigError(f"{key}: expected {expected.__name__}, got {value!r}")
    return {**defaults, **options}
