"""Fixtures shared by the tests of the decode pool's hand-over through shared memory (test_spill.py,
test_arena.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _noisy_jpeg(path: Path, seed: int) -> Path:
    """A 400×300 JPEG of noise: 150 KB of pixels at 224 px, large enough for every chunk to leave the pipe."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(path, "JPEG", quality=90)
    return path


@pytest.fixture
def make_jpeg() -> Callable[[Path, int], Path]:
    return _noisy_jpeg


@pytest.fixture
def noisy_photos(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "photos"
    folder.mkdir()
    return [_noisy_jpeg(folder / f"p{i}.jpg", i) for i in range(16)]


@pytest.fixture
def spill_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "spill"
    folder.mkdir()
    return folder
