"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

# Imported here first, so Lightning's log handler binds to the real stderr and not to the
# capture of whichever test would import it first (later tests then log to a closed stream).
import lightning.pytorch  # noqa: F401
import pytest


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic data set, made once per session: 4 videos (3 train, 1 test), 2 s, 64x64, logmel."""
    from microscope_pl.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth"), videos=4, size=64, seconds=2.0, seed=0, verbose=False)


@pytest.fixture(scope="session")
def trained(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory holding tiny phase-1 and phase-2 checkpoints."""
    from helpers import SHORT_RUN, TINY_FDE, TINY_LMAE, fit

    work = tmp_path_factory.mktemp("phases")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        assert fit("phase1_fde.yaml", synth_root, *TINY_FDE, *SHORT_RUN) == 0
        assert fit("phase2_lmae.yaml", synth_root, *TINY_LMAE, *SHORT_RUN) == 0
    return work
