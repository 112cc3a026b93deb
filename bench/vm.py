"""VM pod start and per-pod host memory on the kata or clearcontainers handler, through the CRI socket.

Starts --pods pods one after another on a CNI bridge of the script's own, each
with one busybox container (from a registry on 127.0.0.1), and keeps them all
running; then measures the host memory of each pod's QEMU and virtiofsd
processes (proportional set size, so the shared guest image and libraries
count once), and removes the pods. Prints the acceleration used.
With --template the VMs start from a saved template (vm_template = true); the
first pod, which boots and saves it, is timed apart.
Run as root from a checkout:
python3 -m bench.vm [--pods 4] [--handler kata|clearcontainers] [--template]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from bench.daemon import IMAGE, busybox_daemon
from bench.lifecycle import BENCH_BRIDGE, network_config, timed
from bench.stats import summary
from shimhub.testing.daemon import pod_config
from shimhub_proto.cri.v1 import api_pb2 as cri
from shimhub_proto.cri.v1 import api_pb2_grpc


def _pss_mib(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_full_info().pss / 2**20
    except psutil.Error:
        return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=4)
    parser.add_argument("--handler", choices=("kata", "clearcontainers"), default="kata")
    parser.add_argument("--template", action="store_true", help="start the VMs from a template")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shimhub-bench-") as tmp:
        root = Path(tmp)
        options = "vm_template = true\n" if args.template else ""
        tables = "".join(
            f'[runtimes.{name}]\nplugin = "{name}"\n[runtimes.{name}.options]\n{options}'
            for name in ("kata", "clearcontainers")
        )
        tables += f'{network_config(root, "cni")}[storage]\ndriver = "overlay"\n'

        try:
            with busybox_daemon(root, tables) as daemon:
                measure(daemon.runtime, root, args)
        finally:
            subprocess.run(["ip", "link", "delete", BENCH_BRIDGE], capture_output=True, check=False)


def measure(rt: api_pb2_grpc.RuntimeServiceStub, root: Path, args: argparse.Namespace) -> None:
    """Start --pods VM pods and keep them; print start times and memory; remove them."""
    pods: list[tuple[str, dict]] = []
    try:
        samples: dict[str, list[float]] = {}
        if args.template:  # the first pod boots the guest and saves the template
            pod = pod_config(name="vm-template", uid="uid-template", hostname="bench")
            with timed(samples, "first pod (boots, saves the template)"):
                request = cri.RunPodSandboxRequest(config=pod, runtime_handler=args.handler)
                first = rt.RunPodSandbox(request).pod_sandbox_id
            rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=first))
            rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=first))
        for run in range(args.pods):
            logs = root / "logs" / str(run)
            pod = pod_config(name=f"vm-{run}", uid=f"uid-{run}", hostname="bench", log_directory=str(logs))
            config = cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name="c"),
                command=["sh", "-c", "echo up; exec sleep 3600"],
                image=cri.ImageSpec(image=IMAGE),
                log_path="c.log",
            )
            started = time.perf_counter()
            with timed(samples, "pod start (RunPodSandbox)"):
                request = cri.RunPodSandboxRequest(config=pod, runtime_handler=args.handler)
                pod_id = rt.RunPodSandbox(request).pod_sandbox_id
            status = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
            vm = json.loads(status.info["info"])["runtime_data"]["vm"]
            samples.setdefault("  of it: QEMU start to agent ready", []).append(vm["boot_seconds"] * 1000)
            with timed(samples, "container create+start"):
                create = cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
                container_id = rt.CreateContainer(create).container_id
                rt.StartContainer(cri.StartContainerRequest(container_id=container_id))
            while not (logs / "c.log").exists() or b"up" not in (logs / "c.log").read_bytes():
                time.sleep(0.01)
            samples.setdefault("pod start to container output", []).append((time.perf_counter() - started) * 1000)
            with timed(samples, "ExecSync (true)"):
                rt.ExecSync(cri.ExecSyncRequest(container_id=container_id, cmd=["true"], timeout=30))
            pods.append((pod_id, vm))
        memory = [_pss_mib(vm["pid"]) + _pss_mib(vm.get("virtiofsd", 0)) for _, vm in pods]
        accel = pods[0][1]["accel"] if pods else "?"
        print(f"handler {args.handler}, acceleration {accel}, {args.pods} pods (1 vCPU, 256 MiB each), milliseconds")
        for name, values in samples.items():
            print(f"{name:<36} {summary(values)}")
        print(f"{'host memory per running pod (PSS)':<36} {summary(memory, ' MiB')}")
    finally:
        for pod_id, _ in pods:
            rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
            rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


if __name__ == "__main__":
    main()
