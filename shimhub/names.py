"""CRI name reservation, with in-flight creations handed to the kubelet's retries.

A pod sandbox or container name is held by one object until that object is
removed. When a creation is slow, the kubelet gives up and retries with the
same request; instead of answering "name is reserved" the retry waits for the
creation already under way and gets its result. A retry that comes after the
creation finished gets the same id, as long as the request is identical (same
digest) and the object is still usable.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable

from attrs import define, field

from shimhub.errors import AlreadyExists, DeadlineExceeded


@define
class _Creation:
    digest: str
    done: threading.Event = field(factory=threading.Event)
    result: str = ""
    error: BaseException | None = None


class NameRegistry:
    """Names of one kind of object (sandboxes or containers) and who holds them."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._lock = threading.Lock()
        self._holders: dict[str, tuple[str, str]] = {}  # name -> (id, request digest)
        self._creating: dict[str, _Creation] = {}

    def restore(self, name: str, object_id: str, digest: str) -> None:
        """Record a name held by an object loaded from disk."""
        with self._lock:
            self._holders[name] = (object_id, digest)

    def release(self, name: str, object_id: str) -> None:
        """Free `name` if `object_id` holds it."""
        with self._lock:
            if self._holders.get(name, ("", ""))[0] == object_id:
                del self._holders[name]

    def holder(self, name: str) -> str:
        """The id holding `name`, or ""."""
        with self._lock:
            return self._holders.get(name, ("", ""))[0]

    def create(
        self,
        name: str,
        digest: str,
        work: Callable[[], str],
        reusable: Callable[[str], bool],
        wait: float | None,
    ) -> str:
        """Create the object called `name` with `work` (which returns its id) and reserve the name.

        If an identical request (same `digest`) is creating it already, wait up to
        `wait` seconds for that creation and return its result. If an object holds
        the name already, return its id when the request is identical and
        `reusable(id)` says it may be handed out; otherwise raise AlreadyExists.
        """
        with self._lock:
            holder = self._holders.get(name)
            creation = self._creating.get(name)
            if creation is None and holder is None:
                creation = self._creating[name] = _Creation(digest)
                mine = True
            else:
                mine = False
        if holder is not None:
            held_id, held_digest = holder
            if held_digest == digest and reusable(held_id):
                return held_id
            raise AlreadyExists(f"{self.kind} name {name!r} is reserved for {self.kind} {held_id}")
        assert creation is not None
        if not mine:
            return self._join(name, creation, digest, wait)
        try:
            object_id = work()
        except BaseException as exc:
            creation.error = exc
            raise
        else:
            creation.result = object_id
            with self._lock:
                self._holders[name] = (object_id, digest)
            return object_id
        finally:
            with self._lock:
                del self._creating[name]
            creation.done.set()

    def _join(self, name: str, creation: _Creation, digest: str, wait: float | None) -> str:
        if creation.digest != digest:
            raise AlreadyExists(f"{self.kind} name {name!r} is being created by a different request")
        if not creation.done.wait(wait):
            raise DeadlineExceeded(f"{self.kind} {name!r} is still being created; retry to get its result")
        if creation.error is not None:
            raise creation.error
        return creation.result


def new_id() -> str:
    """A fresh 64-hex-digit object id."""
    return secrets.token_hex(32)
