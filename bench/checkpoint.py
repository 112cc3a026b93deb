"""CheckpointContainer and a restore from its archive, for a small process and for one holding 100 MiB.

Each run checkpoints a running busybox container (CRIU through runc; the
container keeps running), then creates and starts a container from the
archive in a new pod. Prints the checkpoint time, the archive's size and the
restore time (CreateContainer + StartContainer). Needs a node where `criu
check` passes; where this one's kernel is too new for Debian's CRIU, run it in
the booted node: python3 -m tests.booted_node -- python3 -m bench.checkpoint
python3 -m bench.checkpoint [--runs 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.daemon import IMAGE, busybox_daemon
from bench.lifecycle import timed
from bench.stats import summary
from shimhub.testing.daemon import pod_config, wait_for
from shimhub_proto.cri.v1 import api_pb2 as cri
from shimhub_proto.cri.v1 import api_pb2_grpc

MIB = 1 << 20
#: The processes: one that only sleeps, one whose shell holds 100 MiB of non-zero bytes in a variable (its
#: sleep in a loop: the shell would otherwise replace itself with its last command, and drop the memory).
WORKLOADS = {
    "small process": ["sleep", "3600"],
    "100 MiB process": [
        "sh",
        "-c",
        f"a=$(head -c {100 * MIB} /dev/zero | tr '\\0' x); echo held; while :; do sleep 3600; done",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shimhub-bench-") as tmp:
        root = Path(tmp)
        tables = '[network]\nbackend = "host"\n[storage]\ndriver = "overlay"\n'
        with busybox_daemon(root, tables) as daemon:
            rows = [
                (name, measure(daemon.runtime, root, name, command, args.runs)) for name, command in WORKLOADS.items()
            ]
    print(f"runc + CRIU, overlay, {args.runs} runs each")
    for name, samples in rows:
        for figure, values in samples.items():
            unit = "MiB" if figure == "archive size" else "ms"
            print(f"{name:<16} {figure:<28} {summary(values)} {unit}")


def measure(
    rt: api_pb2_grpc.RuntimeServiceStub, root: Path, name: str, command: list[str], runs: int
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {}
    for run in range(runs):
        label = f"{name.split(maxsplit=1)[0]}-{run}"
        pods = []
        for role in ("source", "target"):
            config = pod_config(name=f"{label}-{role}", uid=f"{label}-{role}", log_directory=str(root / label / role))
            pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
            pods.append((pod_id, config))
        (source, source_config), (target, target_config) = pods
        container = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="work"),
            image=cri.ImageSpec(image=IMAGE),
            command=command,
            log_path="w.log",
        )
        create = cri.CreateContainerRequest(pod_sandbox_id=source, config=container, sandbox_config=source_config)
        container_id = rt.CreateContainer(create).container_id
        rt.StartContainer(cri.StartContainerRequest(container_id=container_id))
        if "held" in " ".join(command):
            log = root / label / "source" / "w.log"
            wait_for(lambda log=log: log.exists() and "held" in log.read_text(), 600)
        archive = root / label / "checkpoint.tar"
        with timed(samples, "checkpoint"):
            rt.CheckpointContainer(
                cri.CheckpointContainerRequest(container_id=container_id, location=str(archive), timeout=600),
                timeout=660,
            )
        samples.setdefault("archive size", []).append(archive.stat().st_size / MIB)
        restored = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="restored"), image=cri.ImageSpec(image=str(archive)), log_path="r.log"
        )
        with timed(samples, "restore (create + start)"):
            request = cri.CreateContainerRequest(pod_sandbox_id=target, config=restored, sandbox_config=target_config)
            restored_id = rt.CreateContainer(request, timeout=660).container_id
            rt.StartContainer(cri.StartContainerRequest(container_id=restored_id), timeout=660)
        for pod_id, _ in pods:
            rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
            rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
        archive.unlink()
    return samples


if __name__ == "__main__":
    main()
