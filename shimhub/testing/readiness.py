"""What a conformance suite does with a plugin that is not ready on the node: skip, or fail where required.

A plugin author's laptop may lack what a plugin needs, so "not ready" skips
its suite with the reason. On a node that must run the plugin (a CI machine
set up for it), name it in ``SHIMHUB_REQUIRE_READY`` (comma-separated entry
point names, or ``*`` for every plugin): "not ready" then fails the suite, so
a plugin that always answers "not ready" cannot pass.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_READY_ENV = "SHIMHUB_REQUIRE_READY"


def required() -> set[str]:
    """The plugins this node must have ready."""
    return {name.strip() for name in os.environ.get(REQUIRE_READY_ENV, "").split(",") if name.strip()}


def not_ready(kind: str, name: str, reason: str) -> NoReturn:
    """Skip the test, or fail it when `name` must be ready here."""
    message = f"{kind} plugin {name!r} is not ready on this node: {reason}"
    wanted = required()
    if name in wanted or "*" in wanted:
        pytest.fail(f"{message} ({REQUIRE_READY_ENV} requires it)")
    pytest.skip(message)
