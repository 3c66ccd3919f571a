"""The machinery of `main.py predict`: the pictures to read (any image Pillow opens, of
any size), their depth files, and the files written for each.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

import data
import models
import utils
from seglab import depth, export, pngfiles
from seglab.devices import UsageError


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders become the files they hold (sorted). Their subfolders are
    named on stderr and not read: give them as inputs of their own."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            children = sorted(path.iterdir())
            paths.extend(child for child in children if child.is_file())
            for child in children:
                if child.is_dir():
                    print(
                        f"warning: skipping the folder {child}: only the files of {path} are "
                        "read; give it as an input of its own to segment its images",
                        file=sys.stderr,
                    )
        else:
            paths.append(path)
    return paths


def read_image(path: Path) -> torch.Tensor:
    """Any image PIL reads (RGB, RGBA, grayscale, palette, JPEG, 16-bit, float TIFF...) as
    `(3, H, W)` uint8. Larger than Pillow's decompression-bomb limit (89 megapixels) is
    refused: a picture that size would not fit in memory as logits."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image_to_tensor(image)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"{path}: too large to segment, scale it down first ({error})") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from None


def image_to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """The pixels of a PIL image as `(3, H, W)` uint8 RGB, copied a band of rows at a time:
    converting a whole photo at once would hold it three times (Pillow's 4 bytes a pixel,
    its conversion, a numpy copy) besides the tensor."""
    image.load()
    width, height = image.size
    if image.mode in ("F", "I") or image.mode.startswith("I;16"):  # scaled by their range
        return torch.from_numpy(image_to_rgb8(image).copy()).permute(2, 0, 1)
    pixels = torch.empty((3, height, width), dtype=torch.uint8)
    for rows in bands(height, width):
        band = image.crop((0, rows.start, width, rows.stop))
        pixels[:, rows] = torch.from_numpy(image_to_rgb8(band).copy()).permute(2, 0, 1)
    return pixels


def image_to_rgb8(image: PIL.Image.Image) -> np.ndarray:
    """The pixels of a PIL image as `(H, W, 3)` uint8 RGB. Pillow's convert("RGB") clips
    16-bit and 32-bit values to 255 (all white) and float values in [0, 1] to 0 (all black),
    so those single-channel modes are scaled here: 16-bit by 255 / 65535, floats in [0, 1]
    by 255, 32-bit integers and other floats from their own minimum and maximum."""
    if image.mode not in ("F", "I") and not image.mode.startswith("I;16"):
        return np.asarray(image.convert("RGB"))
    values = np.nan_to_num(np.asarray(image).astype(np.float64))
    low, high = float(values.min()), float(values.max())
    if image.mode.startswith("I;16"):  # 16-bit: 0 to 65535
        scaled = values * (255 / 65535)
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255
    else:  # 32-bit integers, or floats of another range
        scaled = (values - low) * (255 / max(high - low, 1e-12))
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


# The files predict writes for an input named STEM: STEM_mask.png, ... (save_prediction).
PREDICTION_SUFFIXES = ("_mask.png", "_overlay.png", "_legend.png")


def save_prediction(image: torch.Tensor, prediction: torch.Tensor, out: Path, stem: str) -> None:
    """Write STEM_mask.png (the class ids, shown in their colors), STEM_overlay.png and
    STEM_legend.png (the classes found and their share)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    mask_suffix, overlay_suffix, legend_suffix = PREDICTION_SUFFIXES
    utils.save_class_ids(prediction, out / f"{stem}{mask_suffix}")
    height, width = prediction.shape
    overlay = overlay_bands(image, prediction)
    pngfiles.write_rgb_png(out / f"{stem}{overlay_suffix}", width, height, overlay)
    counts = class_counts(prediction)
    present = [i for i in range(data.NUM_CLASSES) if counts[i] > 0]
    handles = [utils.legend_handles()[i] for i in present]
    for handle, index in zip(handles, present, strict=True):
        handle.set_label(f"{data.CLASSES[index]} {counts[index] / counts.sum():.1%}")
    figure = Figure(figsize=(3, 0.3 * len(handles) + 0.5))
    figure.legend(handles=handles, loc="center", frameon=False)
    figure.savefig(out / f"{stem}{legend_suffix}", dpi=100)


# Pixels of a picture handled at a time: utils.overlay takes 16 bytes a pixel in float, 800
# MB for a whole 50-megapixel photo and 8 MB for a band; the logits of a band of 14 classes
# take 56 bytes a pixel, 28 MB.
BAND_PIXELS = 2**19


def bands(height: int, width: int) -> list[slice]:
    """Row ranges of about BAND_PIXELS pixels covering `height` rows of `width` pixels."""
    rows = max(1, BAND_PIXELS // max(1, width))
    return [slice(top, min(top + rows, height)) for top in range(0, height, rows)]


def overlay_bands(image: torch.Tensor, prediction: torch.Tensor) -> Iterator[np.ndarray]:
    """utils.overlay of `image` `(3, H, W)` and `prediction` `(H, W)`, a band of rows at a
    time, each `(rows, W, 3)` uint8."""
    for rows in bands(*prediction.shape):
        yield utils.overlay(image[:, rows], prediction[rows]).permute(1, 2, 0).numpy()


def class_counts(prediction: torch.Tensor) -> torch.Tensor:
    """The pixels of each class in `prediction` `(H, W)`, int64, counted a band at a time
    (torch.bincount takes int64 ids: 8 bytes a pixel at once)."""
    counts = torch.zeros(data.NUM_CLASSES, dtype=torch.int64)
    for rows in bands(*prediction.shape):
        ids = prediction[rows].flatten().long()
        counts += torch.bincount(ids, minlength=data.NUM_CLASSES)[: data.NUM_CLASSES]
    return counts


def depth_files_of(
    paths: list[Path], given: list[str] | None, needs_depth: bool, model: str
) -> list[Path | None]:
    """The depth file of each image for `predict`: `--depth` in order, else found by name in
    a 2D-3D-S tree (None where there is none); all None for an RGB model."""
    if given is not None and not needs_depth:
        raise UsageError(f"--depth: {model} reads RGB only; leave --depth out")
    if given is None:
        return [depth.depth_file_in_tree(path) if needs_depth else None for path in paths]
    if len(given) != len(paths):
        raise UsageError(
            f"--depth names {len(given)} file(s) for {len(paths)} image(s): give one per image, "
            "in the same order"
        )
    return [Path(file) for file in given]


def segment_files(
    segment: Callable[[torch.Tensor], torch.Tensor],
    paths: list[Path],
    stems: list[str],
    depth_files: list[Path | None],
    needs_depth: bool,
    out: Path,
) -> int:
    """Segment each picture of `paths` with `segment` (see main.load_segmenter) and write
    OUT/STEM_mask.png, _overlay.png and _legend.png; a picture that cannot be read is named
    on stderr and skipped, and so is one without depth for a model that `needs_depth`.
    Returns the number skipped."""
    failures = 0
    for path, stem, depth_file in zip(paths, stems, depth_files, strict=True):
        try:
            image = read_image(path)
            if needs_depth:
                image = depth.attach_depth(image, path, depth_file)
        except (ValueError, data.DataError) as error:
            print(f"error: {error}", file=sys.stderr)
            failures += 1
            continue
        save_prediction(image[:3], segment(image), out, stem)
        print(f"{path} -> {out / stem}_mask.png, _overlay.png, _legend.png")
    return failures


# ----------------------------------------------------------------------------------------
# Segmenting a picture of any size in little memory. models.Segmenter computes on the whole
# picture at once: its float copy (12 bytes a pixel) and its logits at full size (4 bytes a
# pixel and class, 56 for 14 classes) take 3 GB for a 50-megapixel photo, while the network
# itself sees only about img_size**2 pixels. The functions below give the same class ids,
# bit for bit, holding one color channel in float, then the logits resized in width only,
# then those of one band of columns at full height, whose argmax is taken at once. They run
# on the device of the model, as models.Segmenter did, and the class ids come to the host.


def network_input(segmenter: models.Segmenter, image: torch.Tensor) -> torch.Tensor:
    """What `segmenter` feeds its network for `image` `(C, H, W)` uint8: `(1, C', h, w)`
    float32 at the network's size. Each color channel is normalized and resized alone,
    with the same operations as models.Segmenter.forward, so the values are the same."""
    size = segmenter.network_size(*image.shape[-2:])
    mean = torch.tensor(data.MEAN, device=image.device)
    std = torch.tensor(data.STD, device=image.device)
    parts = []
    for channel in range(3):
        values = image[None, channel : channel + 1].float()  # the only full-size float copy
        values.div_(255.0).sub_(mean[channel]).div_(std[channel])  # data.normalize in place
        parts.append(F.interpolate(values, size=size, mode="bilinear", antialias=True))
        del values
    if image.shape[0] == 4:  # depth: nearest neighbour picks pixels, then their features
        picked = F.interpolate(image[None, 3:], size=size, mode="nearest-exact")
        parts.append(depth.depth_features(picked))
    return torch.cat(parts, dim=1)


def class_ids_at_size(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The argmax over classes of `logits` `(1, K, h, w)` resized to `height` x `width` as
    models.Segmenter resizes them: `(height, width)` uint8, on the host.

    A bilinear resize is separable, and PyTorch computes it as one: resizing the width
    first, then each band of columns in height alone, gives the same values bit for bit as
    resizing both at once (the tests check it). Only the logits resized in width (4 * K * h
    bytes a column) and those of one band are held, never all of them at full size.
    """
    logits = logits.float()
    if height < logits.shape[2] or width < logits.shape[3]:  # smaller than the network's input
        whole = F.interpolate(logits, size=(height, width), mode="bilinear")
        return whole.argmax(dim=1)[0].to(torch.uint8).cpu()
    wide = F.interpolate(logits, size=(logits.shape[2], width), mode="bilinear")
    ids = torch.empty((height, width), dtype=torch.uint8)
    band_width = max(1, BAND_PIXELS // height)
    for left in range(0, width, band_width):
        columns = slice(left, min(left + band_width, width))
        band = wide[:, :, :, columns].contiguous()
        band = F.interpolate(band, size=(height, band.shape[3]), mode="bilinear")
        ids[:, columns] = band.argmax(dim=1)[0].to(torch.uint8).cpu()
    return ids


@torch.no_grad()
def segment_in_parts(segmenter: models.Segmenter, image: torch.Tensor, device) -> torch.Tensor:
    """Class ids `(H, W)` uint8 of `image` `(C, H, W)` uint8, equal to the argmax of
    `segmenter(image[None])`, in a fraction of its memory (see above), on `device`."""
    inputs = network_input(segmenter, image.to(device))
    logits = segmenter.model(inputs)
    return class_ids_at_size(logits, *image.shape[-2:])


class OnnxNetwork(torch.nn.Module):
    """The network of an ONNX file written by `python main.py export`, run by onnxruntime
    (see export.network_session), as the `model` of a models.Segmenter: segment_in_parts
    then does the resizes around it, in little memory, where the whole graph would hold
    the picture in float and its logits at full size."""

    def __init__(self, path: Path, metadata: dict) -> None:
        super().__init__()
        from seglab import export

        self.session, self.input_name, self.output_name = export.network_session(path)
        config = dict(metadata["model_config"])
        config.pop("pretrained", None)  # weights come from the file, never downloaded
        try:
            with torch.device("meta"):  # only its size_multiple is needed: allocate nothing
                self.size_multiple = models.build_model(**config).size_multiple
        except (TypeError, ValueError) as error:
            raise export.ExportError(
                f"{path}: its metadata model_config is wrong ({error})"
            ) from None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: inputs.cpu().numpy()}
        (logits,) = self.session.run([self.output_name], feed)
        return torch.from_numpy(logits)


# Pictures up to this size run through the whole graph of an ONNX file (1 GB at this
# size); larger ones through its network alone, with the resizes of segment_in_parts.
ONNX_WHOLE_GRAPH_PIXELS = 4 * 2**20


def segment_by_size(
    whole: Callable[[torch.Tensor], torch.Tensor],
    in_parts: Callable[[], Callable[[torch.Tensor], torch.Tensor]],
    image: torch.Tensor,
) -> torch.Tensor:
    """Class ids of `image` by `whole` up to ONNX_WHOLE_GRAPH_PIXELS, else by the function
    that `in_parts()` returns (made on the first large picture)."""
    height, width = image.shape[-2:]
    if height * width <= ONNX_WHOLE_GRAPH_PIXELS:
        return whole(image)
    return in_parts()(image)


def onnx_segment(
    model_file: Path, segment_whole: Callable[[object, torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`segment(image)` with the ONNX file `model_file`: `segment_whole(session, image)` (the
    file's whole graph, main.segment_with_onnxruntime) on pictures up to
    ONNX_WHOLE_GRAPH_PIXELS; on larger ones its network run by onnxruntime and the resizes
    done in parts by segment_in_parts."""
    session = export.onnx_session(model_file)
    metadata = export.read_onnx_metadata(session, model_file)  # other classes: refused

    @functools.cache
    def in_parts() -> Callable[[torch.Tensor], torch.Tensor]:
        segmenter = models.Segmenter(OnnxNetwork(model_file, metadata), metadata["img_size"])
        return functools.partial(segment_in_parts, segmenter, device="cpu")

    return functools.partial(segment_by_size, functools.partial(segment_whole, session), in_parts)
