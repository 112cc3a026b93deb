"""Seccomp profiles named by requests: the CRI's meaning of the fields, and Localhost profiles read safely.

The core turns the deprecated `seccomp_profile_path` into the `seccomp` field,
gives an unset profile its meaning (unconfined, or the runtime default where
the operator asks for it), and replaces a Localhost reference by a verified
copy in shimhub's own run directory: the profile must lie under the configured
profile root (symlinks kept inside it), be a regular file of at most
PROFILE_LIMIT bytes and hold a JSON object with a defaultAction. Runtimes read
only that copy.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

from shimhub import confined
from shimhub.errors import FailedPrecondition, InvalidArgument
from shimhub.state import write_atomically
from shimhub_proto.cri.v1 import api_pb2 as cri

log = logging.getLogger(__name__)

#: Most bytes of a Localhost seccomp profile.
PROFILE_LIMIT = 1 << 20
_DEPRECATED = {
    "unconfined": cri.SecurityProfile.Unconfined,
    "runtime/default": cri.SecurityProfile.RuntimeDefault,
    "docker/default": cri.SecurityProfile.RuntimeDefault,
}


def settle_seccomp(
    security: cri.LinuxContainerSecurityContext, *, default_when_empty: bool, profile_root: str, copies: Path
) -> None:
    """Rewrite `security.seccomp` in place to what the container gets (see the module's docstring)."""
    if not security.HasField("seccomp") and security.seccomp_profile_path:
        path = security.seccomp_profile_path
        kind = _DEPRECATED.get(path, cri.SecurityProfile.Localhost)
        security.seccomp.profile_type = kind
        if kind == cri.SecurityProfile.Localhost:
            security.seccomp.localhost_ref = path.removeprefix("localhost/")
    security.ClearField("seccomp_profile_path")
    if not security.HasField("seccomp"):
        unset = cri.SecurityProfile.RuntimeDefault if default_when_empty else cri.SecurityProfile.Unconfined
        security.seccomp.profile_type = unset
    if security.seccomp.profile_type == cri.SecurityProfile.Localhost:
        security.seccomp.localhost_ref = str(_verified_copy(security.seccomp.localhost_ref, profile_root, copies))


def _verified_copy(reference: str, profile_root: str, copies: Path) -> Path:
    where = f"seccomp localhost profile {reference[:256]!r}"
    try:
        data = confined.read_absolute(reference, profile_root, PROFILE_LIMIT)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc.message}") from None
    try:
        loaded = json.loads(data)
    except ValueError as exc:
        raise InvalidArgument(f"{where} is not JSON: {exc}") from None
    if not isinstance(loaded, dict) or "defaultAction" not in loaded:
        raise InvalidArgument(f"{where} has no defaultAction")
    copy = copies / f"{hashlib.sha256(data).hexdigest()}.json"
    if not copy.exists():
        copies.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomically(copy, data)
    return copy


APPARMOR_ENABLED = Path("/sys/module/apparmor/parameters/enabled")
SELINUX_ENFORCE = Path("/sys/fs/selinux/enforce")


@functools.cache
def node_lsms() -> dict[str, bool]:
    """Which Linux security modules the node has (for Status and the checks below); read once, as they
    cannot change while the node runs."""
    try:
        apparmor = APPARMOR_ENABLED.read_text().strip() == "Y"
    except OSError:
        apparmor = False
    return {"apparmor": apparmor, "selinux": SELINUX_ENFORCE.exists()}


def check_lsm(security: cri.LinuxContainerSecurityContext, container: str) -> None:
    """Refuse an AppArmor profile the node cannot load; say so when a container asked for confinement the node
    cannot give (AppArmor's runtime default, SELinux labels) and runs without it."""
    lsms = node_lsms()
    localhost = (
        security.apparmor.profile_type == cri.SecurityProfile.Localhost
        if security.HasField("apparmor")
        else security.apparmor_profile.startswith("localhost/")
    )
    asked_default = (
        security.HasField("apparmor") and security.apparmor.profile_type == cri.SecurityProfile.RuntimeDefault
    ) or security.apparmor_profile == "runtime/default"
    if not lsms["apparmor"] and localhost:
        raise FailedPrecondition(
            f"container {container[:64]!r} asks for AppArmor profile "
            f"{(security.apparmor.localhost_ref or security.apparmor_profile)[:256]!r}, but this node has no AppArmor"
        )
    if not lsms["apparmor"] and asked_default:
        log.warning("container %r asks for AppArmor's runtime default; this node has no AppArmor", container[:64])
    if not lsms["selinux"] and security.HasField("selinux_options") and security.selinux_options.ByteSize():
        log.warning("container %r has SELinux labels; this node has no SELinux: they are not applied", container[:64])
