"""A shimhub daemon for a benchmark: its own state under a directory, the busybox image pulled from a
registry on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shimhub.testing.daemon import Daemon
from shimhub.testing.registry import Pusher, Registry, busybox_layer
from shimhub_proto.cri.v1 import api_pb2 as cri

#: The image every benchmark pod runs.
IMAGE = "bench/busybox:1"


@contextmanager
def busybox_daemon(root: Path, tables: str) -> Iterator[Daemon]:
    """A started daemon configured by `tables` (handlers, network, storage) with IMAGE pulled; stopped after."""
    registry = Registry(root / "registry", root / "registry" / "storage")
    try:
        Pusher(registry).image("bench/busybox", "1", [busybox_layer()])
        (root / "daemon").mkdir()
        config = (
            f'{tables}[images]\nsearch_registries = ["{registry.host}"]\n'
            f'[images.registries."{registry.host}"]\ninsecure = true\n'
        )
        daemon = Daemon(root / "daemon", config, log_level="info").start()
        try:
            daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=IMAGE)))
            yield daemon
        finally:
            daemon.stop()
    finally:
        registry.stop()
