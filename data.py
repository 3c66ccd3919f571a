"""Stanford 2D-3D-S semantic segmentation: the data set, its transforms and loaders.

The data set on disk (only what we read):

    ROOT/assets/semantic_labels.json
    ROOT/area_3/data/rgb/camera_<uuid>_<roomType>_<roomNum>_frame_<k>_domain_rgb.png
    ROOT/area_3/data/semantic/camera_<uuid>_<roomType>_<roomNum>_frame_<k>_domain_semantic.png

A pixel (R, G, B) of a semantic PNG is the 24-bit number R * 65536 + G * 256 + B, an index
into the JSON list of labels such as "chair_12_office_3_5"; the class is the part before the
first underscore. #0D0D0D (and any index past the end of the list) means "no data".

The file reads in the order of the lab: classes and labels (Q1), frames on disk, the data set
(Q2), transforms (Q4), splits, loaders and the class histogram (Q3, with the commands
`python -m seglab.explore show` and `histogram`), then the messages about broken files.
The PNG checks that keep a damaged file from crashing a run are in seglab/pngfiles.py, the
pre-decoded cache in seglab/cache.py and the file checker in seglab/check.py.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import multiprocessing
import os
import random
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_png

from seglab import pngfiles  # damaged PNGs: checked before decoding

try:
    # libspng decodes these PNGs 1.2-1.3x faster than torchvision here, and raises a clean
    # error on corrupt pixel data where torchvision's decoder can crash the process. It has
    # no wheel for some platforms (Linux on ARM, Intel Macs): there torchvision decodes.
    import pyspng
except ImportError:
    pyspng = None

# torchvision 0.29 announces that its PNG decoder will move to torchcodec; it is still the
# fastest decoder among our required dependencies, so we keep it and silence the notice.
warnings.filterwarnings(
    "ignore", message=".*image decoding and encoding", category=DeprecationWarning
)

# The 14 classes in the usual order (sorted names, <UNK> first) and the color of each in
# every picture. Index 0, <UNK>, is "unknown": ignored by the losses and metrics, and black,
# so that ignored pixels read as "no label".
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "<UNK>": (0, 0, 0),
    "beam": (255, 187, 120),
    "board": (23, 190, 207),
    "bookcase": (148, 103, 189),
    "ceiling": (174, 199, 232),
    "chair": (214, 39, 40),
    "clutter": (127, 127, 127),
    "column": (188, 189, 34),
    "door": (140, 86, 75),
    "floor": (44, 160, 44),
    "sofa": (227, 119, 194),
    "table": (255, 127, 14),
    "wall": (31, 119, 180),
    "window": (152, 223, 138),
}
CLASSES: tuple[str, ...] = tuple(CLASS_COLORS)
NUM_CLASSES = len(CLASSES)
IGNORE_INDEX = 0

# The areas as they are named on disk (area_5 was scanned in two parts).
AREAS: tuple[str, ...] = ("1", "2", "3", "4", "5a", "5b", "6")

# The data set's three folds (Armeni et al., 2017): fold -> (training areas, test areas). No
# area is on both sides; papers report fold 1 (often as "area 5") or the mean of the three.
FOLDS: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {
    1: (("1", "2", "3", "4", "6"), ("5a", "5b")),
    2: (("1", "3", "5a", "5b", "6"), ("2", "4")),
    3: (("2", "4", "5a", "5b"), ("1", "3", "6")),
}

# Where the data set is when no --datadir is given.
DATADIR_VARIABLE = "STANFORD2D3DS_ROOT"
DEFAULT_DATADIR = "data/stanford2d3ds"

LABELS_FILE = Path("assets") / "semantic_labels.json"
RGB_SUFFIX = "_domain_rgb.png"
SEMANTIC_SUFFIX = "_domain_semantic.png"
DEPTH_SUFFIX = "_domain_depth.png"  # read by seglab/depth.py only
FRAME_NAME = re.compile(r"^camera_(?P<camera>[0-9a-f]+)_(?P<room>.+)_frame_(?P<frame>\d+)$")


class DataError(Exception):
    """A problem with the data on disk; the message names the file or area and what to do."""


def default_datadir(fallback: str | None = None) -> str:
    """$STANFORD2D3DS_ROOT when set, else `fallback` when given, else data/stanford2d3ds."""
    return os.environ.get(DATADIR_VARIABLE) or fallback or DEFAULT_DATADIR


# ----------------------------------------------------------------------------------------
# Classes and labels


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
    except RecursionError:  # brackets nested deeper than the parser goes
        raise DataError(f"{labels_path} is not a label list: its JSON is nested too deep") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise DataError(f"{labels_path} must hold a non-empty JSON list of label strings")
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
    depth_path: Path

    @classmethod
    def at(cls, root: str | Path, area: str, name: str) -> Frame:
        """The frame `name` of `area` under `root`, e.g. its rgb_path
        ROOT/area_3/data/rgb/NAME_domain_rgb.png."""
        match = FRAME_NAME.match(name)
        room = match["room"] if match else "unknown"
        rgb_path = frame_folder(root, area, "rgb") / f"{name}{RGB_SUFFIX}"
        semantic_path = frame_folder(root, area, "semantic") / f"{name}{SEMANTIC_SUFFIX}"
        depth_path = frame_folder(root, area, "depth") / f"{name}{DEPTH_SUFFIX}"
        return cls(area, room, name, rgb_path, semantic_path, depth_path)


def frame_folder(root: str | Path, area: str, domain: str) -> Path:
    """ROOT/area_X/data/DOMAIN (domain "rgb", "semantic" or "depth"): the one place of the
    layout."""
    return Path(root) / f"area_{area}" / "data" / domain


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


def match_areas(
    areas: list[str] | None, available: list[str], not_found: Callable[[str], str]
) -> list[str]:
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


def find_frames(
    root: str | Path, areas: list[str] | None = None
) -> tuple[list[Frame], list[Frame]]:
    """Every rgb frame of the given areas, sorted by area then name, in two lists of Frame:
    those with their semantic file, and those whose semantic file is missing."""
    frames: list[Frame] = []
    unlabelled: list[Frame] = []
    for area in resolve_areas(root, areas):
        rgb_folder = frame_folder(root, area, "rgb")
        rgb_paths = sorted(rgb_folder.glob(f"*{RGB_SUFFIX}"))
        if not rgb_paths:
            raise DataError(
                f"no *{RGB_SUFFIX} file in {rgb_folder}; if {root} is a cache, read it with "
                "main.py or `python -m seglab.explore show|histogram`"
            )
        for rgb_path in rgb_paths:
            frame = Frame.at(root, area, rgb_path.name.removesuffix(RGB_SUFFIX))
            (frames if frame.semantic_path.is_file() else unlabelled).append(frame)
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


def read_png(path: Path, labels: bool = False) -> torch.Tensor:
    """Decode an 8-bit PNG to a `(3, H, W)` uint8 tensor; a broken file names itself.
    With `labels`, the file is a semantic PNG, whose colors must be stored as such (RGB).

    With pyspng the tensor is a channels-first view of `(H, W, 3)` memory, the layout in
    which torchvision resizes uint8 images fastest.
    """
    raw = read_png_bytes(path, labels)  # checked before decoding (seglab/pngfiles.py)
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

    `ds[i]` is `(image, mask)`: image `(3, H, W)` uint8 and mask `(H, W)` uint8 class ids
    (0 = unknown; the training loop makes them int64 on the device, after the copy, which
    moves 8x fewer bytes). `ds.frames[i]` tells the area, room and file of frame i.

    Transforms are called as `transforms(tv_tensors.Image, tv_tensors.Mask)` and must be
    geometric (crops, resizes, flips), which move mask values without blending them. Every
    data set of the project hands them the same pair; here the mask holds the raw `(3, H, W)`
    colors of the semantic PNG, decoded into class ids after the transforms, on the (smaller)
    output instead of the full 1080x1080 frame.

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

    def read_frame(self, index: int) -> tuple[tv_tensors.Image, torch.Tensor]:
        """Frame `index` as stored: `(image, semantic)`, the image `(3, H, W)` uint8 already
        wrapped in `tv_tensors.Image`, the semantic colors `(3, H, W)` uint8, of one size.
        (The RGB-D data set of seglab/depth.py returns its 4-channel image instead.)"""
        frame = self.frames[index]
        image = read_png(frame.rgb_path)
        semantic = read_png(frame.semantic_path, labels=True)
        if image.shape != semantic.shape:
            raise DataError(size_mismatch(frame, tuple(image.shape[1:]), tuple(semantic.shape[1:])))
        return tv_tensors.Image(image), semantic

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame `index` as `(image (3, H, W) uint8, mask (H, W) uint8)`, transforms applied.

        `self.transforms`, when not None, takes and returns `(image, tv_tensors.Mask)`;
        return plain tensors (`.as_subclass(torch.Tensor)`).
        """
        image, semantic = self.read_frame(index)
        # >>> Q2: apply the transforms, then decode the labels
        if self.transforms is not None:
            image, semantic = self.transforms(image, tv_tensors.Mask(semantic))
        mask = decode_semantic(semantic.as_subclass(torch.Tensor), self.label_table)
        return image.as_subclass(torch.Tensor), mask
        # <<< Q2

    def label_mask(self, index: int) -> torch.Tensor:
        """The class ids of frame `index` at full size, no transforms: `(H, W)` uint8."""
        semantic = read_png(self.frames[index].semantic_path, labels=True)
        return decode_semantic(semantic, self.label_table)

    def bad_paths(self) -> list[Path]:
        """With `skip_bad`, the files of the frames left out so far: the missing semantic file
        of a frame without labels, the rgb file of a frame found unreadable."""
        unreadable = [self.frames[i].rgb_path for i in self.bad.nonzero().flatten().tolist()]
        return [frame.semantic_path for frame in self.unlabelled] + unreadable


# A function that opens a data set as `open_dataset(root, areas, transforms, skip_bad)`:
# StanfordDataset itself, or cache.open_dataset, which also reads the caches of seglab/cache.py.
DatasetOpener = Callable[..., Dataset]


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


def eval_transforms(img_size: int, resize_mask: bool = True) -> T.Transform:
    """Deterministic resize to `img_size` x `img_size`.

    With `resize_mask=False` only the image is resized: the metrics are then computed at the
    labels' full resolution, the logits being upsampled to the mask size.
    """
    resize = T.Resize((img_size, img_size), antialias=True)
    if resize_mask:
        return resize
    # A module-level function, not a nested one: loader workers started with spawn
    # (Windows, macOS) receive the dataset, transforms included, pickled.
    return functools.partial(resize_image_only, resize)


def resize_image_only(resize: T.Transform, image: tv_tensors.Image, mask: tv_tensors.Mask):
    """`(resize(image), mask)`: the transforms of eval_transforms(resize_mask=False)."""
    return resize(image), mask


# ImageNet statistics: the pretrained backbones of models.py expect them, and they are a
# fine choice for a UNet trained from scratch too.
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """The one normalization of the project: `(B, 3, H, W)` uint8 -> float32 standardized
    with the ImageNet mean and standard deviation, on the device of `images`."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


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


def get_datasets(
    root: str | Path,
    train_areas: list[str],
    val_areas: list[str] | None = None,
    img_size: int = 256,
    subset: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    skip_bad: bool = False,
    open_dataset: DatasetOpener = StanfordDataset,
) -> tuple[Subset, Subset]:
    """Training and validation sets: by area, or by held-out rooms without `val_areas`.

    Each is a `Subset` of what `open_dataset` returns (a StanfordDataset by default):
    `subset.dataset.frames[subset.indices[i]]` is the frame of sample i.
    """
    train_set = open_dataset(root, train_areas, train_transforms(img_size), skip_bad)
    if val_areas:
        val_set = open_dataset(root, val_areas, eval_transforms(img_size), skip_bad)
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


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int = 0,
    pin_memory: bool = False,
    worker_init_fn: Callable[[int], None] | None = None,
    sampler: Sampler | None = None,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader of `dataset` in the order of `sampler`; without one, in order, and under
    torch.distributed each process gets its own shard of the frames (evaluation).

    Pass `pin_memory=True` when running on CUDA: pinned batches copy to the GPU
    asynchronously (`.to(device, non_blocking=True)`). The training loader is
    `seglab.runstate.training_loader`, whose sampler makes a stopped run continue exactly.
    """
    if sampler is None and dist.is_available() and dist.is_initialized():
        sampler = ShardSampler(len(dataset), dist.get_rank(), dist.get_world_size())
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        worker_init_fn=worker_init_fn,
        # The workers' base seeds come from a generator of their own, so that starting an
        # epoch draws nothing from the training process's random numbers.
        generator=torch.Generator().manual_seed(seed),
        multiprocessing_context=worker_context(workers),
    )


# How loader workers start, when set: "spawn" (a fresh interpreter that imports the modules
# and unpickles the dataset, as on Windows and macOS), "fork" (a copy of the process, the
# default on Linux) or "forkserver". Unset, the platform's default. On Linux,
# SEGLAB_START_METHOD=spawn checks that the loaders also work where workers are spawned.
START_METHOD_VARIABLE = "SEGLAB_START_METHOD"


def worker_context(workers: int):
    """The multiprocessing context of a loader with `workers` workers: the start method of
    $SEGLAB_START_METHOD, or None (the platform's default) when it is unset or there are no
    workers (DataLoader refuses a context without them)."""
    method = os.environ.get(START_METHOD_VARIABLE, "")
    if workers == 0 or not method:
        return None
    if method not in multiprocessing.get_all_start_methods():
        raise DataError(
            f"${START_METHOD_VARIABLE} is {method!r}: loader workers start here with one of "
            f"{', '.join(multiprocessing.get_all_start_methods())}"
        )
    return multiprocessing.get_context(method)


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


# ----------------------------------------------------------------------------------------
# The class histogram


def class_histogram(
    dataset: Dataset, indices: list[int] | None = None, progress: bool = True
) -> torch.Tensor:
    """Pixel count per class over the frames `indices` (all by default) of `dataset`, at
    full resolution (`dataset.label_mask`): `(NUM_CLASSES,)` int64."""
    from tqdm import tqdm

    counts = torch.zeros(NUM_CLASSES, dtype=torch.int64)
    indices = range(len(dataset)) if indices is None else indices
    for index in tqdm(indices, desc="histogram", disable=not progress):
        counts += torch.bincount(dataset.label_mask(index).flatten(), minlength=NUM_CLASSES)
    return counts


# ----------------------------------------------------------------------------------------
# Messages about missing and broken files


def missing_datadir_message(root: str | Path) -> str:
    if Path(root).exists():
        return (
            f"data directory {root} is a file, not a folder: point --datadir (or "
            f"${DATADIR_VARIABLE}) at the 2D-3D-S root folder"
        )
    return (
        f"data directory {root} does not exist. Point --datadir (or ${DATADIR_VARIABLE}) at "
        "the 2D-3D-S root (download: http://buildingparser.stanford.edu/dataset.html), "
        f"or make synthetic data in the same format: python -m seglab.synthetic --out {root}"
    )


def bad_file_hint(root: str | Path) -> str:
    """What to do about a broken file under `root`."""
    return (
        f"list every bad file with `python -m seglab.check --datadir {root}`, or leave bad "
        "frames out of training with `python main.py train --skip-bad`"
    )


def size_mismatch(frame: Frame, image_size: tuple, semantic_size: tuple) -> str:
    """The message for a frame whose rgb and semantic PNGs differ in (height, width)."""
    return (
        f"{frame.rgb_path} is {image_size} but {frame.semantic_path} is {semantic_size}: "
        "rgb and semantic must have the same size"
    )


def read_png_bytes(path: Path, labels: bool = False) -> bytes:
    """The bytes of a PNG file whose chunks are whole (with `labels`, of an 8-bit RGB PNG);
    a DataError names what is wrong."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would block the read forever
        raise DataError(f"cannot read {path}: not a regular file (a folder, FIFO or device)")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    damage = pngfiles.png_problem(raw, labels)
    if damage:
        raise DataError(f"cannot read {path}: {damage}")
    return raw
