"""Records persist atomically, survive reloads, and are found by id or unique prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

from shimhub.errors import InvalidArgument, NotFound
from shimhub.hooktypes import ContainerState, ContainerStatus, PodNetwork
from shimhub.records import SANDBOX_READY, ContainerRecord, SandboxRecord
from shimhub.state import StateStore


def sandbox(record_id: str) -> SandboxRecord:
    return SandboxRecord(
        id=record_id,
        name=f"p_{record_id}",
        handler="runc",
        created_at=1,
        config={"hostname": "h"},
        state=SANDBOX_READY,
        network=PodNetwork(netns_path="/run/netns/x", ips=["10.0.0.2"]),
    )


def test_round_trip_through_disk(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save_sandbox(sandbox("abc123"))
    container = ContainerRecord(
        id="def456",
        sandbox_id="abc123",
        name="c",
        created_at=2,
        config={},
        state=ContainerState(status=ContainerStatus.EXITED, exit_code=3, reason="Error"),
        runtime_data={"pid": 42},
    )
    store.save_container(container)
    again = StateStore(tmp_path)
    again.load()
    assert again.sandbox("abc123") == sandbox("abc123")
    assert again.container("def456") == container
    assert again.sandbox("abc123").pod_config().hostname == "h"


def test_interrupted_write_and_corrupt_record_do_not_stop_loading(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save_sandbox(sandbox("good01"))
    (tmp_path / "sandboxes" / ".half01.json.tmp").write_text('{"id": "hal')
    (tmp_path / "sandboxes" / "bad001.json").write_text("{not json")
    again = StateStore(tmp_path)
    again.load()
    assert [r.id for r in again.sandboxes()] == ["good01"]
    assert not (tmp_path / "sandboxes" / ".half01.json.tmp").exists()
    assert (tmp_path / "sandboxes" / "bad001.corrupt").exists()


def test_orphan_container_is_kept_for_its_pod_to_be_rebuilt(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save_container(ContainerRecord(id="c1", sandbox_id="gone", name="c", created_at=1, config={}))
    again = StateStore(tmp_path)
    again.load()
    assert again.containers() == []
    assert [c.id for c in again.orphaned["gone"]] == ["c1"]


def test_lookup_by_prefix(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for record_id in ("aaaa1111", "aaaa2222", "bbbb3333"):
        store.save_sandbox(sandbox(record_id))
    assert store.sandbox("bbb").id == "bbbb3333"
    assert store.sandbox("aaaa1").id == "aaaa1111"
    with pytest.raises(InvalidArgument, match="pod sandbox id prefix 'aaaa' is ambiguous: it matches 2 ids"):
        store.sandbox("aaaa")
    with pytest.raises(NotFound, match="pod sandbox 'cc' not found"):
        store.sandbox("cc")
    with pytest.raises(NotFound):
        store.sandbox("bb")  # shorter than the minimum prefix
    with pytest.raises(InvalidArgument, match="no pod sandbox id given"):
        store.sandbox("")


def test_delete(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save_sandbox(sandbox("abc123"))
    store.delete_sandbox("abc123")
    assert not (tmp_path / "sandboxes" / "abc123.json").exists()
    with pytest.raises(NotFound):
        store.sandbox("abc123")
