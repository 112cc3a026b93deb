"""Pressure-stall information from cgroup v2 files into the CRI's PsiStats."""

from __future__ import annotations

from pathlib import Path

import pytest

from shimhub import cgroups, stats
from shimhub.hooktypes import Pressure, PressureLine

pytestmark = pytest.mark.unit


def test_a_pressure_file_with_some_and_full(tmp_path: Path) -> None:
    path = tmp_path / "memory.pressure"
    path.write_text(
        "some avg10=1.50 avg60=0.25 avg300=0.00 total=1234\nfull avg10=0.50 avg60=0.00 avg300=0.00 total=99\n"
    )
    assert cgroups._pressure(path) == Pressure(
        some=PressureLine(total_ns=1_234_000, avg10=1.5, avg60=0.25, avg300=0.0),
        full=PressureLine(total_ns=99_000, avg10=0.5),
    )


def test_a_missing_or_garbled_pressure_file_is_unknown(tmp_path: Path) -> None:
    assert cgroups._pressure(tmp_path / "cpu.pressure") is None
    (tmp_path / "cpu.pressure").write_text("some avg10=x total=\n")
    assert cgroups._pressure(tmp_path / "cpu.pressure") is None


def test_psi_in_the_cri_message() -> None:
    message = stats._psi(Pressure(some=PressureLine(total_ns=5, avg10=1.0, avg60=2.0, avg300=3.0)))
    assert (message.Some.Total, message.Some.Avg10, message.Some.Avg60, message.Some.Avg300) == (5, 1.0, 2.0, 3.0)
    assert not message.HasField("Full")
