"""The CRI socket, signals, reload, and answers to RPCs shimhub does not implement."""

from __future__ import annotations

import signal
import socket
import stat
import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from shimhub import rpc
from shimhub.server import prepare_socket_path
from shimhub.testing.daemon import pod_config, wait_for
from shimhub_proto.cri.v1 import api_pb2 as cri
from shimhub_proto.cri.v1 import api_pb2_grpc
from tests.conftest import NEEDS_ROOT, PROC_CONFIG

pytestmark = NEEDS_ROOT


def test_socket_permissions(daemon) -> None:
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660
    assert stat.S_IMODE(daemon.socket.parent.stat().st_mode) == 0o750


def test_version_and_runtime_config(daemon) -> None:
    version = daemon.runtime.Version(cri.VersionRequest(version="0.1.0"))
    assert (version.runtime_name, version.runtime_api_version) == ("shimhub", "v1")
    config = daemon.runtime.RuntimeConfig(cri.RuntimeConfigRequest())
    assert config.linux.cgroup_driver == cri.CGROUPFS


def test_unimplemented_rpcs_say_so(tmp_path: Path) -> None:
    # every method of the CRI is served now; a servicer without one (a method newer than shimhub) still answers
    service = cri.DESCRIPTOR.services_by_name["RuntimeService"]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((rpc.service_handler(service, object(), rpc.lanes()),))
    address = f"unix:{tmp_path / 'cri.sock'}"
    server.add_insecure_port(address)
    server.start()
    try:
        with grpc.insecure_channel(address) as channel:
            runtime = api_pb2_grpc.RuntimeServiceStub(channel)
            with pytest.raises(grpc.RpcError) as unary:
                runtime.CheckpointContainer(cri.CheckpointContainerRequest(container_id="x"))
    finally:
        server.stop(None)
    assert unary.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert unary.value.details() == "shimhub does not implement runtime.v1.RuntimeService/CheckpointContainer"


def test_stale_socket_is_replaced(daemon_factory) -> None:
    daemon = daemon_factory(PROC_CONFIG)
    daemon.socket.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(daemon.socket))
    stale.close()  # bound, never listening: what a crashed daemon leaves
    daemon.start()
    assert daemon.runtime.Version(cri.VersionRequest()).runtime_name == "shimhub"
    assert "removing stale socket" in daemon.log()


def test_live_socket_and_non_socket_are_not_taken_over(daemon_factory) -> None:
    first = daemon_factory(PROC_CONFIG, name="first").start()
    second = daemon_factory(PROC_CONFIG, name="second")
    second.socket = first.socket
    second.write_config(PROC_CONFIG)
    dropin = second.root / "shimhub.d" / "99-test-paths.toml"
    dropin.write_text(dropin.read_text().replace(str(second.root / "run" / "shimhub.sock"), str(first.socket)))
    served = second.command("serve", "--config", str(second.config_path))
    assert served.returncode == 1
    assert f"shimhub: another process is serving on {first.socket}" in served.stderr
    assert first.runtime.Version(cri.VersionRequest()).runtime_name == "shimhub"

    third = daemon_factory(PROC_CONFIG, name="third")
    third.socket.parent.mkdir(parents=True)
    third.socket.write_text("precious")
    served = third.command("serve", "--config", str(third.config_path))
    assert served.returncode == 1
    assert f"{third.socket} exists and is not a socket" in served.stderr
    assert third.socket.read_text() == "precious"


def test_sigterm_lets_calls_in_flight_finish_and_removes_the_socket(daemon, tmp_path: Path) -> None:
    rt = daemon.runtime
    config = pod_config(log_directory=str(tmp_path / "logs"))
    pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
    container = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"), command=["sleep", "60"])
    container_id = rt.CreateContainer(cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=container)).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=container_id))
    results: list[object] = []

    def slow_exec() -> None:
        results.append(
            rt.ExecSync(cri.ExecSyncRequest(container_id=container_id, cmd=["sh", "-c", "sleep 1; echo done"]))
        )

    caller = threading.Thread(target=slow_exec)
    caller.start()
    time.sleep(0.3)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    caller.join(15)
    assert results and results[0].stdout == b"done\n"
    assert daemon.proc.wait(15) == 0
    assert not daemon.socket.exists()


def test_sighup_reloads_handlers_and_keeps_running_on_a_bad_file(daemon) -> None:
    rt = daemon.runtime
    names = lambda: sorted(h.name for h in rt.Status(cri.StatusRequest()).runtime_handlers)  # noqa: E731
    assert "extra" not in names()
    daemon.write_config(PROC_CONFIG + '[runtimes.extra]\nplugin = "proc"\n')
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "extra" in names())
    daemon.write_config(PROC_CONFIG + "[runtimes.extra\n")
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "configuration not reloaded, the running one stays" in daemon.log())
    assert "extra" in names()
    pod = pod_config(name="after-reload")
    pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=pod, runtime_handler="extra")).pod_sandbox_id
    assert rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status.runtime_handler == "extra"


def test_a_second_daemon_on_the_same_state_stops_before_touching_it(daemon_factory) -> None:
    """It must not run crash recovery against the live daemon's pulls and creations in flight."""
    first = daemon_factory(PROC_CONFIG).start()
    sandbox = first.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config())).pod_sandbox_id
    config = str(first.config_path)
    argv = [first.python, "-m", "shimhub", "serve", "--config", config, "--socket", str(first.root / "s")]
    second = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert second.returncode == 1
    assert f"another shimhub serves the state directory {first.root / 'state'}" in second.stderr
    assert [p.id for p in first.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items] == [sandbox]


@pytest.mark.unit
def test_only_a_socket_directory_shimhub_makes_gets_its_mode(tmp_path: Path) -> None:
    """`--socket /run/x.sock` once chmod-ed /run to 0750."""
    existing = tmp_path / "run"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    prepare_socket_path(existing / "x.sock", tmp_path / "shimhub")
    assert stat.S_IMODE(existing.stat().st_mode) == 0o755
    prepare_socket_path(existing / "made" / "x.sock", tmp_path / "shimhub")
    assert stat.S_IMODE((existing / "made").stat().st_mode) == 0o750
