"""CRI requests a real kubelet sent, as recorded in the project's shared `kubelet-cri/` data.

Tests and benchmarks build their requests from these shapes rather than from a
helper that fills only the fields we thought of. `localize` moves the
node-specific parts of a recorded request: the kubelet's directories under a
root of the caller's and the recorded image to one the caller has.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def recordings_dir() -> Path:
    """SHIMHUB_KUBELET_CRI, else shared/kubelet-cri beside the checkout or beside one of its parents."""
    if "SHIMHUB_KUBELET_CRI" in os.environ:
        return Path(os.environ["SHIMHUB_KUBELET_CRI"])
    for parent in Path(__file__).resolve().parents[2:]:
        if (parent / "shared" / "kubelet-cri").is_dir():
            return parent / "shared" / "kubelet-cri"
    return Path("shared") / "kubelet-cri"


def scenario_calls(scenario: str) -> list[dict[str, Any]]:
    """The recorded RunPodSandbox/CreateContainer/PullImage calls of one scenario, in order.

    Raises FileNotFoundError naming the directory when the recordings are not there."""
    path = recordings_dir() / "by-scenario" / f"scenario-{scenario}-creates.json"
    if not path.exists():
        raise FileNotFoundError(f"no kubelet recordings at {recordings_dir()} (set SHIMHUB_KUBELET_CRI)")
    return json.loads(path.read_text())["calls"]


def localize(request: dict[str, Any], root: Path, image: str, user_image: str = "") -> dict[str, Any]:
    """A copy of a recorded request with the kubelet's directories under `root` and its image `image`.

    The host paths its mounts name are made (files for /etc/hosts and the termination log,
    world-writable directories for volumes), as the kubelet makes them before CreateContainer."""
    text = json.dumps(request)
    text = text.replace("/var/lib/kubelet", str(root / "kubelet"))
    text = text.replace("/var/log/pods", str(root / "pods"))
    moved = json.loads(text)
    config = moved.get("config", {})
    if config.get("image"):
        config["image"]["image"] = image
        config["image"]["user_specified_image"] = user_image or image
    if "image" in moved and "config" not in moved:  # PullImage
        moved["image"]["image"] = user_image or image
    for mount in config.get("mounts", []):
        host = Path(mount["host_path"])
        if mount["container_path"] in ("/etc/hosts", "/dev/termination-log"):
            host.parent.mkdir(parents=True, exist_ok=True)
            host.touch()
        else:
            host.mkdir(parents=True, exist_ok=True)
            host.chmod(0o777)
    if "log_directory" in config:
        Path(config["log_directory"]).mkdir(parents=True, exist_ok=True)
    return moved
