"""Executing CNI plugins: environment, stdin, timeouts, results and errors, per the CNI specification."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from shimhub.sdk import FailedPrecondition, PluginFailed


def find_plugin(kind: str, bin_dirs: list[str]) -> str:
    """The executable of plugin `kind` from the first bin directory that has it."""
    for directory in bin_dirs:
        candidate = Path(directory) / kind
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise FailedPrecondition(f"CNI plugin {kind!r} not found in {', '.join(bin_dirs)}")


def run(
    command: str,
    plugin: dict[str, Any],
    *,
    bin_dirs: list[str],
    container_id: str,
    netns: str,
    ifname: str,
    args: str,
    stdin: dict[str, Any],
    timeout: float,
) -> dict[str, Any]:
    """Run one plugin for `command` (ADD, DEL, CHECK, VERSION); its parsed result ({} when it printed none)."""
    executable = find_plugin(plugin["type"], bin_dirs)
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": ifname,
        "CNI_ARGS": args,
        "CNI_PATH": os.pathsep.join(bin_dirs),
    }
    try:
        done = subprocess.run(
            [executable], input=json.dumps(stdin).encode(), env=env, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise PluginFailed(f"CNI plugin {plugin['type']} {command} did not finish within {timeout:g} s") from None
    except OSError as exc:
        raise PluginFailed(f"CNI plugin {plugin['type']} could not run: {exc.strerror}") from exc
    output = done.stdout.decode(errors="replace").strip()
    if done.returncode != 0:
        raise PluginFailed(
            f"CNI plugin {plugin['type']} {command} failed: {_error_text(output)}"
            + (f" (stderr: {done.stderr.decode(errors='replace').strip()})" if done.stderr.strip() else "")
        )
    if not output:
        return {}
    try:
        result = json.loads(output)
    except ValueError:
        raise PluginFailed(
            f"CNI plugin {plugin['type']} {command} printed something that is not JSON: {output[:200]!r}"
        ) from None
    return result if isinstance(result, dict) else {}


def _error_text(output: str) -> str:
    try:
        error = json.loads(output)
        text = error.get("msg", "") + (f": {error['details']}" if error.get("details") else "")
        return f"{text} (code {error.get('code')})" if text else output
    except (ValueError, AttributeError):
        return output or "no output"


def result_ips(result: dict[str, Any]) -> list[str]:
    """The IP addresses of a 0.4.0 or 1.0.0 result, without prefix lengths, IPv4 first."""
    addresses = [str(entry.get("address", "")).split("/")[0] for entry in result.get("ips", []) if entry.get("address")]
    return sorted(addresses, key=lambda ip: ":" in ip)
