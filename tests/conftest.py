"""Shared test setup: the scripts are imported from the repository root, and a tiny
synthetic 2D-3D-S tree is made once per test session.

With SEGLAB_START_METHOD set (e.g. to spawn, as on Windows and macOS), every worker process
of the tests starts with that method: the project's loaders read the variable themselves
(data.worker_context), and the tests' own DataLoaders follow the default set here.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The teacher's tools, for the teacher-side tests (absent from the student bundle).
if (ROOT / "teacher").is_dir():
    sys.path.insert(1, str(ROOT / "teacher"))

if os.environ.get("SEGLAB_START_METHOD"):
    multiprocessing.set_start_method(os.environ["SEGLAB_START_METHOD"], force=True)

# The real label file, when the project sits beside the shared folder that holds it.
REAL_LABELS = ROOT.parent / "shared" / "stanford2d3ds" / "semantic_labels.json"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Areas 1, 2 and 5a, 6 frames each, 64x64 pixels."""
    from seglab import synthetic

    root = tmp_path_factory.mktemp("stanford2d3ds")
    synthetic.generate(root, ["1", "2", "5a"], images_per_area=6, size=64, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_model(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a 2-block UNet trained one epoch on 4 frames of area 1 (32 px crops)."""
    import main

    logdir = tmp_path_factory.mktemp("tiny-run")
    argv = [
        "train", "--datadir", str(synthetic_root), "--areas", "1", "--val-areas", "5a",
        "--epochs", "1", "--batch-size", "2", "--subset", "4", "--workers", "0",
        "--device", "cpu", "--logdir", str(logdir), "--name", "tiny", "--num-blocks", "2",
        "--base-chan", "4", "--img-size", "32",
    ]  # fmt: skip
    assert main.main(argv) == 0
    return logdir / "tiny" / "best.pt"
