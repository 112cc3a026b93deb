"""Pull and unpack benchmark: a ~100 MB four-layer image from a registry on 127.0.0.1.

Prints, per storage driver, the PullImage time through a running shimhub
(download, verify, unpack) and the unpack throughput of the driver alone; then
the cost of the image trust policy per pull: a small image pulled with no
policy, and under a signedBy policy with a GPG signature made by skopeo in a
file lookaside (needs gpg and skopeo: ./install --dev).
Run as root from a checkout: python3 -m bench.pull [--runs N] [--drivers vfs,overlay]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import httpx

from bench.stats import summary
from shimhub import plugins
from shimhub.hooktypes import PluginContext
from shimhub.testing.daemon import Daemon
from shimhub.testing.registry import Pusher, Registry
from shimhub_proto.cri.v1 import api_pb2 as cri

LAYERS = 4
LAYER_BYTES = 25 << 20
FILES_PER_LAYER = 50


def make_layer(index: int) -> bytes:
    """An uncompressed layer of FILES_PER_LAYER files, half random (incompressible), half text."""
    out = io.BytesIO()
    size = LAYER_BYTES // FILES_PER_LAYER
    with tarfile.open(fileobj=out, mode="w") as archive:
        for number in range(FILES_PER_LAYER):
            data = os.urandom(size // 2) + (b"shimhub benchmark line\n" * (size // 46))[: size - size // 2]
            info = tarfile.TarInfo(f"layer{index}/file{number}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def bench_pull(root: Path, registry: Registry, driver: str, runs: int) -> list[float]:
    config = (
        f'[network]\nbackend = "host"\n[storage]\ndriver = "{driver}"\n'
        f'[images]\nsearch_registries = ["{registry.host}"]\n[images.registries."{registry.host}"]\ninsecure = true\n'
    )
    (root / f"daemon-{driver}").mkdir()
    daemon = Daemon(root / f"daemon-{driver}", config).start()
    samples = []
    try:
        for _ in range(runs):
            started = time.perf_counter()
            ref = daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="bench/big:1"))).image_ref
            samples.append(time.perf_counter() - started)
            daemon.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=ref)))
    finally:
        daemon.stop()
    return samples


def bench_verification(root: Path, registry: Registry, runs: int) -> tuple[list[float], list[float]]:
    """PullImage seconds of a one-layer image with no policy and with a signedBy policy (its signature
    verified at every pull)."""
    digest = Pusher(registry).image("bench/small", "1", [make_small_layer()])["manifest"]
    home = root / "gnupg"
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    params = b"%no-protection\nKey-Type: RSA\nKey-Length: 2048\nName-Real: bench\nExpire-Date: 0\n%commit\n"
    subprocess.run(["gpg", "--batch", "--gen-key"], input=params, env=env, check=True, capture_output=True)
    keys = subprocess.run(["gpg", "--export"], env=env, check=True, capture_output=True).stdout
    listing = subprocess.run(["gpg", "--list-keys", "--with-colons"], env=env, check=True, capture_output=True)
    fingerprint = next(line.split(":")[9] for line in listing.stdout.decode().splitlines() if line.startswith("fpr:"))
    (root / "key.gpg").write_bytes(keys)
    manifest = root / "manifest.json"
    accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
    answer = httpx.get(f"http://{registry.host}/v2/bench/small/manifests/{digest}", headers={"Accept": accept})
    manifest.write_bytes(answer.content)
    signatures = root / "lookaside" / f"bench/small@sha256={digest.split(':')[1]}"
    signatures.mkdir(parents=True)
    name = f"{registry.host}/bench/small:1"
    subprocess.run(["skopeo", "standalone-sign", str(manifest), name, fingerprint, "--output",
                    str(signatures / "signature-1")], env=env, check=True, capture_output=True)  # fmt: skip
    subprocess.run(["gpgconf", "--kill", "all"], env=env, check=False, capture_output=True)  # its agent
    (root / "registries.d").mkdir()
    (root / "registries.d" / "bench.yaml").write_text(f"default-docker:\n  lookaside: file://{root / 'lookaside'}\n")
    policy = {"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(root / "key.gpg")}]}
    (root / "policy.json").write_text(json.dumps(policy))
    timings = []
    for extra in ('signature_policy = ""\n', f'signature_policy = "{root / "policy.json"}"\n'
                                                 f'registries_d = "{root / "registries.d"}"\n'):  # fmt: skip
        directory = root / f"daemon-policy-{len(timings)}"
        directory.mkdir()
        config = (
            f'[network]\nbackend = "host"\n[storage]\ndriver = "overlay"\n[images]\n{extra}'
            f'search_registries = ["{registry.host}"]\n[images.registries."{registry.host}"]\ninsecure = true\n'
        )
        daemon = Daemon(directory, config).start()
        samples = []
        try:
            for _ in range(runs):
                started = time.perf_counter()
                request = cri.PullImageRequest(image=cri.ImageSpec(image=name))
                ref = daemon.images.PullImage(request).image_ref
                samples.append(time.perf_counter() - started)
                daemon.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=ref)))
        finally:
            daemon.stop()
        timings.append(samples)
    return timings[0], timings[1]


def make_small_layer() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        info = tarfile.TarInfo("hello")
        info.size = 6
        archive.addfile(info, io.BytesIO(b"hello\n"))
    return out.getvalue()


def bench_unpack(root: Path, driver: str, layers: list[bytes], runs: int) -> list[float]:
    loaded = plugins.load("storage", driver)
    context = PluginContext(
        name=driver,
        state_dir=root,
        run_dir=root,
        log=logging.getLogger("bench"),
        cgroup_driver="cgroupfs",
        extensions=None,
    )
    readiness = loaded.call("storage_setup", root=str(root / f"unpack-{driver}"), options={}, context=context)
    if not readiness.ready:
        raise SystemExit(f"{driver}: {readiness.reason}")
    rates = []
    for run in range(runs):
        started = time.perf_counter()
        parent = ""
        for index, layer in enumerate(layers):
            layer_id = f"r{run}l{index}"
            loaded.call("storage_layer_apply", layer_id=layer_id, parent_id=parent, diff=io.BytesIO(layer))
            parent = layer_id
        rates.append(sum(map(len, layers)) / (1 << 20) / (time.perf_counter() - started))
        for index in reversed(range(len(layers))):
            loaded.call("storage_layer_remove", layer_id=f"r{run}l{index}")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--drivers", default="vfs,overlay")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shimhub-bench-") as tmp:
        root = Path(tmp)
        registry = Registry(root / "registry", root / "registry" / "storage")
        try:
            layers = [make_layer(i) for i in range(LAYERS)]
            Pusher(registry).image("bench/big", "1", layers)
            total = sum(map(len, layers)) / (1 << 20)
            print(f"image: {LAYERS} gzip layers, {total:.0f} MiB uncompressed; {args.runs} runs each")
            print(f"{'driver':<10} {'PullImage seconds':<48} unpack MiB/s")
            for driver in args.drivers.split(","):
                pulls = bench_pull(root, registry, driver, args.runs)
                rates = bench_unpack(root, driver, layers, args.runs)
                print(f"{driver:<10} {summary(pulls):<48} {summary(rates)}")
            if shutil.which("skopeo") and shutil.which("gpg"):
                plain, signed = bench_verification(root, registry, max(args.runs, 10))
                print("\nimage trust policy, a one-layer image, PullImage seconds")
                print(f"  no policy                         {summary(plain)}")
                print(f"  signedBy (GPG, file lookaside)    {summary(signed)}")
                cost = (statistics.median(signed) - statistics.median(plain)) * 1e3
                print(f"  verification per pull (medians)   {cost:.1f} ms")
            else:
                print("\nimage trust policy: skopeo or gpg is not installed, skipped")
        finally:
            registry.stop()


if __name__ == "__main__":
    main()
