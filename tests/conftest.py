"""Fixtures: a virtual environment with the test runtime plugin installed, and daemons."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.shimhubd import Daemon

HERE = Path(__file__).parent
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, /run)")


@pytest.fixture(scope="session")
def plugin_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh virtual environment (seeing shimhub's own install) with the third-party
    test plugin distribution `shimhub-procrun` pip-installed into it; its python."""
    base = tmp_path_factory.mktemp("plugin-venv")
    source = base / "src"
    shutil.copytree(HERE / "plugins" / "procrun", source)
    venv = base / "venv"
    # No pip of its own: ensurepip's old setuptools would shadow the one the build needs.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            str(source),
        ],
        check=True,
    )
    return python


@pytest.fixture
def daemon_factory(tmp_path: Path, plugin_python: str) -> Iterator:
    """Make daemons under a test's temporary directory; all are stopped at the end."""
    made: list[Daemon] = []

    def make(config: str, name: str = "d", python: str | None = None, env: dict[str, str] | None = None) -> Daemon:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        daemon = Daemon(root, config, python or plugin_python, env)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.stop()
        daemon.kill()


PROC_CONFIG = """
default_runtime = "proc"
[runtimes.proc]
plugin = "proc"
[network]
backend = "host"
"""


@pytest.fixture
def daemon(daemon_factory) -> Daemon:
    """A running daemon whose default handler is the test plugin's `proc` runtime."""
    return daemon_factory(PROC_CONFIG).start()
