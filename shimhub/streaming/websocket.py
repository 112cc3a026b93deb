"""Numbered channels over one WebSocket: the Kubernetes ``channel.k8s.io`` subprotocol family.

Every message starts with its channel number: one byte in the binary
protocols, one ASCII digit followed by base64 data in the ``base64.`` ones.
``v5.channel.k8s.io`` adds a close signal: the message [255, N] ends the
client's input on channel N.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import threading
from collections.abc import Iterable

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection

from shimhub.streaming.idle import Activity
from shimhub.streaming.spdy import Inbox

log = logging.getLogger(__name__)

CLOSE_SIGNAL = 255


class ChannelWriter:
    """Output on one channel; `close` has nothing to send in these protocols."""

    def __init__(self, connection: ChannelConnection, number: int) -> None:
        self.connection = connection
        self.number = number

    def write(self, data: bytes) -> None:
        self.connection.send(self.number, data)

    def close(self) -> None:
        """Channels end with the connection."""


class ChannelConnection:
    """A WebSocket carrying numbered channels; `inputs` are the channels the client may write to."""

    def __init__(self, websocket: ServerConnection, protocol: str, inputs: Iterable[int]) -> None:
        self.websocket = websocket
        self.base64 = ".base64." in f".{protocol}"
        self.inboxes = {number: Inbox() for number in inputs}
        self.activity = Activity()
        self._send_lock = threading.Lock()

    def writer(self, number: int) -> ChannelWriter:
        return ChannelWriter(self, number)

    def send(self, number: int, data: bytes) -> None:
        self.activity.touch()
        message: str | bytes = (
            chr(ord("0") + number) + base64.b64encode(data).decode() if self.base64 else bytes([number]) + data
        )
        with self._send_lock, contextlib.suppress(ConnectionClosed):
            self.websocket.send(message)

    def serve(self) -> None:
        """Deliver the client's messages to their channels until the connection closes."""
        try:
            for message in self.websocket:
                self._deliver(message)
        except ConnectionClosed:
            pass
        finally:
            for inbox in self.inboxes.values():
                inbox.end()

    def _deliver(self, message: str | bytes) -> None:
        self.activity.touch()
        if not message:
            return
        if isinstance(message, str):
            number = ord(message[0]) - ord("0")
            try:
                data = base64.b64decode(message[1:], validate=True)
            except (binascii.Error, ValueError):
                log.info("dropping a message that is not base64 on channel %d", number)
                return
        else:
            number, data = message[0], message[1:]
        if number == CLOSE_SIGNAL and data:
            inbox = self.inboxes.get(data[0])
            if inbox is not None:
                inbox.end()
            return
        inbox = self.inboxes.get(number)
        if inbox is not None:
            inbox.feed(data)

    def close(self) -> None:
        for inbox in self.inboxes.values():
            inbox.abandon()  # a receive loop blocked feeding one goes on to see the close
        self.websocket.close()
