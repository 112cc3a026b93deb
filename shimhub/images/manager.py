"""Pulling images, providing their layers to storage drivers, and collecting garbage.

A pull fetches the manifest (picking the node's platform from an index), the
config and the layer blobs (several at once) into the content store, then
unpacks the layers into the default storage driver. Another driver (a runtime
handler may use its own) gets an image's layers when a container first needs
them. Each layer's uncompressed digest is checked against the image config as
it is unpacked. Layers and blobs that no image and no container use any more
are removed by `collect_garbage`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

from shimhub import telemetry
from shimhub.backends import Backend
from shimhub.config import ImagesConfig
from shimhub.errors import ConfigError, FailedPrecondition, InvalidArgument, ResourceExhausted, ShimhubError
from shimhub.faults import crash_point
from shimhub.hooktypes import FilesystemUsage
from shimhub.images import manifest, node_registries, policy, reference, signatures
from shimhub.images.auth import Credentials
from shimhub.images.content import BlobMismatch, ContentStore
from shimhub.images.registry import RegistryClient
from shimhub.images.store import ImageRecord, ImageStore, Layer
from shimhub.locks import KeyedLocks

log = logging.getLogger(__name__)
T = TypeVar("T")
#: Suffix of the marker of a layer a driver is applying (see provide_layers).
APPLYING = ".applying"

READ_CHUNK = 1 << 20
#: Largest image config accepted (as containers/image): it is parsed at every start and handed to runtimes.
MAX_CONFIG_BYTES = 4 << 20


class LayerTooLarge(ResourceExhausted):
    """A layer unpacks to more than the node allows (images.max_layer_bytes)."""


class _HashingReader:
    """A read-only stream that hashes what passes through it and refuses more than `limit` bytes (0: no limit)."""

    def __init__(self, raw: IO[bytes], what: str, limit: int) -> None:
        self.raw = raw
        self.what = what
        self.limit = limit
        self.hasher = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        if self.limit and self.count > self.limit:
            raise LayerTooLarge(f"{self.what} unpacks to more than {self.limit} bytes (images.max_layer_bytes)")
        self.hasher.update(data)
        return data

    def drain(self) -> str:
        """Read what is left (a tar's trailing padding) and return the digest of everything."""
        while self.read(READ_CHUNK):
            pass
        return f"sha256:{self.hasher.hexdigest()}"


def check_layer_type(media_type: str, where: str) -> None:
    """Refuse a layer this node cannot unpack, before anything is downloaded."""
    if manifest.NONDISTRIBUTABLE in media_type:
        raise InvalidArgument(f"{where}: non-distributable layers are not pulled")
    if media_type not in (*manifest.LAYER_GZIP, *manifest.LAYER_ZSTD, *manifest.LAYER_PLAIN):
        raise InvalidArgument(f"{where}: unsupported layer media type {media_type!r}")


def _decompressed(path: Path, media_type: str) -> IO[bytes]:
    raw = path.open("rb")
    if media_type in manifest.LAYER_GZIP:
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if media_type in manifest.LAYER_ZSTD:
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw)
    return raw


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The OCI chain ids of a stack of layers, bottom first."""
    chain: list[str] = []
    for diff_id in diff_ids:
        chain.append(
            diff_id if not chain else "sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest()
        )
    return chain


def _depth(mark: Path) -> int:
    """How many layers lie below the layer of `mark` (marks hold their parent's chain id)."""
    depth, parent = 0, mark.read_text()
    while parent:
        depth += 1
        above = mark.parent / parent
        parent = above.read_text() if above.exists() else ""
    return depth


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


class ImageManager:
    """The node's images: pull, look up, provide layers, remove."""

    def __init__(self, config: ImagesConfig, state_dir: Path, default_driver: str) -> None:
        search_is_shimhubs = config.search_registries != ImagesConfig().search_registries
        #: shimhub's [images] with what the node's registries.conf and hosts directory add.
        config, self.node_registries = node_registries.merged(config, search_is_shimhubs)
        self.config = config
        self.registry = RegistryClient(config)
        path = policy.default_path(config.signature_policy)
        #: The node's image trust policy (None: every image may be pulled).
        self.policy = policy.PolicyFile(path) if path else None
        self.content = ContentStore(state_dir / "content")
        self.images = ImageStore(state_dir / "images", config.search_registries)
        self.layer_marks = state_dir / "layers"
        self.default_driver = default_driver
        self.platform = manifest.node_platform(config.platform)
        self._layer_locks = KeyedLocks()
        self._gc_lock = threading.Lock()
        #: Blob digests and layer chain ids that pulls in progress hold (see _pin).
        self._pinned: Counter[str] = Counter()

    def _policy_step(self, ref: reference.Reference, step: Callable[[], T]) -> T:
        """Run one step of the image trust policy on a pull. A refusal is logged and counted; an invalid
        policy or registries.d refuses the pull (a trust policy fails closed)."""
        try:
            return step()
        except ConfigError as exc:
            telemetry.POLICY_DECISIONS.labels("refused").inc()
            log.error("image %s refused: the image trust settings are invalid: %s", ref, exc)
            raise FailedPrecondition(f"image {ref} refused: the image trust settings are invalid: {exc}") from None
        except ShimhubError as exc:
            telemetry.POLICY_DECISIONS.labels("refused").inc()
            log.warning("%s", exc.message)
            raise

    def _admit(self, ref: reference.Reference) -> tuple[policy.Policy, policy.Decision]:
        """The policy in force for this pull (read once) and its decision, before anything is fetched."""
        assert self.policy is not None
        in_force = self.policy.current()
        return in_force, in_force.check(ref)

    def _verify(
        self, in_force: policy.Policy, decision: policy.Decision, ref: reference.Reference, manifest_digest: str
    ) -> None:
        """Check the signatures `decision` requires (fetched from the scope's signature storage) against the
        manifest's digest, before any blob is fetched. registries.d is read only when a signature is needed."""

        def fetch() -> Iterator[bytes]:
            storage = signatures.Registries(self.config.registries_d).storage(ref)
            for url in signatures.signature_urls(storage, ref, manifest_digest):
                found = self.registry.fetch(url, signatures.MAX_SIGNATURE_BYTES)
                if found is None:
                    return
                yield found

        signers = in_force.verify(decision, ref, manifest_digest, fetch)
        telemetry.POLICY_DECISIONS.labels("verified" if signers else "allowed").inc()
        if signers:
            log.info("image %s: signatures verified, signed by %s", ref, ", ".join(signers))

    def pull(
        self,
        image: str,
        creds: Credentials | None,
        drivers: dict[str, Backend],
        alive: Callable[[], bool] = lambda: True,
    ) -> ImageRecord:
        """Pull `image` and unpack it into the default storage driver (when that driver is ready).

        Downloads stop once `alive` turns false: the client that asked has gone.
        """
        ref = reference.parse(image, self.config.search_registries)
        admitted = self._policy_step(ref, lambda: self._admit(ref)) if self.policy is not None else None
        where = str(ref)
        body, content_type, header_digest = self.registry.manifest(ref, ref.selector, creds)
        top_digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if ref.digest and top_digest != ref.digest:
            raise BlobMismatch(f"{where}: the registry sent a manifest with digest {top_digest}")
        if header_digest and header_digest != top_digest and header_digest.startswith("sha256:"):
            raise BlobMismatch(f"{where}: manifest digest {top_digest} differs from the registry's {header_digest}")
        if admitted is not None:
            self._policy_step(ref, lambda: self._verify(*admitted, ref, top_digest))
        parsed = manifest.parse(body, content_type, where)
        if isinstance(parsed, list):
            chosen = manifest.pick_platform(parsed, self.platform, where)
            body, content_type, _ = self.registry.manifest(ref, chosen.digest, creds)
            if "sha256:" + hashlib.sha256(body).hexdigest() != chosen.digest:
                raise BlobMismatch(f"{where}: the manifest for {chosen.platform} does not match digest {chosen.digest}")
            parsed = manifest.parse(body, content_type, where)
            if isinstance(parsed, list):
                raise InvalidArgument(f"{where}: an index entry for {chosen.platform} is itself an index")
        pins: Counter[str] = Counter([parsed.config.digest, *(layer.digest for layer in parsed.layers)])
        self._pin(pins)
        try:
            record = self._fetch(ref, parsed, creds, where, alive)
            chains = Counter(layer.chain_id for layer in record.layers)
            self._pin(chains)
            pins += chains
            if ref.tag:
                record.repo_tags = sorted({*record.repo_tags, ref.tagged()})
            record.repo_digests = sorted({*record.repo_digests, ref.with_digest(top_digest)})
            record.pulled_at = time.time_ns()
            driver = drivers.get(self.default_driver)
            if driver is not None and driver.readiness().ready:
                self.provide_layers(record, self.default_driver, driver)  # a refused layer lists no image
            self.images.put(record)
        finally:
            self._unpin(pins)
        log.info("pulled %s as %s", where, record.id)
        return record

    def _pin(self, items: Counter[str]) -> None:
        """Keep garbage collection off the blobs and layers of a pull in progress."""
        with self._gc_lock:
            self._pinned.update(items)

    def _unpin(self, items: Counter[str]) -> None:
        """Let go of what `_pin` held; what no pull holds any more is collectable again."""
        with self._gc_lock:
            self._pinned.subtract(items)
            self._pinned = +self._pinned

    def _fetch(
        self,
        ref: reference.Reference,
        parsed: manifest.Manifest,
        creds: Credentials | None,
        where: str,
        alive: Callable[[], bool],
    ) -> ImageRecord:
        if len(parsed.layers) > self.config.max_layers:
            raise InvalidArgument(
                f"{where}: the image has {len(parsed.layers)} layers; at most {self.config.max_layers} are "
                "accepted ([images] max_layers)"
            )
        if parsed.config.size > MAX_CONFIG_BYTES:
            raise ResourceExhausted(
                f"{where}: the image config is {parsed.config.size} bytes; at most {MAX_CONFIG_BYTES} are accepted"
            )
        config_path = self.content.fetch(
            parsed.config.digest,
            parsed.config.size,
            lambda: self.registry.blob(ref, parsed.config.digest, creds, parsed.config.size, alive),
            "image config",
        )
        try:
            config: dict[str, Any] = json.loads(config_path.read_bytes())
            diff_ids = list(config["rootfs"]["diff_ids"])
        except (ValueError, KeyError, TypeError):
            raise InvalidArgument(
                f"{where}: the image config {parsed.config.digest} is not a valid OCI config"
            ) from None
        if len(diff_ids) != len(parsed.layers):
            raise InvalidArgument(f"{where}: the manifest has {len(parsed.layers)} layers, the config {len(diff_ids)}")
        for layer in parsed.layers:
            check_layer_type(layer.media_type, f"{where}: layer {layer.digest}")

        def download(layer: manifest.Descriptor) -> None:
            self.content.fetch(
                layer.digest,
                layer.size,
                lambda: self.registry.blob(ref, layer.digest, creds, layer.size, alive),
                "layer",
            )
            crash_point("pull:blob")

        with ThreadPoolExecutor(self.config.max_concurrent_downloads, thread_name_prefix="pull") as pool:
            for future in [pool.submit(download, layer) for layer in parsed.layers]:
                future.result()
        layers = [
            Layer(blob_digest=d.digest, media_type=d.media_type, size=d.size, diff_id=diff_id, chain_id=chain_id)
            for d, diff_id, chain_id in zip(parsed.layers, diff_ids, chain_ids(diff_ids), strict=True)
        ]
        existing = self.images.get(parsed.config.digest)
        if existing is not None and existing.removed:
            existing = None
        return ImageRecord(
            id=parsed.config.digest,
            repo_tags=list(existing.repo_tags) if existing else [],
            repo_digests=list(existing.repo_digests) if existing else [],
            size=parsed.config.size + sum(d.size for d in parsed.layers),
            config=config,
            layers=layers,
        )

    def _mark(self, driver_name: str, chain_id: str) -> Path:
        return self.layer_marks / driver_name / _hex(chain_id)

    def provide_layers(self, record: ImageRecord, driver_name: str, driver: Backend) -> None:
        """Make sure storage driver `driver_name` holds every layer of `record`."""
        plugin = driver.require()
        (self.layer_marks / driver_name).mkdir(parents=True, exist_ok=True, mode=0o700)
        parent = ""
        for layer in record.layers:
            mark = self._mark(driver_name, layer.chain_id)
            with self._layer_locks.hold(f"{driver_name}/{layer.chain_id}"):
                if not mark.exists():
                    applying = mark.with_suffix(APPLYING)
                    applying.touch()  # a crash before the mark leaves this: the next start removes the layer
                    try:
                        self._apply(plugin, layer, parent)
                    except BaseException:
                        applying.unlink()  # the driver removes what it had unpacked of a layer it failed
                        raise
                    crash_point("pull:layer")
                    mark.write_text(parent)  # the parent's chain id: garbage collection removes children first
                    applying.unlink()
            parent = _hex(layer.chain_id)

    def _apply(self, plugin: Any, layer: Layer, parent: str) -> None:
        if not self.content.has(layer.blob_digest):
            raise FailedPrecondition(f"layer blob {layer.blob_digest} is missing from the content store; pull again")
        with _decompressed(self.content.path(layer.blob_digest), layer.media_type) as stream:
            reader = _HashingReader(stream, f"layer {layer.blob_digest}", self.config.max_layer_bytes)
            plugin.call("storage_layer_apply", layer_id=_hex(layer.chain_id), parent_id=parent, diff=reader)
            try:
                actual = reader.drain()
            except (OSError, EOFError) as exc:
                actual = f"unreadable ({exc})"
            except LayerTooLarge:
                plugin.call("storage_layer_remove", layer_id=_hex(layer.chain_id))
                raise
        if actual != layer.diff_id:
            plugin.call("storage_layer_remove", layer_id=_hex(layer.chain_id))
            raise BlobMismatch(
                f"layer {layer.blob_digest}: uncompressed content {actual} does not match the "
                f"image config's diff_id {layer.diff_id}"
            )

    def drop_interrupted_layers(self, drivers: dict[str, Backend]) -> None:
        """At startup: remove the layers a crash interrupted while a driver was applying them."""
        for applying in self.layer_marks.glob(f"*/*{APPLYING}"):
            driver = drivers.get(applying.parent.name)
            if driver is not None and driver.plugin is not None:
                driver.plugin.call("storage_layer_remove", layer_id=applying.stem)
            applying.unlink()
            log.warning("removed layer %s: a crash interrupted its unpacking", applying.stem[:12])

    def collect_garbage(self, drivers: dict[str, Backend], images_in_use: Iterable[str]) -> None:
        """Remove layers and blobs that no image and no container (of `images_in_use`) needs."""
        in_use = set(images_in_use)
        with self._gc_lock:
            kept: list[ImageRecord] = []
            for record in self.images.all(include_removed=True):
                if record.removed and record.id not in in_use:
                    self.images.delete(record.id)
                else:
                    kept.append(record)
            pinned = set(self._pinned)
            kept_chains = {layer.chain_id for record in kept for layer in record.layers} | pinned
            kept_blobs = {layer.blob_digest for record in kept for layer in record.layers} | {r.id for r in kept}
            kept_blobs |= pinned
            for driver_dir in self.layer_marks.glob("*"):
                driver = drivers.get(driver_dir.name)
                marks = [m for m in driver_dir.iterdir() if m.suffix != APPLYING]
                unused = [m for m in marks if f"sha256:{m.name}" not in kept_chains]
                # Children before parents: a driver may refuse to remove a layer another builds on.
                for mark in sorted(unused, key=_depth, reverse=True):
                    if driver is not None and driver.plugin is not None:
                        driver.plugin.call("storage_layer_remove", layer_id=mark.name)
                    mark.unlink()
            for digest in self.content.digests() - kept_blobs:
                self.content.remove(digest)

    def remove(self, record: ImageRecord) -> None:
        """Remove an image from the list; its layers stay while containers use them (see collect_garbage)."""
        record.removed = True
        record.repo_tags = []
        record.repo_digests = []
        self.images.put(record)

    def usage(self) -> FilesystemUsage:
        """Bytes and inodes of the content store."""
        return self.content.usage()
