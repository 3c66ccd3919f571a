"""Depth as a second input: the depth PNGs of 2D-3D-S, RGB-D samples and what the network sees.

Every frame of the data set has a depth image beside its rgb one:

    ROOT/area_3/data/depth/camera_<uuid>_<roomType>_<roomNum>_frame_<k>_domain_depth.png

a 16-bit single-channel PNG in units of 1/512 m (value / 512 = meters), z-depth measured
along the camera's axis, and 65535 where the scanner had no reading (glass, mirrors, too far,
parts of the mesh that are missing). `python main.py train --inputs rgb depth` trains on it.

How depth travels, from the file to the network:

1. On reading, the depth becomes one uint8 channel (`encode_depth`): 0 for "no reading",
   else the depth in steps of DEPTH_STEP = 4 cm, 1 to 255 (4 cm to 10.2 m; farther readings,
   rare indoors, count as 10.2 m). With it the loader, the cache and the batches stay uint8:
   an RGB-D sample is an `RGBDImage`, `(4, H, W)` uint8, RGB then depth.
2. The geometric augmentations move it with the colors, and never blend a reading with a
   hole: `RGBDImage` resizes its depth channel with nearest neighbour (see the kernels
   below), crops and flips move pixels as they are.
3. The color jitter sees only the first three channels (main.network_input).
4. `depth_features` turns the channel into the network's two depth channels: the depth
   standardized with a typical indoor mean and spread (3 m and 1.5 m, so that it has about
   the scale of the normalized colors), 0 where there is no reading; and a validity channel,
   1 where there is a reading and 0 in a hole. A hole is thus never mistaken for a surface
   at some depth, and the network can use the holes themselves (glass has none).

An RGB-D network therefore takes `input_channels(["rgb", "depth"])` = 5 channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as F
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_png
from torchvision.transforms import InterpolationMode

import data
import models
from data import DataError

# The real format.
DEPTH_UNITS_PER_METER = 512
NO_READING = 65535

# The loader's uint8 depth channel: 0 means no reading, k means k * DEPTH_STEP meters.
DEPTH_STEP = 0.04
# Standardization of the depth channel the network sees (meters).
DEPTH_MEAN = 3.0
DEPTH_STD = 1.5

# The inputs that `--inputs` accepts, and the channels each one gives the network.
INPUT_CHANNELS: dict[str, int] = {"rgb": 3, "depth": 2}
INPUTS: tuple[str, ...] = tuple(INPUT_CHANNELS)


def uses_depth(inputs: Sequence[str]) -> bool:
    """Whether a model of these inputs (e.g. ["rgb", "depth"]) reads depth."""
    return "depth" in inputs


def input_channels(inputs: Sequence[str]) -> int:
    """The network's input channels for `inputs`: 3 for ["rgb"], 5 for ["rgb", "depth"]."""
    return sum(INPUT_CHANNELS[name] for name in inputs)


# ----------------------------------------------------------------------------------------
# Reading depth


def read_depth(path: str | Path) -> torch.Tensor:
    """The raw values of a depth PNG: `(1, H, W)` int32 in 1/512 m, NO_READING for none.

    A file that is missing, damaged or not a 16-bit grayscale PNG raises a DataError naming it.
    """
    raw = data.read_png_bytes(Path(path))
    try:
        values = decode_png(
            torch.frombuffer(bytearray(raw), dtype=torch.uint8), ImageReadMode.UNCHANGED
        )
    except RuntimeError as error:
        raise DataError(f"cannot read {path}: {error}".strip()) from None
    if values.dtype != torch.uint16 or values.shape[0] != 1:
        raise DataError(
            f"{path} is not a depth image: expected a 16-bit grayscale PNG, got "
            f"{values.shape[0]} channel(s) of {values.dtype}"
        )
    return values.to(torch.int32)


def depth_meters(values: torch.Tensor) -> torch.Tensor:
    """Raw depth values (any shape, integer) -> float32 meters, NaN where there is no reading."""
    meters = values.to(torch.float32) / DEPTH_UNITS_PER_METER
    return meters.masked_fill(values == NO_READING, float("nan"))


def encode_depth(values: torch.Tensor) -> torch.Tensor:
    """Raw depth values -> the loader's uint8 channel, same shape: 0 where there is no
    reading, else the depth in steps of DEPTH_STEP, clamped to 1..255."""
    steps = torch.round(values.to(torch.float32) / (DEPTH_STEP * DEPTH_UNITS_PER_METER))
    encoded = steps.clamp(1, 255).to(torch.uint8)
    return encoded.masked_fill(values == NO_READING, 0)


def read_depth_channel(path: str | Path) -> torch.Tensor:
    """The depth PNG at `path` as the loader's channel: `(1, H, W)` uint8 (0 = no reading)."""
    return encode_depth(read_depth(path))


def depth_features(channel: torch.Tensor) -> torch.Tensor:
    """The loader's depth channel `(B, 1, H, W)` uint8 -> the network's depth input
    `(B, 2, H, W)` float32: standardized depth (0 in holes), then validity (1 or 0)."""
    valid = channel > 0
    meters = channel.to(torch.float32) * DEPTH_STEP
    standardized = ((meters - DEPTH_MEAN) / DEPTH_STD).masked_fill(~valid, 0.0)
    return torch.cat([standardized, valid.to(torch.float32)], dim=1)


# ----------------------------------------------------------------------------------------
# RGB-D samples and their transforms


class RGBDImage(tv_tensors.Image):
    """`(4, H, W)` uint8: RGB, then the depth channel of `encode_depth`.

    The transforms of data.py act on it as on an image, except that resizing treats the
    depth channel with nearest neighbour (the kernels below): an antialiased or bilinear
    resize would blend readings with holes (0) into depths that were never measured. Crops,
    flips and padding move pixels without blending and need no kernel of their own.
    Interpolating transforms that the project does not use (rotations, affine or perspective
    warps) would need one too.
    """


def resize_rgbd(
    image: RGBDImage, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True
) -> RGBDImage:
    """F.resize for RGBDImage: colors as asked, depth with nearest neighbour."""
    pixels = image.as_subclass(torch.Tensor)
    rgb = F.resize_image(pixels[:3], size, interpolation, max_size, antialias)
    depth = F.resize_image(pixels[3:], size, InterpolationMode.NEAREST_EXACT, max_size)
    return tv_tensors.wrap(torch.cat([rgb, depth]), like=image)


def resized_crop_rgbd(
    image: RGBDImage,
    top: int,
    left: int,
    height: int,
    width: int,
    size,
    interpolation=InterpolationMode.BILINEAR,
    antialias=True,
) -> RGBDImage:
    """F.resized_crop for RGBDImage (RandomResizedCrop): crop, then resize_rgbd."""
    cropped = F.crop_image(image.as_subclass(torch.Tensor), top, left, height, width)
    return resize_rgbd(tv_tensors.wrap(cropped, like=image), size, interpolation, None, antialias)


F.register_kernel(F.resize, RGBDImage)(resize_rgbd)
F.register_kernel(F.resized_crop, RGBDImage)(resized_crop_rgbd)


class DepthDataset(data.StanfordDataset):
    """A StanfordDataset whose samples are `(RGBDImage (4, H, W) uint8, mask (H, W) uint8)`.

    Transforms are called as `transforms(RGBDImage, tv_tensors.Mask)`, so the depth moves
    with the colors. A frame whose depth file is missing or broken is a broken frame
    (DataError, or left out with `skip_bad`).
    """

    def read_frame(self, index: int) -> tuple[RGBDImage, torch.Tensor]:
        """Frame `index` as stored: `(rgbd (4, H, W) uint8, semantic colors (3, H, W) uint8)`.
        StanfordDataset.load transforms and decodes it like an RGB frame."""
        frame = self.frames[index]
        if not frame.depth_path.is_file():
            raise DataError(
                f"{frame.depth_path} is missing (the depth of {frame.rgb_path}); training "
                "with --inputs rgb depth needs the data set's depth folder"
            )
        image, semantic = super().read_frame(index)
        depth = read_depth_channel(frame.depth_path)
        if depth.shape[1:] != image.shape[1:]:
            raise DataError(
                f"{frame.depth_path} is {tuple(depth.shape[1:])} but {frame.rgb_path} is "
                f"{tuple(image.shape[1:])}: depth and rgb must have the same size"
            )
        return RGBDImage(torch.cat([image.as_subclass(torch.Tensor), depth])), semantic


# ----------------------------------------------------------------------------------------
# Pictures of any size, and their depth


def depth_file_in_tree(image_path: str | Path) -> Path | None:
    """The depth file of an rgb file of a 2D-3D-S tree (ROOT/area_N/data/rgb/NAME_domain_rgb.png
    -> ROOT/area_N/data/depth/NAME_domain_depth.png) when it exists, else None."""
    path = Path(image_path)
    in_tree = (
        path.name.endswith(data.RGB_SUFFIX)
        and path.parent.name == "rgb"
        and path.parent.parent.name == "data"
        and path.parents[2].name.startswith("area_")
    )
    if not in_tree:
        return None
    area = path.parents[2].name.removeprefix("area_")
    frame = data.Frame.at(path.parents[3], area, path.name.removesuffix(data.RGB_SUFFIX))
    return frame.depth_path if frame.depth_path.is_file() else None


def attach_depth(image: torch.Tensor, image_path: Path, depth_path: Path | None) -> torch.Tensor:
    """A `(3, H, W)` uint8 picture and its depth PNG -> `(4, H, W)` uint8, as the loader's.

    Without a depth file (None) a DataError says how to give one.
    """
    if depth_path is None:
        raise DataError(
            f"{image_path}: no depth for this model trained with depth: give it with --depth "
            f"FILE, or read the image from a 2D-3D-S tree that has its data/depth file"
        )
    depth = read_depth_channel(depth_path)
    if depth.shape[1:] != image.shape[1:]:
        raise DataError(
            f"{depth_path} is {tuple(depth.shape[1:])} but its image is "
            f"{tuple(image.shape[1:])}: depth and image must have the same size"
        )
    return torch.cat([image, depth])


class RGBDSegmenter(models.Segmenter):
    """models.Segmenter for a model trained with depth: `(N, 4, H, W)` uint8 (RGB, then the
    depth channel of `encode_depth`) in, logits `(N, K, H, W)` float32 out. The depth is
    resized with nearest neighbour, the colors as Segmenter does."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        size = self.network_size(height, width)
        rgb = nnf.interpolate(data.normalize(images[:, :3]), size, mode="bilinear", antialias=True)
        depth = nnf.interpolate(depth_features(images[:, 3:]), size, mode="nearest-exact")
        logits = self.model(torch.cat([rgb, depth], dim=1))
        return nnf.interpolate(logits.float(), size=(height, width), mode="bilinear")
