"""`shimhub plugins --check NAME`: set one plugin up on this node as shimhub would, and say what is missing.

NAME is a runtime handler, or a plugin's entry point name. Every use of the
plugin in the effective configuration is checked with its options (each handler
that names it, the storage driver, the network backend); a plugin the
configuration does not use is checked with its default options. Loading checks
the import, the API version and the hooks; the setup hook checks the options and
probes binaries and kernel features, in scratch state and run directories so a
running shimhub's state is not touched (storage drivers get the configured root,
as at startup).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from attrs import define, field

from shimhub import plugins
from shimhub.backends import Backend
from shimhub.config import Config
from shimhub.errors import ConfigError, PluginLoadError
from shimhub.hookspecs import KINDS
from shimhub.hooktypes import PluginContext


@define
class Use:
    """One use of a plugin to check: what it is for and how shimhub sets it up."""

    kind: str
    role: str
    plugin: str
    config_key: str
    arguments: dict[str, Any]


@define
class Verdict:
    """The outcome of checking one use."""

    role: str
    ok: bool
    problem: str = ""
    info: dict[str, str] = field(factory=dict)


def uses(config: Config, name: str) -> list[Use]:
    """How the configuration uses `name`; for a plugin it does not use, each installed kind with defaults."""
    found = [
        Use(
            "runtime",
            f"runtime handler {handler!r}",
            entry.plugin,
            f"[runtimes.{handler}.options]",
            {"options": dict(entry.options)},
        )
        for handler, entry in sorted(config.runtimes.items())
        if name in (handler, entry.plugin)
    ]
    if name == config.storage.driver:
        options = dict(config.storage.options)
        found.append(
            Use(
                "storage",
                f"storage driver {name!r}",
                name,
                "[storage.options]",
                {"root": config.storage.root, "options": options},
            )
        )
    if name == config.network.backend:
        found.append(
            Use(
                "network",
                f"network backend {name!r}",
                name,
                "[network.options]",
                {"options": dict(config.network.options)},
            )
        )
    if found:
        return found
    for kind in KINDS:
        if kind == "extension" or not plugins.installed(kind, name):
            continue
        arguments: dict[str, Any] = {"options": {}}
        if kind == "storage":
            arguments["root"] = config.storage.root
        found.append(
            Use(kind, f"{kind} plugin {name!r} (not configured: default options)", name, "its options", arguments)
        )
    return found


def check(config: Config, use: Use) -> Verdict:
    """Load and set up the plugin for `use` in scratch directories; what is wrong, if anything."""
    with tempfile.TemporaryDirectory(prefix="shimhub-check-") as scratch:
        context = PluginContext(
            name=use.plugin,
            state_dir=Path(scratch, "state"),
            run_dir=Path(scratch, "run"),
            log=logging.getLogger(f"shimhub.check.{use.kind}.{use.plugin}"),
            cgroup_driver=config.cgroup_driver,
            extensions=None,
        )
        for directory in (context.state_dir, context.run_dir):
            directory.mkdir(mode=0o700)
        try:
            backend = Backend.setup(use.kind, use.role, use.plugin, use.config_key, context, **use.arguments)
        except (PluginLoadError, ConfigError) as exc:
            return Verdict(use.role, ok=False, problem=str(exc))
    readiness = backend.setup_readiness
    info = {key: str(value) for key, value in readiness.info.items()}
    return Verdict(use.role, ok=readiness.ready, problem=readiness.reason, info=info)
