"""shimhub and containerd side by side: the same CRI workload through the same gRPC client.

Both runtimes run on this node at once, each on its own socket, state
directories and CNI bridge, with runc, pulling from one registry on
127.0.0.1. The workloads alternate between them and every figure is printed
for both with the ratio shimhub/containerd (below 1: shimhub is faster or
smaller). Needs root and Debian's containerd (`./install --dev` installs it).
python3 -m bench.compare [--runs 20] [--containers 500] [--churn-seconds 15] [--pods 100]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import grpc
import psutil

from bench.lifecycle import cni_conf_dir, timed
from bench.stats import summary
from shimhub.testing.daemon import Daemon, pod_config
from shimhub.testing.registry import Pusher, Registry, busybox_layer
from shimhub_proto.cri.v1 import api_pb2 as cri
from shimhub_proto.cri.v1 import api_pb2_grpc

START_TIMEOUT = 30.0
PAUSE_IMAGE = "bench/pause:1"
BUSYBOX_IMAGE = "bench/busybox:1"
BRIDGES = {"shimhub": ("shbench0", "10.232.0.0/16"), "containerd": ("shbench1", "10.233.0.0/16")}


class Runtime:
    """One CRI runtime under test: its stubs, its daemon process and the processes that monitor its pods."""

    def __init__(self, name: str, socket_path: Path, pid: int, monitor_marker: str) -> None:
        self.name = name
        self.channel = grpc.insecure_channel(f"unix:{socket_path}")
        grpc.channel_ready_future(self.channel).result(timeout=START_TIMEOUT)
        self.rt = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)
        self.process = psutil.Process(pid)
        #: A string in the command line of this runtime's monitors (conmon, containerd-shim) and nobody else's.
        self.monitor_marker = monitor_marker

    def daemon_rss(self) -> float:
        """The daemon's resident memory in MiB."""
        return self.process.memory_info().rss / 2**20

    def host_memory(self) -> float:
        """Proportional memory (PSS, MiB) of the daemon, its pods' monitors and everything they run."""
        roots = [self.process] + [
            p for p in psutil.process_iter(["cmdline"]) if self.monitor_marker in " ".join(p.info["cmdline"] or [])
        ]
        seen: dict[int, psutil.Process] = {}
        for root in roots:
            with contextlib.suppress(psutil.Error):  # a monitor that exits meanwhile
                for process in [root, *root.children(recursive=True)]:
                    seen[process.pid] = process
        total = 0
        for process in seen.values():
            with contextlib.suppress(psutil.Error):
                total += process.memory_full_info().pss
        return total / 2**20


def start_containerd(root: Path, registry: str) -> tuple[subprocess.Popen[bytes], Path]:
    """containerd 1.6 with its CRI plugin on its own socket, state, snapshots and CNI network."""
    bridge, subnet = BRIDGES["containerd"]
    conf_dir = cni_conf_dir(root, bridge, subnet)
    socket_path = root / "containerd.sock"
    config = f"""version = 2
root = "{root / "root"}"
state = "{root / "state"}"
[grpc]
  address = "{socket_path}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{registry}/{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{conf_dir}"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry}"]
    endpoint = ["http://{registry}"]
"""
    (root / "config.toml").write_text(config)
    log = (root / "containerd.log").open("ab")
    process = subprocess.Popen(
        ["containerd", "--config", str(root / "config.toml")], stdout=log, stderr=log, start_new_session=True
    )
    deadline = time.monotonic() + START_TIMEOUT
    while not socket_path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"containerd did not start: see {root / 'containerd.log'}")
        time.sleep(0.05)
    return process, socket_path


def pod_and_container(run: str, root: Path, image: str) -> tuple[cri.PodSandboxConfig, cri.ContainerConfig]:
    pod = pod_config(name=f"bench-{run}", uid=f"uid-{run}", hostname="bench", log_directory=str(root / "logs" / run))
    container = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="c"), command=["sleep", "3600"], image=cri.ImageSpec(image=image),
        log_path="c.log",
    )  # fmt: skip
    return pod, container


def start_pod(runtime: Runtime, run: str, root: Path, image: str, containers: int = 1) -> tuple[str, list[str]]:
    pod, config = pod_and_container(run, root, image)
    pod_id = runtime.rt.RunPodSandbox(cri.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    ids = []
    for index in range(containers):
        config.metadata.name = f"c{index}"
        config.log_path = f"c{index}.log"
        request = cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
        ids.append(runtime.rt.CreateContainer(request).container_id)
        runtime.rt.StartContainer(cri.StartContainerRequest(container_id=ids[-1]))
    return pod_id, ids


def remove_pod(runtime: Runtime, pod_id: str) -> None:
    runtime.rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    runtime.rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


def lifecycle(runtime: Runtime, run: str, root: Path, image: str, samples: dict[str, list[float]]) -> None:
    pod, config = pod_and_container(run, root, image)
    with timed(samples, "pod start (RunPodSandbox, CNI)"):
        pod_id = runtime.rt.RunPodSandbox(cri.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    with timed(samples, "container create+start"):
        create = cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
        container_id = runtime.rt.CreateContainer(create).container_id
        runtime.rt.StartContainer(cri.StartContainerRequest(container_id=container_id))
    with timed(samples, "ExecSync (true)"):
        runtime.rt.ExecSync(cri.ExecSyncRequest(container_id=container_id, cmd=["true"], timeout=10))
    with timed(samples, "stop+remove container and pod"):
        runtime.rt.StopContainer(cri.StopContainerRequest(container_id=container_id, timeout=0))
        runtime.rt.RemoveContainer(cri.RemoveContainerRequest(container_id=container_id))
        remove_pod(runtime, pod_id)


def count_programs(runtime: Runtime, root: Path, image: str) -> Counter[str]:
    """The programs one lifecycle runs (execve by the daemon and its descendants, under strace), by name."""
    trace = root / f"execs-{runtime.name}.txt"
    tracer = subprocess.Popen(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=execve",
            "-e",
            "signal=none",
            "-o",
            str(trace),
            "-p",
            str(runtime.process.pid),
        ],
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1)  # attaching to every thread
    lifecycle(runtime, f"traced-{runtime.name}", root, image, {})
    time.sleep(1)  # monitors report exits after the call returns
    tracer.send_signal(signal.SIGINT)
    tracer.wait(30)
    programs: Counter[str] = Counter()
    for line in trace.read_text().splitlines():
        if "execve(" in line and line.rstrip().endswith("= 0"):
            programs[line.split('execve("', 1)[1].split('"', 1)[0].rsplit("/", 1)[-1]] += 1
    return programs


def churn(runtime: Runtime, root: Path, image: str, clients: int, seconds: float) -> tuple[float, int]:
    """Pods started and removed per second by `clients` concurrent clients, and the errors seen."""
    deadline = time.monotonic() + seconds
    done, errors, lock = [0], [0], threading.Lock()

    def client(number: int) -> None:
        serial = 0
        while time.monotonic() < deadline:
            serial += 1
            try:
                pod_id, _ = start_pod(runtime, f"churn-{number}-{serial}", root, image)
                remove_pod(runtime, pod_id)
                with lock:
                    done[0] += 1
            except grpc.RpcError as exc:
                with lock:
                    errors[0] += 1
                print(f"  {runtime.name} churn error: {exc.code().name}: {exc.details()}")

    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return done[0] / (time.monotonic() - started), errors[0]


def latencies(call: Callable[[], object], count: int) -> list[float]:
    samples: dict[str, list[float]] = {}
    for _ in range(count):
        with timed(samples, "call"):
            call()
    return samples["call"]


def print_row(name: str, ours: list[float], theirs: list[float], unit: str = " ms") -> None:
    ratio = statistics.median(ours) / statistics.median(theirs)
    print(f"{name:<36} shimhub    {summary(ours, unit)}")
    print(f"{'':<36} containerd {summary(theirs, unit)}   ratio {ratio:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="lifecycle runs per runtime")
    parser.add_argument("--containers", type=int, default=500, help="containers present for the list/status calls")
    parser.add_argument("--pods", type=int, default=100, help="running pods for the memory figures")
    parser.add_argument("--churn-seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shimhub-compare-") as tmp, side_by_side(Path(tmp)) as (runtimes, image):
        run_all(runtimes, Path(tmp), image, args)


@contextlib.contextmanager
def side_by_side(root: Path) -> Iterator[tuple[list[Runtime], str]]:
    """shimhub and containerd started under `root` with the busybox and pause images in a registry on
    127.0.0.1; yields both runtimes (shimhub first) and the busybox reference; stops and cleans up after."""
    if not shutil.which("containerd"):
        raise SystemExit("containerd is not installed: apt-get install containerd (or ./install --dev)")
    registry = Registry(root / "registry", root / "registry" / "storage")
    pusher = Pusher(registry)
    layer = busybox_layer()
    pusher.image("bench/busybox", "1", [layer])
    pusher.image("bench/pause", "1", [layer], config={"Cmd": ["sleep", "2147483647"], "Env": ["PATH=/bin"]})
    image = f"{registry.host}/{BUSYBOX_IMAGE}"
    (root / "shimhub" / "daemon").mkdir(parents=True)
    (root / "containerd").mkdir()
    bridge, subnet = BRIDGES["shimhub"]
    conf_dir = cni_conf_dir(root / "shimhub", bridge, subnet)
    shimhubd = Daemon(
        root / "shimhub" / "daemon",
        f'[network]\nbackend = "cni"\n[network.options]\nconf_dir = "{conf_dir}"\n'
        f'[images.registries."{registry.host}"]\ninsecure = true\n',
        log_level="info",  # as a node runs it: debug logging costs every call
    )
    shimhubd.start()
    containerd, containerd_socket = start_containerd(root / "containerd", registry.host)
    try:
        assert shimhubd.proc is not None
        yield (
            [
                Runtime("shimhub", shimhubd.socket, shimhubd.proc.pid, str(shimhubd.root)),
                Runtime("containerd", containerd_socket, containerd.pid, f"-address {containerd_socket}"),
            ],
            image,
        )
    finally:
        shimhubd.stop()
        containerd.terminate()
        containerd.wait(30)
        for process in psutil.process_iter(["cmdline"]):
            if str(containerd_socket) in " ".join(process.info["cmdline"] or []):
                process.kill()
        subprocess.run(["umount", "-R", str(root / "containerd" / "state")], capture_output=True, check=False)
        registry.stop()
        for bridge, _ in BRIDGES.values():
            subprocess.run(["ip", "link", "delete", bridge], capture_output=True, check=False)


def run_all(runtimes: list[Runtime], root: Path, image: str, args: argparse.Namespace) -> None:
    idle = {r.name: r.daemon_rss() for r in runtimes}
    compare_lifecycle(runtimes, root, image, args.runs)
    pods = compare_memory(runtimes, root, image, args.pods, idle)
    compare_lists(runtimes, root, image, more=args.containers - args.pods, pods=pods)
    for runtime in runtimes:
        for pod_id in pods[runtime.name]:
            remove_pod(runtime, pod_id)
    compare_programs(runtimes, root, image)
    compare_churn(runtimes, root, image, args.clients, args.churn_seconds)


def compare_lifecycle(runtimes: list[Runtime], root: Path, image: str, runs: int) -> None:
    """Image pull, then `runs` lifecycles each, alternating which runtime goes first."""
    pulls: dict[str, list[float]] = {}
    for runtime in runtimes:
        with timed(pulls, runtime.name):
            runtime.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
    samples: dict[str, dict[str, list[float]]] = {r.name: {} for r in runtimes}
    for run in range(runs):
        for runtime in runtimes if run % 2 == 0 else runtimes[::-1]:
            lifecycle(runtime, f"{runtime.name}-{run}", root, image, samples[runtime.name])
    print(f"{runs} lifecycle runs each, CNI bridge, runc; min / median / p95 (ratio of medians)\n")
    print_row("image pull (busybox, local registry)", pulls["shimhub"], pulls["containerd"])
    for name in samples["shimhub"]:
        print_row(name, samples["shimhub"][name], samples["containerd"][name])


def compare_memory(
    runtimes: list[Runtime], root: Path, image: str, count: int, idle: dict[str, float]
) -> dict[str, list[str]]:
    """Start `count` pods of one container on each; print memory; return the pods."""
    base = {r.name: r.host_memory() for r in runtimes}
    pods: dict[str, list[str]] = {r.name: [] for r in runtimes}
    for index in range(count):
        for runtime in runtimes:
            pods[runtime.name].append(start_pod(runtime, f"mem-{runtime.name}-{index}", root, image)[0])
    time.sleep(2)
    print(f"\nmemory, MiB ({count} running pods of one container each)")
    for runtime in runtimes:
        per_pod = (runtime.host_memory() - base[runtime.name]) / count
        print(
            f"  {runtime.name:<11} daemon RSS idle {idle[runtime.name]:7.1f}  with pods {runtime.daemon_rss():7.1f}"
            f"   host memory per pod (PSS: daemon, monitors, pod processes) {per_pod:6.2f}"
        )
    return pods


def compare_lists(
    runtimes: list[Runtime], root: Path, image: str, *, more: int, pods: dict[str, list[str]], per_pod: int = 10
) -> None:
    """Add `more` containers (in pods of `per_pod`) to each, then time list and status calls."""
    for index in range(max(0, more) // per_pod):
        for runtime in runtimes:
            pods[runtime.name].append(start_pod(runtime, f"many-{runtime.name}-{index}", root, image, per_pod)[0])
    counts = {r.name: len(r.rt.ListContainers(cri.ListContainersRequest()).containers) for r in runtimes}
    print(f"\nlist and status calls ({counts} containers present)")
    measured: dict[str, dict[str, list[float]]] = {"ListContainers": {}, "ListPodSandbox": {}, "ContainerStatus": {}}
    for runtime in runtimes:
        rt = runtime.rt
        some = rt.ListContainers(cri.ListContainersRequest()).containers[-1].id
        measured["ListContainers"][runtime.name] = latencies(
            partial(rt.ListContainers, cri.ListContainersRequest()), 50
        )
        measured["ListPodSandbox"][runtime.name] = latencies(
            partial(rt.ListPodSandbox, cri.ListPodSandboxRequest()), 50
        )
        status = cri.ContainerStatusRequest(container_id=some)
        measured["ContainerStatus"][runtime.name] = latencies(partial(rt.ContainerStatus, status), 100)
    for name, by_runtime in measured.items():
        print_row(name, by_runtime["shimhub"], by_runtime["containerd"])


def compare_programs(runtimes: list[Runtime], root: Path, image: str) -> None:
    if not shutil.which("strace"):
        print("\nprograms per lifecycle: strace is not installed, skipped")
        return
    counts = {r.name: count_programs(r, root, image) for r in runtimes}
    print("\nprograms run for one lifecycle (pod with CNI, container, ExecSync, stop and remove)")
    for runtime in runtimes:
        listed = ", ".join(f"{name} {n}" for name, n in counts[runtime.name].most_common())
        print(f"  {runtime.name:<11} {sum(counts[runtime.name].values()):3d} in all: {listed}")


def compare_churn(runtimes: list[Runtime], root: Path, image: str, clients: int, seconds: float) -> None:
    print(f"\npod churn: {clients} concurrent clients for {seconds:.0f} s each (run pod, create+start, remove)")
    rates = {}
    for runtime in runtimes:
        rates[runtime.name], errors = churn(runtime, root, image, clients, seconds)
        print(f"  {runtime.name:<11} {rates[runtime.name]:6.2f} pods/s, {errors} errors")
    print(f"  ratio shimhub/containerd {rates['shimhub'] / rates['containerd']:.2f} (above 1: shimhub churns faster)")


if __name__ == "__main__":
    main()
