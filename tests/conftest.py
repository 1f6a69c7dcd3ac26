"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic data set, made once per session: 4 videos (3 train, 1 test), 2 s, 64x64, logmel."""
    from microscope_pl.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth"), videos=4, size=64, seconds=2.0, seed=0, verbose=False)
