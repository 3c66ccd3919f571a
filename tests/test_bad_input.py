"""Bad input of every kind, each with its repro on tiny synthetic data: refused in one line
naming the file or flag and what to do, and nothing lost or overwritten.

Data roots that synthetic.py did not make, labels that cannot be right, photos of any bit
depth, outputs that would replace an input, pictures too large to decode, files named by
flags, unwritable folders and a full disk, Ctrl-C, and the messages about checkpoints.
"""

from __future__ import annotations

import errno
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

import data
import main
from seglab import check, checkpoints, cli, explore, inference, pngfiles, runfolder, synthetic

TINY_TRAINING = [
    "--areas", "1", "--val-areas", "5a", "--epochs", "2", "--batch-size", "2", "--subset", "2",
    "--workers", "0", "--device", "cpu", "--num-blocks", "2", "--base-chan", "4",
    "--img-size", "32", "--warmup-steps", "1",
]  # fmt: skip


def train_argv(root: Path, logdir: Path, *extra: str) -> list[str]:
    return ["train", "--datadir", str(root), "--logdir", str(logdir), *TINY_TRAINING, *extra]


def one_error_line(stderr: str) -> str:
    """The one `error:` line of stderr (no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr
    return lines[0]


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def root_copy(synthetic_root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "root"
    shutil.copytree(synthetic_root, copy)
    return copy


def semantic_files(root: Path, area: str) -> list[Path]:
    return sorted(data.frame_folder(root, area, "semantic").glob(f"*{data.SEMANTIC_SUFFIX}"))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def png_file(path: Path, width: int, height: int, depth: int, color: int, rows: bytes) -> Path:
    """A PNG written byte by byte (Pillow writes neither 16-bit RGB nor huge headers):
    IHDR, one IDAT of the zlib-compressed `rows` (each row: filter byte 0, then pixels)."""
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([depth, color, 0, 0, 0])
    chunks = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
    path.write_bytes(pngfiles.PNG_SIGNATURE + chunks + png_chunk(b"IEND", b""))
    return path


def huge_png(path: Path, side: int) -> Path:
    """A PNG whose header announces side x side RGB pixels: Pillow refuses it on opening,
    before it decodes any pixel (the few bytes of pixels given would not fill it)."""
    return png_file(path, side, side, 8, 2, b"\0" * 16)


# ----------------------------------------------------------------------------------------
# synthetic.py writes only into roots it made, with the same label list


def generate(root: Path, areas: list[str]) -> None:
    synthetic.generate(root, areas, images_per_area=1, size=32, seed=0, progress=False)


def test_synthetic_refuses_a_root_it_did_not_make(root_copy, capsys):
    (root_copy / synthetic.MARKER_FILE).unlink()  # as in a real 2D-3D-S root
    before = snapshot(root_copy)
    status = synthetic.main(["--out", str(root_copy), "--areas", "1", "--size", "32"])
    assert status == 2
    line = one_error_line(capsys.readouterr().err)
    assert "did not write" in line and "new or empty folder" in line
    assert snapshot(root_copy) == before


def test_synthetic_refuses_its_own_root_with_another_label_list(tmp_path):
    root = tmp_path / "root"
    generate(root, ["1"])
    before = snapshot(root)
    with pytest.raises(data.DataError, match="would decode wrong"):
        generate(root, ["1", "2"])
    assert snapshot(root) == before


def test_synthetic_writes_again_into_its_own_root_and_into_an_empty_folder(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    generate(root, ["1"])
    first = snapshot(root)
    generate(root, ["1"])  # same areas, frames and seed: the same label list
    assert snapshot(root) == first


# ----------------------------------------------------------------------------------------
# Labels that cannot be right: found by check.py, refused by train


@pytest.mark.parametrize("mode", ["L", "P"])
def test_semantic_pngs_that_are_not_rgb_are_found_and_refused(root_copy, tmp_path, capsys, mode):
    for path in semantic_files(root_copy, "1"):
        with Image.open(path) as image:
            converted = image.convert(mode)
        converted.save(path)
    assert check.main(["--datadir", str(root_copy), "--areas", "1"]) == 1
    out = capsys.readouterr().out
    assert out.count("but the labels are 8-bit RGB colors") == len(semantic_files(root_copy, "1"))
    status = main.main(train_argv(root_copy, tmp_path / "runs"))
    assert status == 2
    line = one_error_line(capsys.readouterr().err)
    assert "_domain_semantic.png" in line and "8-bit RGB" in line


@pytest.mark.parametrize("labels", ["[]", "{}", '["chair_1_office_1_1", 3]'])
def test_an_empty_or_malformed_label_list_is_refused(root_copy, tmp_path, capsys, labels):
    (root_copy / data.LABELS_FILE).write_text(labels)
    assert check.main(["--datadir", str(root_copy)]) == 2
    assert "non-empty JSON list of label strings" in one_error_line(capsys.readouterr().err)
    assert main.main(train_argv(root_copy, tmp_path / "runs")) == 2
    assert "non-empty JSON list" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


def test_a_training_set_without_a_labelled_pixel_is_found_and_refused(root_copy, tmp_path, capsys):
    labels_path = root_copy / data.LABELS_FILE
    labels = json.loads(labels_path.read_text())
    labels_path.write_text(json.dumps(["<UNK>_0_<UNK>_0_0"] * len(labels)))
    assert check.main(["--datadir", str(root_copy)]) == 1
    out = capsys.readouterr().out
    assert all(f"area {area}: no labelled pixel" in out for area in ("1", "2", "5a"))
    assert main.main(train_argv(root_copy, tmp_path / "runs")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "training frames have no labelled pixel" in line
    assert not any((tmp_path / "runs").rglob("*.pt"))


# ----------------------------------------------------------------------------------------
# predict: photos of any depth, outputs that never replace an input, huge pictures


def gradient(height: int = 8, width: int = 16) -> np.ndarray:
    """(H, W) float64 in [0, 1], increasing along each row."""
    return np.tile(np.linspace(0, 1, width), (height, 1))


def test_photos_of_any_bit_depth_are_scaled_to_8_bits(tmp_path):
    ramp = gradient()
    expected = np.rint(ramp * 255).astype(np.uint8)
    gray16 = tmp_path / "gray16.png"
    Image.fromarray(np.rint(ramp * 65535).astype(np.uint16)).save(gray16)
    rgb16_values = np.rint(np.stack([ramp, 1 - ramp, ramp], axis=-1) * 65535).astype(">u2")
    rows = b"".join(b"\0" + row.tobytes() for row in rgb16_values)
    rgb16 = png_file(tmp_path / "rgb16.png", 16, 8, 16, 2, rows)
    float01 = tmp_path / "float01.tif"
    Image.fromarray(ramp.astype(np.float32)).save(float01)
    float_other = tmp_path / "float_other.tif"
    Image.fromarray((ramp * 300 - 5).astype(np.float32)).save(float_other)

    for path in (gray16, float01, float_other):
        image = inference.read_image(path)
        assert image.shape == (3, 8, 16) and image.dtype == torch.uint8
        for channel in image:
            assert np.abs(channel.numpy().astype(int) - expected).max() <= 1, path
    image = inference.read_image(rgb16)
    assert np.abs(image[0].numpy().astype(int) - expected).max() <= 1
    assert np.abs(image[1].numpy().astype(int) - (255 - expected)).max() <= 1


def segment_folder(tmp_path: Path) -> Path:
    """A folder of two photos, one named like the overlay of the other."""
    folder = tmp_path / "photos"
    folder.mkdir()
    picture = (gradient(40, 48)[..., None] * [255, 128, 60]).astype(np.uint8)
    Image.fromarray(picture).save(folder / "a.png")
    Image.fromarray(picture).save(folder / "a_overlay.png")
    return folder


def test_predict_into_its_input_folder_never_replaces_an_input(tiny_model, tmp_path, capsys):
    folder = segment_folder(tmp_path)
    before = snapshot(folder)
    status = main.main(["predict", str(folder), "--model", str(tiny_model), "--out", str(folder)])
    assert status == 2
    line = one_error_line(capsys.readouterr().err)
    assert "a_overlay.png would replace that input" in line
    assert snapshot(folder) == before


def test_predict_names_the_subfolders_it_does_not_read(tiny_model, tmp_path, capsys):
    folder = segment_folder(tmp_path)
    (folder / "more").mkdir()
    shutil.copy(folder / "a.png", folder / "more" / "b.png")
    out = tmp_path / "out"
    assert main.main(["predict", str(folder), "--model", str(tiny_model), "--out", str(out)]) == 0
    assert f"skipping the folder {folder / 'more'}" in capsys.readouterr().err
    assert (out / "a_mask.png").is_file() and not (out / "b_mask.png").exists()


def test_predict_refuses_pictures_too_large_and_does_the_others(tiny_model, tmp_path, capsys):
    folder = segment_folder(tmp_path)
    huge_png(folder / "huge.png", 14_000)  # 196 megapixels: Pillow raises
    huge_png(folder / "large.png", 10_000)  # 100 megapixels: Pillow warns
    out = tmp_path / "out"
    assert main.main(["predict", str(folder), "--model", str(tiny_model), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("too large to segment" in line for line in errors)
    assert {p.name for p in out.glob("*_mask.png")} == {"a_mask.png", "a_overlay_mask.png"}


def test_check_reports_a_picture_too_large_and_checks_the_others(root_copy, capsys):
    rgb = sorted(data.frame_folder(root_copy, "1", "rgb").iterdir())[0]
    huge_png(rgb, 14_000)
    assert check.main(["--datadir", str(root_copy)]) == 1
    out = capsys.readouterr().out
    assert f"cannot read {rgb}: too large" in out
    assert "checked 18 frames: 1 problem(s)" in out


@pytest.mark.parametrize("kind", ["an existing file", "below a file"])
def test_predict_into_an_unusable_out_says_so(tiny_model, tmp_path, capsys, kind):
    folder = segment_folder(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file\n")
    out = blocker if kind == "an existing file" else blocker / "out"
    status = main.main(["predict", str(folder), "--model", str(tiny_model), "--out", str(out)])
    assert status == 2
    assert f"--out {out}" in one_error_line(capsys.readouterr().err)
    assert blocker.read_text() == "a file\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_predict_into_a_read_only_folder_says_so(tiny_model, tmp_path, capsys):
    folder = segment_folder(tmp_path)
    out = tmp_path / "read-only"
    out.mkdir(mode=0o555)
    status = main.main(["predict", str(folder), "--model", str(tiny_model), "--out", str(out)])
    assert status == 2
    assert "Permission denied" in one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------
# Unwritable folders and a full disk during training: one line, the last checkpoint kept


def fail_from_epoch_2(monkeypatch, target, name: str, error: OSError) -> None:
    """Make `target.name` raise `error` once last.pt of epoch 1 exists."""
    original = getattr(target, name)
    epochs_saved = []
    save = checkpoints.save_checkpoint

    def counting_save(state, path):
        save(state, path)
        if path.name == "last.pt":
            epochs_saved.append(state["epoch"])

    def failing(*args, **kwargs):
        if epochs_saved:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_checkpoint", counting_save)
    monkeypatch.setattr(target, name, failing)


def assert_epoch_1_kept(run_dir: Path) -> None:
    assert checkpoints.load_checkpoint(run_dir / "last.pt")["epoch"] == 1


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_full_disk_in_tensorboard_gives_one_line_and_keeps_the_checkpoint(
    synthetic_root, tmp_path, monkeypatch, capsys
):
    from tensorboard.summary.writer import record_writer

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "events.out.tfevents")
    fail_from_epoch_2(monkeypatch, record_writer.RecordWriter, "write", full)
    assert main.main(train_argv(synthetic_root, tmp_path, "--name", "full")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "free some space" in line
    assert_epoch_1_kept(tmp_path / "full")


def test_a_run_folder_that_turns_read_only_gives_one_line_and_keeps_the_checkpoint(
    synthetic_root, tmp_path, monkeypatch, capsys
):
    run_dir = tmp_path / "ro"
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(run_dir / "x"))
    fail_from_epoch_2(monkeypatch, runfolder, "append_jsonl", denied)
    assert main.main(train_argv(synthetic_root, tmp_path, "--name", "ro")) == 2
    assert "Permission denied" in one_error_line(capsys.readouterr().err)
    assert_epoch_1_kept(run_dir)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_logdir_gives_one_line(synthetic_root, tmp_path, capsys):
    logdir = tmp_path / "runs"
    logdir.mkdir(mode=0o555)
    assert main.main(train_argv(synthetic_root, logdir, "--name", "x")) == 2
    assert "Permission denied" in one_error_line(capsys.readouterr().err)


def test_ctrl_c_ends_training_with_one_line_and_status_130(synthetic_root, tmp_path):
    argv = train_argv(synthetic_root, tmp_path, "--name", "stopped", "--epochs", "50")
    argv[argv.index("--workers") + 1] = "1"  # the loader's process gets Ctrl-C too
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not (tmp_path / "stopped" / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)  # as a terminal sends Ctrl-C: to the whole group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stderr.rstrip().splitlines()[-1].startswith("interrupted (Ctrl-C)")
    assert checkpoints.load_checkpoint(tmp_path / "stopped" / "last.pt")["epoch"] >= 1


# Run in a process of its own: pytest replaces sys.unraisablehook, which would hide what a
# user sees. `command` is the body of a command given to cli.run.
CTRL_C_SCRIPT = """
import argparse, os, signal, sys, time
from seglab import cli

class HalfBuilt:  # Ctrl-C in its constructor; its finalizer then fails, as a progress bar's
    def __init__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        self.ready = True
    def __del__(self):
        assert self.ready

class InterruptedFinalizer:  # Ctrl-C while its finalizer runs, where Python cannot raise it
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)

def command(args):
    {body}
    for _ in range(250):
        time.sleep(0.02)
    return 0

sys.exit(cli.run(command, argparse.Namespace(), ()))
"""


@pytest.mark.parametrize(
    "body", ["HalfBuilt()", "finalizer = InterruptedFinalizer(); del finalizer"]
)
def test_ctrl_c_in_a_constructor_or_a_finalizer_ends_in_one_line(body):
    result = subprocess.run(
        [sys.executable, "-c", CTRL_C_SCRIPT.format(body=body)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == cli.INTERRUPTED_STATUS  # 0 if the interrupt were lost
    assert result.stderr.strip().splitlines() == [
        "interrupted (Ctrl-C); files written so far are whole"
    ]


def test_a_poisoned_pretrained_file_stops_training_in_one_line(
    synthetic_root, tmp_path, monkeypatch, capsys
):
    from torchvision.models import segmentation

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = segmentation.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    cached.parent.mkdir(parents=True)
    ran = tmp_path / "code-ran"
    torch.save({"payload": TouchesAFile(ran)}, cached)
    argv = train_argv(synthetic_root, tmp_path / "runs", "--model", "lraspp_mobilenet_v3_large")
    assert main.main([*argv, "--pretrained", "coco"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"refused to load {cached}" in line and "delete it to download it again" in line
    assert not ran.exists()


class TouchesAFile:
    """Unpickling this would create `path`: proof that code from the file ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


# ----------------------------------------------------------------------------------------
# Files named by flags


def pixel_shares_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each bad --class-weights file and a part of the message that names its fault."""
    shares = [1 / data.NUM_CLASSES] * data.NUM_CLASSES
    contents = {
        "missing": (None, "no such file"),
        "not JSON": ("{pixel_share", "is not JSON"),
        "no key": (json.dumps({"pixel_count": shares}), 'no "pixel_share" entry'),
        "short": (json.dumps({"pixel_share": shares[:5]}), "list of 14 numbers"),
        "negative": (json.dumps({"pixel_share": [-0.1, *shares[1:]]}), "finite shares >= 0"),
        "a list": (json.dumps(shares), 'no "pixel_share" entry'),
    }
    files = {}
    for name, (content, message) in contents.items():
        path = folder / f"{name.replace(' ', '_')}.json"
        if content is not None:
            path.write_text(content)
        files[name] = (path, message)
    return files


@pytest.mark.parametrize("fault", ["missing", "not JSON", "no key", "short", "negative", "a list"])
def test_every_bad_class_weights_file_is_refused_in_one_line(
    synthetic_root, tmp_path, capsys, fault
):
    path, message = pixel_shares_files(tmp_path)[fault]
    argv = train_argv(synthetic_root, tmp_path / "runs", "--loss", "wce", "--class-weights")
    with pytest.raises(SystemExit) as exit_info:
        main.main([*argv, str(path)])
    assert exit_info.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--class-weights: {path}" in line and message in line
    assert not (tmp_path / "runs").exists()


def test_class_weights_with_a_loss_that_does_not_use_them_is_refused(
    synthetic_root, tmp_path, capsys
):
    shares = tmp_path / "hist.json"
    assert explore.main(["histogram", "--datadir", str(synthetic_root), "--out", str(shares)]) == 0
    capsys.readouterr()
    argv = train_argv(synthetic_root, tmp_path / "runs", "--loss", "focal")
    with pytest.raises(SystemExit) as exit_info:
        main.main([*argv, "--class-weights", str(shares)])
    assert exit_info.value.code == 2
    assert "--class-weights is used by --loss wce only" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", ["show", "histogram"])
@pytest.mark.parametrize("kind", ["in a missing folder", "a folder"])
def test_show_and_histogram_refuse_an_out_they_cannot_write(
    synthetic_root, tmp_path, capsys, command, kind
):
    out = tmp_path / "missing" / "x.png" if kind == "in a missing folder" else tmp_path
    before = snapshot(tmp_path)
    assert explore.main([command, "--datadir", str(synthetic_root), "--out", str(out)]) == 2
    assert f"--out {out}" in one_error_line(capsys.readouterr().err)
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------
# test over frames of different sizes; messages that said the wrong thing


def test_test_over_frames_of_different_sizes(root_copy, tiny_model, tmp_path, capsys):
    rgb = sorted(data.frame_folder(root_copy, "5a", "rgb").iterdir())[0]
    frame = data.Frame.at(root_copy, "5a", rgb.name.removesuffix(data.RGB_SUFFIX))
    for path in (frame.rgb_path, frame.semantic_path):
        with Image.open(path) as image:
            image.resize((48, 40), Image.Resampling.NEAREST).save(path)
    argv = ["test", "--model", str(tiny_model), "--datadir", str(root_copy), "--areas", "5a"]
    argv += ["--workers", "0", "--device", "cpu", "--out", str(tmp_path / "scores")]
    assert main.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "different sizes (48x40 and 64x64)" in line and "--batch-size 1" in line
    assert main.main([*argv, "--batch-size", "1"]) == 0
    assert (tmp_path / "scores" / "metrics.json").is_file()


def test_a_datadir_that_is_a_file_is_called_a_file(tmp_path, tiny_model, capsys):
    not_a_folder = tmp_path / "data.txt"
    not_a_folder.write_text("")
    for argv in (
        train_argv(not_a_folder, tmp_path / "runs"),
        ["test", "--model", str(tiny_model), "--datadir", str(not_a_folder)],
    ):
        assert main.main(argv) == 2
        assert f"{not_a_folder} is a file, not a folder" in one_error_line(capsys.readouterr().err)
    assert check.main(["--datadir", str(not_a_folder)]) == 2
    assert "is a file, not a folder" in one_error_line(capsys.readouterr().err)


def test_test_without_its_datadir_says_the_data_is_missing(
    tiny_model, tmp_path, monkeypatch, capsys
):
    checkpoint = torch.load(tiny_model, weights_only=True)
    checkpoint["args"]["datadir"] = str(tmp_path / "moved")
    moved = tmp_path / "moved.pt"
    torch.save(checkpoint, moved)
    monkeypatch.delenv(data.DATADIR_VARIABLE, raising=False)
    assert main.main(["test", "--model", str(moved), "--device", "cpu"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"data directory {tmp_path / 'moved'} does not exist" in line
    assert "used for training" not in line


class RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty (0 bytes)"),
        (bytes(range(7, 250)) * 4, "is not a PyTorch checkpoint"),
        (b"\x80" + bytes(range(200, 100, -1)), "is not a checkpoint of this project"),
        ("poisoned", "holds Python objects that could run code"),
        ("cut short", "is damaged or cut short"),
    ],
)
def test_a_checkpoint_is_refused_with_its_real_reason(
    tiny_model, tmp_path, capsys, content, expected
):
    path = tmp_path / "model.pt"
    if content == "poisoned":
        torch.save({"format": checkpoints.CHECKPOINT_FORMAT, "x": RunsCode()}, path)
    elif content == "cut short":
        path.write_bytes(tiny_model.read_bytes()[:5000])
    else:
        path.write_bytes(content)
    assert main.main(["predict", str(tiny_model), "--model", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert expected in line
    assert "weights_only" not in line and "trusted source" not in line
    if "Python objects" not in expected:
        assert "Python objects" not in line
