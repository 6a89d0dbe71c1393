"""Shared fixtures: one small synthetic cohort per test session (generated in seconds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from crossmoda_lib import synth

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """A 12-case cohort (6 per centre: 3 source, 2 target, 1 validation), seed 0. Read-only."""
    out = tmp_path_factory.mktemp("cohort") / "data"
    synth.generate_cohort(out, seed=0, cases_per_centre=6, progress=False)
    return out


@pytest.fixture()
def cohort_copy(cohort, tmp_path) -> Path:
    """A private copy of the session cohort that a test may damage."""
    dest = tmp_path / "data"
    shutil.copytree(cohort, dest)
    return dest
