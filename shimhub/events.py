"""Fan-out of events to subscribers that never slows down the publisher.

Each subscriber has a queue bounded in events and in bytes. Publishing never
waits: a subscriber whose queue is full is cut off (its `overflowed` is set and it gets nothing
more), so that it can re-list and subscribe again rather than silently miss
events while the RPC paths stay fast.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

#: Events, and bytes of them, a subscriber may fall behind by before it is cut off.
QUEUE_LIMIT = 10_000
BYTES_LIMIT = 16 << 20


class Subscription(Generic[T]):
    """One subscriber's queue of events."""

    def __init__(self, bus: EventBus[T], limit: int) -> None:
        self.bus = bus
        self.queue: queue.Queue[tuple[T, int]] = queue.Queue(maxsize=limit)
        self.overflowed = False
        #: Bytes of the events queued (as the bus's `size` counts them).
        self.queued_bytes = 0

    def events(self, poll: float, active: Callable[[], bool], idle: Callable[[], None]) -> Iterator[T]:
        """Events as they come, until `active()` is false or the subscriber overflowed.

        Every `poll` seconds without an event, `idle()` runs (e.g. to look for
        changes nobody asked about) and `active()` is asked again.
        """
        try:
            while not self.overflowed and not self.bus.closed.is_set() and active():
                try:
                    event, size = self.queue.get(timeout=poll)
                except queue.Empty:
                    idle()
                    continue
                with self.bus._lock:
                    self.queued_bytes -= size
                yield event
        finally:
            self.bus.unsubscribe(self)


class EventBus(Generic[T]):
    """Delivers each published event to every current subscriber."""

    def __init__(
        self, limit: int = QUEUE_LIMIT, byte_limit: int = BYTES_LIMIT, size: Callable[[T], int] = lambda _event: 0
    ) -> None:
        self.limit = limit
        self.byte_limit = byte_limit
        self.size = size
        self._subscribers: list[Subscription[T]] = []
        self._lock = threading.Lock()
        #: Set by close(): every subscription ends within its poll interval.
        self.closed = threading.Event()

    def close(self) -> None:
        """End every subscription (at shutdown, so that open streams do not hold it up)."""
        self.closed.set()

    def subscribe(self) -> Subscription[T]:
        """A new subscription that receives events published from now on."""
        subscription = Subscription(self, self.limit)
        with self._lock:
            self._subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription[T]) -> None:
        """Stop delivering to `subscription` (idempotent)."""
        with self._lock:
            if subscription in self._subscribers:
                self._subscribers.remove(subscription)

    @property
    def has_subscribers(self) -> bool:
        """Whether anyone listens (publishers may skip building events otherwise)."""
        return bool(self._subscribers)

    def publish(self, event: T) -> None:
        """Queue `event` for every subscriber without waiting; cut off those that are full."""
        size = self.size(event)
        with self._lock:
            subscribers = list(self._subscribers)
        for subscription in subscribers:
            if subscription.overflowed:
                continue
            with self._lock:
                fits = subscription.queued_bytes + size <= self.byte_limit
                if fits:
                    subscription.queued_bytes += size
            try:
                if not fits:
                    raise queue.Full
                subscription.queue.put_nowait((event, size))
            except queue.Full:
                subscription.overflowed = True
                self.unsubscribe(subscription)
