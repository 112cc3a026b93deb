"""`shimhub config import`: the shimhub configuration equivalent to a CRI-O or containerd one.

What is carried over: runtime handlers (OCI runtimes under conmon become `runc` plugin
handlers, VM runtimes and shims become `shimv2` handlers), allowed annotations, the
cgroup manager, conmon's cgroup, the default seccomp choice, CNI directories, the
storage driver, and registry settings (insecure registries, mirrors, the hosts
directory). Every other key that is set is listed as having no equivalent.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shimhub.errors import ConfigError

#: The sources `--from` names.
SOURCES = ("crio", "containerd")
#: CRI-O's and containerd's storage names, as shimhub's storage drivers.
STORAGE = {
    "overlay": "overlay", "overlayfs": "overlay", "vfs": "vfs", "native": "vfs", "btrfs": "btrfs",
    "devicemapper": "devicemapper", "devmapper": "devicemapper", "aufs": "aufs",
}  # fmt: skip


class Imported:
    """A shimhub configuration being built, and the source keys that have no equivalent."""

    def __init__(self, documents: list[tuple[str, dict[str, Any]]]) -> None:
        self.documents = documents
        self.config: dict[str, Any] = {}
        self.used: set[tuple[str, ...]] = set()

    def get(self, *path: str) -> Any:
        """The value at `path` in the last document that sets it (later files override earlier ones)."""
        found = None
        for _name, document in self.documents:
            here: Any = document
            for key in path:
                here = here.get(key) if isinstance(here, dict) else None
            if here is not None:
                found = here if not isinstance(here, dict) or found is None else {**found, **here}
        if found is not None and not isinstance(found, dict):
            self.used.add(path)  # a table's keys are marked one by one, where they are carried over
        return found

    def set(self, path: str | tuple[str, ...], value: Any) -> None:
        """Set `path` (dotted, or keys) of the shimhub configuration, when `value` says something."""
        if value in (None, "", [], {}):
            return
        *tables, key = path.split(".") if isinstance(path, str) else path
        here = self.config
        for table in tables:
            here = here.setdefault(table, {})
        here[key] = value

    def left_out(self) -> list[str]:
        """Keys the sources set (to something other than empty) that were not carried over."""
        missing: list[str] = []
        for name, document in self.documents:
            for path, value in _leaves(document, ()):
                if value in ("", [], {}, False, 0) or any(path[: len(used)] == used for used in self.used):
                    continue
                missing.append(f"{name}: {'.'.join(path)} = {value!r}")
        return missing


def _leaves(table: dict[str, Any], path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in table.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, (*path, key))
        else:
            yield (*path, key), value


def read(source: str, files: list[Path]) -> tuple[dict[str, Any], list[str]]:
    """The shimhub configuration equivalent to `source`'s `files` (in order), and what has no equivalent."""
    documents = []
    for path in files:
        try:
            documents.append((str(path), tomllib.loads(path.read_text())))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read it as TOML: {exc}") from None
    imported = Imported(documents)
    (_from_crio if source == "crio" else _from_containerd)(imported)
    return imported.config, imported.left_out()


def _from_crio(imported: Imported) -> None:
    get, put = imported.get, imported.set
    put("default_runtime", get("crio", "runtime", "default_runtime"))
    put("cgroup_driver", get("crio", "runtime", "cgroup_manager"))
    put("seccomp_use_default_when_empty", get("crio", "runtime", "seccomp_use_default_when_empty"))
    conmon_cgroup, conmon = get("crio", "runtime", "conmon_cgroup"), get("crio", "runtime", "conmon")
    put("storage.driver", STORAGE.get(get("crio", "storage_driver") or ""))
    put("images.signature_policy", get("crio", "image", "signature_policy"))
    put("images.credentials_file", get("crio", "image", "global_auth_file"))
    for host in get("crio", "image", "insecure_registries") or []:
        put(("images", "registries", host, "insecure"), True)
    put("network.options.conf_dir", get("crio", "network", "network_dir"))
    put("network.options.bin_dirs", get("crio", "network", "plugin_dirs"))
    for name, table in (get("crio", "runtime", "runtimes") or {}).items():
        handler: dict[str, Any] = {}
        kind = table.get("runtime_type", "oci")
        if kind == "vm":
            handler = {
                "plugin": "shimv2",
                "options": {"shim": table.get("runtime_path") or f"containerd-shim-{name}-v2"},
            }
            if table.get("runtime_config_path"):
                handler["options"]["shim_config"] = table["runtime_config_path"]
        else:
            options = {"binary": table.get("runtime_path") or name}
            if table.get("runtime_root"):
                options["runtime_args"] = ["--root", table["runtime_root"]]
            for ours, theirs, fallback in (
                ("conmon", "monitor_path", conmon),
                ("conmon_cgroup", "monitor_cgroup", conmon_cgroup),
            ):
                if table.get(theirs) or fallback:
                    options[ours] = table.get(theirs) or fallback
            handler = {"plugin": "runc", "options": options}
        for key in ("allowed_annotations", "privileged_without_host_devices"):
            if table.get(key):
                handler[key] = table[key]
        imported.config.setdefault("runtimes", {})[name] = handler
        imported.used |= {("crio", "runtime", "runtimes", name, key) for key in _CRIO_HANDLER_KEYS if key in table}
        if kind not in ("oci", "vm"):
            imported.used.discard(("crio", "runtime", "runtimes", name, "runtime_type"))


_CRIO_HANDLER_KEYS = (
    "runtime_path", "runtime_type", "runtime_root", "runtime_config_path", "monitor_path", "monitor_cgroup",
    "allowed_annotations", "privileged_without_host_devices",
)  # fmt: skip


def _from_containerd(imported: Imported) -> None:
    get, put = imported.get, imported.set
    version = imported.get("version") or 1
    if version >= 3:
        runtime, images = ("plugins", "io.containerd.cri.v1.runtime"), ("plugins", "io.containerd.cri.v1.images")
    else:
        runtime = images = ("plugins", "io.containerd.grpc.v1.cri")
    put("default_runtime", get(*runtime, "containerd", "default_runtime_name"))
    put("enable_cdi", get(*runtime, "enable_cdi"))
    put("cdi_spec_dirs", get(*runtime, "cdi_spec_dirs"))
    restrict = get(*runtime, "restrict_oom_score_adj")
    snapshotter = get(*images, "snapshotter") if version >= 3 else get(*runtime, "containerd", "snapshotter")
    put("storage.driver", STORAGE.get(snapshotter or ""))
    put("network.options.conf_dir", get(*runtime, "cni", "conf_dir"))
    bin_dirs = get(*runtime, "cni", "bin_dirs") or (
        [get(*runtime, "cni", "bin_dir")] if get(*runtime, "cni", "bin_dir") else []
    )
    put("network.options.bin_dirs", bin_dirs)
    _containerd_registries(imported, images)
    for name, table in (get(*runtime, "containerd", "runtimes") or {}).items():
        imported.config.setdefault("runtimes", {})[name] = _containerd_handler(
            imported, (*runtime, "containerd", "runtimes", name), table, restrict
        )
    if get(*runtime, "device_ownership_from_security_context"):
        for handler in imported.config.get("runtimes", {}).values():
            handler["device_ownership_from_security_context"] = True


def _containerd_registries(imported: Imported, images: tuple[str, ...]) -> None:
    get, put = imported.get, imported.set
    put("images.hosts_dir", get(*images, "registry", "config_path"))
    for host, table in (get(*images, "registry", "mirrors") or {}).items():
        imported.used.add((*images, "registry", "mirrors", host, "endpoint"))
        mirrors = [urlsplit(url).netloc or url for url in table.get("endpoint", []) if urlsplit(url).netloc != host]
        put(("images", "registries", host, "mirrors"), mirrors)
        for url in table.get("endpoint", []):
            if url.startswith("http://"):
                put(("images", "registries", urlsplit(url).netloc, "insecure"), True)
    for host, table in (get(*images, "registry", "configs") or {}).items():
        put(("images", "registries", host, "skip_verify"), table.get("tls", {}).get("insecure_skip_verify"))
        imported.used.add((*images, "registry", "configs", host, "tls", "insecure_skip_verify"))


def _containerd_handler(
    imported: Imported, base: tuple[str, ...], table: dict[str, Any], restrict: Any
) -> dict[str, Any]:
    """One runtime of containerd's CRI plugin as a shimhub handler."""
    options = table.get("options", {})
    kind = table.get("runtime_type", "")
    if kind == "io.containerd.runc.v2":
        handler_options: dict[str, Any] = {"binary": options.get("BinaryName") or "runc"}
        if options.get("Root"):
            handler_options["runtime_args"] = ["--root", options["Root"]]
        if restrict is not None:
            handler_options["restrict_oom_score_adj"] = restrict
        if options.get("SystemdCgroup"):
            imported.config["cgroup_driver"] = "systemd"
        handler = {"plugin": "runc", "options": handler_options}
        used = {"BinaryName", "Root", "SystemdCgroup"}
    else:
        shim = table.get("runtime_path") or _shim_binary(kind)
        handler = {"plugin": "shimv2", "options": {"shim": shim}}
        if options.get("ConfigPath"):
            handler["options"]["shim_config"] = options["ConfigPath"]
        used = {"ConfigPath", "TypeUrl"}
    for theirs, ours in (("pod_annotations", "allowed_annotations"), ("privileged_without_host_devices",) * 2):
        if table.get(theirs):
            handler[ours] = table[theirs]
    imported.used |= {
        (*base, key) for key in ("runtime_type", "runtime_path", "pod_annotations", "privileged_without_host_devices")
    }
    imported.used |= {(*base, "options", key) for key in used}
    return handler


def _shim_binary(runtime_type: str) -> str:
    """containerd's shim binary of a runtime type: io.containerd.kata.v2 is containerd-shim-kata-v2."""
    parts = runtime_type.split(".")
    return f"containerd-shim-{parts[-2]}-{parts[-1]}" if len(parts) >= 2 else runtime_type


def header(source: str, files: list[Path], left_out: list[str]) -> str:
    """TOML comments opening the printed configuration: where it came from and what has no equivalent."""
    lines = [f"# shimhub configuration imported from {source}: {', '.join(map(str, files))}"]
    if left_out:
        lines.append("# No equivalent in shimhub (not carried over):")
        lines += [f"#   {item}" for item in left_out]
    return "\n".join(lines) + "\n"
