"""`predict` on large photos: the class ids equal those of models.Segmenter on the whole
picture, and a 50-megapixel photo stays under 1.5 GB resident, with a checkpoint and with an
ONNX file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import main
import models
from seglab import bench, checkpoints, inference, pngfiles

PEAK_LIMIT = 1.5e9  # bytes resident, for the whole predict process


def write_checkpoint(path: Path, img_size: int) -> Path:
    """A small UNet with random weights, saved as this project saves its checkpoints."""
    torch.manual_seed(img_size)
    config = models.model_config("unet", data.NUM_CLASSES, num_blocks=2, base_chan=4)
    state = {
        "format": checkpoints.CHECKPOINT_FORMAT, "model_config": config, "epoch": 1,
        "model_state": models.build_model(**config).state_dict(), "args": {},
        "classes": list(data.CLASSES), "img_size": img_size,
    }  # fmt: skip
    checkpoints.save_checkpoint(state, path)
    return path


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """A checkpoint trained at 48 px, another at 256 px, and the first as an ONNX file."""
    folder = tmp_path_factory.mktemp("models")
    files = {f"pt{size}": write_checkpoint(folder / f"m{size}.pt", size) for size in (48, 256)}
    files["onnx"] = folder / "m48.onnx"
    assert main.main(["export", "--model", str(files["pt48"]), "--out", str(files["onnx"])]) == 0
    return files


def photo(height: int, width: int, kind: str) -> torch.Tensor:
    """A `(3, H, W)` uint8 picture: noise, or smooth gradients (large regions of a class)."""
    if kind == "noise":
        generator = torch.Generator().manual_seed(height * width)
        return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    rows = torch.linspace(0, 255, height)[:, None]
    columns = torch.linspace(0, 255, width)[None, :]
    return torch.stack([rows.expand(height, width), columns.expand(height, width),
                        (rows + columns).expand(height, width) / 2]).to(torch.uint8)  # fmt: skip


def whole_picture_ids(model: Path, image: torch.Tensor) -> torch.Tensor:
    """The class ids as predict computed them before: models.Segmenter on the whole picture,
    logits at full size, argmax."""
    checkpoint = checkpoints.load_checkpoint(model)
    network = checkpoints.model_from_checkpoint(checkpoint, model).eval()
    with torch.no_grad():
        logits = models.Segmenter(network, checkpoint["img_size"])(image[None])
    return logits.argmax(dim=1)[0]


# Pictures up to 4 megapixels, larger and smaller than the network's input, odd sides.
CASES = [
    ("pt48", (2000, 1999), "noise"),
    ("pt48", (1700, 1300), "smooth"),
    ("pt256", (1080, 1920), "noise"),
    ("pt256", (2000, 1999), "smooth"),
    ("pt256", (97, 131), "noise"),
    ("pt256", (5, 7), "noise"),
    ("pt48", (40, 3000), "noise"),
]


@pytest.mark.parametrize(("model_name", "size", "kind"), CASES)
def test_ids_in_parts_equal_the_whole_pictures(model_files, model_name, size, kind):
    image = photo(*size, kind)
    segment, _ = main.load_segmenter(str(model_files[model_name]), torch.device("cpu"))
    ids = segment(image)
    assert ids.dtype == torch.uint8 and ids.shape == size
    assert torch.equal(ids.long(), whole_picture_ids(model_files[model_name], image))


def test_predict_writes_the_masks_and_overlays_of_before(model_files, tmp_path):
    image = photo(1500, 2000, "smooth")
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "photo.png")
    model = model_files["pt256"]
    out = tmp_path / "out"
    assert main.main(["predict", "--model", str(model), str(tmp_path / "photo.png"),
                      "--out", str(out)]) == 0  # fmt: skip
    expected = whole_picture_ids(model, image)
    assert np.array_equal(np.array(Image.open(out / "photo_mask.png")), expected.numpy())
    import utils

    overlay = utils.overlay(image, expected).permute(1, 2, 0).numpy()
    assert np.array_equal(np.array(Image.open(out / "photo_overlay.png")), overlay)


def test_onnx_runs_its_whole_graph_up_to_4_megapixels(model_files):
    image = photo(2048, 2048, "noise")  # 4 megapixels exactly
    assert inference.ONNX_WHOLE_GRAPH_PIXELS >= 2048 * 2048
    segment, _ = main.load_segmenter(str(model_files["onnx"]), torch.device("cpu"))
    from seglab import export

    session = export.onnx_session(model_files["onnx"])
    assert torch.equal(segment(image), main.segment_with_onnxruntime(session, image))


def test_onnx_on_larger_pictures_agrees_with_the_checkpoint(model_files, monkeypatch):
    monkeypatch.setattr(inference, "ONNX_WHOLE_GRAPH_PIXELS", 0)  # every picture is large
    image = photo(900, 1200, "noise")
    segment, _ = main.load_segmenter(str(model_files["onnx"]), torch.device("cpu"))
    ids = segment(image)
    assert ids.dtype == torch.uint8 and ids.shape == (900, 1200)
    expected = whole_picture_ids(model_files["pt48"], image)
    assert (ids.long() == expected).float().mean() >= 0.999


def test_pictures_are_read_band_by_band_as_a_whole(tmp_path):
    pixels = photo(1111, 777, "noise").permute(1, 2, 0).numpy()
    for mode in ("RGB", "RGBA", "L", "P"):
        path = tmp_path / f"{mode}.png"
        picture = Image.fromarray(pixels).convert(mode)
        picture.save(path)
        expected = np.asarray(picture.convert("RGB")).transpose(2, 0, 1)
        assert np.array_equal(inference.read_image(path).numpy(), expected)


def test_the_streamed_png_holds_the_pixels(tmp_path):
    pixels = photo(301, 97, "noise").permute(1, 2, 0).numpy()
    pngfiles.write_rgb_png(tmp_path / "a.png", 97, 301, [pixels[:100], pixels[100:]])
    assert np.array_equal(np.array(Image.open(tmp_path / "a.png")), pixels)


@pytest.mark.parametrize("model_name", ["pt256", "onnx"])
def test_a_50_megapixel_photo_stays_under_1_5_gb(model_files, model_name, tmp_path):
    large = tmp_path / "large.bmp"
    bench.write_large_photo(large, *bench.LARGE_PHOTO)
    _, peak = bench.predict_peak_memory(model_files[model_name], large, tmp_path / "out")
    assert peak < PEAK_LIMIT, f"predict took {peak / 1e9:.2f} GB"
    with Image.open(tmp_path / "out" / "large_mask.png") as mask:
        assert mask.size == bench.LARGE_PHOTO[::-1]
