"""A real registry (Debian's docker-registry) on 127.0.0.1, and images built from local files and pushed to it.

One storage directory can be served by several registry processes at once
(an open one to push to, others behind authentication).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import socket
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
PLAIN_LAYER = "application/vnd.oci.image.layer.v1.tar"
ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry:
    """One docker-registry process on 127.0.0.1."""

    def __init__(self, root: Path, storage: Path, auth: dict[str, Any] | None = None) -> None:
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "version": 0.1,
            "log": {"level": "error"},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
            "http": {"addr": self.host},
        }
        if auth:
            config["auth"] = auth
        config_path = root / f"registry-{self.port}.json"
        config_path.write_text(json.dumps(config))  # YAML is a superset of JSON
        self.log = (root / f"registry-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(config_path)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://{self.host}/v2/", timeout=1).status_code in (200, 401):
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"docker-registry did not start on {self.host}")

    def images_config(self) -> str:
        """The `[images]` tables that make a daemon pull short names from this registry over plain HTTP."""
        return f'[images]\nsearch_registries = ["{self.host}"]\n[images.registries."{self.host}"]\ninsecure = true\n'

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


class Pusher:
    """Pushes blobs and manifests to an open registry."""

    def __init__(self, registry: Registry) -> None:
        self.base = f"http://{registry.host}/v2"
        self.http = httpx.Client(timeout=60)

    def blob(self, repository: str, data: bytes) -> str:
        blob_digest = digest(data)
        started = self.http.post(f"{self.base}/{repository}/blobs/uploads/")
        assert started.status_code == 202, started.text
        location = started.headers["Location"]
        if location.startswith("/"):
            location = self.base.removesuffix("/v2") + location
        sep = "&" if "?" in location else "?"
        done = self.http.put(
            f"{location}{sep}digest={blob_digest}", content=data, headers={"Content-Type": "application/octet-stream"}
        )
        assert done.status_code == 201, done.text
        return blob_digest

    def manifest(self, repository: str, reference: str, document: dict[str, Any]) -> str:
        body = json.dumps(document).encode()
        done = self.http.put(
            f"{self.base}/{repository}/manifests/{reference}",
            content=body,
            headers={"Content-Type": document["mediaType"]},
        )
        assert done.status_code == 201, done.text
        return digest(body)

    def image(
        self,
        repository: str,
        tag: str,
        layers: list[bytes],
        config: dict[str, Any] | None = None,
        *,
        media_type: str = OCI_MANIFEST,
        compress: str = "gzip",
        architecture: str = "amd64",
    ) -> dict[str, str]:
        """Push an image of uncompressed layer tars with `config` (Cmd, User, …) as its container config;
        return its manifest and config digests and the manifest's size."""
        descriptors = []
        for layer in layers:
            if compress == "gzip":
                blob, layer_type = gzip.compress(layer, mtime=0), GZIP_LAYER
            elif compress == "zstd":
                import zstandard

                blob, layer_type = zstandard.ZstdCompressor().compress(layer), ZSTD_LAYER
            else:
                blob, layer_type = layer, PLAIN_LAYER
            if media_type == DOCKER_MANIFEST:
                layer_type = "application/vnd.docker.image.rootfs.diff.tar.gzip"
            descriptors.append({"mediaType": layer_type, "digest": self.blob(repository, blob), "size": len(blob)})
        document = {
            "architecture": architecture,
            "os": "linux",
            "config": config or {},
            "rootfs": {"type": "layers", "diff_ids": [digest(layer) for layer in layers]},
        }
        config_blob = json.dumps(document).encode()
        config_type = (
            "application/vnd.docker.container.image.v1+json"
            if media_type == DOCKER_MANIFEST
            else "application/vnd.oci.image.config.v1+json"
        )
        manifest = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": config_type,
                "digest": self.blob(repository, config_blob),
                "size": len(config_blob),
            },
            "layers": descriptors,
        }
        manifest_digest = self.manifest(repository, tag, manifest)
        body = json.dumps(manifest).encode()
        return {"manifest": manifest_digest, "config": digest(config_blob), "size": str(len(body))}

    def index(self, repository: str, tag: str, entries: list[tuple[str, str, int]]) -> str:
        """Push an index of (platform, manifest digest, manifest size) entries."""
        manifests = []
        for platform, manifest_digest, size in entries:
            os_name, arch = platform.split("/")[:2]
            manifests.append(
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": manifest_digest,
                    "size": size,
                    "platform": {"os": os_name, "architecture": arch},
                }
            )
        return self.manifest(repository, tag, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})


def busybox_layer() -> bytes:
    """A root filesystem layer made from the host's static busybox, with its applets and an /etc/passwd."""
    out = io.BytesIO()
    applets = subprocess.run(["busybox", "--list"], capture_output=True, text=True, check=True).stdout.split()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for directory in ("bin", "etc", "tmp", "root", "home", "home/app", "proc", "sys", "dev"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            archive.addfile(info)
        archive.add("/bin/busybox", arcname="bin/busybox")
        for applet in applets:
            if applet != "busybox":
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                archive.addfile(link)
        for name, text in {
            "etc/passwd": "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
            "etc/group": "root:x:0:\napp:x:1000:\n",
        }.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()
