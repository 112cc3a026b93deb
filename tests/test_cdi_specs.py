"""CDI spec files read as the CDI specification says: priorities, conflicts, malformed files, every edit."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from shimhub import cdi
from shimhub.errors import FailedPrecondition
from shimhub_proto.cri.v1 import api_pb2 as cri

pytestmark = pytest.mark.unit


def _spec_file(directory: Path, name: str, kind: str, devices: dict[str, dict[str, Any]], **top: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    document = {
        "cdiVersion": "0.7.0",
        "kind": kind,
        "devices": [{"name": device, "containerEdits": edits} for device, edits in devices.items()],
        **top,
    }
    path = directory / name
    path.write_text(json.dumps(document))
    return path


def _oci() -> dict[str, Any]:
    return {
        "process": {"env": ["PATH=/bin", "MODE=old"], "user": {"uid": 1000, "gid": 3000, "additionalGids": [3000]}},
        "mounts": [{"destination": "/etc/hosts", "type": "bind", "source": "/tmp", "options": ["rbind"]}],
        "linux": {"devices": [], "resources": {"devices": [{"allow": False, "access": "rwm"}]}},
    }


def test_every_edit_lands_in_the_spec(tmp_path: Path) -> None:
    edits = {
        "env": ["MODE=new", "ADDED=1"],
        "deviceNodes": [{"path": "/dev/gpu0", "hostPath": "/dev/null", "permissions": "rw"}],
        "mounts": [{"hostPath": "/usr/lib", "containerPath": "/usr/lib/gpu", "options": ["rbind", "ro"]}],
        "hooks": [{"hookName": "createContainer", "path": "/usr/bin/gpu-hook", "args": ["gpu-hook", "setup"]}],
        "additionalGids": [0, 44],
        "intelRdt": {"closID": "gpu"},
        "netDevices": [{"hostInterfaceName": "eth9", "name": "gpu0"}],
    }
    spec_level = {"env": ["FROM_SPEC=1"], "mounts": [{"hostPath": "/opt", "containerPath": "/opt"}]}
    _spec_file(tmp_path, "gpu.json", "example.com/gpu", {"0": edits}, containerEdits=spec_level)
    spec = _oci()
    cdi.Registry([str(tmp_path)]).inject(spec, ["example.com/gpu=0"])
    assert spec["process"]["env"] == ["PATH=/bin", "MODE=new", "ADDED=1", "FROM_SPEC=1"]
    assert spec["linux"]["devices"] == [
        {"path": "/dev/gpu0", "type": "c", "major": 1, "minor": 3, "fileMode": 0o666, "uid": 1000, "gid": 3000}
    ]
    rule = {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"}
    assert spec["linux"]["resources"]["devices"][-1] == rule
    assert [m["destination"] for m in spec["mounts"]] == ["/opt", "/etc/hosts", "/usr/lib/gpu"]  # parents first
    assert spec["mounts"][0] == {"destination": "/opt", "source": "/opt", "type": "bind", "options": ["rbind"]}
    assert spec["hooks"] == {"createContainer": [{"path": "/usr/bin/gpu-hook", "args": ["gpu-hook", "setup"]}]}
    assert spec["process"]["user"]["additionalGids"] == [3000, 44]
    assert spec["linux"]["intelRdt"] == {"closID": "gpu"}
    assert spec["linux"]["netDevices"] == {"eth9": {"name": "gpu0"}}


def test_a_later_directory_wins_and_a_clash_in_one_directory_is_refused(tmp_path: Path) -> None:
    node = {"env": ["FROM=etc"]}
    _spec_file(tmp_path / "etc", "a.json", "example.com/x", {"one": node, "two": node})
    _spec_file(tmp_path / "run", "b.json", "example.com/x", {"one": {"env": ["FROM=run"]}})
    _spec_file(tmp_path / "run", "c.json", "example.com/x", {"three": {}})
    _spec_file(tmp_path / "run", "d.json", "example.com/x", {"three": {}})
    registry = cdi.Registry([str(tmp_path / "etc"), str(tmp_path / "run")])
    spec = _oci()
    registry.inject(spec, ["example.com/x=one"])
    assert spec["process"]["env"][-1] == "FROM=run"
    spec = _oci()
    registry.inject(spec, ["example.com/x=two"])  # what the later directory does not define stays
    assert spec["process"]["env"][-1] == "FROM=etc"
    with pytest.raises(FailedPrecondition, match=r"'example.com/x=three' is defined twice, in .*c.json and .*d.json"):
        registry.inject(_oci(), ["example.com/x=three"])


def test_a_missing_device_names_itself_and_the_directories_and_changes_nothing(tmp_path: Path) -> None:
    _spec_file(tmp_path, "a.json", "example.com/x", {"one": {"env": ["A=1"]}})
    spec = _oci()
    with pytest.raises(FailedPrecondition, match=f"'example.com/x=two' is not defined in any spec file of {tmp_path}"):
        cdi.Registry([str(tmp_path)]).inject(spec, ["example.com/x=one", "example.com/x=two"])
    assert spec == _oci()


def test_malformed_files_are_logged_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tmp_path.joinpath("broken.yaml").write_text("cdiVersion: [unclosed\n")
    tmp_path.joinpath("huge.json").write_bytes(b" " * (cdi.MAX_SPEC_BYTES + 1))
    _spec_file(tmp_path, "badnode.json", "example.com/x", {"bad": {"deviceNodes": [{"path": "relative"}]}})
    _spec_file(tmp_path, "badkind.json", "no-slash", {"bad": {}})
    tmp_path.joinpath("link.json").symlink_to(_spec_file(tmp_path / "elsewhere", "o.json", "example.com/o", {"o": {}}))
    tmp_path.joinpath("good.yaml").write_text(
        "cdiVersion: 0.6.0\nkind: example.com/good\ndevices:\n- name: one\n  containerEdits:\n    env: [GOOD=1]\n"
    )
    registry = cdi.Registry([str(tmp_path)])
    with caplog.at_level(logging.WARNING, logger="shimhub.cdi"):
        spec = _oci()
        registry.inject(spec, ["example.com/good=one"])
    assert spec["process"]["env"][-1] == "GOOD=1"
    said = caplog.text
    assert "broken.yaml skipped: it is not YAML" in said
    assert f"huge.json skipped: it is larger than {cdi.MAX_SPEC_BYTES} bytes" in said
    assert "badnode.json skipped: devices[0].containerEdits.deviceNodes[0]: needs an absolute path" in said
    assert "badkind.json skipped: kind: 'no-slash' is not vendor.com/class" in said
    assert "link.json skipped" in said


def test_a_changed_directory_is_read_again(tmp_path: Path) -> None:
    registry = cdi.Registry([str(tmp_path)])
    _spec_file(tmp_path, "a.json", "example.com/x", {"one": {"env": ["V=1"]}})
    spec = _oci()
    registry.inject(spec, ["example.com/x=one"])
    (tmp_path / "a.json").unlink()
    _spec_file(tmp_path, "b.json", "example.com/x", {"two": {"env": ["V=2"]}})
    spec = _oci()
    registry.inject(spec, ["example.com/x=two"])
    assert spec["process"]["env"][-1] == "V=2"


def test_the_kubelets_two_ways_of_asking() -> None:
    config = cri.ContainerConfig(
        CDI_devices=[cri.CDIDevice(name="example.com/gpu=0")],
        annotations={"cdi.k8s.io/claim": "example.com/gpu=1, example.com/gpu=0", "other": "example.com/gpu=9"},
    )
    assert cdi.requested(config) == ["example.com/gpu=0", "example.com/gpu=1"]
