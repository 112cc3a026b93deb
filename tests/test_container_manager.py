"""The container manager's lifecycle policy, in process, against a fake runtime plugin: no root, no daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shimhub.config import Config, UserNamespacesConfig
from shimhub.containers import ContainerManager, lifecycle
from shimhub.errors import DeadlineExceeded, NotFound
from shimhub.hooktypes import ContainerState, ContainerStatus
from shimhub.locks import KeyedLocks
from shimhub.records import ContainerRecord, SandboxRecord
from shimhub.state import StateStore

pytestmark = pytest.mark.unit


class FakeRuntime:
    """A runtime plugin facade answering states from a table; a container exits on the signals in `fatal`."""

    def __init__(self, states: dict[str, ContainerState], batch: bool = False, api: str = "1.4") -> None:
        self.states = states
        self.batch = batch
        self.api = api
        self.fatal: set[str] = {"SIGKILL"}
        self.calls: list[tuple[str, Any]] = []
        self.removal_error: Exception | None = None
        self.kill_error: Exception | None = None

    def implements(self, hook: str) -> bool:
        if hook in ("runtime_container_kill", "runtime_container_wait"):
            return self.api >= "1.4"
        return hook != "runtime_container_states" or self.batch

    def call(self, hook: str, **kwargs: Any) -> Any:
        container = kwargs.get("container")
        if hook == "runtime_container_states":
            return [self.states[container.id] for _, container in kwargs["containers"]]
        if hook == "runtime_container_state":
            return self.states[container.id]
        if hook == "runtime_container_kill":
            self.calls.append(("kill", kwargs["signal"]))
            if self.kill_error:
                raise self.kill_error
            if kwargs["signal"] in self.fatal:
                code = 137 if kwargs["signal"] == "SIGKILL" else 0
                self.states[container.id] = ContainerState(ContainerStatus.EXITED, exit_code=code, finished_at=5)
            return None
        if hook == "runtime_container_remove":
            self.calls.append(("remove", container.id))
            if self.removal_error:
                raise self.removal_error
            return None
        if hook == "runtime_container_wait":
            self.calls.append(("wait", kwargs["timeout"]))
            return self.states[container.id].status == ContainerStatus.EXITED
        assert hook == "runtime_container_stop", hook
        self.calls.append(("stop", kwargs["timeout"]))
        self.states[container.id] = ContainerState(ContainerStatus.EXITED, exit_code=0, finished_at=5)
        return None


class FakeNode:
    """The collaborators ContainerManager uses for state: a real store on disk, one handler, an event log."""

    def __init__(self, root: Path, runtime: FakeRuntime) -> None:
        self.store = StateStore(root)
        self.config = Config(user_namespaces=UserNamespacesConfig(mount_dir=str(root / "idmapped")))
        backend = type("Backend", (), {"plugin": runtime})()
        handler = type("Handler", (), {"backend": backend})()
        handler.installed = lambda: runtime
        self.handlers = type("Handlers", (), {"get": staticmethod(lambda name: handler)})()
        self.locks = KeyedLocks()
        self.events: list[tuple[str, str]] = []
        self.container_names = type("Names", (), {"release": staticmethod(lambda name, owner: None)})()

    def emit(self, event: str, sandbox: SandboxRecord, container: ContainerRecord | None = None) -> None:
        self.events.append((event, container.id if container else ""))


def _node(tmp_path: Path, states: dict[str, ContainerState], batch: bool = False, api: str = "1.4") -> Any:
    node = FakeNode(tmp_path, FakeRuntime(states, batch, api))
    node.store.save_sandbox(SandboxRecord(id="s1", name="web_default_u_0", handler="fake", created_at=1, config={}))
    for container_id in states:
        record = ContainerRecord(id=container_id, sandbox_id="s1", name=container_id, created_at=1, config={})
        record.state = ContainerState(ContainerStatus.RUNNING, pid=10, started_at=2)
        record.stop_signal = "SIGQUIT"
        node.store.save_container(record)
    return node, ContainerManager(node)  # type: ignore[arg-type]


@pytest.mark.parametrize("batch", [True, False], ids=["runtime_container_states", "runtime_container_state"])
def test_the_core_names_exits_and_announces_each_once(tmp_path: Path, batch: bool) -> None:
    states = {
        "ok": ContainerState(ContainerStatus.EXITED, started_at=2, finished_at=3, exit_code=0),
        "bad": ContainerState(ContainerStatus.EXITED, started_at=2, finished_at=3, exit_code=7),
        "oom": ContainerState(ContainerStatus.EXITED, started_at=2, finished_at=3, exit_code=137, reason="OOMKilled"),
        "up": ContainerState(ContainerStatus.RUNNING, pid=10, started_at=2),
    }
    node, manager = _node(tmp_path, states, batch)
    manager.refresh_running()
    manager.refresh_running()
    reloaded = StateStore(tmp_path)
    reloaded.load()
    assert {c.id: (c.state.status, c.state.exit_code, c.state.reason) for c in reloaded.containers()} == {
        "ok": (ContainerStatus.EXITED, 0, "Completed"),
        "bad": (ContainerStatus.EXITED, 7, "Error"),
        "oom": (ContainerStatus.EXITED, 137, "OOMKilled"),
        "up": (ContainerStatus.RUNNING, 0, ""),
    }
    assert sorted(node.events) == [
        ("container_stopped", "bad"),
        ("container_stopped", "ok"),
        ("container_stopped", "oom"),
    ]
    record, state = manager.state("bad")
    assert (record.state, state.reason) == (state, "Error")
    assert len(node.events) == 3, "an exit already recorded is not announced again"


def _running() -> dict[str, ContainerState]:
    return {"app": ContainerState(ContainerStatus.RUNNING, pid=10, started_at=2)}


def test_stop_sends_the_stop_signal_and_waits_the_timeout(tmp_path: Path) -> None:
    node, manager = _node(tmp_path, _running())
    runtime = node.handlers.get("").installed()
    runtime.fatal = {"SIGQUIT", "SIGKILL"}
    manager.stop("app", timeout=30)
    assert runtime.calls == [("kill", "SIGQUIT"), ("wait", 30.0)]
    assert node.store.container("app").state.reason == "Completed"


def test_stop_escalates_to_sigkill_after_the_timeout(tmp_path: Path) -> None:
    node, manager = _node(tmp_path, _running())
    runtime = node.handlers.get("").installed()
    manager.stop("app", timeout=2)
    assert runtime.calls == [("kill", "SIGQUIT"), ("wait", 2.0), ("kill", "SIGKILL"), ("wait", lifecycle.KILL_WAIT)]
    assert (node.store.container("app").state.exit_code, node.events) == (137, [("container_stopped", "app")])


def test_stop_with_no_timeout_kills_at_once_and_a_survivor_is_deadline_exceeded(tmp_path: Path) -> None:
    node, manager = _node(tmp_path, _running())
    runtime = node.handlers.get("").installed()
    runtime.fatal = set()  # a process stuck in the kernel
    with pytest.raises(DeadlineExceeded, match="container app did not exit within 10 s of SIGKILL"):
        manager.stop("app", timeout=0)
    assert runtime.calls == [("kill", "SIGKILL"), ("wait", lifecycle.KILL_WAIT)]


def test_a_runtime_of_api_1_3_still_stops_through_its_own_hook(tmp_path: Path) -> None:
    node, manager = _node(tmp_path, _running(), api="1.3")
    runtime = node.handlers.get("").installed()
    manager.stop("app", timeout=7)
    assert runtime.calls == [("stop", 7)]
    assert node.store.container("app").state.status == ContainerStatus.EXITED


def test_stopping_an_exited_container_asks_nothing(tmp_path: Path) -> None:
    node, manager = _node(tmp_path, {"app": ContainerState(ContainerStatus.EXITED, exit_code=3, finished_at=4)})
    runtime = node.handlers.get("").installed()
    manager.stop("app", timeout=7)
    assert runtime.calls == []


def test_a_removed_container_is_gone_at_once_and_cleaned_up_after(tmp_path: Path) -> None:
    node, manager = _node(tmp_path, _running())
    runtime = node.handlers.get("").installed()
    runtime.fatal = {"SIGKILL"}
    manager.remove("app")
    with pytest.raises(NotFound, match="being removed"):
        manager.state("app")
    assert ("kill", "SIGKILL") in runtime.calls, "RemoveContainer answers only once the container is stopped"
    assert manager.removals.wait_idle(10)
    assert ("remove", "app") in runtime.calls
    assert node.store.container("app", missing_ok=True) is None
    assert node.events[-1] == ("container_removed", "app")
    manager.remove("app")  # idempotent
    assert runtime.calls.count(("remove", "app")) == 1


def test_a_failed_cleanup_stays_recorded_and_is_finished_later(tmp_path: Path) -> None:
    node, manager = _node(tmp_path, _running())
    runtime = node.handlers.get("").installed()
    runtime.removal_error = OSError("device busy")
    manager.remove("app")
    assert manager.removals.wait_idle(10)
    reloaded = StateStore(tmp_path)
    reloaded.load()
    assert reloaded.container("app").removing, "a crash from here on finishes the removal at the next start"
    with pytest.raises(NotFound):
        manager.state("app")
    runtime.removal_error = None
    manager.remove_now("app")  # as a pod's removal does
    assert node.store.container("app", missing_ok=True) is None
    assert runtime.calls.count(("remove", "app")) == 2


def test_a_removal_whose_stop_fails_leaves_the_container_listed(tmp_path: Path) -> None:
    node, manager = _node(tmp_path, _running())
    runtime = node.handlers.get("").installed()
    runtime.kill_error = OSError("the runtime is broken")
    with pytest.raises(OSError):
        manager.remove("app")
    record, state = manager.state("app")  # still there for the kubelet's retry
    assert (record.removing, state.status) == (False, ContainerStatus.RUNNING)
    assert ("remove", "app") not in runtime.calls
