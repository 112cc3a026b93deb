"""Work run off the request path: every request gets a run that starts after it, requests coalesce."""

from __future__ import annotations

import threading

import pytest

from shimhub.background import Coalesced

pytestmark = pytest.mark.unit


def test_requests_during_a_run_make_exactly_one_more() -> None:
    runs: list[int] = []
    started, release = threading.Event(), threading.Event()

    def work() -> None:
        runs.append(len(runs))
        started.set()
        if len(runs) == 1:
            release.wait(5)

    task = Coalesced(work, "test work")
    task.request()
    assert started.wait(5)
    for _ in range(20):
        task.request()  # while the first run is held: they coalesce into one more
    release.set()
    assert task.wait_idle(5)
    assert runs == [0, 1]


def test_a_failing_run_is_logged_and_the_next_request_runs_again(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def work() -> None:
        calls.append("run")
        if len(calls) == 1:
            raise OSError("disk gone")

    task = Coalesced(work, "test work")
    task.request()
    assert task.wait_idle(5)
    task.request()
    assert task.wait_idle(5)
    assert calls == ["run", "run"]
    assert "test work failed; it runs again at the next request" in caplog.text
