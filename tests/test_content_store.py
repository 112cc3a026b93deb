"""The content store: a failed blob write closes its download at once, in the writing thread."""

from __future__ import annotations

import gc
import hashlib
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shimhub.errors import ResourceExhausted
from shimhub.images.content import BlobMismatch, ContentStore
from tests.conftest import NEEDS_ROOT


class Download:
    """A download generator that records whether, and in which thread, its cleanup ran."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.closed_in: int | None = None

    def __call__(self) -> Iterator[bytes]:
        try:
            yield from self.chunks
        finally:
            self.closed_in = threading.get_ident()


@pytest.mark.unit
def test_a_blob_longer_than_announced_closes_its_download_in_this_thread(tmp_path: Path) -> None:
    """Left suspended, the download was finalized by the garbage collector wherever it ran next, once
    inside the HTTP pool's lock: every later pull from that registry hung."""
    store = ContentStore(tmp_path)
    download = Download([b"x" * 10, b"y" * 10, b"never read"])
    gc.disable()
    try:
        with pytest.raises(BlobMismatch, match="sent more than the 15 bytes announced"):
            store.fetch("sha256:" + "0" * 64, 15, download, "layer")
        assert download.closed_in == threading.get_ident()
    finally:
        gc.enable()
    assert list((tmp_path / "ingest").iterdir()) == []


@NEEDS_ROOT
def test_a_full_content_store_is_resource_exhausted(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        store = ContentStore(small)
        data = [b"z" * (256 << 10)] * 8
        digest = "sha256:" + hashlib.sha256(b"".join(data)).hexdigest()
        download = Download(data)
        with pytest.raises(ResourceExhausted, match="no space left in the content store"):
            store.fetch(digest, 2 << 20, download, "layer")
        assert download.closed_in == threading.get_ident()
        assert list((small / "ingest").iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)
