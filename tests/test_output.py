"""A container's output fanned out to its CRI log and attached clients, each client bounded."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from shimhub.hooktypes import STDERR, STDOUT
from shimhub.output import END, Attachment, OutputFanout

pytestmark = pytest.mark.unit


def _drain(attachment: Attachment) -> list[tuple[int, bytes]]:
    chunks = []
    while (chunk := attachment.read()) != END:
        chunks.append(chunk)
    return chunks


def test_every_chunk_reaches_the_log_and_each_client_attached_at_the_time(tmp_path: Path) -> None:
    fanout = OutputFanout(str(tmp_path / "c.log"))
    early = fanout.attach()
    fanout.write(STDOUT, b"one\n")
    late = fanout.attach()
    fanout.write(STDERR, b"two\n")
    fanout.write(STDOUT, b"")
    fanout.write(STDERR, b"")
    assert fanout.wait_ended(0)
    assert _drain(early) == [(STDOUT, b"one\n"), (STDERR, b"two\n")]
    assert _drain(late) == [(STDERR, b"two\n")]
    fanout.close()
    lines = (tmp_path / "c.log").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["stdout F one", "stderr F two"]
    assert fanout.attach().read() == END, "a client attaching after the end gets the end at once"


def test_a_client_too_far_behind_misses_output_but_still_gets_the_end(tmp_path: Path) -> None:
    fanout = OutputFanout(str(tmp_path / "c.log"), streams=1)
    slow = Attachment(streams=1, backlog=10)
    fanout._attached.append(slow)
    for n in range(5):
        fanout.write(STDOUT, f"chunk{n}\n".encode())
    fanout.write(STDOUT, b"")
    assert _drain(slow) == [(STDOUT, b"chunk0\n")]
    assert (tmp_path / "c.log").read_text().count("chunk") == 5, "the log has everything"


def test_detaching_or_closing_wakes_a_blocked_reader(tmp_path: Path) -> None:
    fanout = OutputFanout(str(tmp_path / "c.log"))
    readers = [fanout.attach(), fanout.attach()]
    got: list[tuple[int, bytes]] = []
    threads = [threading.Thread(target=lambda r=r: got.append(r.read())) for r in readers]
    for thread in threads:
        thread.start()
    fanout.detach(readers[0])
    fanout.close()
    for thread in threads:
        thread.join(5)
    assert got == [END, END]
