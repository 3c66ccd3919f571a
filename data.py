"""Stanford 2D-3D-S semantic segmentation: the data set, its transforms and loaders.

The data set on disk (only what we read):

    ROOT/assets/semantic_labels.json
    ROOT/area_3/data/rgb/camera_<uuid>_<roomType>_<roomNum>_frame_<k>_domain_rgb.png
    ROOT/area_3/data/semantic/camera_<uuid>_<roomType>_<roomNum>_frame_<k>_domain_semantic.png

A pixel (R, G, B) of a semantic PNG is the 24-bit number R * 65536 + G * 256 + B, an index
into the JSON list of labels such as "chair_12_office_3_5"; the class is the part before the
first underscore. #0D0D0D (and any index past the end of the list) means "no data".

Run `python data.py --help` for the command line: show a sample, a class histogram, a
decoded cache, a check of every file.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import sys
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_png

try:
    # libspng decodes these PNGs 1.2-1.3x faster than torchvision here, and raises a clean
    # error on corrupt pixel data where torchvision's decoder can crash the process. It has
    # no wheel for some platforms (Linux on ARM, Intel Macs): there torchvision decodes.
    import pyspng
except ImportError:
    pyspng = None

# The 14 classes in the usual order: sorted names with <UNK> first. Index 0 is "unknown"
# and is ignored by the losses and metrics.
CLASSES: tuple[str, ...] = (
    "<UNK>",
    "beam",
    "board",
    "bookcase",
    "ceiling",
    "chair",
    "clutter",
    "column",
    "door",
    "floor",
    "sofa",
    "table",
    "wall",
    "window",
)
NUM_CLASSES = len(CLASSES)
IGNORE_INDEX = 0

# The areas as they are named on disk (area_5 was scanned in two parts).
AREAS: tuple[str, ...] = ("1", "2", "3", "4", "5a", "5b", "6")

# ImageNet statistics: the pretrained backbones of models.py expect them, and they are a
# fine choice for a UNet trained from scratch too.
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

LABELS_FILE = Path("assets") / "semantic_labels.json"
RGB_SUFFIX = "_domain_rgb.png"
SEMANTIC_SUFFIX = "_domain_semantic.png"
# torchvision 0.29 announces that its PNG decoder will move to torchcodec; it is still the
# fastest decoder among our required dependencies, so we keep it and silence the notice.
warnings.filterwarnings(
    "ignore", message=".*image decoding and encoding", category=DeprecationWarning
)
FRAME_NAME = re.compile(r"^camera_(?P<camera>[0-9a-f]+)_(?P<room>.+)_frame_(?P<frame>\d+)$")


class DataError(Exception):
    """A problem with the data on disk; the message names the file or area and what to do."""


def missing_datadir_message(root: str | Path) -> str:
    return (
        f"data directory {root} does not exist. Point --datadir (or $STANFORD2D3DS_ROOT) at "
        "the 2D-3D-S root (download: http://buildingparser.stanford.edu/dataset.html), "
        f"or make synthetic data in the same format: python synthetic.py --out {root}"
    )


# ----------------------------------------------------------------------------------------
# Labels


def class_index_of_label(label: str) -> int:
    """Class id of one entry of semantic_labels.json, e.g. "chair_12_office_3_5" -> 5."""
    class_name = label.split("_", 1)[0]
    if class_name not in CLASSES:
        raise ValueError(f"label {label!r} has class {class_name!r}, not one of {CLASSES}")
    return CLASSES.index(class_name)


def load_label_table(labels_path: str | Path) -> torch.Tensor:
    """Read semantic_labels.json into a lookup table from label index to class id.

    Returns a `(N + 1,)` uint8 tensor for a file of N labels; its last entry is 0 (unknown)
    and stands for every index past the end of the list, #0D0D0D included.
    """
    labels_path = Path(labels_path)
    try:
        labels = json.loads(labels_path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{labels_path} not found: a 2D-3D-S root holds assets/semantic_labels.json"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{labels_path} is not valid JSON: {error}") from None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise DataError(f"{labels_path} must hold a JSON list of strings")
    try:
        class_ids = [class_index_of_label(label) for label in labels]
    except ValueError as error:
        raise DataError(f"{labels_path}: {error}") from None
    return torch.tensor([*class_ids, IGNORE_INDEX], dtype=torch.uint8)


def decode_semantic(semantic_rgb: torch.Tensor, label_table: torch.Tensor) -> torch.Tensor:
    """Turn the colors of a semantic PNG into class ids.

    semantic_rgb: `(3, H, W)` uint8, the raw pixels of a `*_domain_semantic.png`.
    label_table: `(N + 1,)` uint8 from `load_label_table`.
    Returns `(H, W)` uint8 class ids (0 for unknown).
    """
    # >>> Q1: decode the label colors into class ids
    channels = semantic_rgb.to(torch.int32)
    # R * 65536 + G * 256 + B with in-place adds, and index_select on the flat index: about
    # 3x faster on a full frame than shifts, ors and advanced indexing, for the same result.
    label_index = channels[0].mul(65536).add_(channels[1], alpha=256).add_(channels[2])
    # Every index past the list (the #0D0D0D "no data" color among them) lands on the last
    # entry of the table, which is "unknown".
    label_index.clamp_(max=len(label_table) - 1)
    return label_table.index_select(0, label_index.flatten()).view(label_index.shape)
    # <<< Q1


# ----------------------------------------------------------------------------------------
# Frames on disk


@dataclass(frozen=True)
class Frame:
    """One view: its area ("5a"), room ("office_3"), name (file stem without the domain)."""

    area: str
    room: str
    name: str
    rgb_path: Path
    semantic_path: Path


def normalize_area(area: str | int) -> list[str]:
    """Spellings of an area to the names on disk: "3", 3, "area_3" -> ["3"]; "5" -> 5a, 5b."""
    name = str(area).strip().lower().removeprefix("area_").removeprefix("area")
    if name == "5":
        return ["5a", "5b"]
    return [name]


def areas_on_disk(root: str | Path) -> list[str]:
    """The areas present under `root`, e.g. ["1", "3", "5a"]."""
    root = Path(root)
    found = [path.name.removeprefix("area_") for path in root.glob("area_*") if path.is_dir()]
    return sorted(found)


def resolve_areas(root: str | Path, areas: list[str] | None) -> list[str]:
    """Check the requested areas against the disk; None means every area present."""
    if not Path(root).is_dir():
        raise DataError(missing_datadir_message(root))
    present = areas_on_disk(root)
    if not present:
        raise DataError(f"no area_* folder under {root}: is this a 2D-3D-S root?")

    def not_found(area: str) -> str:
        return f"area {area!r} not found under {root} (areas found: {', '.join(present)})"

    return match_areas(areas, present, not_found)


def match_areas(areas: list[str] | None, available: list[str], not_found) -> list[str]:
    """The requested areas, spelled as on disk, in the order asked and once each; None means
    all of `available`. An area not available raises DataError(not_found(area))."""
    if areas is None:
        return list(available)
    resolved: list[str] = []
    for area in areas:
        for name in normalize_area(area):
            if name not in available:
                raise DataError(not_found(area))
            if name not in resolved:
                resolved.append(name)
    return resolved


def bad_file_hint(root: str | Path) -> str:
    """What to do about a broken file under `root`."""
    return (
        f"list every bad file with `python data.py check --datadir {root}`, or leave bad "
        "frames out of training with `python main.py train --skip-bad`"
    )


def find_frames(
    root: str | Path, areas: list[str] | None = None
) -> tuple[list[Frame], list[Frame]]:
    """Every rgb frame of the given areas, sorted by area then name, in two lists of Frame:
    those with their semantic file, and those whose semantic file is missing."""
    root = Path(root)
    frames: list[Frame] = []
    unlabelled: list[Frame] = []
    for area in resolve_areas(root, areas):
        rgb_dir = root / f"area_{area}" / "data" / "rgb"
        semantic_dir = rgb_dir.parent / "semantic"
        rgb_paths = sorted(rgb_dir.glob(f"*{RGB_SUFFIX}"))
        if not rgb_paths:
            raise DataError(f"no *{RGB_SUFFIX} file in {rgb_dir}")
        for rgb_path in rgb_paths:
            name = rgb_path.name.removesuffix(RGB_SUFFIX)
            semantic_path = semantic_dir / f"{name}{SEMANTIC_SUFFIX}"
            match = FRAME_NAME.match(name)
            room = match["room"] if match else "unknown"
            frame = Frame(area, room, name, rgb_path, semantic_path)
            (frames if semantic_path.is_file() else unlabelled).append(frame)
    return frames, unlabelled


def list_frames(root: str | Path, areas: list[str] | None = None) -> list[Frame]:
    """Every rgb frame of the given areas with its semantic file, sorted by area then name;
    a missing semantic file is an error."""
    frames, unlabelled = find_frames(root, areas)
    if unlabelled:
        frame = unlabelled[0]
        raise DataError(
            f"{frame.semantic_path} is missing (the labels of {frame.rgb_path}); "
            f"{bad_file_hint(root)}"
        )
    return frames


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_damage(raw: bytes) -> str | None:
    """Why the bytes of a PNG file are damaged (no PNG signature, cut short, a chunk whose
    CRC-32 fails), or None when every chunk up to IEND is whole.

    torchvision's decoder crashes the whole process on some damaged files (a failing
    checksum, a broken compressed stream) instead of raising, so read_png checks first.
    The checksums catch flipped or zeroed bytes for a few percent of the decoding time.
    """
    if not raw.startswith(PNG_SIGNATURE):
        return f"not a PNG file (its {len(raw)} bytes do not start with the PNG signature)"
    view = memoryview(raw)
    position = len(PNG_SIGNATURE)
    # A chunk: 4-byte big-endian data length, 4-byte type, the data, CRC-32 of type + data.
    while position + 12 <= len(raw):
        length = int.from_bytes(view[position : position + 4], "big")
        crc_position = position + 8 + length
        if crc_position + 4 > len(raw):
            break
        chunk_type = bytes(view[position + 4 : position + 8])
        stored_crc = int.from_bytes(view[crc_position : crc_position + 4], "big")
        if zlib.crc32(view[position + 4 : crc_position]) != stored_crc:
            name = chunk_type.decode("ascii", "replace")
            return f"its {name} chunk at byte {position} fails its checksum (damaged file)"
        if chunk_type == b"IEND":
            return None
        position = crc_position + 4
    return f"it ends after {len(raw)} bytes, before its IEND chunk (truncated file)"


def size_mismatch(frame: Frame, image_size: tuple, semantic_size: tuple) -> str:
    """The message for a frame whose rgb and semantic PNGs differ in (height, width)."""
    return (
        f"{frame.rgb_path} is {image_size} but {frame.semantic_path} is {semantic_size}: "
        "rgb and semantic must have the same size"
    )


def read_png_bytes(path: Path) -> bytes:
    """The bytes of a PNG file whose chunks are whole; a DataError names what is wrong."""
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    damage = png_damage(raw)
    if damage:
        raise DataError(f"cannot read {path}: {damage}")
    return raw


def read_png(path: Path) -> torch.Tensor:
    """Decode an 8-bit PNG to a `(3, H, W)` uint8 tensor; a broken file names itself.

    With pyspng the tensor is a channels-first view of `(H, W, 3)` memory, the layout in
    which torchvision resizes uint8 images fastest.
    """
    raw = read_png_bytes(path)
    try:
        if pyspng is not None:
            return torch.from_numpy(pyspng.load(raw, "RGB")).permute(2, 0, 1)
        return decode_png(torch.frombuffer(bytearray(raw), dtype=torch.uint8), ImageReadMode.RGB)
    except RuntimeError as error:
        raise DataError(f"cannot read {path}: {error}".strip()) from None


# ----------------------------------------------------------------------------------------
# The data set


class StanfordDataset(Dataset):
    """Frames of Stanford 2D-3D-S (or of the synthetic generator) as (image, mask) pairs.

    Without transforms, `ds[i]` is `(image, mask)`: image `(3, H, W)` uint8 and mask
    `(H, W)` uint8 class ids (0 = unknown; the training loop makes them int64 on the
    device, after the copy, which moves 8x fewer bytes). With transforms, they are called as
    `transforms(tv_tensors.Image, tv_tensors.Mask)`, where the mask still holds the raw
    `(3, H, W)` colors of the semantic PNG: geometric transforms resize masks with nearest
    neighbour, which moves those colors exactly, and decoding the labels afterwards works
    on the (smaller) output instead of the full 1080x1080 frame.

    `ds.frames[i]` tells the area, room and file of frame i.

    A broken or missing file raises a DataError naming it, or with `skip_bad` its frame is
    left out (without labels: when listed; unreadable: replaced by the next readable frame)
    and `bad_paths()` names it.
    """

    def __init__(
        self,
        root: str | Path,
        areas: list[str] | None = None,
        transforms: T.Transform | None = None,
        skip_bad: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(missing_datadir_message(self.root))
        if skip_bad:
            # Frames without labels are left out here, named once, and reported as bad.
            self.frames, self.unlabelled = find_frames(self.root, areas)
            for frame in self.unlabelled:
                print(
                    f"warning: skipping {frame.rgb_path}: {frame.semantic_path} is missing",
                    file=sys.stderr,
                )
        else:
            self.frames, self.unlabelled = list_frames(self.root, areas), []
        self.areas = sorted({frame.area for frame in self.frames})
        self.label_table = load_label_table(self.root / LABELS_FILE)
        self.transforms = transforms
        self.skip_bad = skip_bad
        # One flag per frame in shared memory, so that loader workers can report the broken
        # frames they skipped to the main process.
        self.bad = torch.zeros(len(self.frames), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.skip_bad:
            try:
                return self.load(index)
            except DataError as error:
                raise DataError(f"{error}; {bad_file_hint(self.root)}") from None
        # A broken frame is flagged and replaced by the next readable one, so that batches
        # keep their size.
        for offset in range(len(self.frames)):
            candidate = (index + offset) % len(self.frames)
            try:
                return self.load(candidate)
            except DataError as error:
                if not self.bad[candidate]:
                    print(f"warning: skipping {error}", file=sys.stderr)
                self.bad[candidate] = True
        raise DataError(f"every frame under {self.root} is unreadable")

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame `index` as `(image (3, H, W) uint8, mask (H, W) uint8)`, transforms applied."""
        frame = self.frames[index]
        image = read_png(frame.rgb_path)
        semantic = read_png(frame.semantic_path)
        if image.shape != semantic.shape:
            raise DataError(size_mismatch(frame, tuple(image.shape[1:]), tuple(semantic.shape[1:])))
        # >>> Q2: apply the transforms, then decode the labels
        if self.transforms is not None:
            image, semantic = self.transforms(tv_tensors.Image(image), tv_tensors.Mask(semantic))
        mask = decode_semantic(semantic.as_subclass(torch.Tensor), self.label_table)
        return image.as_subclass(torch.Tensor), mask
        # <<< Q2

    def label_mask(self, index: int) -> torch.Tensor:
        """The class ids of frame `index` at full size, no transforms: `(H, W)` uint8."""
        return decode_semantic(read_png(self.frames[index].semantic_path), self.label_table)

    def bad_paths(self) -> list[Path]:
        """With `skip_bad`, the files of the frames left out so far: the missing semantic file
        of a frame without labels, the rgb file of a frame found unreadable."""
        unreadable = [self.frames[i].rgb_path for i in self.bad.nonzero().flatten().tolist()]
        return [frame.semantic_path for frame in self.unlabelled] + unreadable


# ----------------------------------------------------------------------------------------
# Transforms and normalization


def train_transforms(img_size: int, scale: tuple[float, float] = (0.25, 1.0)) -> T.Transform:
    """Random resized crop to `img_size` x `img_size`, then a horizontal flip half the time.

    Image and mask move together (v2 transforms act on both); masks are resized with
    nearest neighbour. The color augmentation is `jitter_colors`, on the device.
    """
    # >>> Q4: build the geometric training augmentations
    return T.Compose(
        [
            T.RandomResizedCrop(img_size, scale=scale, antialias=True),
            T.RandomHorizontalFlip(),
        ]
    )
    # <<< Q4


def grayscale(pixels: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601) of `(B, 3, H, W)` float pixels: `(B, 1, H, W)` float."""
    red, green, blue = pixels.unbind(dim=1)
    return (0.299 * red + 0.587 * green + 0.114 * blue).unsqueeze(1)


def jitter_colors(images: torch.Tensor, strength: float) -> torch.Tensor:
    """Random brightness, contrast and saturation, each image of the batch its own.

    images: `(B, 3, H, W)` uint8 on any device. Each image draws three factors uniformly
    from [1 - strength, 1 + strength] and goes through brightness (scale the pixels),
    contrast (blend with the image's mean gray) and saturation (blend with its own gray
    picture), clipped to [0, 255] after each step. Returns `(B, 3, H, W)` uint8.

    A batch at a time on the device costs microseconds on a GPU, where per frame in the
    loader it would take about as long as reading the frame from a cache.
    """
    if strength == 0:
        return images
    # >>> Q4: jitter brightness, contrast and saturation
    # Drawn on the CPU, so that the factors depend on the seed only, not on the device.
    factors = 1 + strength * (2 * torch.rand(3, len(images), 1, 1, 1) - 1)
    brightness, contrast, saturation = factors.to(images.device)
    # In place: a float batch is several MB, and on a CPU each new tensor is one more pass
    # through memory (in place is 3x faster at 16 x 256 x 256).
    pixels = images.float().mul_(brightness).clamp_(0, 255)
    mean_gray = grayscale(pixels).mean(dim=(1, 2, 3), keepdim=True)
    pixels.sub_(mean_gray).mul_(contrast).add_(mean_gray).clamp_(0, 255)  # m + c (x - m)
    gray = grayscale(pixels)
    pixels.sub_(gray).mul_(saturation).add_(gray).clamp_(0, 255)  # g + s (x - g)
    return pixels.round_().to(torch.uint8)
    # <<< Q4


def eval_transforms(img_size: int, resize_mask: bool = True) -> T.Transform:
    """Deterministic resize to `img_size` x `img_size`.

    With `resize_mask=False` only the image is resized: the metrics are then computed at the
    labels' full resolution, the logits being upsampled to the mask size.
    """
    resize = T.Resize((img_size, img_size), antialias=True)
    if resize_mask:
        return resize

    def resize_image_only(image: torch.Tensor, mask: torch.Tensor) -> tuple:
        return resize(image), mask

    return resize_image_only


def normalize(images: torch.Tensor) -> torch.Tensor:
    """The one normalization of the project: `(B, 3, H, W)` uint8 -> float32 standardized.

    Applied on the device, after the copy, so that the loader moves 4x fewer bytes.
    """
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalize`: `(B, 3, H, W)` float32 -> uint8 (for pictures)."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return ((images * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------
# Splits and subsets


def split_by_room(
    frames: list[Frame], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Hold out whole rooms: `(train_indices, val_indices)` into `frames`.

    Frames of one room are near-duplicates, so a random split of frames would leak the
    validation rooms into training. Rooms are drawn with `seed`; at least one room goes to
    each side when there are two or more.
    """
    rooms = sorted({(frame.area, frame.room) for frame in frames})
    random.Random(seed).shuffle(rooms)
    num_val = min(max(1, round(val_fraction * len(rooms))), len(rooms) - 1)
    val_rooms = set(rooms[:num_val])
    train_indices, val_indices = [], []
    for index, frame in enumerate(frames):
        side = val_indices if (frame.area, frame.room) in val_rooms else train_indices
        side.append(index)
    return train_indices, val_indices


def subset_indices(num_frames: int, subset: int | None) -> list[int]:
    """`subset` indices spread evenly over `range(num_frames)` (all when None or too big).

    Spreading, rather than taking the first frames, keeps every area and most rooms.
    """
    if subset is None or subset >= num_frames:
        return list(range(num_frames))
    if subset <= 0:
        raise ValueError(f"subset must be positive, got {subset}")
    step = num_frames / subset
    return [math.floor(i * step) for i in range(subset)]


# ----------------------------------------------------------------------------------------
# Loaders


class ShardSampler(Sampler):
    """Frames `rank, rank + world, ...` for evaluation under torch.distributed.

    Unlike DistributedSampler it never repeats a frame to even out the shards, so the
    metrics summed over processes count every frame exactly once.
    """

    def __init__(self, num_frames: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, num_frames, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def distributed_rank_and_size() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def make_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    workers: int = 0,
    pin_memory: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader: shuffled with drop_last for training, in order for evaluation.

    Under torch.distributed each process gets its own shard of the frames.
    """
    rank, world_size = distributed_rank_and_size()
    sampler: Sampler | None = None
    if world_size > 1 and train:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=seed)
    elif world_size > 1:
        sampler = ShardSampler(len(dataset), rank, world_size)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=train,
        persistent_workers=workers > 0,
        generator=generator,
    )


def get_datasets(
    root: str | Path,
    train_areas: list[str],
    val_areas: list[str] | None = None,
    img_size: int = 256,
    subset: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    scale: tuple[float, float] = (0.25, 1.0),
    skip_bad: bool = False,
) -> tuple[Subset, Subset]:
    """Training and validation sets: by area, or by held-out rooms without `val_areas`.

    Each is a `Subset` of a `StanfordDataset`, or of a `CachedDataset` when `root` is a
    cache made by `python data.py cache`: `subset.dataset.frames[subset.indices[i]]` is the
    frame of sample i.
    """
    train_transform = train_transforms(img_size, scale)
    train_set = open_dataset(root, train_areas, train_transform, skip_bad, img_size)
    if val_areas:
        val_set = open_dataset(root, val_areas, eval_transforms(img_size), skip_bad, img_size)
        train_indices = list(range(len(train_set)))
        val_indices = list(range(len(val_set)))
    else:
        # The same frames with other transforms: listed (and warned about) once, and a
        # frame found broken in one split is known broken in the other.
        val_set = copy.copy(train_set)
        val_set.transforms = eval_transforms(img_size)
        train_indices, val_indices = split_by_room(train_set.frames, val_fraction, seed)
    overlap = {train_set.frames[i].rgb_path for i in train_indices} & {
        val_set.frames[i].rgb_path for i in val_indices
    }
    if overlap:
        raise DataError(f"{len(overlap)} frames are in both training and validation areas")
    train_indices = [train_indices[i] for i in subset_indices(len(train_indices), subset)]
    val_indices = [val_indices[i] for i in subset_indices(len(val_indices), subset)]
    return Subset(train_set, train_indices), Subset(val_set, val_indices)


def get_dataloaders(
    root: str | Path,
    train_areas: list[str],
    val_areas: list[str] | None = None,
    img_size: int = 256,
    batch_size: int = 8,
    workers: int = 0,
    subset: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    pin_memory: bool = False,
    skip_bad: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders yielding `(B, 3, S, S)` uint8 and `(B, S, S)` uint8.

    Pass `pin_memory=True` when training on CUDA: pinned batches copy to the GPU
    asynchronously (`.to(device, non_blocking=True)`).
    """
    train_set, val_set = get_datasets(
        root, train_areas, val_areas, img_size, subset, val_fraction, seed, skip_bad=skip_bad
    )
    train_loader = make_loader(train_set, batch_size, True, workers, pin_memory, seed)
    val_loader = make_loader(val_set, batch_size, False, workers, pin_memory, seed)
    return train_loader, val_loader


# ----------------------------------------------------------------------------------------
# Pre-decoded cache
#
# Decoding the two PNGs of a 1080x1080 frame costs about 25 ms of one core, so a loader
# of raw PNGs needs many cores to keep a GPU busy. `python data.py cache` decodes every
# frame once, resized as eval_transforms does, into plain uint8 arrays:
#
#     CACHE/cache.json             how the cache was made, written last
#     CACHE/area_1/images.uint8    (N, 3, S, S) uint8 RGB, frames in the order of cache.json
#     CACHE/area_1/masks.uint8     (N, S, S) uint8 class ids
#
# A cache directory then works as a --datadir: open_dataset (used by get_datasets) finds
# cache.json and returns a CachedDataset, whose samples equal the raw ones at size S.

CACHE_MANIFEST = "cache.json"
CACHE_FORMAT = "stanford2d3ds-decoded-cache"
CACHE_VERSION = 1
CACHE_IMAGES = "images.uint8"
CACHE_MASKS = "masks.uint8"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rebuild_hint(manifest: dict, cache_root: Path) -> str:
    return (
        f"rebuild it: python data.py cache --datadir {manifest.get('source_root', 'ROOT')} "
        f"--out {cache_root} --size {manifest.get('size', 'PX')}"
    )


def read_cache_manifest(cache_root: str | Path) -> dict:
    """Read `cache_root/cache.json` and check it against this code and the source labels.

    A cache is refused when its format version or class list differ from this code's, or
    when the label file of its source root still exists but changed since the cache was
    made (the class ids in the cache would then be stale).
    """
    cache_root = Path(cache_root)
    path = cache_root / CACHE_MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read the cache manifest {path}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise DataError(f"{path} is not a manifest written by `python data.py cache`")
    if manifest.get("version") != CACHE_VERSION:
        raise DataError(
            f"the cache {cache_root} has format version {manifest.get('version')}, this code "
            f"reads version {CACHE_VERSION}; {rebuild_hint(manifest, cache_root)}"
        )
    expected_keys = ("size", "source_root", "labels_sha256", "num_labels", "classes", "areas")
    missing = [key for key in expected_keys if key not in manifest]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; {rebuild_hint(manifest, cache_root)}")
    if manifest["classes"] != list(CLASSES):
        raise DataError(
            f"the cache {cache_root} was made for the classes {manifest['classes']}, not "
            f"{list(CLASSES)}; {rebuild_hint(manifest, cache_root)}"
        )
    labels_path = Path(manifest["source_root"]) / LABELS_FILE
    if labels_path.is_file() and file_sha256(labels_path) != manifest["labels_sha256"]:
        raise DataError(
            f"the cache {cache_root} is stale: {labels_path} changed since the cache was "
            f"made; {rebuild_hint(manifest, cache_root)}"
        )
    return manifest


def check_cache_files(cache_root: Path, area: str, num_frames: int, size: int) -> None:
    """Raise a DataError unless both arrays of `area` have exactly the expected length."""
    for file_name, frame_bytes in [(CACHE_IMAGES, 3 * size * size), (CACHE_MASKS, size * size)]:
        path = cache_root / f"area_{area}" / file_name
        expected = num_frames * frame_bytes
        actual = path.stat().st_size if path.is_file() else None
        if actual != expected:
            found = "is missing" if actual is None else f"has {actual:,} bytes"
            raise DataError(
                f"{path} {found}, expected {expected:,} ({num_frames} frames of {size}x{size}): "
                f"the cache is truncated or damaged; rebuild it with python data.py cache"
            )


def cached_frame(source_root: Path, area: str, name: str) -> Frame:
    """The Frame of a cached view; its paths name the original PNGs, present or not."""
    rgb_path = source_root / f"area_{area}" / "data" / "rgb" / f"{name}{RGB_SUFFIX}"
    semantic_path = rgb_path.parent.parent / "semantic" / f"{name}{SEMANTIC_SUFFIX}"
    match = FRAME_NAME.match(name)
    return Frame(area, match["room"] if match else "unknown", name, rgb_path, semantic_path)


class CachedDataset(Dataset):
    """Frames of a cache written by `python data.py cache`, with the API of StanfordDataset.

    Without transforms, `ds[i]` is `(image (3, S, S) uint8, mask (S, S) uint8)` at the cached
    size S, equal to `StanfordDataset(source_root, areas, eval_transforms(S))[i]`. With
    transforms, they are called as `transforms(tv_tensors.Image, tv_tensors.Mask)`, the mask
    being the `(S, S)` uint8 class ids, so training crops and flips start from S x S.

    The arrays are memory-mapped on first use in each process: DataLoader workers map the
    files themselves instead of receiving copies of them.
    """

    def __init__(
        self,
        root: str | Path,
        areas: list[str] | None = None,
        transforms: T.Transform | None = None,
        skip_bad: bool = False,
    ) -> None:
        self.root = Path(root)
        manifest = read_cache_manifest(self.root)
        self.size: int = manifest["size"]
        self.source_root = Path(manifest["source_root"])
        self.num_frames_per_area = {area: len(names) for area, names in manifest["areas"].items()}
        self.frames: list[Frame] = []
        self.rows: list[tuple[str, int]] = []  # (area, row in its arrays) of each frame
        for area in self.resolve_areas(areas):
            names = manifest["areas"][area]
            check_cache_files(self.root, area, len(names), self.size)
            self.frames += [cached_frame(self.source_root, area, name) for name in names]
            self.rows += [(area, row) for row in range(len(names))]
        self.areas = sorted({frame.area for frame in self.frames})
        self.transforms = transforms
        # Every cached frame was readable when the cache was made; the flags keep the API
        # of StanfordDataset (main.py reports `bad_paths()`).
        self.skip_bad = skip_bad
        self.bad = torch.zeros(len(self.frames), dtype=torch.bool).share_memory_()
        self.arrays_by_area: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.arrays_pid: int | None = None

    def resolve_areas(self, areas: list[str] | None) -> list[str]:
        """The requested areas in their order, checked against the cached ones."""
        cached = list(self.num_frames_per_area)

        def not_found(area: str) -> str:
            return (
                f"area {area!r} is not in the cache {self.root} (cached areas: "
                f"{', '.join(cached)}); add it with python data.py cache --areas ..."
            )

        return match_areas(areas, cached, not_found)

    def __getstate__(self) -> dict:
        # Pickled for a worker process: send the file names, never the mapped arrays.
        state = self.__dict__.copy()
        state["arrays_by_area"], state["arrays_pid"] = {}, None
        return state

    def arrays(self, area: str) -> tuple[np.ndarray, np.ndarray]:
        """The read-only maps of `area`: images `(N, 3, S, S)` and masks `(N, S, S)` uint8."""
        if self.arrays_pid != os.getpid():  # a forked worker maps the files anew
            self.arrays_by_area, self.arrays_pid = {}, os.getpid()
        if area not in self.arrays_by_area:
            count, size = self.num_frames_per_area[area], self.size
            folder = self.root / f"area_{area}"
            images = np.memmap(folder / CACHE_IMAGES, np.uint8, "r", shape=(count, 3, size, size))
            masks = np.memmap(folder / CACHE_MASKS, np.uint8, "r", shape=(count, size, size))
            self.arrays_by_area[area] = (images, masks)
        return self.arrays_by_area[area]

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.load(index)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame `index` as `(image (3, S, S) uint8, mask (S, S) uint8)`, transforms applied."""
        area, row = self.rows[index]
        images, masks = self.arrays(area)
        # np.array copies out of the map: the tensors own writable memory.
        image = torch.from_numpy(np.array(images[row]))
        mask = torch.from_numpy(np.array(masks[row]))
        if self.transforms is not None:
            image, mask = self.transforms(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)

    def label_mask(self, index: int) -> torch.Tensor:
        """The class ids of frame `index` at the cached size, no transforms: `(S, S)` uint8."""
        area, row = self.rows[index]
        return torch.from_numpy(np.array(self.arrays(area)[1][row]))

    def bad_paths(self) -> list[Path]:
        """Always empty for a cache (kept for the API of StanfordDataset)."""
        return [self.frames[i].rgb_path for i in self.bad.nonzero().flatten().tolist()]


def open_dataset(
    root: str | Path,
    areas: list[str] | None = None,
    transforms: T.Transform | None = None,
    skip_bad: bool = False,
    img_size: int | None = None,
) -> StanfordDataset | CachedDataset:
    """A CachedDataset when `root` holds a cache.json, else a StanfordDataset.

    `img_size`, when given, is the size the samples will be cropped or resized to; a cache
    of smaller frames is refused rather than silently upsampled.
    """
    root = Path(root)
    if (root / CACHE_MANIFEST).is_file():
        dataset = CachedDataset(root, areas, transforms, skip_bad)
        if img_size is not None and img_size > dataset.size:
            raise DataError(
                f"the cache {root} holds {dataset.size}x{dataset.size} frames, smaller than "
                f"the requested image size {img_size}: lower --img-size or make a cache with "
                f"--size {img_size} or more"
            )
        return dataset
    if any(root.glob(f"area_*/{CACHE_IMAGES}")):
        raise DataError(
            f"{root} is an unfinished cache (it has no {CACHE_MANIFEST}): its `python data.py "
            "cache` run was interrupted; run it again"
        )
    return StanfordDataset(root, areas, transforms, skip_bad)


class FramesForCache(Dataset):
    """`(index, image, mask, error)` per frame of a StanfordDataset, for the cache writer.

    A broken frame yields empty tensors and the error message instead of raising, so that
    loader workers keep going and the writer decides what to do with it.
    """

    def __init__(self, source: StanfordDataset) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor, str]:
        try:
            image, mask = self.source.load(index)
        except DataError as error:
            return index, torch.empty(0), torch.empty(0), str(error)
        return index, image, mask.to(torch.uint8), ""


def prepare_cache_dir(out: Path) -> None:
    """Create `out`, or empty it of an earlier cache; refuse a directory holding anything else.

    The manifest goes first, so that an interrupted run never leaves a complete-looking cache.
    """
    cache_files = {CACHE_IMAGES, CACHE_MASKS}
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file: give a new or empty directory")
    if out.is_dir():
        for entry in out.iterdir():
            is_area = entry.is_dir() and entry.name.startswith("area_")
            known = entry.name in (CACHE_MANIFEST, CACHE_MANIFEST + ".tmp") or (
                is_area and all(f.name in cache_files for f in entry.iterdir())
            )
            if not known:
                raise DataError(
                    f"--out {out} holds {entry.name}, which is not part of a cache: give a new "
                    "or empty directory (never the data set's root)"
                )
        (out / CACHE_MANIFEST).unlink(missing_ok=True)
        for path in out.glob("area_*"):
            for file_name in cache_files:
                (path / file_name).unlink(missing_ok=True)
            path.rmdir()
    out.mkdir(parents=True, exist_ok=True)


def write_cache(
    root: str | Path,
    out: str | Path,
    size: int,
    areas: list[str] | None = None,
    workers: int = 0,
    skip_bad: bool = False,
    progress: bool = True,
) -> dict:
    """Decode every frame of `areas` under `root` once, resized to `size` x `size`, into `out`.

    Images are resized with antialiased bilinear and masks with nearest neighbour, exactly as
    `eval_transforms(size)`. A broken frame stops the run, or with `skip_bad` is left out and
    listed in the manifest. Returns the manifest, which is written last.
    """
    from tqdm import tqdm

    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    root, out = Path(root).resolve(), Path(out).resolve()
    source = StanfordDataset(root, areas, eval_transforms(size))
    labels_path = root / LABELS_FILE
    prepare_cache_dir(out)
    needed = len(source) * 4 * size * size
    free = shutil.disk_usage(out).free
    if needed > free:
        raise DataError(
            f"the cache needs {needed / 1e9:.1f} GB and {out} has {free / 1e9:.1f} GB free: "
            "free some space, pick another --out, or a smaller --size"
        )
    names: dict[str, list[str]] = {}
    skipped: list[str] = []
    loader = DataLoader(FramesForCache(source), batch_size=None, num_workers=workers)
    with contextlib.ExitStack() as open_files:
        files: dict[str, tuple] = {}
        for index, image, mask, error in tqdm(
            loader, total=len(source), desc=f"cache {size}px", disable=not progress
        ):
            frame = source.frames[index]
            if error and not skip_bad:
                raise DataError(f"{error} (find every such frame with `python data.py check`)")
            if error:
                print(f"warning: leaving out {error}", file=sys.stderr)
                skipped.append(str(frame.rgb_path))
                continue
            if frame.area not in files:
                folder = out / f"area_{frame.area}"
                folder.mkdir()
                files[frame.area] = tuple(
                    open_files.enter_context(open(folder / name, "wb"))
                    for name in (CACHE_IMAGES, CACHE_MASKS)
                )
                names[frame.area] = []
            images_file, masks_file = files[frame.area]
            images_file.write(image.numpy().tobytes())
            masks_file.write(mask.numpy().tobytes())
            names[frame.area].append(frame.name)
    manifest = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "size": size,
        "source_root": str(root),
        "labels_sha256": file_sha256(labels_path),
        "num_labels": len(source.label_table) - 1,
        "classes": list(CLASSES),
        "image_array": "(N, 3, size, size) uint8 RGB, antialiased bilinear resize",
        "mask_array": "(N, size, size) uint8 class ids, nearest resize",
        "skipped": skipped,
        "areas": names,
    }
    # Written to a side file and renamed: the manifest appears complete or not at all.
    temporary = out / (CACHE_MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(temporary, out / CACHE_MANIFEST)
    return manifest


def int_at_least(minimum: int):
    """An argparse type: an int of at least `minimum`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def command_cache(args: argparse.Namespace) -> None:
    manifest = write_cache(
        args.datadir, args.out, args.size, args.areas, args.workers, args.skip_bad
    )
    num_frames = sum(len(names) for names in manifest["areas"].values())
    gigabytes = num_frames * 4 * args.size**2 / 1e9
    print(
        f"wrote {num_frames} frames of areas {', '.join(manifest['areas'])} at "
        f"{args.size}x{args.size} to {args.out} ({gigabytes:.2f} GB)"
    )
    if manifest["skipped"]:
        print(f"left out {len(manifest['skipped'])} unreadable frame(s), listed in cache.json")
    print(f"train on it with: python main.py train --datadir {args.out} --img-size {args.size}")


# ----------------------------------------------------------------------------------------
# Command line: show, histogram, check, cache


def class_histogram(
    dataset: StanfordDataset, indices: list[int] | None = None, progress: bool = True
) -> torch.Tensor:
    """Pixel count per class over the frames `indices` (all by default) of `dataset`, at
    full resolution: `(NUM_CLASSES,)` int64."""
    from tqdm import tqdm

    counts = torch.zeros(NUM_CLASSES, dtype=torch.int64)
    indices = range(len(dataset)) if indices is None else indices
    for index in tqdm(indices, desc="histogram", disable=not progress):
        counts += torch.bincount(dataset.label_mask(index).flatten(), minlength=NUM_CLASSES)
    return counts


def command_histogram(args: argparse.Namespace) -> None:
    dataset = open_dataset(args.datadir, args.areas)
    counts = class_histogram(dataset)
    shares = (counts / counts.sum()).tolist()
    print(f"{len(dataset)} frames of areas {', '.join(dataset.areas)}")
    print(f"{'class':<10} {'pixels':>14} {'share':>8}")
    for name, count, share in zip(CLASSES, counts.tolist(), shares, strict=True):
        print(f"{name:<10} {count:>14,d} {share:>8.2%}")
    result = {
        "areas": dataset.areas,
        "frames": len(dataset),
        "classes": list(CLASSES),
        "pixel_count": counts.tolist(),
        "pixel_share": shares,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


def command_show(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils import colorize, legend_handles

    dataset = open_dataset(args.datadir, args.areas)
    if not 0 <= args.index < len(dataset):
        raise DataError(f"--index {args.index} is out of range: {len(dataset)} frames")
    image, mask = dataset[args.index]
    frame = dataset.frames[args.index]
    present = [CLASSES[i] for i in torch.unique(mask).tolist()]
    print(f"frame   {frame.name} (area {frame.area}, room {frame.room})")
    print(f"image   shape {tuple(image.shape)} dtype {image.dtype}")
    print(f"mask    shape {tuple(mask.shape)} dtype {mask.dtype}")
    print(f"classes {', '.join(present)}")
    figure, axes = plt.subplots(1, 2, figsize=(11, 5))
    axes[0].imshow(image.permute(1, 2, 0).numpy())
    axes[0].set_title(f"area {frame.area}, {frame.room}")
    axes[1].imshow(colorize(mask).permute(1, 2, 0).numpy())
    axes[1].set_title("labels")
    for axis in axes:
        axis.axis("off")
    figure.legend(handles=legend_handles(), loc="center right", fontsize=8)
    figure.subplots_adjust(right=0.85)
    figure.savefig(args.out, dpi=100)
    plt.close(figure)
    print(f"wrote {args.out}")


def checked_png_size(path: Path) -> tuple[int, int]:
    """(height, width) of a PNG after decoding all of it with Pillow, which raises on a
    broken compressed stream that passes the checksums, where torchvision's decoder would
    crash the process."""
    from PIL import Image

    raw = read_png_bytes(path)
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            width, height = image.size
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read {path}: {error}") from None
    return height, width


def check_frame(frame: Frame) -> str | None:
    """Why one frame cannot be used (unreadable file, sizes differ), or None when it is fine."""
    try:
        image_size = checked_png_size(frame.rgb_path)
        semantic_size = checked_png_size(frame.semantic_path)
    except DataError as error:
        return str(error)
    if image_size != semantic_size:
        return size_mismatch(frame, image_size, semantic_size)
    return None


def missing_rgb_files(root: Path, areas: list[str] | None) -> list[Path]:
    """The rgb files that the semantic files of the given areas lack."""
    missing = []
    for area in resolve_areas(root, areas):
        semantic_dir = root / f"area_{area}" / "data" / "semantic"
        for semantic_path in sorted(semantic_dir.glob(f"*{SEMANTIC_SUFFIX}")):
            name = semantic_path.name.removesuffix(SEMANTIC_SUFFIX)
            rgb_path = semantic_dir.parent / "rgb" / f"{name}{RGB_SUFFIX}"
            if not rgb_path.is_file():
                missing.append(rgb_path)
    return missing


def command_check(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    root = Path(args.datadir)
    load_label_table(root / LABELS_FILE)
    frames, unlabelled = find_frames(root, args.areas)
    problems = [f"{frame.semantic_path} is missing" for frame in unlabelled]
    problems += [f"{path} is missing" for path in missing_rgb_files(root, args.areas)]
    for frame in tqdm(frames, desc="check"):
        problem = check_frame(frame)
        if problem:
            problems.append(problem)
    for problem in problems:
        print(problem)
    print(f"checked {len(frames)} frames: {len(problems)} problem(s)")
    return 1 if problems else 0


def default_datadir() -> str:
    """$STANFORD2D3DS_ROOT when set, else data/stanford2d3ds."""
    import os

    return os.environ.get("STANFORD2D3DS_ROOT", "data/stanford2d3ds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def add_data_arguments(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--datadir",
            default=default_datadir(),
            help="2D-3D-S root (default: $STANFORD2D3DS_ROOT, else data/stanford2d3ds)",
        )
        command.add_argument(
            "--areas", nargs="+", default=None, help='areas, e.g. 1 2 5a ("5" = 5a 5b); all'
        )

    show = commands.add_parser("show", help="plot one frame, its colorized labels and legend")
    add_data_arguments(show)
    show.add_argument("--index", type=int, default=0, help="frame index in the listed areas")
    show.add_argument("--out", default="sample.png", help="picture to write")
    histogram = commands.add_parser("histogram", help="pixel share of each class")
    add_data_arguments(histogram)
    histogram.add_argument("--out", default=None, help="also write the numbers as JSON")
    check = commands.add_parser("check", help="find unreadable, missing or mismatched files")
    add_data_arguments(check)
    cache = commands.add_parser(
        "cache", help="decode every frame once, resized, into a cache usable as --datadir"
    )
    add_data_arguments(cache)
    cache.add_argument("--out", required=True, help="cache directory to write (new or a cache)")
    cache.add_argument(
        "--size", type=int_at_least(1), default=256, help="frame side in px (default 256)"
    )
    cache.add_argument("--workers", type=int_at_least(0), default=0, help="decoding processes")
    cache.add_argument(
        "--skip-bad", action="store_true", help="leave unreadable frames out instead of stopping"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "show":
            command_show(args)
        elif args.command == "histogram":
            command_histogram(args)
        elif args.command == "check":
            return command_check(args)
        elif args.command == "cache":
            command_cache(args)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
