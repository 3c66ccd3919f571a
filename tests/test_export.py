"""export.py and main.py export / predict with ONNX: standalone files that agree with predict."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import data
import main
import models
from seglab import bench, checkpoints, export

ODD_SIZES = [(250, 333), (301, 97), (1080, 1080), (5, 7)]


def write_checkpoint(path: Path, img_size: int = 48) -> Path:
    """A small UNet with random weights, saved as this project saves its checkpoints."""
    torch.manual_seed(0)
    config = models.model_config("unet", data.NUM_CLASSES, num_blocks=2, base_chan=4)
    model = models.build_model(**config)
    state = {
        "format": checkpoints.CHECKPOINT_FORMAT,
        "model_config": config,
        "model_state": model.state_dict(),
        "classes": list(data.CLASSES),
        "img_size": img_size,
        "epoch": 1,
        "args": {},
    }
    checkpoints.save_checkpoint(state, path)
    return path


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("export") / "best.pt")


@pytest.fixture(scope="module")
def onnx_path(checkpoint_path: Path) -> Path:
    out = checkpoint_path.with_name("model.onnx")
    assert main.main(["export", "--model", str(checkpoint_path), "--out", str(out)]) == 0
    return out


def checkpoint_segmenter(path: Path) -> models.Segmenter:
    checkpoint = checkpoints.load_checkpoint(path)
    model = checkpoints.model_from_checkpoint(checkpoint, path).eval()
    return models.Segmenter(model, checkpoint["img_size"])


def random_image(height: int, width: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def test_onnx_file_holds_its_metadata_and_passes_the_checker(onnx_path):
    import onnx

    model = onnx.load(onnx_path)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    assert json.loads(metadata["classes"]) == list(data.CLASSES)
    assert json.loads(metadata["class_colors"]) == [list(c) for c in data.CLASS_COLORS.values()]
    assert json.loads(metadata["model_config"])["base_chan"] == 4
    assert metadata["img_size"] == "48"


@pytest.mark.parametrize("height, width", ODD_SIZES)
def test_onnxruntime_agrees_with_predict_at_odd_sizes(onnx_path, checkpoint_path, height, width):
    session = export.onnx_session(onnx_path)
    segmenter = checkpoint_segmenter(checkpoint_path)
    images = torch.stack([random_image(height, width, seed) for seed in (1, 2)])
    (logits,) = session.run(["logits"], {"image": images.numpy()})
    assert logits.shape == (2, data.NUM_CLASSES, height, width) and logits.dtype == np.float32
    for index, image in enumerate(images):
        ours = main.predict_image(segmenter, image, torch.device("cpu"))
        theirs = torch.from_numpy(logits[index].argmax(axis=0))
        assert (ours == theirs).float().mean() >= 0.999


def test_exported_program_runs_at_any_size(checkpoint_path, tmp_path):
    out = tmp_path / "model.pt2"
    assert main.main(["export", "--model", str(checkpoint_path), "--out", str(out)]) == 0
    program = torch.export.load(out).module()
    segmenter = checkpoint_segmenter(checkpoint_path)
    for height, width in ODD_SIZES:
        image = random_image(height, width)[None]
        with torch.no_grad():
            assert torch.allclose(program(image), segmenter(image), atol=1e-4)


def test_predict_with_the_onnx_file_writes_what_the_checkpoint_writes(
    onnx_path, checkpoint_path, tmp_path
):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for index, (height, width) in enumerate(ODD_SIZES[:2]):
        array = random_image(height, width, index).permute(1, 2, 0).numpy()
        Image.fromarray(array).save(pictures / f"photo{index}.png")
    for model, out in [(checkpoint_path, tmp_path / "pt"), (onnx_path, tmp_path / "onnx")]:
        assert main.main(["predict", "--model", str(model), str(pictures), "--out", str(out)]) == 0
    for index in range(2):
        names = [f"photo{index}_{kind}.png" for kind in ("mask", "overlay", "legend")]
        assert all((tmp_path / "onnx" / name).is_file() for name in names)
        from_checkpoint = np.array(Image.open(tmp_path / "pt" / names[0]))
        from_onnx = np.array(Image.open(tmp_path / "onnx" / names[0]))
        assert from_onnx.shape == from_checkpoint.shape == ODD_SIZES[index]
        assert (from_onnx == from_checkpoint).mean() >= 0.999


def test_the_mask_is_a_palette_png_of_class_ids(checkpoint_path, tmp_path):
    image = random_image(61, 90)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "photo.png")
    out = tmp_path / "out"
    assert main.main(["predict", "--model", str(checkpoint_path), str(tmp_path / "photo.png"),
                      "--out", str(out)]) == 0  # fmt: skip
    expected = main.predict_image(checkpoint_segmenter(checkpoint_path), image, "cpu")
    with Image.open(out / "photo_mask.png") as mask:
        assert mask.mode == "P"
        ids = np.array(mask)
        colors = np.array(mask.convert("RGB"))
    assert ids.dtype == np.uint8 and np.array_equal(ids, expected.numpy())
    palette = np.array(list(data.CLASS_COLORS.values()), dtype=np.uint8)
    assert np.array_equal(colors, palette[ids])


def test_missing_onnxruntime_is_one_line(onnx_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    Image.new("RGB", (20, 10)).save(tmp_path / "photo.png")
    args = ["predict", "--model", str(onnx_path), str(tmp_path / "photo.png")]
    assert main.main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install onnxruntime" in err


def test_missing_exporter_packages_are_one_line(checkpoint_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    out = tmp_path / "model.onnx"
    assert main.main(["export", "--model", str(checkpoint_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install onnxscript" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "out, message",
    [("model.onnx.zip", "name an .onnx or a .pt2 file"), ("missing/model.onnx", "does not exist")],
)
def test_export_refuses_a_bad_destination(checkpoint_path, tmp_path, capsys, out, message):
    args = ["export", "--model", str(checkpoint_path), "--out", str(tmp_path / out)]
    assert main.main(args) == 2
    assert message in capsys.readouterr().err


def test_an_onnx_file_of_other_classes_is_refused(checkpoint_path, tmp_path, capsys):
    import onnx

    out = tmp_path / "model.onnx"
    assert main.main(["export", "--model", str(checkpoint_path), "--out", str(out)]) == 0
    model = onnx.load(out)
    for entry in model.metadata_props:
        if entry.key == "classes":
            entry.value = json.dumps(["<UNK>", "thing"])
    onnx.save(model, out)
    Image.new("RGB", (20, 10)).save(tmp_path / "photo.png")
    args = ["predict", "--model", str(out), str(tmp_path / "photo.png")]
    assert main.main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "classes" in capsys.readouterr().err


def test_test_command_refuses_an_onnx_file(onnx_path, capsys):
    assert main.main(["test", "--model", str(onnx_path)]) == 2
    assert "run model.onnx on pictures with predict" in capsys.readouterr().err


@pytest.fixture
def published(checkpoint_path, onnx_path, tmp_path, monkeypatch) -> Iterator[str]:
    """The checkpoint and the ONNX file under hash-named files of a real HTTP server on
    127.0.0.1, as a teacher publishes them; torch's cache is the test's own."""
    folder = tmp_path / "site"
    folder.mkdir()
    for path in (checkpoint_path, onnx_path):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copy(path, folder / f"unet-{digest[:8]}{path.suffix}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Keep the test output quiet."""


def test_predict_and_export_take_a_url(published, checkpoint_path, tmp_path):
    names = {path.suffix: path.name for path in (tmp_path / "site").iterdir()}
    image = random_image(40, 70)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "photo.png")
    expected = main.predict_image(checkpoint_segmenter(checkpoint_path), image, "cpu")
    for suffix in (".pt", ".onnx"):
        out = tmp_path / f"out{suffix}"
        url = f"{published}/{names[suffix]}"
        assert main.main(["predict", "--model", url, str(tmp_path / "photo.png"),
                          "--out", str(out)]) == 0  # fmt: skip
        cached = tmp_path / "torch" / "hub" / "checkpoints" / names[suffix]
        assert cached.is_file()
        ids = np.array(Image.open(out / "photo_mask.png"))
        assert (ids == expected.numpy()).mean() >= 0.999
    url = f"{published}/{names['.pt']}"
    assert main.main(["export", "--model", url, "--out", str(tmp_path / "again.onnx")]) == 0


def test_benchmark_times_predict_in_pytorch_and_onnxruntime(monkeypatch):

    monkeypatch.setattr(bench, "DEMO_UNET", ("tiny UNet", 2, 4, 32))
    monkeypatch.setattr(bench, "FULL_FRAME", 90)
    rows = bench.bench_onnx_frame(torch.device("cpu"), seconds=0.0, max_runs=1)
    assert [row["name"].split()[0] for row in rows] == ["PyTorch", "onnxruntime"]
    assert all(row["ms"] > 0 and row["unit"] == "frame" for row in rows)
    assert "90x90" in rows[0]["group"]


def test_exporting_leaves_no_trace_records_for_pytest_to_print(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("TORCH_TRACE", raising=False)
    network = nn.Conv2d(3, data.NUM_CLASSES, kernel_size=3, padding=1)
    network.size_multiple = 1
    segmenter = models.Segmenter(network.eval(), img_size=32)
    with caplog.at_level(logging.DEBUG):
        export.export_onnx(segmenter, {"model_config": {"name": "conv"}, "img_size": 32},
                           tmp_path / "model.onnx")  # fmt: skip
    assert not [record for record in caplog.records if record.name == "torch.__trace"]
