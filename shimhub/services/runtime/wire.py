"""How answers go on the wire: request digests, label filters, chunks, and serialized entries reused."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, Protocol, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from shimhub.config import converter

#: Items per message of the Stream* list RPCs.
STREAM_CHUNK = 500

T = TypeVar("T")


class _Identified(Protocol):
    id: str


R = TypeVar("R", bound=_Identified)


def request_digest(request: object, *extra: str) -> str:
    """A digest identifying a creation request, to recognise the kubelet's retries."""
    digest = hashlib.sha256(request.SerializeToString(deterministic=True))  # type: ignore[attr-defined]
    for part in extra:
        digest.update(part.encode())
    return digest.hexdigest()


def labels_match(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    """Whether every key of `selector` is in `labels` with the same value."""
    return all(labels.get(key) == value for key, value in selector.items())


def chunks(items: list[T], size: int = STREAM_CHUNK) -> Iterator[list[T]]:
    """`items` in lists of at most `size`; one empty list when there are none."""
    if not items:
        yield []
    for start in range(0, len(items), size):
        yield items[start : start + size]


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class Serialized(Generic[R]):
    """Each object's message, serialized once per state it is in."""

    def __init__(self, summary: Callable[[R], Message], state: Callable[[R], object]) -> None:
        self.summary = summary
        self.state = state
        self._messages: dict[str, tuple[object, bytes]] = {}

    def message(self, record: R) -> bytes:
        state = self.state(record)
        cached = self._messages.get(record.id)
        if cached is None or cached[0] != state:
            cached = (state, self.summary(record).SerializeToString())
            self._messages[record.id] = cached
        return cached[1]

    def forget(self, object_id: str) -> None:
        self._messages.pop(object_id, None)


class ListEntries(Generic[R]):
    """Each object's entry in one field of a response: tag, length and its message from `messages`.

    A repeated field is on the wire the concatenation of its entries, so a list
    answer is a join of these bytes instead of hundreds of messages built anew.
    Entries of fields that hold the same message share its `messages`.
    """

    def __init__(self, field: FieldDescriptor, messages: Serialized[R]) -> None:
        self.tag = varint(field.number << 3 | 2)  # length-delimited
        self.messages = messages
        self._entries: dict[str, tuple[bytes, bytes]] = {}

    def entry(self, record: R) -> bytes:
        message = self.messages.message(record)
        cached = self._entries.get(record.id)
        if cached is None or cached[0] is not message:
            cached = (message, self.tag + varint(len(message)) + message)
            self._entries[record.id] = cached
        return cached[1]

    def answer(self, records: list[R]) -> bytes:
        """A serialized list response holding `records`."""
        return b"".join(self.entry(record) for record in records)

    def forget(self, object_id: str) -> None:
        self._entries.pop(object_id, None)
        self.messages.forget(object_id)


def record_json(value: object) -> str:
    return json.dumps(converter.unstructure(value), sort_keys=True)
