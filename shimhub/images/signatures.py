"""Image signatures: where they are stored (registries.d(5)) and GPG "simple signing" verification.

registries.d holds YAML files mapping docker scopes (`default-docker`, and
`docker:` host, namespace or repository) to signature storage. A `lookaside`
URL holds an image's GPG signatures at
`<lookaside>/<repository path>@sha256=<hex>/signature-<n>`, n counting from 1.

A simple-signing signature is an OpenPGP signed message whose content is JSON
naming the manifest digest and the image reference it was signed for. It is
checked with Debian's `gpgv` (GnuPG's verify-only tool, which trusts exactly
the keyring it is given and keeps no state), bounded in bytes and time; the
content is trusted only when gpgv answers with a valid signature.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import select
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from attrs import define

from shimhub.errors import ConfigError, FailedPrecondition, ShimhubError
from shimhub.images import reference
from shimhub.images.reference import Reference

#: Where the containers tools keep signature storage settings.
#: Most signatures looked at per image, bytes per signature and per key file, seconds per gpgv run.
MAX_SIGNATURES = 16
MAX_SIGNATURE_BYTES = 4 << 20
MAX_KEY_BYTES = 1 << 20
GPGV_TIMEOUT = 10.0
SIGNATURE_TYPE = "atomic container signature"


@define(frozen=True)
class Storage:
    """Signature storage of one scope (`use-sigstore-attachments` is checked for form only: this node does
    not verify sigstore signatures)."""

    lookaside: str = ""


class Registries:
    """The registries.d settings: signature storage by docker scope."""

    def __init__(self, directory: str) -> None:
        self.default = Storage()
        self.scopes: dict[str, Storage] = {}
        path = Path(directory)
        if not directory or not path.is_dir():
            return
        import yaml  # only nodes with a signature policy read these files

        for file in sorted(path.glob("*.yaml")):
            try:
                document = yaml.safe_load(file.read_text()[:MAX_KEY_BYTES]) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"{file}: not valid YAML: {exc}") from None
            if not isinstance(document, dict):
                raise ConfigError(f"{file}: not a mapping")
            if "default-docker" in document:
                self.default = _storage(document["default-docker"], f"{file}: default-docker")
            docker = document.get("docker") or {}
            if not isinstance(docker, dict):
                raise ConfigError(f"{file}: docker: not a mapping")
            for scope, settings in docker.items():
                if scope in self.scopes:
                    raise ConfigError(f"{file}: docker: {scope!r} is configured in another file too")
                self.scopes[str(scope)] = _storage(settings, f"{file}: docker.{scope!r}")

    def storage(self, ref: Reference) -> Storage:
        """The storage of the most specific scope covering `ref`'s repository."""
        parts = ref.name.split("/")
        for end in range(len(parts), 0, -1):
            found = self.scopes.get("/".join(parts[:end]))
            if found is not None:
                return found
        return self.default


def _storage(settings: Any, where: str) -> Storage:
    if settings is None:
        return Storage()
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: not a mapping")
    lookaside = settings.get("lookaside", settings.get("sigstore", ""))  # "sigstore" is the key's old name
    if not isinstance(lookaside, str) or (lookaside and not lookaside.startswith(("http://", "https://", "file://"))):
        raise ConfigError(f"{where}: lookaside: an http, https or file URL")
    if not isinstance(settings.get("use-sigstore-attachments", False), bool):
        raise ConfigError(f"{where}: use-sigstore-attachments: true or false")
    return Storage(lookaside=lookaside.rstrip("/"))


def signature_urls(storage: Storage, ref: Reference, manifest_digest: str) -> list[str]:
    """Where `ref`'s signatures for `manifest_digest` would be, in order (none without a lookaside)."""
    if not storage.lookaside:
        return []
    algorithm, _, hexdigest = manifest_digest.partition(":")
    base = f"{storage.lookaside}/{ref.repository}@{algorithm}={hexdigest}"
    return [f"{base}/signature-{number}" for number in range(1, MAX_SIGNATURES + 1)]


def keyring(requirement: Mapping[str, Any]) -> bytes:
    """The binary OpenPGP keys a signedBy requirement names (keyPath, keyPaths or keyData; armored or not)."""
    if "keyData" in requirement:
        try:
            blobs = [base64.b64decode(requirement["keyData"], validate=True)]
        except (binascii.Error, ValueError, TypeError):
            raise FailedPrecondition("signedBy: keyData is not base64") from None
    else:
        paths = requirement.get("keyPaths") or [requirement["keyPath"]]
        blobs = []
        for path in paths:
            try:
                with open(path, "rb") as handle:
                    blobs.append(handle.read(MAX_KEY_BYTES))
            except OSError as exc:
                raise FailedPrecondition(f"signedBy: cannot read the key file {path}: {exc.strerror}") from None
    return b"".join(_dearmored(blob) for blob in blobs)


def _dearmored(blob: bytes) -> bytes:
    """OpenPGP ASCII armor (RFC 4880 section 6) taken off; binary keys pass unchanged."""
    text = blob.decode("ascii", errors="replace")
    if "-----BEGIN PGP" not in text:
        return blob
    lines = text[text.index("-----BEGIN PGP") :].splitlines()[1:]
    while lines and lines[0].strip():  # armor headers, up to the blank line
        lines.pop(0)
    body = []
    for line in lines:
        if line.startswith(("=", "-----END")):
            break
        body.append(line.strip())
    try:
        return base64.b64decode("".join(body))
    except (binascii.Error, ValueError):
        raise FailedPrecondition("signedBy: a key file's ASCII armor is not valid") from None


@define(frozen=True)
class Verified:
    """What a valid signature says, and whose key made it."""

    fingerprint: str
    manifest_digest: str
    identity: str


def _signed_content(process: subprocess.Popen[bytes], deadline: float) -> bytes:
    """What gpgv writes to its output pipe, at most MAX_SIGNATURE_BYTES by `deadline`; gpgv is killed past
    either (a small signature may inflate to gigabytes)."""
    assert process.stdout is not None
    chunks, size = [], 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([process.stdout], [], [], left)[0]:
            process.kill()
            raise FailedPrecondition(f"gpgv took longer than {GPGV_TIMEOUT:.0f} s on a signature")
        chunk = os.read(process.stdout.fileno(), 1 << 16)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_SIGNATURE_BYTES:
            process.kill()
            raise FailedPrecondition(f"the signed content is larger than {MAX_SIGNATURE_BYTES} bytes")
        chunks.append(chunk)


def _gpgv(signature: bytes, keys: bytes) -> tuple[int, list[str], bytes]:
    """gpgv's exit code, status lines and signed content (read from a pipe, bounded) for one signature."""
    deadline = time.monotonic() + GPGV_TIMEOUT
    with tempfile.TemporaryDirectory(prefix="shimhub-gpgv-") as work:
        ring, signed = os.path.join(work, "keys.gpg"), os.path.join(work, "signature")
        Path(ring).write_bytes(keys)
        Path(signed).write_bytes(signature)
        with tempfile.TemporaryFile(dir=work) as status:
            try:
                process = subprocess.Popen(
                    ["gpgv", "--status-fd", str(status.fileno()), "--keyring", ring, "--output", "-", signed],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                    pass_fds=(status.fileno(),), env={"LC_ALL": "C", "HOME": work},
                )  # fmt: skip
            except FileNotFoundError:
                raise FailedPrecondition("gpgv is not installed: apt-get install gpgv") from None
            with process:
                try:
                    content = _signed_content(process, deadline)
                    code = process.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    process.kill()
                    raise FailedPrecondition(f"gpgv took longer than {GPGV_TIMEOUT:.0f} s on a signature") from None
            status.seek(0)
            lines = status.read(MAX_KEY_BYTES).decode(errors="replace").splitlines()
    return code, lines, content


def verify_gpg(signature: bytes, keys: bytes) -> Verified:
    """Check one simple-signing signature against `keys`; FailedPrecondition saying why it is not valid."""
    code, status, text = _gpgv(signature, keys)
    valid = [line.split()[2] for line in status if line.startswith("[GNUPG:] VALIDSIG ") and len(line.split()) > 2]
    if code != 0 or not valid:
        if any(" NO_PUBKEY " in f" {line} " for line in status):
            raise FailedPrecondition("signed with a key the policy does not name")
        raise FailedPrecondition("not a valid signature")
    try:
        document = json.loads(text)
        critical = document["critical"]
        kind = critical["type"]
        digest = critical["image"]["docker-manifest-digest"]
        identity = critical["identity"]["docker-reference"]
    except (ValueError, KeyError, TypeError):
        raise FailedPrecondition("the signed content is not a simple-signing signature") from None
    if kind != SIGNATURE_TYPE or not isinstance(digest, str) or not isinstance(identity, str):
        raise FailedPrecondition(f"the signed content is not an {SIGNATURE_TYPE!r}")
    return Verified(fingerprint=valid[0], manifest_digest=digest, identity=identity)


def identity_matches(rule: Mapping[str, Any] | None, ref: Reference, signed: str) -> bool:
    """Whether a signature made for `signed` (an image reference) covers a pull of `ref`, per signedIdentity."""
    kind = (rule or {}).get("type", "matchRepoDigestOrExact")
    if kind == "remapIdentity":
        prefix, replacement = rule["prefix"], rule["signedPrefix"]  # type: ignore[index]
        name = str(ref)
        if name == prefix or name.startswith(prefix.rstrip("/") + "/") or name.startswith(prefix + ":"):
            ref = _parse(replacement + name[len(prefix) :]) or ref
        kind = "matchRepoDigestOrExact"
    signed_ref = _parse(signed)
    if signed_ref is None:
        return False
    if kind == "exactReference":
        return signed == rule["dockerReference"]  # type: ignore[index]
    if kind == "exactRepository":
        return signed_ref.name == rule["dockerRepository"]  # type: ignore[index]
    if kind == "matchRepository":
        return signed_ref.name == ref.name
    if kind == "matchExact":
        return signed_ref == ref
    # matchRepoDigestOrExact: a pull by digest needs the same repository, by tag the same reference.
    return signed_ref.name == ref.name if ref.digest else signed_ref == ref


def _parse(text: str) -> Reference | None:
    """A fully qualified reference as a signature names it (None when it is not one)."""
    try:
        return reference.parse(text, [])
    except ShimhubError:
        return None


def first_valid(
    signatures: Iterable[bytes], keys: bytes, check: Callable[[Verified], str]
) -> tuple[Verified | None, list[str]]:
    """The first signature that verifies and passes `check` (which says what is wrong, "" if nothing);
    else None and why each one failed."""
    problems = []
    for number, signature in enumerate(signatures, 1):
        try:
            verified = verify_gpg(signature, keys)
        except FailedPrecondition as exc:
            problems.append(f"signature {number}: {exc.message}")
            continue
        wrong = check(verified)
        if not wrong:
            return verified, problems
        problems.append(f"signature {number}: {wrong}")
    return None, problems
