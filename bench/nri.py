"""What NRI adds to CreateContainer: the same creations without a plugin, then with one connected.

The plugin is shimhub.testing.nri_plugin, connected to the daemon's NRI socket,
subscribed to every event; with --mode adjust it also adjusts every container
(environment, annotation, mount, device, memory limit). Runs alternate between
the two phases' pods so that the node's state is alike for both.
python3 -m bench.nri [--runs 40] [--mode none|adjust]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.daemon import IMAGE, busybox_daemon
from bench.lifecycle import timed
from bench.stats import summary
from shimhub.testing.daemon import Daemon, pod_config, wait_for
from shimhub_proto.cri.v1 import api_pb2 as cri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--mode", choices=("none", "adjust"), default="none")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shimhub-bench-") as tmp:
        root = Path(tmp)
        (root / "conf.d").mkdir()
        (root / "shared").mkdir()
        (root / "conf.d" / "50-bench.conf").write_text(
            json.dumps({"mode": args.mode, "mount_source": str(root / "shared")})
        )
        tables = (
            '[network]\nbackend = "host"\n[storage]\ndriver = "overlay"\n'
            f'[nri]\nenable = true\nsocket = "{root / "nri.sock"}"\nplugin_path = "{root / "none"}"\n'
            f'plugin_config_path = "{root / "conf.d"}"\n'
        )
        with busybox_daemon(root, tables) as daemon:
            samples: dict[str, list[float]] = {}
            measure(daemon, root, samples, "without a plugin", args.runs)
            plugin = subprocess.Popen(
                [sys.executable, "-m", "shimhub.testing.nri_plugin", str(root / "nri.sock"), "bench", "50"]
            )
            try:
                wait_for(lambda: _plugins(daemon) == 1, 20)
                measure(daemon, root, samples, f"with one plugin ({args.mode})", args.runs)
            finally:
                plugin.kill()
                plugin.wait()
    print(f"CreateContainer, runc, overlay, {args.runs} runs each, milliseconds")
    for name, values in samples.items():
        print(f"{name:<32} {summary(values)}")
    without, with_plugin = (statistics.median(values) for values in samples.values())
    print(f"{'added by NRI (medians)':<32} {with_plugin - without:.2f} ms ({with_plugin / without:.2f}x)")


def _plugins(daemon: Daemon) -> int:
    info = json.loads(daemon.runtime.Status(cri.StatusRequest(verbose=True)).info["status"])
    return len(info["nri"]["plugins"])


def measure(daemon: Daemon, root: Path, samples: dict[str, list[float]], name: str, runs: int) -> None:
    rt = daemon.runtime
    for run in range(runs):
        label = f"{name.split(maxsplit=1)[0]}-{run}"
        config = pod_config(name=label, uid=label, log_directory=str(root / "logs" / label))
        pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
        container = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image=IMAGE), command=["sleep", "60"]
        )
        with timed(samples, name):
            rt.CreateContainer(
                cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=container, sandbox_config=config)
            )
        rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


if __name__ == "__main__":
    main()
