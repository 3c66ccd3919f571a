"""Files that are not what they claim: each ends in one line that names the file, before
anything large is allocated or anything is written. Checkpoints, ONNX files, caches, label
lists, frames, --class-weights files, and the frames `python -m seglab.check` reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import data
import main
import models
from seglab import cache, check, checkpoints, cli, export, pngfiles

TINY = ["--num-blocks", "2", "--base-chan", "4", "--img-size", "32"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def small_checkpoint(path: Path, **changes) -> Path:
    torch.manual_seed(0)
    config = models.model_config("unet", data.NUM_CLASSES, num_blocks=2, base_chan=4)
    state = {
        "format": checkpoints.CHECKPOINT_FORMAT, "model_config": config, "epoch": 1,
        "model_state": models.build_model(**config).state_dict(), "args": {},
        "classes": list(data.CLASSES), "img_size": 32,
    }  # fmt: skip
    state.update(changes)
    checkpoints.save_checkpoint(state, path)
    return path


@pytest.fixture
def photo(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (100, 150, 200)).save(path)
    return path


def predict(model: Path, photo: Path, capsys) -> str:
    out = photo.parent / "out"
    assert main.main(["predict", "--model", str(model), str(photo), "--out", str(out)]) == 2
    assert not out.exists()
    return one_error_line(capsys)


# ----------------------------------------------------------------------------------------
# Checkpoints


def test_a_checkpoint_with_a_damaged_tensor_is_refused(tmp_path, photo, capsys):
    path = small_checkpoint(tmp_path / "model.pt")
    raw = bytearray(path.read_bytes())
    weight = next(iter(torch.load(path, weights_only=True)["model_state"].values()))
    at = bytes(raw).index(weight.numpy().tobytes()) + 8  # inside the tensor's data
    raw[at : at + 4] = bytes(255 - byte for byte in raw[at : at + 4])
    path.write_bytes(raw)
    line = predict(path, photo, capsys)
    assert f"checkpoint {path} is damaged" in line and "fails its checksum" in line


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_config": {"name": "unet", "num_classes": 14, "num_blocks": 6, "base_chan": 2048,
                           "cin": 3}}, "base_chan 2048 (at most 256)"),
        ({"model_config": {"name": "unet", "num_classes": 14, "num_blocks": 9, "base_chan": 64,
                           "cin": 3}}, "num_blocks 9 (at most 6)"),
        ({"model_config": {"name": "unet", "num_classes": 14, "num_blocks": 6, "base_chan": 128,
                           "cin": 3}}, "parameters (at most 600,000,000)"),
        ({"img_size": 10**9}, "img_size (1000000000; at most 2048)"),
    ],
)  # fmt: skip
def test_model_sizes_in_a_checkpoint_are_held_to_the_flags_limits(
    tmp_path, photo, capsys, changes, message
):
    path = small_checkpoint(tmp_path / "model.pt", **changes)
    assert message in predict(path, photo, capsys)


# ----------------------------------------------------------------------------------------
# ONNX files


def onnx_file(path: Path, input_name="image", channels=14, metadata=None) -> Path:
    """A one-node ONNX graph: `input_name` uint8 (N, 3, H, W) -> `logits` float32 of
    `channels` channels (a 1x1 convolution), with the metadata of `export` changed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    image = helper.make_tensor_value_info(input_name, TensorProto.UINT8, ["N", 3, "H", "W"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", channels, "H", "W"])
    weight = numpy_helper.from_array(torch.ones(channels, 3, 1, 1).numpy(), "weight")
    nodes = [
        helper.make_node("Cast", [input_name], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["as_float", "weight"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "g", [image], [logits], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    config = models.model_config("unet", data.NUM_CLASSES, num_blocks=2, base_chan=4)
    entries = export.onnx_metadata({"model_config": config, "img_size": 32})
    entries.update(metadata or {})
    for key, value in entries.items():
        if value is not None:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ({"input_name": "pixels"}, "not one input `image` of uint8"),
        ({"channels": 3}, "not `logits` of shape (N, 14, H, W)"),
        ({"metadata": {"classes": "[not json"}}, "its metadata classes is not JSON"),
        ({"metadata": {"img_size": "large"}}, "its metadata img_size is not a whole number"),
        ({"metadata": {"classes": None}}, "its metadata lacks classes"),
    ],
)
def test_onnx_files_that_are_not_what_they_claim(tmp_path, photo, capsys, kind, message):
    pytest.importorskip("onnxruntime")
    path = onnx_file(tmp_path / "model.onnx", **kind)
    line = predict(path, photo, capsys)
    assert str(path) in line and message in line


# ----------------------------------------------------------------------------------------
# Data: caches, label lists, frames, --class-weights


def test_a_cache_manifest_with_a_size_that_is_a_string(synthetic_root, tmp_path):
    out = tmp_path / "cache"
    cache.write_cache(synthetic_root, out, 32, areas=["5a"], progress=False)
    manifest = json.loads((out / "cache.json").read_text())
    (out / "cache.json").write_text(json.dumps({**manifest, "size": "32"}))
    with pytest.raises(data.DataError, match="cache.json: its size is a str, not a int"):
        cache.read_cache_manifest(out)


@pytest.fixture
def root_copy(synthetic_root, tmp_path) -> Path:
    copy = tmp_path / "root"
    shutil.copytree(synthetic_root, copy)
    return copy


def test_a_label_list_of_deeply_nested_brackets(root_copy, capsys):
    labels = root_copy / data.LABELS_FILE
    labels.write_text("[" * 200_000 + "]" * 200_000)
    assert check.main(["--datadir", str(root_copy)]) == 2
    line = one_error_line(capsys)
    assert str(labels) in line and "nested too deep" in line


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header announces width x height RGB pixels, with one tiny IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
    path.write_bytes(pngfiles.PNG_SIGNATURE + body + chunk(b"IEND", b""))


def test_a_huge_frame_in_a_training_set_is_refused_before_decoding(root_copy, tmp_path, capsys):
    rgb = sorted(data.frame_folder(root_copy, "1", "rgb").iterdir())[0]
    png_header_only(rgb, 20_000, 20_000)
    argv = ["train", "--datadir", str(root_copy), "--areas", "1", "--val-areas", "5a",
            "--epochs", "1", "--batch-size", "2", "--workers", "0", "--device", "cpu",
            "--logdir", str(tmp_path / "runs"), *TINY]  # fmt: skip
    assert main.main(argv) == 2
    line = one_error_line(capsys)
    assert f"cannot read {rgb}: too large: 20000 x 20000 pixels" in line
    assert check.main(["--datadir", str(root_copy)]) == 1
    assert f"cannot read {rgb}: too large" in capsys.readouterr().out


def test_class_weights_of_unk_only_are_refused(synthetic_root, tmp_path, capsys):
    shares = tmp_path / "shares.json"
    shares.write_text(json.dumps({"pixel_share": [1.0] + [0.0] * (data.NUM_CLASSES - 1)}))
    with pytest.raises(SystemExit) as exit_info:
        main.main(["train", "--datadir", str(synthetic_root), "--loss", "wce",
                   "--class-weights", str(shares), *TINY])  # fmt: skip
    assert exit_info.value.code == 2
    line = one_error_line(capsys)
    assert str(shares) in line and "pixels of <UNK> only" in line


def test_models_py_holds_its_flags_to_the_limits():
    command = [sys.executable, str(ROOT / "models.py"), "--num-blocks", "100"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"expected an integer from 1 to {cli.MAX_UNET_BLOCKS}, got '100'" in result.stderr


# ----------------------------------------------------------------------------------------
# check: depth files, and files that are not regular files


def first_depth(root: Path) -> Path:
    return sorted(data.frame_folder(root, "1", "depth").iterdir())[0]


@pytest.mark.parametrize("fault", ["8-bit", "RGB", "not a PNG"])
def test_check_finds_depth_files_that_train_cannot_read(root_copy, capsys, fault):
    from PIL import Image

    depth_file = first_depth(root_copy)
    if fault == "not a PNG":
        depth_file.write_bytes(b"not a picture")
    else:
        Image.new("L" if fault == "8-bit" else "RGB", (64, 64)).save(depth_file, format="PNG")
    assert check.main(["--datadir", str(root_copy)]) == 1
    out = capsys.readouterr().out
    assert str(depth_file) in out and "1 problem(s)" in out


def test_check_depth_finds_missing_depth_files(root_copy, capsys):
    depth_file = first_depth(root_copy)
    depth_file.unlink()
    assert check.main(["--datadir", str(root_copy)]) == 0  # RGB training needs no depth
    capsys.readouterr()
    assert check.main(["--datadir", str(root_copy), "--depth"]) == 1
    assert f"{depth_file} is missing" in capsys.readouterr().out


def test_check_skips_a_fifo_with_a_line(root_copy):
    rgb = sorted(data.frame_folder(root_copy, "1", "rgb").iterdir())[0]
    rgb.unlink()
    os.mkfifo(rgb)
    command = [sys.executable, "-m", "seglab.check", "--datadir", str(root_copy)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 1
    assert f"cannot read {rgb}: not a regular file" in result.stdout


# ----------------------------------------------------------------------------------------
# Claims: the sizes an exported program takes are the ones its docstring states


def test_a_pt2_program_takes_the_sizes_its_documentation_states(tmp_path):
    path = small_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "model.pt2"
    assert main.main(["export", "--model", str(path), "--out", str(out)]) == 0
    program = torch.export.load(out).module()
    side = export.MAX_EXPORT_SIDE
    assert f"H and W from 1 to {side}" in export.__doc__
    assert program(torch.zeros(1, 3, side, 1, dtype=torch.uint8)).shape == (1, 14, side, 1)
    with pytest.raises(Exception, match=str(side)):
        program(torch.zeros(1, 3, side + 1, 1, dtype=torch.uint8))


def test_a_large_picture_with_an_onnx_file_of_a_wrong_model_config(tmp_path):
    pytest.importorskip("onnxruntime")
    from seglab import inference

    checkpoint = small_checkpoint(tmp_path / "model.pt")
    path = tmp_path / "model.onnx"
    assert main.main(["export", "--model", str(checkpoint), "--out", str(path)]) == 0
    metadata = {"model_config": {"name": "unet", "num_classes": 14, "wings": 2}}
    with pytest.raises(export.ExportError, match="its metadata model_config is wrong"):
        inference.OnnxNetwork(path, metadata)
    other = onnx_file(tmp_path / "other.onnx")  # no resize around a network
    with pytest.raises(export.ExportError, match="its graph is not one that"):
        inference.OnnxNetwork(other, metadata)
