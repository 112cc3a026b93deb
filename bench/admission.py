"""Status and list calls while slow ExecSyncs and event streams hold their lanes.

Starts a runc pod with one container, opens --streams GetContainerEvents streams
and --execs concurrent ExecSyncs of `sleep --seconds` (the exec probes of a node
under strain), then times Version and ListContainers every 50 ms until the execs
are done. Prints their latencies and how the slow calls ended.
Run as root from a checkout:
python3 -m bench.admission [--execs 500] [--streams 100] [--seconds 25]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc

from bench.daemon import IMAGE, busybox_daemon
from bench.lifecycle import timed
from bench.stats import summary
from shimhub.testing.daemon import Daemon, pod_config
from shimhub_proto.cri.v1 import api_pb2 as cri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execs", type=int, default=500)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--seconds", type=int, default=25)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shimhub-bench-") as tmp:
        root = Path(tmp)
        tables = '[network]\nbackend = "host"\n[storage]\ndriver = "overlay"\n'
        with busybox_daemon(root, tables) as daemon:
            measure(daemon, root, args)


def measure(daemon: Daemon, root: Path, args: argparse.Namespace) -> None:
    """Open the slow calls, time the quick ones until the slow ones end, print the figures."""
    rt = daemon.runtime
    pod = pod_config(name="admission", log_directory=str(root / "logs"))
    pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    container = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="c"), command=["sleep", "3600"], image=cri.ImageSpec(image=IMAGE)
    )
    create = cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=container, sandbox_config=pod)
    container_id = rt.CreateContainer(create).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=container_id))
    streams = [rt.GetContainerEvents(cri.GetEventsRequest()) for _ in range(args.streams)]
    try:
        slow = cri.ExecSyncRequest(
            container_id=container_id, cmd=["sleep", str(args.seconds)], timeout=args.seconds + 30
        )
        execs = [rt.ExecSync.future(slow, timeout=args.seconds + 120) for _ in range(args.execs)]
        samples: dict[str, list[float]] = {}
        while not all(done.done() for done in execs):
            with timed(samples, "Version"):
                rt.Version(cri.VersionRequest(), timeout=10)
            with timed(samples, "ListContainers"):
                rt.ListContainers(cri.ListContainersRequest(), timeout=10)
            time.sleep(0.05)
        outcomes: Counter[str] = Counter()
        for done in execs:
            try:
                done.result()
                outcomes["OK"] += 1
            except grpc.RpcError as exc:
                outcomes[exc.code().name] += 1
        print(f"{args.execs} ExecSync(sleep {args.seconds}) and {args.streams} event streams open; milliseconds")
        for name, values in samples.items():
            print(f"{name:<16} {summary(values)}  ({len(values)} calls)")
        print("ExecSync outcomes:", ", ".join(f"{code} {count}" for code, count in sorted(outcomes.items())))
    finally:
        for stream in streams:
            stream.cancel()
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)


if __name__ == "__main__":
    main()
