"""The machinery of `main.py predict`: the pictures to read (any image Pillow opens, of
any size), their depth files, and the files written for each.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import torch

import data
import utils
from seglab import depth
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
                rgb = image_to_rgb8(image)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"{path}: too large to segment, scale it down first ({error})") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from None
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # a writable copy


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
    from PIL import Image

    mask_suffix, overlay_suffix, legend_suffix = PREDICTION_SUFFIXES
    utils.save_class_ids(prediction, out / f"{stem}{mask_suffix}")
    blended = utils.overlay(image, prediction).permute(1, 2, 0).numpy()
    Image.fromarray(blended).save(out / f"{stem}{overlay_suffix}")
    counts = torch.bincount(prediction.flatten(), minlength=data.NUM_CLASSES)
    present = [i for i in range(data.NUM_CLASSES) if counts[i] > 0]
    handles = [utils.legend_handles()[i] for i in present]
    for handle, index in zip(handles, present, strict=True):
        handle.set_label(f"{data.CLASSES[index]} {counts[index] / counts.sum():.1%}")
    figure = Figure(figsize=(3, 0.3 * len(handles) + 0.5))
    figure.legend(handles=handles, loc="center", frameon=False)
    figure.savefig(out / f"{stem}{legend_suffix}", dpi=100)


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
