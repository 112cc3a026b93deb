"""The checks on the ID mappings of a pod's user namespace, before anything is made."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from shimhub import userns
from shimhub.config import UserNamespacesConfig
from shimhub.errors import InvalidArgument
from shimhub_proto.cri.v1 import api_pb2 as cri

pytestmark = pytest.mark.unit
ALLOWED = (65536, 1 << 20)


def _pod(options: dict) -> cri.PodSandboxConfig:
    config = cri.PodSandboxConfig()
    json_format.ParseDict(options, config.linux.security_context.namespace_options)
    return config


def _kubelets(base: int = 65536, length: int = 65536) -> dict:
    mapping = [{"host_id": base, "container_id": 0, "length": length}]
    return {"userns_options": {"mode": "POD", "uids": mapping, "gids": mapping}}


def test_the_kubelets_mappings_give_the_pods_root_and_the_oci_form() -> None:
    mappings = userns.check_pod(_pod(_kubelets(131072)), ALLOWED)
    assert mappings is not None
    assert mappings.root == (131072, 131072)
    assert mappings.oci()["uidMappings"] == [{"containerID": 0, "hostID": 131072, "size": 65536}]
    assert userns.Mappings.proc_text(mappings.gids) == "0 131072 65536\n"


def test_no_user_namespace_asked_for() -> None:
    assert userns.check_pod(_pod({"userns_options": {"mode": "NODE"}}), ALLOWED) is None
    assert userns.check_pod(cri.PodSandboxConfig(), ALLOWED) is None  # a client that sends no userns_options


@pytest.mark.parametrize(
    ("options", "why"),
    [
        (_kubelets(0), "outside the ids this node gives pods"),
        (_kubelets(65536 + (1 << 20) - 10), "outside the ids this node gives pods"),
        (_kubelets(length=0), "length 0"),
        ({**_kubelets(), "network": "NODE"}, "cannot share the node's network"),
        ({**_kubelets(), "pid": "NODE", "ipc": "NODE"}, "pid, ipc namespace"),
        ({"userns_options": {"mode": "CONTAINER"}}, "mode CONTAINER is not supported"),
        ({"userns_options": {"mode": "POD", "uids": [{"host_id": 65536, "length": 5}]}}, "needs gid mappings"),
        (
            {
                "userns_options": {
                    "mode": "POD",
                    "uids": [{"host_id": 65536, "length": 10}, {"host_id": 70000, "container_id": 5, "length": 5}],
                    "gids": [{"host_id": 65536, "length": 10}],
                }
            },
            "overlap on the container side",
        ),
    ],
)
def test_refused(options: dict, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        userns.check_pod(_pod(options), ALLOWED)


def test_a_container_joins_its_pods_namespace_or_none() -> None:
    pod = userns.check_pod(_pod(_kubelets()), ALLOWED)
    same = cri.ContainerConfig()
    json_format.ParseDict(_kubelets(), same.linux.security_context.namespace_options)
    userns.check_container(same, pod)
    other = cri.ContainerConfig()
    json_format.ParseDict(_kubelets(196608), other.linux.security_context.namespace_options)
    with pytest.raises(InvalidArgument, match="differ from its pod"):
        userns.check_container(other, pod)
    privileged = cri.ContainerConfig()
    privileged.linux.security_context.privileged = True
    with pytest.raises(InvalidArgument, match="privileged"):
        userns.check_container(privileged, pod)


def test_by_default_no_pod_maps_onto_the_nodes_own_users() -> None:
    """The default range starts where the kubelet's do: a client asking for host id 1000 (a person's
    account on most nodes) is refused."""
    ids = UserNamespacesConfig()
    allowed = (ids.first_host_id, ids.host_id_count)
    assert allowed == (65536, (1 << 32) - 65536)
    with pytest.raises(InvalidArgument, match="outside the ids this node gives pods"):
        userns.check_pod(_pod(_kubelets(1000, 100000)), allowed)
    assert userns.check_pod(_pod(_kubelets(65536)), allowed) is not None
