"""Collecting an exec'd process's output, in process: the timeout closes the process while it is read."""

from __future__ import annotations

import threading

import pytest

from shimhub.containers.exec import collect
from shimhub.hooktypes import STDOUT

pytestmark = pytest.mark.unit


class Racing:
    """A process whose reader is inside a read when the timeout closes it, and then fails as a closed
    selector makes it fail (KeyError from unregister): what a runtime's reader may do in that race."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        self.closes = 0

    def read_output(self) -> tuple[int, bytes]:
        if not self.closed.wait(5):
            return STDOUT, b""
        raise KeyError("81 is not registered")

    def wait(self) -> int:
        return 0

    def close(self) -> None:
        self.closes += 1
        self.closed.set()


def test_a_timeout_that_races_the_reader_is_a_timeout() -> None:
    process = Racing()
    result = collect(process, 0.05, 1024)  # type: ignore[arg-type]
    assert result.timed_out and result.exit_code == -1
    assert process.closes >= 1


def test_a_failure_without_a_timeout_is_raised() -> None:
    class Broken(Racing):
        def read_output(self) -> tuple[int, bytes]:
            raise KeyError("lost")

    with pytest.raises(KeyError):
        collect(Broken(), 5, 1024)  # type: ignore[arg-type]
