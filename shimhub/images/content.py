"""The content store: registry blobs by digest, verified while they stream in.

A blob is written to ``ingest/`` while its sha256 and size are checked, and
renamed into ``blobs/sha256/`` only when both match, so the store never holds
a partial or corrupt blob; ``ingest/`` is emptied at startup. Two pulls that
need the same blob at once share one download.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future
from pathlib import Path

from shimhub.errors import NO_SPACE, InvalidArgument, ResourceExhausted
from shimhub.hooktypes import FilesystemUsage
from shimhub.mounts import tree_usage

CHUNK = 1 << 20


class BlobMismatch(InvalidArgument):
    """A blob's content does not match its digest or size."""


class ContentStore:
    """Verified blobs under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.ingest = root / "ingest"
        self.blobs.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.rmtree(self.ingest, ignore_errors=True)  # downloads a crash interrupted
        self.ingest.mkdir(mode=0o700)
        self._lock = threading.Lock()
        self._inflight: dict[str, Future[Path]] = {}

    def path(self, digest: str) -> Path:
        """Where blob `digest` is stored."""
        return self.blobs / digest.removeprefix("sha256:")

    def has(self, digest: str) -> bool:
        """Whether blob `digest` is stored."""
        return self.path(digest).exists()

    def fetch(self, digest: str, size: int, download: Callable[[], Iterator[bytes]], what: str) -> Path:
        """Store blob `digest` from the chunks `download` yields, unless stored or being stored already."""
        if self.has(digest):
            return self.path(digest)
        with self._lock:
            future = self._inflight.get(digest)
            mine = future is None
            if mine:
                future = self._inflight[digest] = Future()
        assert future is not None
        if not mine:
            return future.result()
        chunks = download()
        try:
            path = self._write(digest, size, chunks, what)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(path)
            return path
        finally:
            # Closed here, in this thread: a download left suspended would be finalized by the garbage
            # collector in whichever thread it runs, possibly inside the connection pool's lock.
            if isinstance(chunks, Generator):
                chunks.close()
            with self._lock:
                del self._inflight[digest]

    def _write(self, digest: str, size: int, chunks: Iterator[bytes], what: str) -> Path:
        expected = digest.removeprefix("sha256:")
        partial = self.ingest / f"{expected}.{threading.get_ident()}"
        hasher = hashlib.sha256()
        written = 0
        try:
            with partial.open("wb") as out:
                for chunk in chunks:
                    written += len(chunk)
                    if written > size:
                        raise BlobMismatch(f"{what} {digest}: the registry sent more than the {size} bytes announced")
                    hasher.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if written != size:
                raise BlobMismatch(f"{what} {digest}: got {written} bytes, the manifest says {size}")
            if hasher.hexdigest() != expected:
                raise BlobMismatch(
                    f"{what} {digest}: content does not match its digest (got sha256:{hasher.hexdigest()})"
                )
            os.rename(partial, self.path(digest))
        except OSError as exc:
            if exc.errno in NO_SPACE:
                raise ResourceExhausted(f"{what} {digest}: no space left in the content store {self.root}") from None
            raise
        finally:
            partial.unlink(missing_ok=True)
        return self.path(digest)

    def remove(self, digest: str) -> None:
        """Forget blob `digest`."""
        self.path(digest).unlink(missing_ok=True)

    def digests(self) -> set[str]:
        """Every stored blob."""
        return {f"sha256:{p.name}" for p in self.blobs.iterdir()}

    def usage(self) -> FilesystemUsage:
        """Bytes and inodes of all stored blobs."""
        return tree_usage(str(self.blobs))
