"""The image store: image records by id (the config digest), with their tags and digests."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from attrs import define, field

from shimhub.config import converter
from shimhub.errors import InvalidArgument, ShimhubError
from shimhub.images import reference
from shimhub.state import load_record, write_atomically


@define
class Layer:
    """One layer of an image: its blob, its uncompressed digest and its chain id."""

    blob_digest: str
    media_type: str
    size: int
    diff_id: str
    #: Identifies the layer together with all below it; storage drivers store layers by it.
    chain_id: str


@define
class ImageRecord:
    """A pulled image."""

    id: str
    repo_tags: list[str] = field(factory=list)
    repo_digests: list[str] = field(factory=list)
    #: Bytes of the config and layer blobs as pulled.
    size: int = 0
    #: The OCI image config document.
    config: dict[str, Any] = field(factory=dict)
    layers: list[Layer] = field(factory=list)
    pulled_at: int = 0
    #: Removed by RemoveImage but kept (hidden) while containers still use its layers.
    removed: bool = False

    @property
    def top_layer(self) -> str:
        """The chain id of the top layer ("" for an image without layers)."""
        return self.layers[-1].chain_id if self.layers else ""

    def user_spec(self) -> str:
        """The image's User ("name", "uid", "name:group", "uid:gid"; "" for none)."""
        return str(self.config.get("config", {}).get("User", ""))

    def user(self) -> tuple[int | None, str]:
        """(uid, username) that the image's config names; one of them is set, or neither."""
        user = self.user_spec().split(":")[0]
        if not user:
            return None, ""
        return (int(user), "") if user.isdigit() else (None, user)


class ImageStore:
    """Image records, one JSON file each, looked up by id, id prefix, tag or digest reference."""

    def __init__(self, root: Path, search_registries: list[str]) -> None:
        self.root = root
        self.search_registries = search_registries
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._images: dict[str, ImageRecord] = {}
        for path in root.glob("*.json"):
            record = load_record(path, ImageRecord, "image")
            if record is not None:
                self._images[record.id] = record

    def all(self, include_removed: bool = False) -> list[ImageRecord]:
        """Every image (and those kept for containers after removal, if asked)."""
        return [r for r in self._images.values() if include_removed or not r.removed]

    def names(self, record: ImageRecord, *asked: str) -> tuple[str, str]:
        """(image, image_ref) for a container's status, as containerd gives them.

        image: the tag the container was asked for by (the first of `asked` that is one
        of the image's tags), else its first tag; image_ref: a repository digest of the
        same repository, else the first; the image id where there is neither.
        """
        tag = next((t for t in map(self._tagged, asked) if t and t in record.repo_tags), "")
        tag = tag or (record.repo_tags[0] if record.repo_tags else record.id)
        repository = tag.rpartition(":")[0] if tag in record.repo_tags else ""
        digest = next((d for d in record.repo_digests if d.partition("@")[0] == repository), "")
        return tag, digest or (record.repo_digests[0] if record.repo_digests else record.id)

    def _tagged(self, name: str) -> str:
        """`name` as a full registry/repository:tag; "" for ids, digests and what does not parse."""
        try:
            return reference.parse(name, self.search_registries).tagged() if name else ""
        except ShimhubError:
            return ""

    def find(self, name: str) -> ImageRecord | None:
        """The image `name` refers to: an id, a unique id prefix, a tag or a digest reference."""
        if not name:
            raise InvalidArgument("no image given")
        bare = name.removeprefix("sha256:")
        if len(bare) >= 6 and all(c in "0123456789abcdef" for c in bare):
            matches = [r for r in self.all() if r.id.removeprefix("sha256:").startswith(bare)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise InvalidArgument(f"image id prefix {name!r} is ambiguous: it matches {len(matches)} images")
            if len(bare) == 64:
                return None
        ref = reference.parse(name, self.search_registries)
        for record in self.all():
            if ref.digest and ref.with_digest(ref.digest) in record.repo_digests:
                return record
            if not ref.digest and ref.tagged() in record.repo_tags:
                return record
        return None

    def put(self, record: ImageRecord) -> None:
        """Store `record`; a tag it carries is taken from any other image that had it."""
        with self._lock:
            for other in self._images.values():
                if other.id != record.id and set(other.repo_tags) & set(record.repo_tags):
                    other.repo_tags = [t for t in other.repo_tags if t not in record.repo_tags]
                    self._save(other)
            self._save(record)

    def _save(self, record: ImageRecord) -> None:
        write_atomically(self._path(record.id), json.dumps(converter.unstructure(record)).encode())
        self._images[record.id] = record

    def _path(self, image_id: str) -> Path:
        return self.root / f"{image_id.removeprefix('sha256:')}.json"

    def get(self, image_id: str) -> ImageRecord | None:
        """The record with exactly this id, removed or not."""
        return self._images.get(image_id)

    def delete(self, image_id: str) -> None:
        """Forget an image record for good."""
        with self._lock:
            self._path(image_id).unlink(missing_ok=True)
            self._images.pop(image_id, None)
