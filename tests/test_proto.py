"""The CRI schema: stubs are fresh, and the wire contract matches the kubelet's runtime.v1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shimhub_proto.cri.v1 import api_pb2 as cri

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parent.parent
PROTO_DIR = ROOT / "proto"
SCHEMA = "shimhub_proto/cri/v1/api.proto"
#: The schemas spoken over ttrpc to containerd shims: messages only, no gRPC stubs.
TTRPC_SCHEMAS = sorted(
    str(path.relative_to(PROTO_DIR))
    for path in (PROTO_DIR / "shimhub_proto").glob("*/**/*.proto")
    if "cri" not in path.parts
)


def _generate(out: Path, schemas: list[str], grpc_stubs: bool) -> None:
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={out}", f"--pyi_out={out}"]
    if grpc_stubs:
        command.append(f"--grpc_python_out={out}")
    subprocess.run([*command, *(str(PROTO_DIR / schema) for schema in schemas)], check=True)


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    _generate(tmp_path, [SCHEMA], grpc_stubs=True)
    _generate(tmp_path, TTRPC_SCHEMAS, grpc_stubs=False)
    generated = sorted(tmp_path.rglob("*_pb2*.py*"))
    assert len(generated) == 3 + 2 * len(TTRPC_SCHEMAS)
    for fresh in generated:
        committed = PROTO_DIR / fresh.relative_to(tmp_path)
        assert committed.exists() and fresh.read_text() == committed.read_text(), (
            f"{committed.name} is stale: run `make proto` (see README)"
        )


RUNTIME_METHODS = {
    "Version",
    "RunPodSandbox",
    "StopPodSandbox",
    "RemovePodSandbox",
    "PodSandboxStatus",
    "ListPodSandbox",
    "StreamPodSandboxes",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "ListContainers",
    "StreamContainers",
    "ContainerStatus",
    "UpdateContainerResources",
    "ReopenContainerLog",
    "ExecSync",
    "Exec",
    "Attach",
    "PortForward",
    "ContainerStats",
    "ListContainerStats",
    "StreamContainerStats",
    "PodSandboxStats",
    "ListPodSandboxStats",
    "StreamPodSandboxStats",
    "UpdateRuntimeConfig",
    "Status",
    "CheckpointContainer",
    "GetContainerEvents",
    "ListMetricDescriptors",
    "ListPodSandboxMetrics",
    "StreamPodSandboxMetrics",
    "RuntimeConfig",
    "UpdatePodSandboxResources",
}
IMAGE_METHODS = {"ListImages", "StreamImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo"}
STREAMING = {
    "StreamPodSandboxes",
    "StreamContainers",
    "StreamContainerStats",
    "StreamPodSandboxStats",
    "GetContainerEvents",
    "StreamPodSandboxMetrics",
    "StreamImages",
}


def test_services_have_every_method_with_the_right_shape() -> None:
    assert cri.DESCRIPTOR.package == "runtime.v1"
    runtime = cri.DESCRIPTOR.services_by_name["RuntimeService"]
    image = cri.DESCRIPTOR.services_by_name["ImageService"]
    assert {m.name for m in runtime.methods} == RUNTIME_METHODS
    assert {m.name for m in image.methods} == IMAGE_METHODS
    for method in [*runtime.methods, *image.methods]:
        assert method.server_streaming == (method.name in STREAMING), method.name
        assert not method.client_streaming
    assert runtime.methods_by_name["GetContainerEvents"].input_type.name == "GetEventsRequest"
    assert runtime.methods_by_name["GetContainerEvents"].output_type.name == "ContainerEventResponse"


# (message, field, number, type name) for fields whose numbers are out of order upstream or easy to get wrong.
FIELDS = [
    ("ImageSpec", "user_specified_image", 18, "string"),
    ("ImageSpec", "runtime_handler", 19, "string"),
    ("ImageSpec", "image_ref", 20, "string"),
    ("LinuxSandboxSecurityContext", "run_as_group", 8, "Int64Value"),
    ("LinuxSandboxSecurityContext", "seccomp", 9, "SecurityProfile"),
    ("LinuxSandboxSecurityContext", "supplemental_groups_policy", 11, "SupplementalGroupsPolicy"),
    ("LinuxContainerSecurityContext", "run_as_group", 12, "Int64Value"),
    ("LinuxContainerSecurityContext", "no_new_privs", 11, "bool"),
    ("LinuxContainerSecurityContext", "supplemental_groups_policy", 17, "SupplementalGroupsPolicy"),
    ("ContainerConfig", "CDI_devices", 17, "CDIDevice"),
    ("ContainerConfig", "stop_signal", 18, "Signal"),
    ("ContainerStatus", "user", 18, "ContainerUser"),
    ("ContainerStatus", "stop_signal", 19, "Signal"),
    ("Container", "image_id", 10, "string"),
    ("Mount", "uidMappings", 6, "IDMapping"),
    ("Mount", "image_sub_path", 10, "string"),
    ("LinuxContainerResources", "memory_swap_limit_in_bytes", 10, "int64"),
    ("PodSandboxStatusResponse", "containers_statuses", 3, "ContainerStatus"),
    ("PodSandboxStatusResponse", "timestamp", 4, "int64"),
    ("StatusResponse", "features", 4, "RuntimeFeatures"),
    ("ExecRequest", "audit_request_id", 7, "string"),
    ("AttachRequest", "audit_request_id", 6, "string"),
    ("KeyValue", "value", 2, "string"),
    ("AuthConfig", "registry_token", 6, "string"),
    ("PsiStats", "Full", 1, "PsiData"),
    ("PsiData", "Avg300", 4, "double"),
    ("MemoryUsage", "psi", 8, "PsiStats"),
    ("ContainerStats", "io", 6, "IoUsage"),
    ("LinuxPodSandboxStats", "io", 6, "IoUsage"),
    ("Namespace", "options", 2, "NamespaceOption"),
    ("UpdatePodSandboxResourcesRequest", "resources", 3, "LinuxContainerResources"),
    ("RuntimeConfigResponse", "linux", 1, "LinuxRuntimeConfiguration"),
    ("StreamPodSandboxStatsResponse", "pod_sandbox_stats", 1, "PodSandboxStats"),
]
SCALARS = {9: "string", 8: "bool", 3: "int64", 1: "double", 4: "uint64", 5: "int32", 13: "uint32", 12: "bytes"}


@pytest.mark.parametrize(("message", "field", "number", "type_name"), FIELDS)
def test_field_numbers_and_types(message: str, field: str, number: int, type_name: str) -> None:
    descriptor = cri.DESCRIPTOR.message_types_by_name[message].fields_by_name[field]
    assert descriptor.number == number
    actual = descriptor.message_type or descriptor.enum_type
    assert (actual.name if actual else SCALARS[descriptor.type]) == type_name


def test_enum_values() -> None:
    assert cri.Signal.Value("SIGRTMAX") == 65
    assert cri.SecurityProfile.ProfileType.Value("Localhost") == 2
    assert cri.ContainerEventType.Value("CONTAINER_DELETED_EVENT") == 3
    assert cri.CgroupDriver.Value("CGROUPFS") == 1
    assert cri.NamespaceMode.Value("TARGET") == 3
