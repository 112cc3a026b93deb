"""Log paths resolved inside the pod's log directory at every open, following no link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shimhub import logpaths
from shimhub.errors import FailedPrecondition, InvalidArgument

pytestmark = pytest.mark.unit


def test_the_directorys_own_links_are_resolved_once_and_none_below_it(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "logs").symlink_to(tmp_path / "real")  # an operator's /var/log on another disk
    full = logpaths.resolve(str(tmp_path / "logs"), "app/0.log")
    assert full == str(tmp_path / "real" / "app" / "0.log")
    fd = logpaths.open_for_append(full)
    try:
        os.write(fd, b"line\n")
    finally:
        os.close(fd)
    assert (tmp_path / "real" / "app" / "0.log").read_bytes() == b"line\n"


def test_a_directory_swapped_for_a_link_after_the_check_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    full = logpaths.resolve(str(tmp_path / "logs"), "app/0.log")
    logpaths.make_directory(full)
    (tmp_path / "logs" / "app").rmdir()
    (tmp_path / "logs" / "app").symlink_to(outside)
    with pytest.raises(FailedPrecondition, match="leads through a symlink at 'app'"):
        logpaths.check(full)
    with pytest.raises(FailedPrecondition, match="leads through a symlink at 'app'"):
        logpaths.open_for_append(full)
    assert list(outside.iterdir()) == []


def test_the_file_itself_may_not_be_a_link(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "0.log").symlink_to(tmp_path / "victim")
    with pytest.raises(InvalidArgument, match="is a symlink"):
        logpaths.resolve(str(tmp_path / "logs"), "0.log")
    with pytest.raises(FailedPrecondition):
        logpaths.open_for_append(str(tmp_path / "logs" / "0.log"))
    assert not (tmp_path / "victim").exists()


@pytest.mark.parametrize(
    ("directory", "path", "says"),
    [
        ("/var/log/pods/x\nforged", "0.log", "control character"),
        ("/var/log/pods/x", "a\rb.log", "control character"),
        ("relative/logs", "0.log", "must be absolute"),
        ("/var/log/../etc", "0.log", "without '..'"),
        ("/var/log/pods/x", "../0.log", "without '..'"),
    ],
)
def test_malformed_paths_are_refused(directory: str, path: str, says: str) -> None:
    with pytest.raises(InvalidArgument, match=says):
        logpaths.resolve(directory, path)
