"""Shared test setup: the scripts are imported from the repository root, and a tiny
synthetic 2D-3D-S tree is made once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The real label file, when the project sits beside the shared folder that holds it.
REAL_LABELS = ROOT.parent / "shared" / "stanford2d3ds" / "semantic_labels.json"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Areas 1, 2 and 5a, 6 frames each, 64x64 pixels."""
    import synthetic

    root = tmp_path_factory.mktemp("stanford2d3ds")
    synthetic.generate(root, ["1", "2", "5a"], images_per_area=6, size=64, seed=0, progress=False)
    return root
