"""Name reservation: duplicates refused, and a retry during a slow creation gets its result."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from shimhub.errors import AlreadyExists, DeadlineExceeded, PluginFailed
from shimhub.names import NameRegistry

pytestmark = pytest.mark.unit


def test_retry_during_slow_creation_gets_the_same_result() -> None:
    names = NameRegistry("pod sandbox")
    release = threading.Event()
    calls: list[int] = []

    def slow() -> str:
        calls.append(1)
        release.wait(10)
        return "id-1"

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(names.create, "pod_ns_uid_0", "digest", slow, lambda _id: True, 10)
        while not calls:
            pass
        retry = pool.submit(names.create, "pod_ns_uid_0", "digest", slow, lambda _id: True, 10)
        release.set()
        assert first.result() == "id-1"
        assert retry.result() == "id-1"
    assert len(calls) == 1


def test_retry_that_gives_up_waiting_is_told_to_retry() -> None:
    names = NameRegistry("pod sandbox")
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait(10)
        return "id-1"

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(names.create, "n", "d", slow, lambda _id: True, None)
        started.wait(10)
        with pytest.raises(DeadlineExceeded, match="still being created; retry"):
            names.create("n", "d", slow, lambda _id: True, 0.05)
        release.set()
        assert first.result() == "id-1"
    assert names.create("n", "d", slow, lambda _id: True, 0.05) == "id-1"


def test_different_request_for_a_held_name_is_refused() -> None:
    names = NameRegistry("container")
    names.create("n", "d1", lambda: "id-1", lambda _id: True, None)
    with pytest.raises(AlreadyExists, match="container name 'n' is reserved for container id-1"):
        names.create("n", "d2", lambda: "id-2", lambda _id: True, None)


def test_identical_request_is_refused_once_the_object_moved_on() -> None:
    names = NameRegistry("container")
    names.create("n", "d", lambda: "id-1", lambda _id: False, None)
    with pytest.raises(AlreadyExists):
        names.create("n", "d", lambda: "id-2", lambda _id: False, None)


def test_failed_creation_frees_the_name_and_fails_its_waiters() -> None:
    names = NameRegistry("pod sandbox")
    started, release = threading.Event(), threading.Event()

    def failing() -> str:
        started.set()
        release.wait(10)
        raise PluginFailed("runtime exploded")

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(names.create, "n", "d", failing, lambda _id: True, None)
        started.wait(10)
        waiter = pool.submit(names.create, "n", "d", failing, lambda _id: True, 10)
        release.set()
        for future in (first, waiter):
            with pytest.raises(PluginFailed, match="runtime exploded"):
                future.result()
    assert names.holder("n") == ""
    assert names.create("n", "d", lambda: "id-2", lambda _id: True, None) == "id-2"


def test_release_only_by_the_holder() -> None:
    names = NameRegistry("pod sandbox")
    names.create("n", "d", lambda: "id-1", lambda _id: True, None)
    names.release("n", "someone-else")
    assert names.holder("n") == "id-1"
    names.release("n", "id-1")
    assert names.holder("n") == ""
