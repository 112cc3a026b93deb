"""Pods whose record was lost (unreadable on disk) while their containers' records were not.

Their containers' processes, mounts and cgroups, and the pod's namespaces, network and
directory may still be on the node. At start, shimhub rebuilds a record for each such
pod from what is left: the handler its containers' records name, else the one the
damaged record names where that can be read, else the default one. Then it removes the
pod as any other: containers through its runtime, then the pod, its network and its
directory. Until that has worked, the pod is listed NOTREADY with the label
ORPHAN_LABEL, so the kubelet's garbage collection and `shimhub orphans --remove` can
remove it too.
"""

from __future__ import annotations

import re

from shimhub.records import PENDING_REMOVE, SANDBOX_NOTREADY, ContainerRecord, SandboxRecord

#: The label of a pod rebuilt for orphaned containers.
ORPHAN_LABEL = "io.shimhub.orphan"
#: The namespace such pods are listed in.
ORPHAN_NAMESPACE = "shimhub-orphans"
_HANDLER = re.compile(rb'"handler"\s*:\s*"([A-Za-z0-9._-]{1,63})"')


def rebuilt_pod(
    sandbox_id: str, containers: list[ContainerRecord], damaged: bytes, default_handler: str
) -> SandboxRecord:
    """A record of the lost pod `sandbox_id`, marked for removal."""
    named = sorted({container.handler for container in containers if container.handler})
    found = _HANDLER.search(damaged)
    handler = named[0] if named else found.group(1).decode() if found else default_handler
    name = f"orphaned-{sandbox_id[:12]}"
    metadata = {"name": name, "namespace": ORPHAN_NAMESPACE, "uid": sandbox_id, "attempt": 0}
    return SandboxRecord(
        id=sandbox_id,
        name=f"{name}_{ORPHAN_NAMESPACE}_{sandbox_id}_0",
        handler=handler,
        created_at=min(container.created_at for container in containers),
        config={"metadata": metadata, "labels": {ORPHAN_LABEL: "true"}},
        state=SANDBOX_NOTREADY,
        pending=PENDING_REMOVE,
    )
