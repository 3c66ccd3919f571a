"""Fault injection: a kill -9 mid-epoch and mid-save, NaN losses, broken and missing files,
bad checkpoints, CUDA out of memory, a full disk, inputs of predict that are not images.

None of them may lose a run, leave a checkpoint that does not load, or run foreign code.
The checkpoint payload and class-count refusals are in test_main.py.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from test_main import train_args

import data
import main
import models
from seglab import checkpoints

# 12 training frames (areas 1 and 2) in batches of 4.
STEPS_PER_EPOCH = 3

# main.py train, stalled at one moment until the test kills it. argv: the moment ("save":
# halfway through writing last.pt of epoch 2; "loss:N": at the N-th training step), the
# file to create once stalled, then the arguments of main.py.
STALLING_TRAINER = """
import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())
import main
import torch
from seglab import check

moment, marker, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]


def stall():
    marker.touch()
    time.sleep(600)


if moment == "save":
    real_save = torch.save

    def save_half_then_stall(state, file, *args, **kwargs):
        target = Path(getattr(file, "name", file))
        if state["epoch"] == 2 and "last.pt" in target.name:
            whole = io.BytesIO()
            real_save(state, whole)
            half = whole.getvalue()[: whole.tell() // 2]
            if hasattr(file, "write"):
                file.write(half)
                file.flush()
            else:
                target.write_bytes(half)
            stall()
        real_save(state, file, *args, **kwargs)

    torch.save = save_half_then_stall
else:
    stall_at = int(moment.split(":")[1])
    real_build_loss = main.losses.build_loss

    def build_loss(*args, **kwargs):
        loss_fn = real_build_loss(*args, **kwargs)
        calls = 0

        def loss_or_stall(logits, targets):
            nonlocal calls
            calls += 1
            if calls == stall_at:
                stall()
            return loss_fn(logits, targets)

        return loss_or_stall

    main.losses.build_loss = build_loss
sys.exit(main.main(argv))
"""


@pytest.fixture(scope="module")
def reference_run(synthetic_root, tmp_path_factory) -> Path:
    """Three epochs without any fault."""
    logdir = tmp_path_factory.mktemp("reference")
    assert main.main(train_args(synthetic_root, logdir, "reference", 3)) == 0
    return logdir / "reference"


@pytest.fixture
def root_copy(synthetic_root, tmp_path) -> Path:
    """A copy of the synthetic tree that a test may damage."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "stanford2d3ds"))


def epochs_in(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def frame_files(root: Path, area: str, domain: str) -> list[Path]:
    return sorted((root / f"area_{area}" / "data" / domain).iterdir())


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero_some_bytes(path: Path) -> None:
    """Zero 64 bytes in the middle of a file, as a bad disk block would; a PNG chunk's
    checksum then fails, which torchvision's decoder does not survive."""
    raw = path.read_bytes()
    middle = len(raw) // 2
    path.write_bytes(raw[:middle] + bytes(64) + raw[middle + 64 :])


def break_compressed_pixels(path: Path) -> None:
    """Garble the compressed pixels of a PNG and fix the chunk's checksum: the file passes
    the CRC check and only a full decode finds the damage."""
    raw = bytearray(path.read_bytes())
    start = raw.index(b"IDAT") - 4  # the chunk's length field
    length = int.from_bytes(raw[start : start + 4], "big")
    middle = start + 8 + length // 2
    raw[middle : middle + 16] = bytes(b ^ 0xFF for b in raw[middle : middle + 16])
    crc = zlib.crc32(bytes(raw[start + 4 : start + 8 + length]))
    raw[start + 8 + length : start + 12 + length] = crc.to_bytes(4, "big")
    path.write_bytes(bytes(raw))


def run_until_stalled(moment: str, marker: Path, args: list[str], tmp_path: Path) -> None:
    """Start a training subprocess, wait until it stalls at `moment`, then kill -9 it."""
    script = tmp_path / "stalling_trainer.py"
    script.write_text(STALLING_TRAINER)
    log_path = tmp_path / "stalled.log"
    with open(log_path, "w") as log:
        command = [sys.executable, str(script), moment, str(marker), *args]
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300  # only against a hang; the test times nothing
        while not marker.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"training did not reach {moment}:\n{log_path.read_text()}")
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """The run's last.pt and metrics.jsonl equal those of the uninterrupted reference."""
    resumed = torch.load(run_dir / "last.pt", weights_only=True)
    expected = torch.load(reference / "last.pt", weights_only=True)
    assert resumed["epoch"] == expected["epoch"] == 3
    assert resumed["step"] == expected["step"] == 3 * STEPS_PER_EPOCH
    assert resumed["scheduler_state"] == expected["scheduler_state"]
    for key, value in expected["model_state"].items():
        torch.testing.assert_close(resumed["model_state"][key], value, rtol=1e-5, atol=1e-6)
    assert epochs_in(run_dir) == [1, 2, 3]
    for line, expected_line in zip(
        (run_dir / "metrics.jsonl").open(), (reference / "metrics.jsonl").open(), strict=True
    ):
        assert json.loads(line)["val"]["miou"] == pytest.approx(
            json.loads(expected_line)["val"]["miou"], abs=1e-6
        )


# ----------------------------------------------------------------------------------------
# kill -9, then --resume


@pytest.mark.parametrize(
    ("moment", "epochs_before_resume"),
    [
        ("save", [1, 2]),  # epoch 2's line is written before its checkpoint
        (f"loss:{STEPS_PER_EPOCH + 2}", [1]),  # the second step of epoch 2
    ],
    ids=["while-saving", "mid-epoch"],
)
def test_kill_keeps_loadable_checkpoints_and_resume_completes_the_run(
    synthetic_root, reference_run, tmp_path, moment, epochs_before_resume
):
    args = train_args(synthetic_root, tmp_path, "killed", 3)
    run_until_stalled(moment, tmp_path / "stalled", args, tmp_path)
    run_dir = tmp_path / "killed"
    last = torch.load(run_dir / "last.pt", weights_only=True)
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert last["epoch"] == 1 and best["epoch"] in (1, 2)
    assert epochs_in(run_dir) == epochs_before_resume
    if moment == "save":  # the half-written last.pt of epoch 2 is a side file
        assert len(list(run_dir.glob(".last.pt.*.tmp"))) == 1

    assert main.main(["train", "--resume", str(run_dir / "last.pt")]) == 0
    assert_same_run(run_dir, reference_run)
    assert torch.load(run_dir / "best.pt", weights_only=True)["epoch"] in (1, 2, 3)
    assert not list(run_dir.glob(".*.tmp"))


def test_relaunch_after_a_kill_before_the_first_checkpoint_starts_clean(synthetic_root, tmp_path):
    run_dir = tmp_path / "fresh"
    run_dir.mkdir()
    # What a kill between the metrics line and the checkpoint of epoch 1 leaves.
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val": {}}) + "\n")
    (run_dir / ".last.pt.12345.tmp").write_bytes(b"half a checkpoint")
    args = train_args(synthetic_root, tmp_path, "fresh", 1)
    assert main.main(args) == 2, "a new run never writes over a run's files"
    assert main.main([*args, "--resume", "auto"]) == 0  # the relaunched job's command
    assert epochs_in(run_dir) == [1]
    assert not list(run_dir.glob(".*.tmp"))


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoints.save_checkpoint({"epoch": 1}, path)

    def disk_full(state, file, *args, **kwargs):
        file.write(b"the first bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(
        checkpoints.CheckpointError, match=r"last\.pt .*No space left.*previous one"
    ):
        checkpoints.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# ----------------------------------------------------------------------------------------
# NaN losses and out of memory


def make_training_outputs_nan(monkeypatch, bad_steps: set[int]) -> None:
    """The model's logits are NaN at the given training forward passes (counted from 0)."""
    real_build_model = models.build_model

    def build_model(**config):
        model = real_build_model(**config)
        training_calls = itertools.count()

        def poison(module, inputs, output):
            if module.training and next(training_calls) in bad_steps:
                return output * float("nan")  # NaN, and NaN gradients
            return None

        model.register_forward_hook(poison)
        return model

    monkeypatch.setattr(models, "build_model", build_model)


def test_nan_steps_are_skipped_counted_and_training_finishes(
    synthetic_root, tmp_path, monkeypatch, capsys
):
    make_training_outputs_nan(monkeypatch, {1, STEPS_PER_EPOCH + 1})
    args = train_args(synthetic_root, tmp_path, "nan", 2, "--max-bad-steps", "2")
    assert main.main(args) == 0
    out = capsys.readouterr().out
    # Counted on the device, reported at the checks (here the end of each epoch).
    assert out.count("warning: 1 step(s) skipped for non-finite gradients") == 2
    checkpoint = torch.load(tmp_path / "nan/last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["step"] == 2 * STEPS_PER_EPOCH
    adam_steps = {int(s["step"]) for s in checkpoint["optimizer_state"]["state"].values()}
    assert adam_steps == {2 * STEPS_PER_EPOCH - 2}, "the skipped steps changed no weight"
    assert all(torch.isfinite(v).all() for v in checkpoint["model_state"].values())
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "nan/metrics.jsonl").open()]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_consecutive_nan_steps_stop_the_run_and_keep_the_last_good_checkpoint(
    synthetic_root, tmp_path, monkeypatch, capsys
):
    # The last step of epoch 1 and the first of epoch 2: the count runs across epochs.
    make_training_outputs_nan(monkeypatch, {STEPS_PER_EPOCH - 1, STEPS_PER_EPOCH})
    saved = []
    real_save_checkpoint = checkpoints.save_checkpoint

    def recording_save_checkpoint(state, path):
        saved.append((path.name, state["epoch"]))
        real_save_checkpoint(state, path)

    monkeypatch.setattr(checkpoints, "save_checkpoint", recording_save_checkpoint)
    args = train_args(synthetic_root, tmp_path, "nan", 3, "--max-bad-steps", "2")
    assert main.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [message] = error_lines(err)
    assert "2 non-finite steps in a row" in message and "--max-bad-steps 2" in message
    assert saved == [("last.pt", 1), ("best.pt", 1)]
    for name in ("best.pt", "last.pt"):
        checkpoint = torch.load(tmp_path / "nan" / name, weights_only=True)
        assert checkpoint["epoch"] == 1 and checkpoint["step"] == STEPS_PER_EPOCH
        assert all(torch.isfinite(v).all() for v in checkpoint["model_state"].values())
    assert epochs_in(tmp_path / "nan") == [1]


def test_weights_blown_up_by_a_huge_learning_rate_stop_the_run_unsaved(
    synthetic_root, tmp_path, monkeypatch, capsys
):
    """--lr 1e6: the losses may stay finite while weights and normalization statistics
    overflow; no checkpoint may hold them."""
    non_finite_when_saved = []
    real_save_checkpoint = checkpoints.save_checkpoint

    def recording_save_checkpoint(state, path):
        # The state holds the live tensors: look at them now.
        non_finite_when_saved.extend(checkpoints.non_finite_tensors(state))
        real_save_checkpoint(state, path)

    monkeypatch.setattr(checkpoints, "save_checkpoint", recording_save_checkpoint)
    assert main.main(train_args(synthetic_root, tmp_path, "huge", 3, "--lr", "1e6")) == 2
    [message] = error_lines(capsys.readouterr().err)
    assert "weights became NaN or infinite" in message or "non-finite steps" in message
    assert non_finite_when_saved == []
    for path in (tmp_path / "huge").glob("*.pt"):
        assert not checkpoints.non_finite_tensors(torch.load(path, weights_only=True))


def test_a_checkpoint_holding_nan_is_refused_by_test_predict_and_resume(reference_run, tmp_path):
    checkpoint = torch.load(reference_run / "last.pt", weights_only=True)
    key = next(iter(checkpoint["model_state"]))
    checkpoint["model_state"][key][0] = float("nan")
    run_dir = tmp_path / "diverged"
    run_dir.mkdir()
    torch.save(checkpoint, run_dir / "last.pt")
    with pytest.raises(checkpoints.CheckpointError, match="not writing"):
        checkpoints.save_checkpoint(checkpoint, tmp_path / "never.pt")
    assert not (tmp_path / "never.pt").exists()
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), "gray").save(photo)
    for command in (
        ["test", "--model", str(run_dir / "last.pt"), "--workers", "0"],
        ["predict", "--model", str(run_dir / "last.pt"), str(photo), "--out", str(tmp_path)],
        ["train", "--resume", str(run_dir / "last.pt"), "--epochs", "4"],
    ):
        result = subprocess.run(
            [sys.executable, str(ROOT / "main.py"), *command],
            capture_output=True, text=True, cwd=ROOT, timeout=300,
        )  # fmt: skip
        assert result.returncode == 2, command
        [message] = error_lines(result.stderr)
        assert "hold NaN or inf values" in message and key in message


def test_cuda_out_of_memory_names_the_flags_to_lower(synthetic_root, tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(main, "train_one_epoch", out_of_memory)
    assert main.main(train_args(synthetic_root, tmp_path, "oom")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [message] = error_lines(err)
    assert "--batch-size 4" in message and "--img-size 32" in message


# ----------------------------------------------------------------------------------------
# Broken and missing files


def test_check_lists_every_bad_file_and_fails(root_copy):
    truncated = frame_files(root_copy, "1", "rgb")[0]
    truncate(truncated)
    garbled = frame_files(root_copy, "2", "semantic")[1]
    break_compressed_pixels(garbled)  # passes the CRC; can crash torchvision's decoder
    zeroed = frame_files(root_copy, "5a", "rgb")[2]
    zero_some_bytes(zeroed)
    missing = frame_files(root_copy, "2", "semantic")[3]
    missing.unlink()
    mismatched = frame_files(root_copy, "5a", "semantic")[4]
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(mismatched)
    unpaired = frame_files(root_copy, "1", "rgb")[5]  # its semantic file stays
    unpaired.unlink()

    result = subprocess.run(
        [sys.executable, "-m", "seglab.check", "--datadir", str(root_copy)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    report = result.stdout.splitlines()
    for path in (truncated, garbled, zeroed, missing, mismatched, unpaired):
        assert sum(path.name in line for line in report) == 1, path.name
    assert any("truncated" in line for line in report if truncated.name in line)
    assert f"{unpaired} is missing" in report
    assert "checked 16 frames: 6 problem(s)" in report[-1]


GARBLED_NEEDS_PYSPNG = pytest.mark.skipif(
    data.pyspng is None, reason="torchvision's decoder crashes on it; check.py finds it"
)


@pytest.mark.parametrize(
    "fault",
    ["truncated-png", pytest.param("garbled-png", marks=GARBLED_NEEDS_PYSPNG), "missing-semantic"],
)
def test_bad_file_stops_training_with_one_line_naming_it(root_copy, tmp_path, capsys, fault):
    if fault == "truncated-png":
        bad = frame_files(root_copy, "1", "rgb")[2]
        truncate(bad)
    elif fault == "garbled-png":
        bad = frame_files(root_copy, "2", "rgb")[1]
        break_compressed_pixels(bad)
    else:
        bad = frame_files(root_copy, "2", "semantic")[2]
        bad.unlink()
    # With a loader worker, torch re-raises the worker's error wrapped in its traceback.
    args = train_args(root_copy, tmp_path, "bad", 1, "--workers", "1")
    assert main.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "DataLoader worker" not in err
    [message] = error_lines(err)
    assert str(bad) in message
    assert f"python -m seglab.check --datadir {root_copy}" in message and "--skip-bad" in message


def test_skip_bad_leaves_out_broken_and_unlabelled_frames_and_reports_them(
    root_copy, tmp_path, capsys
):
    truncated_rgb = frame_files(root_copy, "1", "rgb")[2]
    truncate(truncated_rgb)
    zeroed_rgb = frame_files(root_copy, "1", "rgb")[4]
    zero_some_bytes(zeroed_rgb)
    missing_semantic = frame_files(root_copy, "2", "semantic")[3]
    missing_semantic.unlink()
    val_frame = frame_files(root_copy, "5a", "rgb")[1]
    truncate(frame_files(root_copy, "5a", "semantic")[1])
    # Batches of one read every training frame; the worker flags the broken ones in
    # shared memory for the main process to report.
    args = train_args(root_copy, tmp_path, "lenient", 1, "--skip-bad", "--workers", "1")
    assert main.main([*args, "--batch-size", "1"]) == 0
    captured = capsys.readouterr()
    assert f"warning: skipping {frame_files(root_copy, '2', 'rgb')[3]}" in captured.err
    out = captured.out
    assert "11 training frames, 6 validation frames" in out
    report = out[out.index("skipped 4 frame(s) with an unreadable or missing file") :]
    for path in (truncated_rgb, zeroed_rgb, missing_semantic, val_frame):
        assert f"  {path}\n" in report
    checkpoint = torch.load(tmp_path / "lenient/last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["step"] == 11


def test_skip_bad_without_val_areas_warns_once_and_shares_what_it_found(root_copy, capsys):
    missing_semantic = frame_files(root_copy, "2", "semantic")[3]
    missing_semantic.unlink()
    train_set, val_set = data.get_datasets(root_copy, ["1", "2"], img_size=16, skip_bad=True)
    assert capsys.readouterr().err.count(str(missing_semantic)) == 1
    broken = train_set.dataset.frames[val_set.indices[0]].rgb_path
    truncate(broken)
    val_set[0]  # replaced by the next readable frame, and flagged
    assert train_set.dataset.bad_paths() == val_set.dataset.bad_paths()
    assert val_set.dataset.bad_paths() == [missing_semantic, broken]


# ----------------------------------------------------------------------------------------
# Checkpoints that do not fit, inputs of predict that are not images


def broken_checkpoints(reference_run: Path, folder: Path) -> list[tuple[Path, str]]:
    """(checkpoint file, what its error must say) for each way a checkpoint can be wrong."""
    checkpoint = torch.load(reference_run / "best.pt", weights_only=True)
    cases = []

    def write(name: str, content, expected: str) -> None:
        torch.save(content, folder / name)
        cases.append((folder / name, expected))

    write("no_state.pt", {k: v for k, v in checkpoint.items() if k != "model_state"},
          "lacks model_state")  # fmt: skip
    write("plain_state_dict.pt", checkpoint["model_state"], "not a checkpoint of this project")
    wider = {**checkpoint, "model_config": {**checkpoint["model_config"], "base_chan": 8}}
    write("wider.pt", wider, "shapes differ: ")
    other_config = models.model_config("lraspp_mobilenet_v3_large", data.NUM_CLASSES)
    write("other_model.pt", {**checkpoint, "model_config": other_config}, "missing ")
    half = (reference_run / "best.pt").read_bytes()
    (folder / "half.pt").write_bytes(half[: len(half) // 2])
    cases.append((folder / "half.pt", "cannot read checkpoint"))
    return cases


def test_checkpoints_that_do_not_fit_are_refused_with_what_differs(
    reference_run, synthetic_root, tmp_path, capsys
):
    for path, expected in broken_checkpoints(reference_run, tmp_path):
        args = ["test", "--model", str(path), "--datadir", str(synthetic_root), "--workers", "0"]
        assert main.main(args) == 2, path.name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
        assert str(path) in err and expected in err, err


def test_predict_names_each_bad_input_and_still_does_the_good_ones(reference_run, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(inputs / "good.png")
    Image.fromarray(rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)).save(inputs / "cut.jpg")
    truncate(inputs / "cut.jpg")
    (inputs / "notes.txt").write_text("not an image")
    absent = tmp_path / "absent.png"
    out = tmp_path / "out"
    args = ["predict", "--model", str(reference_run / "best.pt"), "--out", str(out)]
    assert main.main([*args, "--device", "cpu", str(inputs), str(absent)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for path in (inputs / "cut.jpg", inputs / "notes.txt", absent):
        assert sum(str(path) in line for line in error_lines(err)) == 1, path
    assert "3 input(s) could not be read" in err
    with Image.open(out / "good_mask.png") as mask:
        assert mask.size == (50, 40)
    assert sorted(p.name for p in out.iterdir()) == [
        "good_legend.png", "good_mask.png", "good_overlay.png",
    ]  # fmt: skip
