"""Extensions run in pluggy's call loop: edits whole or not at all, refusals fail the container, wrappers run."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from shimhub.errors import FailedPrecondition, Refused
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
    def shimhub_adjust_oci_spec(self, container: ContainerRecord, spec: dict[str, Any]) -> None:
        spec["half"] = "written"
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
    """Breaks raises after the other's edit: the edit survives only because the adjustment runs again
    without Breaks, and nothing Breaks wrote before raising is kept."""
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


class Refuses:
    shimhub_api = "1.6"

    @hookimpl
    def shimhub_adjust_oci_spec(self, spec: dict[str, Any]) -> None:
        spec["process"] = {"args": ["changed"]}
        raise Refused("no GPU for this pod")


class Wraps:
    shimhub_api = "1.6"

    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl(wrapper=True)
    def shimhub_adjust_oci_spec(self, spec: dict[str, Any]) -> Any:
        self.seen.append("before:" + ",".join(sorted(spec.get("annotations", {}))))
        result = yield
        self.seen.append("after:" + ",".join(sorted(spec.get("annotations", {}))))
        spec["annotations"]["example.com/wrapped"] = "yes"
        return result


class First:
    shimhub_api = "1.6"

    @hookimpl(tryfirst=True)
    def shimhub_adjust_oci_spec(self, spec: dict[str, Any]) -> None:
        spec.setdefault("annotations", {})["example.com/order"] = "first"


class Last:
    shimhub_api = "1.6"

    @hookimpl(trylast=True)
    def shimhub_adjust_oci_spec(self, spec: dict[str, Any]) -> None:
        spec.setdefault("annotations", {})["example.com/order"] += ",last"


def test_a_refusing_extension_fails_the_container_and_changes_nothing() -> None:
    extensions = Extensions([])
    register(extensions.manager, AddsAnnotation, "adds-annotation", "adds-annotation")
    register(extensions.manager, Refuses, "gpu-policy", "gpu-policy")
    spec = {"process": {"args": ["sh"]}}
    with pytest.raises(FailedPrecondition, match="extension 'gpu-policy' refused container 'app': no GPU for this pod"):
        extensions.adjust_oci_spec(SANDBOX, CONTAINER, spec)
    assert spec == {"process": {"args": ["sh"]}}


def test_a_wrapper_runs_around_the_others_in_pluggys_order() -> None:
    extensions = Extensions([])
    register(extensions.manager, Last, "last", "last")
    register(extensions.manager, First, "first", "first")
    register(extensions.manager, AddsAnnotation, "adds-annotation", "adds-annotation")
    wrapper = register(extensions.manager, Wraps, "wraps", "wraps")
    spec: dict[str, Any] = {}
    extensions.adjust_oci_spec(SANDBOX, CONTAINER, spec)
    assert spec["annotations"] == {
        "example.com/order": "first,last",
        "example.com/adjusted": "yes",
        "example.com/wrapped": "yes",
    }
    assert wrapper.seen == ["before:", "after:example.com/adjusted,example.com/order"]  # type: ignore[attr-defined]
