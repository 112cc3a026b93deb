"""The context a conformance suite hands a plugin it sets up outside any daemon."""

from __future__ import annotations

import logging
from pathlib import Path

from shimhub.hooktypes import PluginContext


def scratch_context(name: str, directory: Path) -> PluginContext:
    """A PluginContext for plugin instance `name` with its state and run directories under `directory`."""
    return PluginContext(
        name=name,
        state_dir=directory / "state",
        run_dir=directory / "run",
        log=logging.getLogger(f"shimhub.testing.{name}"),
        cgroup_driver="cgroupfs",
        extensions=None,
    )
