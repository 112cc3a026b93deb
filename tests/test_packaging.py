"""What `pip install` (not editable) puts on a node: every module of each distribution, and its data files."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
#: Every distribution of the tree (the core and each plugins/<name>), with its top-level packages' sources.
DISTRIBUTIONS = {
    ".": ["shimhub", "proto/shimhub_proto"],
    **{
        f"plugins/{setup.parent.name}": [f"shimhub_{setup.parent.name}"]
        for setup in (ROOT / "plugins").glob("*/setup.cfg")
    },
}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every distribution built as a wheel, as `pip install` builds it (one pip run for all)."""
    out = tmp_path_factory.mktemp("wheels")
    # From a clean copy: a build/ directory left in the checkout would hide a missing package.
    sources = tmp_path_factory.mktemp("sources") / "tree"
    shutil.copytree(ROOT, sources, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out)]
    subprocess.run([*pip, *(str(sources / d) for d in DISTRIBUTIONS)], check=True, capture_output=True)
    return out


@pytest.mark.parametrize("distribution", sorted(DISTRIBUTIONS))
def test_the_wheel_holds_every_module(distribution: str, wheels: Path) -> None:
    source = ROOT / distribution
    metadata = configparser.ConfigParser()
    metadata.read(source / "setup.cfg")
    (wheel,) = wheels.glob(f"{metadata['metadata']['name'].replace('-', '_')}-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        str(path.relative_to((source / package).parent))
        for package in DISTRIBUTIONS[distribution]
        for path in (source / package).rglob("*")
        if path.suffix in (".py", ".proto", ".toml") and "__pycache__" not in path.parts
    }
    assert sorted(expected - shipped) == []
