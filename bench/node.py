"""A kubelet-shaped load on a full node, shimhub and containerd one after the other in one run.

Each runtime in turn gets --pods pods (110, the kubelet's default maximum) of the
kubelet's recorded shape (scenario a of the shared kubelet-cri recordings: an app
and a sidecar, with its resources, security context, mounts and log paths) on a
CNI bridge, then for --seconds the kubelet's steady load: an exec probe on every
container every 10 s (ExecSync `sh -c true`, 1 s timeout), a relist every second
(ListPodSandbox + ListContainers) and ListContainerStats + ListPodSandboxStats
every 10 s; then for --churn-seconds the same load while 10 % of the pods are
replaced per minute. The runtime's CPU (daemon, monitors or shims, and the
runtime binaries they run; not the containers) is read from a cpuacct cgroup the
daemon is moved into. Per-call latencies of the status, image and lifecycle calls
are taken at the full node with the load paused. Prints a table with the ratio
shimhub/containerd (below 1: shimhub uses less or answers sooner).
Root, containerd installed (`./install --dev`); traffic stays on loopback and the
runtimes' own bridges.
python3 -m bench.node [--pods 110] [--seconds 120] [--churn-seconds 120]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import json
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from bench.compare import Runtime, side_by_side
from bench.stats import percentile
from shimhub.testing.kubelet import localize, scenario_calls
from shimhub_proto.cri.v1 import api_pb2 as cri

#: The recorded pod whose uid and name are replaced per pod.
RECORDED_UID = "605b387d50337f547380f9e1645bb180"
RECORDED_NAME = "sc-a-burstable-node-1"
PROBE = ["sh", "-c", "true"]
PROBE_PERIOD = 10.0
RELIST_PERIOD = 1.0
STATS_PERIOD = 10.0
#: Share of the pods replaced per minute during the churn phase.
CHURN_PER_MINUTE = 0.10
CPUACCT = Path("/sys/fs/cgroup/cpuacct")
CALL_TIMEOUT = 60.0


class Samples:
    """Latencies in ms by name, and errors by name, from many threads."""

    def __init__(self) -> None:
        self.ms: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def time(self, name: str, call: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            answer = call()
        except grpc.RpcError as exc:
            with self._lock:
                self.errors[name] += 1
                first = self.errors[name] <= 3
            if first:  # the first few of each call, then only the count in the table
                print(f"  {name}: {exc.code().name}: {exc.details()}", flush=True)
            return None
        with self._lock:
            self.ms[name].append((time.perf_counter() - started) * 1e3)
        return answer


class CpuAccount:
    """A cpuacct cgroup (v1) or cgroup (v2) holding a daemon, and so everything it starts that stays there."""

    def __init__(self, name: str, pid: int) -> None:
        v1 = CPUACCT.is_dir()
        base = CPUACCT if v1 else Path("/sys/fs/cgroup")
        self.path = base / f"shimhub-bench-{name}"
        self.path.mkdir(exist_ok=True)
        (self.path / "cgroup.procs").write_text(str(pid))
        self._read = self._v1 if v1 else self._v2

    def _v1(self) -> float:
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def _v2(self) -> float:
        for line in (self.path / "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) / 1e6
        return 0.0

    def seconds(self) -> float:
        """CPU seconds used by the cgroup so far."""
        return self._read()

    def remove(self, pid: int) -> None:
        """Move the daemon back to the root and delete the cgroup if it is empty."""
        parent = self.path.parent / "cgroup.procs"
        for line in (self.path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                parent.write_text(line)
        try:
            self.path.rmdir()
        except OSError as exc:
            print(f"  cgroup {self.path} left: {exc}")


class Node:
    """One runtime holding the kubelet's pods, and the kubelet's load on it."""

    def __init__(self, runtime: Runtime, root: Path, image: str) -> None:
        self.runtime = runtime
        self.rt = runtime.rt
        self.root = root / runtime.name
        self.image = image
        self.calls = scenario_calls("a")
        self.pods: dict[str, tuple[dict[str, Any], list[str]]] = {}
        self.serial = 0
        #: The pod uids given out, whose pod-level cgroups (the kubelet's to remove) go at the end.
        self.uids: list[str] = []
        self.samples = Samples()
        self.lock = threading.Lock()

    def _shape(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The recorded pod and its containers' requests, made a new pod's."""
        self.serial += 1
        uid = hashlib.md5(f"{self.runtime.name}-{self.serial}".encode()).hexdigest()
        self.uids.append(uid)
        text = json.dumps([call["request"] for call in self.calls if call["method"] != "PullImage"])
        text = text.replace(RECORDED_UID, uid).replace(RECORDED_NAME, f"bench-{self.serial}")
        pod, *containers = (localize(request, self.root, self.image) for request in json.loads(text))
        return pod, containers

    def start_pod(self, samples: Samples) -> None:
        pod, containers = self._shape()
        request = json_format.ParseDict(pod, cri.RunPodSandboxRequest())
        answer = samples.time("RunPodSandbox", lambda: self.rt.RunPodSandbox(request, timeout=CALL_TIMEOUT))
        if answer is None:
            return
        pod_id, ids = answer.pod_sandbox_id, []
        for container in containers:
            container["pod_sandbox_id"] = pod_id
            create = json_format.ParseDict(container, cri.CreateContainerRequest())
            made = samples.time("CreateContainer", lambda c=create: self.rt.CreateContainer(c, timeout=CALL_TIMEOUT))
            if made is None:
                continue
            start = cri.StartContainerRequest(container_id=made.container_id)
            samples.time("StartContainer", lambda s=start: self.rt.StartContainer(s, timeout=CALL_TIMEOUT))
            ids.append(made.container_id)
        with self.lock:
            self.pods[pod_id] = (pod, ids)

    def remove_pod(self, pod_id: str, samples: Samples, grace: int) -> None:
        """As the kubelet removes a pod: stop its containers with the grace period, stop the pod, remove."""
        with self.lock:
            _, ids = self.pods.pop(pod_id)
        for container_id in ids:
            stop = cri.StopContainerRequest(container_id=container_id, timeout=grace)
            samples.time("StopContainer", lambda s=stop: self.rt.StopContainer(s, timeout=CALL_TIMEOUT))
        for container_id in ids:
            remove = cri.RemoveContainerRequest(container_id=container_id)
            samples.time("RemoveContainer", lambda r=remove: self.rt.RemoveContainer(r, timeout=CALL_TIMEOUT))
        stop_pod = cri.StopPodSandboxRequest(pod_sandbox_id=pod_id)
        samples.time("StopPodSandbox", lambda: self.rt.StopPodSandbox(stop_pod, timeout=CALL_TIMEOUT))
        remove_pod = cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id)
        samples.time("RemovePodSandbox", lambda: self.rt.RemovePodSandbox(remove_pod, timeout=CALL_TIMEOUT))

    def remove_pod_cgroups(self) -> None:
        """Remove the pods' cgroup parents, empty now, as the kubelet does for pods it removed."""
        for uid in self.uids:
            for directory in Path("/sys/fs/cgroup").glob(f"*/kubepods/burstable/pod{uid}"):
                for inner in sorted(directory.rglob("*"), reverse=True):
                    if inner.is_dir():
                        with contextlib.suppress(OSError):
                            inner.rmdir()
                with contextlib.suppress(OSError):
                    directory.rmdir()

    def containers(self) -> list[str]:
        with self.lock:
            return [container for _, ids in self.pods.values() for container in ids]

    def load(self, seconds: float, churn: bool, samples: Samples) -> None:
        """The kubelet's steady load for `seconds`, replacing pods if `churn`."""
        deadline = time.monotonic() + seconds
        stop = threading.Event()
        with ThreadPoolExecutor(48, thread_name_prefix="probe") as probes, ThreadPoolExecutor(8) as lifecycle:
            threads = [
                threading.Thread(target=self._probes, args=(probes, samples, stop)),
                threading.Thread(target=self._every, args=(RELIST_PERIOD, self._relist, samples, stop)),
                threading.Thread(target=self._every, args=(STATS_PERIOD, self._stats, samples, stop)),
            ]
            if churn:
                period = 60.0 / max(1.0, CHURN_PER_MINUTE * len(self.pods))
                replace = self._replace(lifecycle)
                threads.append(threading.Thread(target=self._every, args=(period, replace, samples, stop)))
            for thread in threads:
                thread.start()
            stop.wait(max(0.0, deadline - time.monotonic()))
            stop.set()
            for thread in threads:
                thread.join()

    def _probes(self, pool: ThreadPoolExecutor, samples: Samples, stop: threading.Event) -> None:
        """Each container probed every PROBE_PERIOD, the probes spread over the period as the kubelet's are."""
        start = time.monotonic()
        schedule: list[tuple[float, str]] = []
        known: set[str] = set()
        while not stop.is_set():
            for index, container_id in enumerate(self.containers()):
                if container_id not in known:
                    known.add(container_id)
                    offset = (index * PROBE_PERIOD / max(1, len(known))) % PROBE_PERIOD
                    heapq.heappush(schedule, (max(time.monotonic(), start + offset), container_id))
            if not schedule:
                stop.wait(0.1)
                continue
            due, container_id = schedule[0]
            if stop.wait(max(0.0, due - time.monotonic())):
                return
            heapq.heappop(schedule)
            if container_id not in self.containers():
                known.discard(container_id)
                continue
            request = cri.ExecSyncRequest(container_id=container_id, cmd=PROBE, timeout=1)
            pool.submit(samples.time, "ExecSync (probe)", lambda r=request: self.rt.ExecSync(r, timeout=CALL_TIMEOUT))
            heapq.heappush(schedule, (due + PROBE_PERIOD, container_id))

    @staticmethod
    def _every(period: float, action: Callable[[Samples], None], samples: Samples, stop: threading.Event) -> None:
        due = time.monotonic()
        while not stop.wait(max(0.0, due - time.monotonic())):
            action(samples)
            due += period

    def _relist(self, samples: Samples) -> None:
        def relist() -> None:
            self.rt.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=CALL_TIMEOUT)
            self.rt.ListContainers(cri.ListContainersRequest(), timeout=CALL_TIMEOUT)

        samples.time("relist", relist)

    def _stats(self, samples: Samples) -> None:
        def stats() -> None:
            self.rt.ListContainerStats(cri.ListContainerStatsRequest(), timeout=CALL_TIMEOUT)
            self.rt.ListPodSandboxStats(cri.ListPodSandboxStatsRequest(), timeout=CALL_TIMEOUT)

        samples.time("stats (containers + pods)", stats)

    def _replace(self, pool: ThreadPoolExecutor) -> Callable[[Samples], None]:
        def replace(samples: Samples) -> None:
            with self.lock:
                oldest = next(iter(self.pods), None)
            if oldest is not None:
                pool.submit(self._swap, oldest, samples)

        return replace

    def _swap(self, pod_id: str, samples: Samples) -> None:
        self.remove_pod(pod_id, samples, grace=5)
        self.start_pod(samples)
        with self.lock:
            samples.ms["replaced"].append(1.0)

    def per_call(self, samples: Samples, count: int) -> None:
        """The status and image calls at the full node, `count` each, on objects that do not change."""
        some_pod = next(iter(self.pods))
        some_container = self.pods[some_pod][1][0]
        calls: dict[str, Callable[[], Any]] = {
            "ContainerStatus": lambda: self.rt.ContainerStatus(cri.ContainerStatusRequest(container_id=some_container)),
            "PodSandboxStatus": lambda: self.rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=some_pod)),
            "ImageStatus": lambda: self.runtime.images.ImageStatus(
                cri.ImageStatusRequest(image=cri.ImageSpec(image=self.image))
            ),
            "ListImages": lambda: self.runtime.images.ListImages(cri.ListImagesRequest()),
            "ListContainers (full node)": lambda: self.rt.ListContainers(cri.ListContainersRequest()),
        }
        for name, call in calls.items():
            for _ in range(count):
                samples.time(name, call)


def run(runtime: Runtime, root: Path, image: str, args: argparse.Namespace) -> dict[str, Any]:
    """Fill the node, load it, churn it, measure calls, empty it; the figures of this runtime."""
    figures: dict[str, Any] = {"idle RSS (MiB)": runtime.daemon_rss()}
    runtime.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
    node = Node(runtime, root, image)
    account = CpuAccount(runtime.name, runtime.process.pid)
    try:
        started = time.monotonic()
        lifecycle = Samples()
        for _ in range(args.pods):
            node.start_pod(lifecycle)
        figures["fill (pods/s)"] = args.pods / (time.monotonic() - started)
        print(f"  {runtime.name}: {len(node.pods)} pods, {len(node.containers())} containers running")
        steady, churned = Samples(), Samples()
        for samples, seconds, churn in ((steady, args.seconds, False), (churned, args.churn_seconds, True)):
            cpu = account.seconds()
            node.load(seconds, churn, samples)
            samples.ms["cpu"] = [(account.seconds() - cpu) / seconds * 60.0]
        figures["steady"], figures["churn"] = steady, churned
        figures["RSS at full node (MiB)"] = runtime.daemon_rss()
        figures["PSS daemon + monitors (MiB)"] = runtime.host_memory()
        calls = Samples()
        node.per_call(calls, args.calls)
        figures["calls"] = calls
        for pod_id in list(node.pods):
            node.remove_pod(pod_id, lifecycle, grace=0)
        figures["lifecycle"] = lifecycle
    finally:
        for pod_id in list(node.pods):
            node.remove_pod(pod_id, Samples(), grace=0)
        node.remove_pod_cgroups()
        account.remove(runtime.process.pid)
    return figures


def report(figures: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    ours, theirs = figures["shimhub"], figures["containerd"]
    print(f"\n{args.pods} pods x 2 containers (kubelet shape), probes every {PROBE_PERIOD:.0f} s, relist every "
          f"{RELIST_PERIOD:.0f} s, stats every {STATS_PERIOD:.0f} s; steady {args.seconds:.0f} s, then "
          f"{args.churn_seconds:.0f} s replacing {CHURN_PER_MINUTE:.0%} of the pods per minute")  # fmt: skip
    print(f"{'':<40} {'shimhub':>22} {'containerd':>22} {'ratio':>7}")

    def row(name: str, a: float, b: float, unit: str = "") -> None:
        print(f"{name:<40} {a:>19.2f}{unit:>3} {b:>19.2f}{unit:>3} {a / b if b else float('nan'):7.2f}")

    def percentiles(name: str, a: list[float], b: list[float]) -> None:
        for label, q in (("p50", 0.5), ("p99", 0.99)):
            row(f"{name} {label}", percentile(a, q), percentile(b, q), "ms")

    for phase in ("steady", "churn"):
        a, b = ours[phase], theirs[phase]
        row(f"[{phase}] runtime CPU s per minute", a.ms["cpu"][0], b.ms["cpu"][0], "s")
        for name in ("relist", "ExecSync (probe)", "stats (containers + pods)"):
            percentiles(f"[{phase}] {name}", a.ms[name], b.ms[name])
        if phase == "churn":
            row("[churn] pods replaced", len(a.ms["replaced"]), len(b.ms["replaced"]))
        errors = (sum(a.errors.values()), sum(b.errors.values()))
        row(f"[{phase}] errors", *errors)
    for name in ("idle RSS (MiB)", "RSS at full node (MiB)", "PSS daemon + monitors (MiB)", "fill (pods/s)"):
        row(name, ours[name], theirs[name])
    for group in ("calls", "lifecycle"):
        for name in ours[group].ms:
            a, b = ours[group].ms[name], theirs[group].ms.get(name, [])
            row(f"{name} median", statistics.median(a), statistics.median(b) if b else float("nan"), "ms")
    for first, second in (("CreateContainer", "StartContainer"), ("StopContainer", "RemoveContainer")):
        a = statistics.median(ours["lifecycle"].ms[first]) + statistics.median(ours["lifecycle"].ms[second])
        b = statistics.median(theirs["lifecycle"].ms[first]) + statistics.median(theirs["lifecycle"].ms[second])
        row(f"{first}+{second.removesuffix('Container')} median", a, b, "ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=110)
    parser.add_argument("--seconds", type=float, default=120.0, help="steady load, per runtime")
    parser.add_argument("--churn-seconds", type=float, default=120.0, help="load with pods replaced, per runtime")
    parser.add_argument("--calls", type=int, default=200, help="calls of each status and image call")
    args = parser.parse_args()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shimhub-node-") as tmp, side_by_side(Path(tmp)) as (runtimes, image):
        figures = {runtime.name: run(runtime, Path(tmp), image, args) for runtime in runtimes}
    report(figures, args)
    print(f"\n(the whole run took {(time.monotonic() - began) / 60:.1f} min)")


if __name__ == "__main__":
    main()
