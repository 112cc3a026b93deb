"""Choosing the runtime handler of a pod, and what its plugin gets to see."""

from __future__ import annotations

import json

import grpc
import pytest

from shimhub.testing.daemon import host_network, pod_config
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT

pytestmark = NEEDS_ROOT

CONFIG = """
default_runtime = "standard"
untrusted_runtime = "sealed"
handler_annotation = "shimhub.io/runtime-handler"
[runtimes.standard]
plugin = "proc"
[runtimes.fast]
plugin = "proc"
selectable = true
[runtimes.sealed]
plugin = "proc"
allowed_annotations = ["io.katacontainers.config.hypervisor."]
[network]
backend = "host"
"""


@pytest.fixture
def rt(daemon_factory):
    return daemon_factory(CONFIG).start().runtime


def run(rt, runtime_handler: str = "", annotations: dict[str, str] | None = None, name: str = "p") -> str:
    config = pod_config(name=name, annotations=annotations or {}, linux=host_network())
    request = cri.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
    return rt.RunPodSandbox(request).pod_sandbox_id


def handler_of(rt, pod_id: str) -> str:
    return rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status.runtime_handler


def rpc_error(call, *args):
    with pytest.raises(grpc.RpcError) as caught:
        call(*args)
    return caught.value.code(), caught.value.details()


def test_named_handler(rt) -> None:
    assert handler_of(rt, run(rt, "fast")) == "fast"


def test_empty_handler_is_the_default(rt) -> None:
    assert handler_of(rt, run(rt, "")) == "standard"


def test_unknown_handler_is_rejected_before_anything_is_made(rt) -> None:
    code, details = rpc_error(run, rt, "gvisor")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "unknown runtime handler 'gvisor' (configured: fast, runc, sealed, standard)"
    assert list(rt.ListPodSandbox(cri.ListPodSandboxRequest()).items) == []


def test_annotation_selects_a_selectable_handler(rt) -> None:
    assert handler_of(rt, run(rt, "", {"shimhub.io/runtime-handler": "fast"})) == "fast"


def test_annotation_may_not_select_a_handler_that_is_not_selectable(rt) -> None:
    code, details = rpc_error(run, rt, "", {"shimhub.io/runtime-handler": "sealed"})
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details == (
        "runtime handler 'sealed' may not be selected by annotation shimhub.io/runtime-handler: "
        "set selectable = true in [runtimes.sealed] to allow it"
    )
    code, details = rpc_error(run, rt, "", {"shimhub.io/runtime-handler": "nope"})
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "annotation shimhub.io/runtime-handler names unknown runtime handler 'nope'"


def test_runtime_class_wins_over_the_annotation(rt) -> None:
    assert handler_of(rt, run(rt, "standard", {"shimhub.io/runtime-handler": "fast"})) == "standard"


def test_legacy_untrusted_annotation_selects_the_untrusted_handler(rt) -> None:
    assert handler_of(rt, run(rt, "", {"io.kubernetes.cri-o.TrustedSandbox": "false"})) == "sealed"
    assert handler_of(rt, run(rt, "", {"io.kubernetes.cri-o.TrustedSandbox": "true"}, name="q")) == "standard"


def test_plugin_sees_only_allowed_annotations_and_status_returns_all(rt) -> None:
    annotations = {
        "io.katacontainers.config.hypervisor.default_vcpus": "2",
        "io.katacontainers.config.agent.debug": "true",
        "example.com/owner": "team-a",
    }
    pod_id = run(rt, "sealed", annotations)
    response = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
    seen = json.loads(response.info["info"])["runtime_data"]["annotations_seen"]
    assert seen == {"io.katacontainers.config.hypervisor.default_vcpus": "2"}
    assert dict(response.status.annotations) == annotations
    other = run(rt, "standard", annotations, name="other")
    response = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=other, verbose=True))
    assert json.loads(response.info["info"])["runtime_data"]["annotations_seen"] == {}
