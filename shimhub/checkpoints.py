"""Container checkpoint archives (KEP 2008): what CheckpointContainer writes and CreateContainer restores from.

An archive is an uncompressed tar with CRI-O's file names:

* ``config.dump``: the container as created: its CRI config (protobuf JSON) and its image;
* ``spec.dump``: the OCI runtime spec it ran with;
* ``checkpoint/``: the runtime's images of its processes (CRIU's);
* ``rootfs-diff.tar``: what it changed in its root filesystem, as an OCI layer.

A CreateContainer whose image is the absolute path of such an archive creates a
container that resumes the checkpointed processes when started: its image,
command, arguments, environment and working directory are the checkpointed
container's; its name, labels, annotations, mounts, log path, resources and
security context are the request's. An archive is read as hostile input:
bounded in size and entries, regular files and directories only, read by
the confined unpacker (`shimhub.unpack`), never in the daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from attrs import define
from google.protobuf import json_format

from shimhub.errors import AlreadyExists, InvalidArgument
from shimhub.unpack import APPLY, UnsafeLayer, unpack
from shimhub_proto.cri.v1 import api_pb2 as cri

CONFIG = "config.dump"
SPEC = "spec.dump"
IMAGES = "checkpoint"
ROOTFS_DIFF = "rootfs-diff.tar"
#: Most entries an archive may hold (CRIU writes a few dozen files a process).
MAX_ENTRIES = 100_000
#: Most of the state disk's free space one archive may unpack to.
STATE_DISK_SHARE = 0.5
#: Most bytes config.dump may have.
MAX_CONFIG_BYTES = 4 << 20
#: What a restored container takes from the checkpointed one's config; the rest is the request's.
FROM_CHECKPOINT = ("image", "command", "args", "envs", "working_dir", "tty", "stdin", "stdin_once")


@define(frozen=True)
class Checkpointed:
    """What config.dump says of the checkpointed container."""

    config: cri.ContainerConfig
    image_id: str


def is_reference(image: str) -> bool:
    """Whether a CreateContainer image names a checkpoint archive (an absolute path) rather than an image."""
    return image.startswith("/")


def check_location(location: str) -> None:
    """Refuse a location that is not an absolute path to a new file in an existing directory."""
    if not os.path.isabs(location) or location.endswith("/"):
        raise InvalidArgument(f"checkpoint location {location[:256]!r} must be the absolute path of a file")
    if not os.path.isdir(os.path.dirname(location)):
        raise InvalidArgument(f"checkpoint location {location[:256]!r}: its directory does not exist")
    if os.path.lexists(location):
        raise AlreadyExists(f"checkpoint location {location[:256]!r} exists already")


def write_dumps(work: Path, config: Mapping[str, Any], image_id: str, spec: Mapping[str, Any]) -> None:
    """config.dump and spec.dump in the archive's working directory."""
    (work / CONFIG).write_text(json.dumps({"config": dict(config), "image_id": image_id}))
    (work / SPEC).write_text(json.dumps(dict(spec)))


def write_archive(work: Path, location: str) -> int:
    """Tar `work` into a new file at `location` (made whole or not at all); its size."""
    partial = f"{location}.partial"
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as out:
            with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as archive:
                for name in (CONFIG, SPEC, ROOTFS_DIFF, IMAGES):
                    if (work / name).exists():
                        archive.add(work / name, arcname=name)
            out.flush()
            os.fsync(out.fileno())
        os.link(partial, location)  # fails rather than replace a file that appeared meanwhile
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    return os.stat(location).st_size


def _open_archive(path: str) -> IO[bytes]:
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise InvalidArgument(f"checkpoint archive {path[:256]!r}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise InvalidArgument(f"checkpoint archive {path[:256]!r} is not a regular file")
    return os.fdopen(descriptor, "rb")


def read_config(path: str) -> Checkpointed:
    """The checkpointed container's config.dump; InvalidArgument for anything but a checkpoint archive."""
    with tempfile.TemporaryDirectory(prefix="shimhub-checkpoint-") as scratch:
        _unpack(path, scratch, MAX_CONFIG_BYTES, f"{path[:256]!r} is not a checkpoint archive", only=CONFIG)
        try:
            with open(os.path.join(scratch, CONFIG), "rb") as dump:
                data = dump.read(MAX_CONFIG_BYTES)
        except OSError:
            raise InvalidArgument(f"{path[:256]!r} is not a checkpoint archive: it has no {CONFIG}") from None
    return _parse_config(data, path)


def _unpack(path: str, into: str, max_bytes: int, failure: str, only: str = "") -> None:
    """The archive's regular files and directories unpacked into `into` by the confined unpacker."""
    with _open_archive(path) as stream:
        try:
            unpack(stream, into, APPLY, max_bytes, files_only=True, max_entries=MAX_ENTRIES, only=only)
        except (UnsafeLayer, OSError) as exc:
            raise InvalidArgument(f"{failure}: {exc}") from None


def _parse_config(data: bytes, path: str) -> Checkpointed:
    try:
        dumped = json.loads(data)
        config = json_format.ParseDict(dumped["config"], cri.ContainerConfig(), ignore_unknown_fields=True)
        return Checkpointed(config=config, image_id=str(dumped["image_id"]))
    except (ValueError, KeyError, TypeError, json_format.ParseError) as exc:
        raise InvalidArgument(f"checkpoint archive {path[:256]!r}: {CONFIG} is not valid: {exc}") from None


def restored_config(request: cri.ContainerConfig, checkpointed: Checkpointed) -> cri.ContainerConfig:
    """The config of a container restored from `checkpointed` as `request` asks."""
    taken = cri.ContainerConfig()
    taken.CopyFrom(checkpointed.config)
    merged = cri.ContainerConfig()
    merged.CopyFrom(request)
    for field in cri.ContainerConfig.DESCRIPTOR.fields:
        (merged if field.name in FROM_CHECKPOINT else taken).ClearField(field.name)
    merged.MergeFrom(taken)
    return merged


def archive_limit(state_dir: str, configured: int) -> int:
    """Most bytes an archive may unpack to: `configured` (0: no limit of its own), and never more than
    STATE_DISK_SHARE of what is free on the state disk, where it is unpacked."""
    free = int(shutil.disk_usage(state_dir).free * STATE_DISK_SHARE)
    return min(configured, free) if configured else free


def unpack_archive(path: str, into: Path, max_bytes: int) -> None:
    """Unpack the archive into the new directory `into`: regular files and directories only, at most
    `max_bytes` in all."""
    into.mkdir(parents=True, mode=0o700)
    failure = (
        f"checkpoint archive {path[:256]!r} cannot be unpacked ([checkpoints] max_archive_bytes {max_bytes}, "
        f"{MAX_ENTRIES} entries)"
    )
    _unpack(path, str(into), max_bytes, failure)
    if not (into / IMAGES).is_dir():
        raise InvalidArgument(f"checkpoint archive {path[:256]!r} holds no process images ({IMAGES}/)")


def read_spec(work: Path) -> dict[str, Any]:
    """The checkpointed container's OCI spec, from an unpacked archive ({} if it has none readable)."""
    try:
        with (work / SPEC).open("rb") as dump:
            spec = json.loads(dump.read(MAX_CONFIG_BYTES))
    except (OSError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


def working_directory(state_dir: str, container_id: str) -> Path:
    """Where a container's checkpoint is assembled, or its archive unpacked for a restore."""
    return Path(state_dir, "checkpoints", container_id)


def discard(state_dir: str, container_id: str) -> None:
    """Remove a container's checkpoint working directory. Idempotent."""
    shutil.rmtree(working_directory(state_dir, container_id), ignore_errors=True)
