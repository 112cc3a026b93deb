"""The event bus and the terminal-size channel: what a stalled or hostile client can make shimhub hold."""

from __future__ import annotations

import threading

import pytest

from shimhub.events import EventBus
from shimhub.streaming import remotecommand
from shimhub.streaming.spdy import Inbox

pytestmark = pytest.mark.unit


def test_a_stalled_subscriber_is_cut_off_by_bytes_not_only_by_count() -> None:
    bus: EventBus[bytes] = EventBus(limit=1000, byte_limit=100, size=len)
    stalled = bus.subscribe()
    reading = bus.subscribe()
    events = reading.events(0.01, lambda: True, lambda: None)
    for _ in range(3):
        bus.publish(b"x" * 40)
        assert next(events) == b"x" * 40  # a subscriber that reads keeps its budget
    assert stalled.overflowed and not reading.overflowed
    assert stalled.queue.qsize() == 2  # 80 bytes fit, the third event did not


class _Sizes:
    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def resize(self, width: int, height: int) -> None:
        self.seen.append((width, height))


def test_an_endless_terminal_size_document_is_dropped_not_buffered() -> None:
    inbox = Inbox()
    sizes = _Sizes()
    pump = threading.Thread(target=remotecommand._pump_resizes, args=(inbox, sizes))
    pump.start()
    inbox.feed(b'{"Width": ' + b" " * (remotecommand.MAX_RESIZE_DOCUMENT + 10))
    inbox.feed(b'{"Width": 80, "Height": 24}{"Width": 1')
    inbox.feed(b'00, "Height": 30}')
    inbox.end()
    pump.join(5)
    assert sizes.seen == [(80, 24), (100, 30)]
