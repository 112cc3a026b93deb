"""The conformance kit's answer to a plugin that is not ready: a skip, or a failure where the node requires it."""

from __future__ import annotations

import pytest

from shimhub.testing import readiness

pytestmark = pytest.mark.unit


def test_not_ready_skips_a_plugin_the_node_does_not_require(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(readiness.REQUIRE_READY_ENV, "runc, overlay")
    with pytest.raises(pytest.skip.Exception, match="'aufs' is not ready on this node: no aufs"):
        readiness.not_ready("storage", "aufs", "no aufs")


@pytest.mark.parametrize("required", ["runc,kata", "*"])
def test_not_ready_fails_a_plugin_the_node_requires(monkeypatch: pytest.MonkeyPatch, required: str) -> None:
    monkeypatch.setenv(readiness.REQUIRE_READY_ENV, required)
    with pytest.raises(pytest.fail.Exception, match=r"'kata' is not ready on this node: no qemu .*requires it"):
        readiness.not_ready("runtime", "kata", "no qemu")
