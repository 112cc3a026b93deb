"""The plugin author kit: the example plugin, installed as its author would, passes the kit; a broken one fails it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shimhub.testing.daemon import BUSYBOX, Daemon, Pod
from shimhub.testing.leaks import ids_in, leftovers
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import EXAMPLE_PLUGIN, NEEDS_ROOT, install_in_venv
from tests.test_runc import runc_config

pytestmark = NEEDS_ROOT
PLUGIN = "shimhub_procrun/__init__.py"


def run_kit(tmp_path: Path, source: Path) -> tuple[str, subprocess.CompletedProcess[str]]:
    """Install the distribution at `source` into a new venv and run `pytest -p shimhub.testing tests/` in it."""
    python = install_in_venv(source, tmp_path)
    return python, subprocess.run(
        [
            python,
            "-m",
            "pytest",
            "-p",
            "shimhub.testing",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rfs",
            f"--basetemp={tmp_path / 'kit'}",
            "tests/",
        ],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def copy_example(tmp_path: Path) -> Path:
    """The example plugin's distribution, copied as the docs tell an author to start."""
    source = tmp_path / "my-runtime"
    tmp_path.mkdir(exist_ok=True)
    shutil.copytree(EXAMPLE_PLUGIN, source, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    return source


def break_hook(source: Path, original: str, broken: str) -> None:
    path = source / PLUGIN
    text = path.read_text()
    assert text.count(original) == 1, f"the example no longer has {original!r}"
    path.write_text(text.replace(original, broken))


def clean_up_after_a_broken_plugin(tmp_path: Path, python: str) -> dict[str, list[str]]:
    """What the broken plugin could not remove, removed by the kit's daemons with the example plugin reinstalled."""
    fixed = copy_example(tmp_path / "fixed")
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "--force-reinstall", str(fixed)],
        check=True,
    )
    left: dict[str, list[str]] = {}
    for config in (tmp_path / "kit").glob("*/node/shimhub.toml"):
        daemon = Daemon(config.parent, config.read_text(), python)
        try:
            left.update(daemon.remove_everything())
        finally:
            daemon.stop()
            daemon.kill()
    return left


def test_the_example_plugin_passes_the_kit(tmp_path: Path, registry) -> None:
    _python, done = run_kit(tmp_path, copy_example(tmp_path))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "10 passed" in done.stdout, done.stdout[-2000:]


@pytest.mark.parametrize(
    ("hook", "original", "broken", "failing_test"),
    [
        (
            "runtime_container_kill",
            'os.killpg(container.runtime_data["pid"], number)',
            'os.killpg(container.runtime_data["pid"], signal.SIGKILL)',
            "test_stop_honours_the_signal_then_kills_after_the_timeout",
        ),
        (
            "runtime_container_state",
            "exit_code=code,",
            "exit_code=0,",
            "test_output_lands_in_a_cri_log_and_the_exit_code_is_reported",
        ),
    ],
)
def test_a_broken_hook_fails_the_kit_naming_it(
    tmp_path: Path, registry, hook: str, original: str, broken: str, failing_test: str
) -> None:
    source = copy_example(tmp_path)
    break_hook(source, original, broken)
    python, done = run_kit(tmp_path, source)
    assert not clean_up_after_a_broken_plugin(tmp_path, python)
    assert done.returncode == 1, done.stdout[-4000:]
    failures = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    assert any(failing_test in line for line in failures), done.stdout[-4000:]
    assert re.search(rf"^E +AssertionError: .*{hook}", done.stdout, re.MULTILINE), done.stdout[-4000:]


@NEEDS_ROOT
def test_leak_checks_count_only_what_the_daemon_under_test_made(tmp_path: Path, registry) -> None:
    """Another shimhub daemon's running pod is not ours; our own container that outlives our daemon is."""
    for name in ("other", "ours"):
        (tmp_path / name).mkdir()
    other = Daemon(tmp_path / "other", runc_config(registry)).start()
    ours = Daemon(tmp_path / "ours", runc_config(registry)).start()
    try:
        for daemon in (other, ours):
            daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=BUSYBOX)))
        Pod(other, tmp_path / "other-pod").run("busy", ["sleep", "300"])  # started after `ours.before`
        Pod(ours, tmp_path / "our-pod").run("app", ["sleep", "300"])
        assert ours.remove_everything() == {}, "another daemon's pod counted as ours"

        container_id = Pod(ours, tmp_path / "lost-pod").run("app", ["sleep", "300"])
        status = ours.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id, verbose=True))
        pid = json.loads(status.info["info"])["runtime_data"]["pid"]
        ours.kill()  # its container lives on, and no record of ours is read: the check must find it anyway
        found = leftovers(ours.root, set(), set(), ours.before, ids_in(ours.log()))
        assert [line.split(":")[0] for line in found["stray processes"]] == [str(pid)]
        assert not [line for lines in found.values() for line in lines if str(other.root) in line]
        ours.start()
    finally:
        for daemon in (ours, other):
            daemon.remove_everything()
            daemon.stop()
