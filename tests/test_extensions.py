"""Extensions run one by one: a failing one is logged under its name and the others' changes stay."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from shimhub.extensions import Extensions
from shimhub.hookspecs import hookimpl
from shimhub.plugins import register
from shimhub.records import ContainerRecord, SandboxRecord

pytestmark = pytest.mark.unit


class AddsAnnotation:
    shimhub_api = "1.0"

    @hookimpl
    def shimhub_adjust_oci_spec(self, spec: dict[str, Any]) -> None:
        spec.setdefault("annotations", {})["example.com/adjusted"] = "yes"


class Breaks:
    shimhub_api = "1.0"

    @hookimpl
    def shimhub_adjust_oci_spec(self, container: ContainerRecord) -> None:
        raise RuntimeError(f"cannot adjust {container.id}")

    @hookimpl
    def shimhub_lifecycle_event(self, event: str) -> None:
        raise RuntimeError(f"cannot observe {event}")


SANDBOX = SandboxRecord(id="s1", name="web_default_uid_0", handler="runc", created_at=0, config={})
CONTAINER = ContainerRecord(id="c1", sandbox_id="s1", name="app", created_at=0, config={})


def _extensions() -> Extensions:
    extensions = Extensions([])
    register(extensions.manager, AddsAnnotation, "adds-annotation", "adds-annotation")
    register(extensions.manager, Breaks, "breaks", "breaks")
    return extensions


def test_a_failing_extension_is_logged_by_name_and_the_others_apply(caplog: pytest.LogCaptureFixture) -> None:
    spec: dict[str, Any] = {}
    with caplog.at_level(logging.ERROR, logger="shimhub.extensions"):
        _extensions().adjust_oci_spec(SANDBOX, CONTAINER, spec)
    assert spec == {"annotations": {"example.com/adjusted": "yes"}}
    assert "extension 'breaks' failed in shimhub_adjust_oci_spec" in caplog.text
    assert "cannot adjust c1" in caplog.text


def test_the_api_1_hook_relay_spelling_still_adjusts() -> None:
    spec: dict[str, Any] = {}
    _extensions().shimhub_adjust_oci_spec(sandbox=SANDBOX, container=CONTAINER, spec=spec)
    assert spec["annotations"] == {"example.com/adjusted": "yes"}


def test_a_failing_observer_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="shimhub.extensions"):
        _extensions().lifecycle_event("container_started", SANDBOX, None)
    assert "extension 'breaks' failed in shimhub_lifecycle_event" in caplog.text
