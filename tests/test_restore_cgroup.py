"""A checkpoint archive names the cgroup its processes ran in: only a container cgroup's shape is looked in."""

from __future__ import annotations

import pytest

from shimhub_runc.runtime import container_cgroup

pytestmark = pytest.mark.unit
ID = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("path", "taken"),
    [
        (f"/shimhub/shimhub-{ID}", True),
        (f"/kubepods/burstable/pod-uid/shimhub-{ID}", True),
        (f"kubepods-burstable.slice:shimhub:{ID}", True),
        ("/", False),
        ("/system.slice", False),
        ("/kubepods", False),
        (f"/shimhub/shimhub-{ID}/../../system.slice", False),
        (f"system.slice:docker:{ID}", False),
        (f"/shimhub/shimhub-{ID[:12]}", False),
    ],
)
def test_only_container_cgroups_are_taken_from_an_archive(path: str, taken: bool) -> None:
    assert container_cgroup(path) == (path if taken else "")
