"""A pod's cgroup parent must be in the form of the node's cgroup driver, as the kubelet sends it."""

from __future__ import annotations

import pytest

from shimhub.errors import InvalidArgument
from shimhub.validation import check_cgroup_parent

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("parent", "driver"),
    [
        ("", "systemd"),
        ("", "cgroupfs"),
        ("kubepods-burstable-pod0a1b.slice", "systemd"),
        ("kubepods.slice", "systemd"),
        ("/kubepods/burstable/pod0a1b", "cgroupfs"),
        ("kubepods/besteffort", "cgroupfs"),
    ],
)
def test_the_kubelets_forms_are_taken(parent: str, driver: str) -> None:
    check_cgroup_parent(parent, driver)


@pytest.mark.parametrize(
    ("parent", "driver", "says"),
    [
        ("/kubepods/burstable/pod0a1b", "systemd", "is not a systemd slice name"),
        ("kubepods.slice/kubepods-burstable.slice", "systemd", "is not a systemd slice name"),
        ("kubepods-burstable-pod0a1b.slice", "cgroupfs", "is a systemd slice name"),
        ("/kubepods/../../escape", "cgroupfs", "climbs with '..'"),
    ],
)
def test_the_other_drivers_form_is_invalid_argument(parent: str, driver: str, says: str) -> None:
    with pytest.raises(InvalidArgument, match=says):
        check_cgroup_parent(parent, driver)
