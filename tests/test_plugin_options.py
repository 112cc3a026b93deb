"""Plugin options checked against a plugin's defaults."""

from __future__ import annotations

import pytest

from shimhub.errors import ConfigError
from shimhub.plugin_options import validated

pytestmark = pytest.mark.unit

DEFAULTS = {"binary": "runc", "timeout": 30.0, "size_gib": 10, "args": [], "strict": True}


def test_options_override_defaults() -> None:
    merged = validated({"timeout": 5, "args": ["--debug"]}, DEFAULTS)
    assert merged == {**DEFAULTS, "timeout": 5, "args": ["--debug"]}
    assert validated({}, DEFAULTS) == DEFAULTS


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"colour": "red", "binary": "x"}, "unknown option(s) colour; known: args, binary, size_gib, strict, timeout"),
        ({"size_gib": True}, "size_gib: expected int, got True"),
        ({"size_gib": 1.5}, "size_gib: expected int, got 1.5"),
        ({"timeout": "5"}, "timeout: expected float, got '5'"),
        ({"args": "--debug"}, "args: expected a list of strings, got '--debug'"),
        ({"args": ["--x", 3]}, "args: expected a list of strings, got ['--x', 3]"),
        ({"strict": 1}, "strict: expected bool, got 1"),
    ],
)
def test_wrong_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        validated(options, DEFAULTS)
    assert str(refused.value) == message


def test_a_plugin_without_options_says_so() -> None:
    with pytest.raises(ConfigError, match=r"unknown option\(s\) x; known: none"):
        validated({"x": 1}, {})
