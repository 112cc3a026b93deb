"""NRI adjustments applied to an OCI spec: what each kind changes, and what is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shimhub.cdi import Registry
from shimhub.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from shimhub.nri import adjust
from shimhub_proto.cri.v1 import api_pb2 as cri
from shimhub_proto.nri import api_pb2 as nri

pytestmark = pytest.mark.unit
ALL = frozenset(adjust.KINDS)
POD = cri.NamespaceOption()
NO_DEVICES = Registry([])


def _spec() -> dict[str, Any]:
    return {
        "process": {"args": ["sleep", "1"], "env": ["PATH=/bin", "KEEP=1", "DROP=1"], "oomScoreAdj": 0},
        "mounts": [{"destination": "/data", "type": "bind", "source": "/tmp", "options": ["rbind"]}],
        "annotations": {"keep": "1", "drop": "1"},
        "linux": {"resources": {"devices": [{"allow": False, "access": "rwm"}]}},
    }


def test_each_kind_lands_where_the_runtime_reads_it(tmp_path: Path) -> None:
    cdi_spec = {"cdiVersion": "0.6.0", "kind": "example.com/null", "devices": [
        {"name": "one", "containerEdits": {"deviceNodes": [{"path": "/dev/cdi-null", "hostPath": "/dev/null"}]}},
    ]}  # fmt: skip
    (tmp_path / "null.json").write_text(json.dumps(cdi_spec))
    change = nri.ContainerAdjustment(annotations={"added": "yes", "-drop": ""}, args=["sh"])
    change.CDI_devices.add(name="example.com/null=one")
    change.env.add(key="ADDED", value="1")
    change.env.add(key="-DROP")
    change.mounts.add(destination="-/data")
    change.mounts.add(destination="/nri", type="bind", source="/", options=["rbind", "ro"])
    change.hooks.prestart.add(path="/bin/true", args=["true"])
    change.linux.devices.add(path="/dev/nri", type="c", major=1, minor=3)
    change.linux.resources.memory.limit.value = 1 << 26
    change.linux.resources.cpu.cpus = "0-1"
    change.linux.oom_score_adj.value = 500
    change.linux.sysctl["net.ipv4.ip_forward"] = "1"
    change.rlimits.add(type="RLIMIT_NOFILE", hard=1024, soft=512)
    spec = _spec()
    made = adjust.apply(spec, change, ALL, "10-test", POD, devices=Registry([str(tmp_path)]))
    assert set(made) == set(adjust.KINDS)
    assert spec["annotations"] == {"keep": "1", "added": "yes"}
    assert spec["process"]["env"] == ["PATH=/bin", "KEEP=1", "ADDED=1"]
    assert [m["destination"] for m in spec["mounts"]] == ["/nri"]
    assert spec["hooks"]["prestart"] == [{"path": "/bin/true", "args": ["true"], "env": []}]
    assert spec["linux"]["devices"][0] == {"path": "/dev/nri", "type": "c", "major": 1, "minor": 3}
    injected = {"path": "/dev/cdi-null", "type": "c", "major": 1, "minor": 3, "fileMode": 0o666}
    assert spec["linux"]["devices"][1] == injected
    assert spec["linux"]["resources"]["devices"][-2] == {
        "allow": True,
        "type": "c",
        "major": 1,
        "minor": 3,
        "access": "rwm",
    }
    assert spec["linux"]["resources"]["memory"] == {"limit": 1 << 26}
    assert spec["linux"]["resources"]["cpu"] == {"cpus": "0-1"}
    assert spec["process"]["oomScoreAdj"] == 500 and spec["process"]["args"] == ["sh"]
    assert spec["linux"]["sysctl"] == {"net.ipv4.ip_forward": "1"}
    assert spec["process"]["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}]


def test_nothing_asked_changes_nothing() -> None:
    spec = _spec()
    assert adjust.apply(spec, nri.ContainerAdjustment(), frozenset(), "10-test", POD, devices=NO_DEVICES) == []
    assert spec == _spec()


def _refused(
    change: nri.ContainerAdjustment, error: type[Exception], words: str, allowed: frozenset[str] = ALL
) -> None:
    with pytest.raises(error, match=words):
        adjust.apply(_spec(), change, allowed, "10-test", POD, devices=NO_DEVICES)


def test_what_is_refused() -> None:
    _refused(nri.ContainerAdjustment(annotations={"a": "b"}), PermissionDenied, "adjusts annotations", frozenset())
    cdi = nri.ContainerAdjustment()
    cdi.CDI_devices.add(name="vendor.com/gpu=0")
    _refused(cdi, FailedPrecondition, "CDI device 'vendor.com/gpu=0' is not defined in any spec file")
    scheduled = nri.ContainerAdjustment()
    scheduled.linux.scheduler.nice = 5
    _refused(scheduled, FailedPrecondition, "scheduling attributes")
    relative = nri.ContainerAdjustment()
    relative.mounts.add(destination="data", type="bind", source="/")
    _refused(relative, InvalidArgument, "not absolute")
    missing = nri.ContainerAdjustment()
    missing.mounts.add(destination="/x", type="bind", source="/nonexistent/source")
    _refused(missing, InvalidArgument, "does not exist")
    node_wide = nri.ContainerAdjustment()
    node_wide.linux.sysctl["vm.swappiness"] = "1"
    _refused(node_wide, InvalidArgument, "not namespaced")
    device = nri.ContainerAdjustment()
    device.linux.devices.add(path="/dev/x", type="z", major=1, minor=1)
    _refused(device, InvalidArgument, "type of c, b, u or p")
    oom = nri.ContainerAdjustment()
    oom.linux.oom_score_adj.value = 5000
    _refused(oom, InvalidArgument, "outside -1000..1000")
    rlimit = nri.ContainerAdjustment()
    rlimit.rlimits.add(type="RLIMIT_NOFILE", hard=1, soft=2)
    _refused(rlimit, InvalidArgument, "soft limit over its hard")
