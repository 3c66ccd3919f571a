"""main.py end to end on a tiny synthetic tree: train, resume, test, predict, errors."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

import data
import main
import models
from seglab import checkpoints, flags

TINY_MODEL = ["--num-blocks", "2", "--base-chan", "4", "--img-size", "32"]


def train_args(root: Path, logdir: Path, name: str, epochs: int = 2, *extra: str) -> list[str]:
    return [
        "train", "--datadir", str(root), "--areas", "1", "2", "--val-areas", "5a",
        "--epochs", str(epochs), "--batch-size", "4", "--workers", "0", "--device", "cpu",
        "--logdir", str(logdir), "--name", name, "--warmup-steps", "2", *TINY_MODEL, *extra,
    ]  # fmt: skip


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """main.py in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(synthetic_root, tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("runs")
    assert main.main(train_args(synthetic_root, logdir, "tiny")) == 0
    return logdir / "tiny"


def test_training_writes_checkpoints_metrics_and_events(trained_run):
    assert {"best.pt", "last.pt", "metrics.jsonl"} <= {p.name for p in trained_run.iterdir()}
    lines = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert 0 <= lines[-1]["val"]["miou"] <= 1
    checkpoint = torch.load(trained_run / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["classes"] == list(data.CLASSES)
    assert checkpoint["model_config"]["name"] == "unet"
    assert checkpoint["img_size"] == 32
    assert checkpoint["normalization"]["mean"] == list(data.MEAN)
    assert checkpoint["step"] == 2 * (12 // 4)


def test_tensorboard_events_have_scalars_and_images(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "val/miou", "val_iou/wall"} <= set(tags["scalars"])
    assert len(events.Scalars("val/miou")) == 2
    # Read every --log-every (10) steps and at the end of each epoch of 3 steps.
    assert [event.step for event in events.Scalars("train/loss")] == [3, 6]
    assert "val/input_truth_prediction" in tags["images"]
    assert "val/confusion_matrix" in tags["images"]


def test_test_command_needs_only_the_model(trained_run, synthetic_root, tmp_path):
    result = run_cli("test", "--model", str(trained_run / "best.pt"), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    miou_lines = [line for line in result.stdout.splitlines() if line.startswith("mIoU: ")]
    assert len(miou_lines) == 1
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["areas"] == ["5a"]  # the area not trained on
    assert f"{written['miou']:.4f}" == miou_lines[0].split()[1]
    assert np.array(written["confusion_matrix"]).shape == (14, 14)
    # Scored at the labels' full 64x64 resolution: every labelled pixel of the 6 frames.
    dataset = data.StanfordDataset(synthetic_root, ["5a"])
    labelled = sum(int((dataset.label_mask(i) != 0).sum()) for i in range(len(dataset)))
    assert sum(written["support"]) == labelled
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000


def test_test_command_saves_predictions(trained_run, synthetic_root, tmp_path):
    args = ["test", "--model", str(trained_run / "best.pt"), "--datadir", str(synthetic_root)]
    args += ["--areas", "1", "--out", str(tmp_path), "--save-predictions", "--workers", "0"]
    assert main.main(args) == 0
    saved = sorted((tmp_path / "predictions").iterdir())
    assert len(saved) == 6
    with Image.open(saved[0]) as picture:
        assert picture.size == (64, 64)


def test_predict_any_image(trained_run, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (45, 70, 4), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (33, 20), dtype=np.uint8)).save(tmp_path / "b.jpg")
    out = tmp_path / "out"
    code = main.main(["predict", "--model", str(trained_run / "best.pt"), "--out", str(out)] + [
        str(tmp_path / "a.png"), str(tmp_path / "b.jpg")])  # fmt: skip
    assert code == 0
    for stem, size in (("a", (70, 45)), ("b", (20, 33))):
        for kind, mode in (("mask", "P"), ("overlay", "RGB")):  # the mask: class ids
            with Image.open(out / f"{stem}_{kind}.png") as picture:
                assert picture.size == size and picture.mode == mode
        assert (out / f"{stem}_legend.png").is_file()


def test_resume_matches_an_uninterrupted_run_whatever_the_workers(synthetic_root, tmp_path):
    straight = train_args(synthetic_root, tmp_path, "straight", 3, "--workers", "2")
    assert main.main(straight) == 0
    stopped = train_args(synthetic_root, tmp_path, "stopped", 3, "--stop-after", "1")
    assert main.main([*stopped, "--workers", "2"]) == 0
    assert torch.load(tmp_path / "stopped/last.pt", weights_only=True)["epoch"] == 1
    resume = ["train", "--resume", str(tmp_path / "stopped/last.pt")]
    assert main.main([*resume, "--workers", "1"]) == 0

    reference = torch.load(tmp_path / "straight/last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "stopped/last.pt", weights_only=True)
    assert resumed["epoch"] == reference["epoch"] == 3
    assert resumed["step"] == reference["step"] == 9
    assert resumed["scheduler_state"] == reference["scheduler_state"]
    steps = [s["step"] for s in resumed["optimizer_state"]["state"].values()]
    assert steps and all(step == 9 for step in steps)
    # Data order and augmentations depend only on (seed, epoch, frame), not on the loader
    # workers that read the frames: the weights and the scores agree exactly.
    for key, value in reference["model_state"].items():
        assert torch.equal(resumed["model_state"][key], value), key
    lines = [json.loads(x) for x in (tmp_path / "stopped/metrics.jsonl").open()]
    expected = [json.loads(x) for x in (tmp_path / "straight/metrics.jsonl").open()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    assert [line["val"] for line in lines] == [line["val"] for line in expected]


def test_resume_takes_options_the_checkpoint_predates_from_the_command_line():
    args = main.build_parser().parse_args(["train", "--jitter", "0.3", "--workers", "1"])
    args.resume = "runs/old/last.pt"
    saved = {**vars(main.build_parser().parse_args(["train", "--lr", "0.01"]))}
    del saved["func"], saved["jitter"]
    restored = checkpoints.restore_args(args, {"args": saved})
    assert restored.jitter == 0.3 and restored.lr == 0.01 and restored.workers == 1


def test_resume_of_a_finished_run_says_so(trained_run, capsys):
    assert main.main(["train", "--resume", str(trained_run / "last.pt")]) == 0
    assert "finished" in capsys.readouterr().out


def test_existing_run_is_not_overwritten(trained_run, synthetic_root):
    before = (trained_run / "last.pt").read_bytes()
    result = run_cli(*train_args(synthetic_root, trained_run.parent, trained_run.name))
    assert result.returncode == 2
    assert "--resume" in result.stderr and "Traceback" not in result.stderr
    assert (trained_run / "last.pt").read_bytes() == before


class Payload:
    """Unpickling this object would create a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_checkpoint_is_refused_without_running_it(trained_run, tmp_path):
    checkpoint = torch.load(trained_run / "best.pt", weights_only=True)
    marker = tmp_path / "executed"
    checkpoint["metrics"] = Payload(str(marker))
    evil = tmp_path / "evil.pt"
    torch.save(checkpoint, evil, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    result = run_cli("test", "--model", str(evil), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "refused" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_checkpoint_of_another_class_count_is_refused(trained_run, tmp_path):
    checkpoint = torch.load(trained_run / "best.pt", weights_only=True)
    checkpoint["classes"] = checkpoint["classes"][:10]
    checkpoint["model_config"]["num_classes"] = 10
    path = tmp_path / "ten.pt"
    torch.save(checkpoint, path)
    result = run_cli("test", "--model", str(path))
    assert result.returncode == 2
    assert "10 classes" in result.stderr and "14" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--areas", "9"], "area '9' not found"),
        (["--model", "resnet"], "invalid choice: 'resnet'"),
        (["--loss", "hinge"], "invalid choice: 'hinge'"),
        (["--jitter", "1.5"], "argument --jitter: expected a number from 0 up to"),
        (["--jitter", "much"], "argument --jitter: expected a number from 0 up to"),
    ],
)
def test_bad_arguments_end_with_one_clear_line(synthetic_root, tmp_path, args, message):
    result = run_cli(*train_args(synthetic_root, tmp_path, "bad"), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_missing_datadir_says_how_to_get_data(tmp_path):
    result = run_cli("train", "--epochs", "1", env={"STANFORD2D3DS_ROOT": str(tmp_path / "no")})
    assert result.returncode == 2
    assert "seglab.synthetic --out" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_learning_rate_schedule():
    factors = [main.learning_rate_factor(step, 100, 10, "poly") for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))
    assert main.learning_rate_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert main.learning_rate_factor(55, 100, 10, "cosine") == pytest.approx(0.5)


def test_torchrun_two_processes_train_and_test_exactly(synthetic_root, tmp_path):
    """2 gloo processes: training completes; distributed test on an odd number of frames
    gives exactly the single-process numbers."""
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = train_args(synthetic_root, tmp_path, "ddp", 2)
    result = subprocess.run(
        [*torchrun, str(ROOT / "main.py"), *train], capture_output=True, text=True, cwd=ROOT,
        env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "ddp/last.pt", weights_only=True)
    # 12 training frames, 2 processes of batch 4: one full batch each per epoch.
    assert checkpoint["epoch"] == 2 and checkpoint["step"] == 2
    lines = (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2, "only rank 0 writes"

    scores = {}
    for name, launcher in (("single", [sys.executable]), ("ddp", [*torchrun])):
        out = tmp_path / f"test-{name}"
        test = ["test", "--model", str(tmp_path / "ddp/best.pt"), "--datadir", str(synthetic_root)]
        test += ["--areas", "5a", "--subset", "5", "--batch-size", "2", "--workers", "0"]
        result = subprocess.run(
            [*launcher, str(ROOT / "main.py"), *test, "--out", str(out), "--device", "cpu"],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        scores[name] = json.loads((out / "metrics.json").read_text())
    assert scores["ddp"]["frames"] == scores["single"]["frames"] == 5
    assert scores["ddp"]["confusion_matrix"] == scores["single"]["confusion_matrix"]
    assert scores["ddp"]["miou"] == scores["single"]["miou"]


def test_torchrun_into_an_existing_run_stops_every_process_with_the_message(
    synthetic_root, tmp_path
):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken/last.pt").write_bytes(b"an earlier run")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "main.py"), *train_args(synthetic_root, tmp_path, "taken", 1)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.count(f"error: {tmp_path / 'taken'} already holds a run") == 2
    assert "[rank1]" not in result.stderr, "rank 1 failed on its own instead"
    assert (tmp_path / "taken/last.pt").read_bytes() == b"an earlier run"


def test_a_run_saved_when_pretrained_was_a_switch_resumes():
    args = main.build_parser().parse_args(["train", "--resume", "runs/old/last.pt"])
    for saved, expected in ((False, "none"), (True, "imagenet")):
        saved_args = {"model": "lraspp_mobilenet_v3_large", "pretrained": saved, "workers": 2}
        restored = checkpoints.restore_args(args, {"args": {**saved_args, "datadir": "data"}})
        assert restored.pretrained == expected
        config = models.model_config(restored.model, 14, **flags.model_options(restored))
        assert config["pretrained"] == expected
