"""Resolving a container's user and groups inside its image's /etc/passwd and /etc/group."""

from __future__ import annotations

from attrs import define, field

from shimhub import confined
from shimhub.errors import InvalidArgument
from shimhub_proto.cri.v1 import api_pb2 as cri

#: Most bytes read of an image's /etc/passwd or /etc/group.
USER_DB_LIMIT = 4 << 20


@define
class User:
    """The identity a container's process runs as."""

    uid: int = 0
    gid: int = 0
    additional_gids: list[int] = field(factory=list)
    name: str = ""
    home: str = "/"


def _read(rootfs: str, path: str) -> list[list[str]]:
    """The colon-separated lines of a file of the image: resolved inside the rootfs, a regular file, bounded."""
    if not rootfs:
        return []
    try:
        data = confined.read(rootfs, path, USER_DB_LIMIT)
    except confined.TooLarge:
        raise InvalidArgument(f"the image's {path} is larger than {USER_DB_LIMIT} bytes") from None
    except confined.NotRegular:
        raise InvalidArgument(f"the image's {path} is not a regular file") from None
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace")
    return [line.split(":") for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _passwd(rootfs: str) -> list[tuple[str, int, int, str]]:
    entries = []
    for fields in _read(rootfs, "/etc/passwd"):
        if len(fields) >= 6 and fields[2].isdigit() and fields[3].isdigit():
            entries.append((fields[0], int(fields[2]), int(fields[3]), fields[5]))
    return entries


def _groups(rootfs: str) -> list[tuple[str, int, list[str]]]:
    entries = []
    for fields in _read(rootfs, "/etc/group"):
        if len(fields) >= 4 and fields[2].isdigit():
            entries.append((fields[0], int(fields[2]), [m for m in fields[3].split(",") if m]))
    return entries


def resolve(rootfs: str, security: cri.LinuxContainerSecurityContext, image_user: str) -> User:
    """The user of a container: the CRI's run_as_* fields first, then the image's User."""
    passwd = _passwd(rootfs)
    groups = _groups(rootfs)
    user = User()
    if security.run_as_username:
        user = _by_name(passwd, security.run_as_username, "run_as_username")
    elif security.HasField("run_as_user"):
        user = _by_uid(passwd, security.run_as_user.value)
    elif image_user:
        name, _, group = image_user.partition(":")
        user = _by_uid(passwd, int(name)) if name.isdigit() else _by_name(passwd, name, "the image's User")
        if group:
            user.gid = int(group) if group.isdigit() else _group_id(groups, group)
    if security.HasField("run_as_group"):
        user.gid = security.run_as_group.value
    supplemental = list(security.supplemental_groups)
    if security.supplemental_groups_policy == cri.Merge and user.name:
        supplemental += [gid for _name, gid, members in groups if user.name in members]
    user.additional_gids = sorted(set(supplemental) - {user.gid})
    return user


def _by_name(passwd: list[tuple[str, int, int, str]], name: str, source: str) -> User:
    for entry_name, uid, gid, home in passwd:
        if entry_name == name:
            return User(uid=uid, gid=gid, name=name, home=home)
    raise InvalidArgument(f"{source}: user {name!r} is not in the image's /etc/passwd")


def _by_uid(passwd: list[tuple[str, int, int, str]], uid: int) -> User:
    if uid < 0:
        raise InvalidArgument(f"run_as_user {uid} is negative")
    for name, entry_uid, gid, home in passwd:
        if entry_uid == uid:
            return User(uid=uid, gid=gid, name=name, home=home)
    return User(uid=uid, gid=0)


def _group_id(groups: list[tuple[str, int, list[str]]], name: str) -> int:
    for entry_name, gid, _members in groups:
        if entry_name == name:
            return gid
    raise InvalidArgument(f"the image's User names group {name!r}, which is not in its /etc/group")
