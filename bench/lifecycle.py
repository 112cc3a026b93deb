"""Pod and container lifecycle latencies on the runc handler, through the CRI socket.

Each run: RunPodSandbox (on a CNI bridge of the script's own, or loopback only
with --network host), CreateContainer + StartContainer (busybox from a registry
on 127.0.0.1), ExecSync, ContainerStats, PodSandboxStats, then StopContainer +
RemoveContainer (also timed alone) + StopPodSandbox + RemovePodSandbox.
Run as root from a checkout:
python3 -m bench.lifecycle [--runs 50] [--handler runc|crun|runsc|shim] [--network cni|host]
                          [--cgroup-driver cgroupfs|systemd] [--userns]
With --userns every run is done twice, alternately, by a pod in the node's user
namespace and by one in its own (hostUsers: false, 65536 ids), and the ratios printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from bench.daemon import IMAGE, busybox_daemon
from bench.stats import summary
from shimhub.testing.daemon import pod_config
from shimhub_proto.cri.v1 import api_pb2 as cri
from shimhub_proto.cri.v1 import api_pb2_grpc


@contextmanager
def timed(samples: dict[str, list[float]], name: str) -> Iterator[None]:
    """Add the block's duration in milliseconds to samples[name]."""
    started = time.perf_counter()
    yield
    samples.setdefault(name, []).append((time.perf_counter() - started) * 1000)


BENCH_BRIDGE = "shbench0"


def cni_conf_dir(root: Path, bridge: str = BENCH_BRIDGE, subnet: str = "10.232.0.0/16") -> Path:
    """A CNI config directory under `root`: a bridge network of the benchmark's own, with its IPAM dir."""
    conf_dir = root / "net.d"
    conf_dir.mkdir()
    conflist = {
        "cniVersion": "1.0.0",
        "name": "bench",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,
                "ipam": {"type": "host-local", "dataDir": str(root / "ipam"), "ranges": [[{"subnet": subnet}]]},
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    (conf_dir / "10-bench.conflist").write_text(json.dumps(conflist))
    return conf_dir


def network_config(root: Path, backend: str) -> str:
    """The [network] tables: a CNI bridge network with its own subnet and IPAM dir, or the host backend."""
    if backend == "host":
        return '[network]\nbackend = "host"\n'
    return f'[network]\nbackend = "cni"\n[network.options]\nconf_dir = "{cni_conf_dir(root)}"\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--handler", default="runc")
    parser.add_argument(
        "--network",
        choices=("cni", "host"),
        default="cni",
        help="cni: a bridge network on a subnet of the script's own (default); host: loopback only",
    )
    parser.add_argument("--cgroup-driver", choices=("cgroupfs", "systemd"), default="cgroupfs")
    parser.add_argument("--userns", action="store_true", help="also pods in user namespaces, and the ratios")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shimhub-bench-") as tmp:
        root = Path(tmp)
        root.chmod(0o711)  # reachable by runtimes in pods' user namespaces (--userns)
        tables = (
            f'cgroup_driver = "{args.cgroup_driver}"\n'
            '[runtimes.crun]\nplugin = "runc"\n[runtimes.crun.options]\nbinary = "crun"\n'
            '[runtimes.runsc]\nplugin = "runc"\n[runtimes.runsc.options]\nbinary = "runsc"\n'
            f'runtime_args = ["--network=host"]\n'
            '[runtimes.shim]\nplugin = "shimv2"\n[runtimes.shim.options]\nshim = "containerd-shim-runc-v2"\n'
            f'{network_config(root, args.network)}[storage]\ndriver = "overlay"\n'
        )
        try:
            with busybox_daemon(root, tables) as daemon:
                samples = measure(daemon.runtime, root, args)
        finally:
            subprocess.run(["ip", "link", "delete", BENCH_BRIDGE], capture_output=True, check=False)
        print(
            f"handler {args.handler}, network {args.network}, cgroup driver {args.cgroup_driver}, "
            f"{args.runs} runs, milliseconds"
        )
        for name, values in samples.items():
            print(f"{name:<40} {summary(values)}")
        for name in [name for name in samples if f"{USERNS}{name}" in samples]:
            ratio = statistics.median(samples[f"{USERNS}{name}"]) / statistics.median(samples[name])
            print(f"{name:<40} user namespace / node's, medians: {ratio:.2f}")


USERNS = "userns: "


def measure(rt: api_pb2_grpc.RuntimeServiceStub, root: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    """The lifecycle of --runs pods (twice as many with --userns), each step timed."""
    samples: dict[str, list[float]] = {}
    for run in range(args.runs):
        lifecycle(rt, root, args, samples, run=run, kind="")
        if args.userns:
            lifecycle(rt, root, args, samples, run=run, kind=USERNS)
    return samples


def lifecycle(
    rt: api_pb2_grpc.RuntimeServiceStub,
    root: Path,
    args: argparse.Namespace,
    samples: dict[str, list[float]],
    *,
    run: int,
    kind: str,
) -> None:
    """One pod's lifecycle, its steps timed under names starting with `kind`."""

    def step(name: str) -> AbstractContextManager[None]:
        return timed(samples, kind + name)

    namespaces = cri.NamespaceOption(pid=cri.CONTAINER)
    if kind == USERNS:
        mapping = [cri.IDMapping(host_id=65536 * (1 + run % 64), container_id=0, length=65536)]
        namespaces.userns_options.CopyFrom(cri.UserNamespace(mode=cri.POD, uids=mapping, gids=mapping))
    linux = cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(namespace_options=namespaces))
    pod = pod_config(
        name=f"bench-{run}{kind[:6]}",
        uid=f"uid-{run}{kind[:6]}",
        hostname="bench",
        log_directory=str(root / "logs" / f"{run}{kind[:6]}"),
        linux=linux,
    )
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="c"),
        command=["sleep", "3600"],
        image=cri.ImageSpec(image=IMAGE),
        log_path="c.log",
        linux=cri.LinuxContainerConfig(
            security_context=cri.LinuxContainerSecurityContext(namespace_options=namespaces)
        ),
    )
    with step("pod start (RunPodSandbox)"):
        request = cri.RunPodSandboxRequest(config=pod, runtime_handler=args.handler)
        pod_id = rt.RunPodSandbox(request).pod_sandbox_id
    with step("container create+start"):
        create = cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
        container_id = rt.CreateContainer(create).container_id
        rt.StartContainer(cri.StartContainerRequest(container_id=container_id))
    with step("ExecSync (true)"):
        rt.ExecSync(cri.ExecSyncRequest(container_id=container_id, cmd=["true"], timeout=10))
    with step("ContainerStats"):
        rt.ContainerStats(cri.ContainerStatsRequest(container_id=container_id))
    with step("PodSandboxStats (with network)"):
        rt.PodSandboxStats(cri.PodSandboxStatsRequest(pod_sandbox_id=pod_id))
    with step("stop+remove container and pod"):
        rt.StopContainer(cri.StopContainerRequest(container_id=container_id, timeout=0))
        with step("RemoveContainer (stopped)"):
            rt.RemoveContainer(cri.RemoveContainerRequest(container_id=container_id))
        rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


if __name__ == "__main__":
    main()
