"""A pre-decoded cache of Stanford 2D-3D-S: every frame decoded once, resized, in plain arrays.

Decoding the two PNGs of a 1080x1080 frame costs about 25 ms of one core, so a loader of raw
PNGs needs many cores to keep a GPU busy. This module decodes every frame once, resized as
`data.eval_transforms` does, into plain uint8 arrays:

    CACHE/cache.json             how the cache was made, written last
    CACHE/area_1/images.uint8    (N, 3, S, S) uint8 RGB, frames in the order of cache.json
                                 ((N, 4, S, S) with --depth: RGB, then seglab/depth.py's channel)
    CACHE/area_1/masks.uint8     (N, S, S) uint8 class ids

A cache directory then works as a --datadir of main.py: `open_dataset` finds cache.json and
returns a CachedDataset, whose samples equal the raw ones at size S.

    python -m seglab.cache write --datadir ROOT --out CACHE --size 256 --workers 8 [--depth]
    python -m seglab.explore show --datadir CACHE --index 3      (a cache or a raw root)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

import data
from data import DataError
from seglab import cli, depth, downloads, filesystem

CACHE_MANIFEST = "cache.json"
CACHE_FORMAT = "stanford2d3ds-decoded-cache"
CACHE_VERSION = 1
CACHE_IMAGES = "images.uint8"
CACHE_MASKS = "masks.uint8"


# ----------------------------------------------------------------------------------------
# Reading a cache


def rebuild_hint(manifest: dict, cache_root: Path) -> str:
    return (
        f"rebuild it: python -m seglab.cache write --datadir {manifest.get('source_root', 'ROOT')} "
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
    except RecursionError:
        raise DataError(f"cannot read the cache manifest {path}: nested too deep") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise DataError(f"{path} is not a manifest written by `python -m seglab.cache write`")
    if manifest.get("version") != CACHE_VERSION:
        raise DataError(
            f"the cache {cache_root} has format version {manifest.get('version')}, this code "
            f"reads version {CACHE_VERSION}; {rebuild_hint(manifest, cache_root)}"
        )
    expected_keys = ("size", "source_root", "labels_sha256", "num_labels", "classes", "areas")
    missing = [key for key in expected_keys if key not in manifest]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; {rebuild_hint(manifest, cache_root)}")
    kinds = {"size": int, "source_root": str, "labels_sha256": str, "num_labels": int,
             "classes": list, "areas": dict}  # fmt: skip
    for key, kind in kinds.items():
        value = manifest[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DataError(
                f"{path}: its {key} is a {type(value).__name__}, not a {kind.__name__}; "
                f"{rebuild_hint(manifest, cache_root)}"
            )
    if manifest["classes"] != list(data.CLASSES):
        raise DataError(
            f"the cache {cache_root} was made for the classes {manifest['classes']}, not "
            f"{list(data.CLASSES)}; {rebuild_hint(manifest, cache_root)}"
        )
    labels_path = Path(manifest["source_root"]) / data.LABELS_FILE
    if labels_path.is_file() and downloads.file_sha256(labels_path) != manifest["labels_sha256"]:
        raise DataError(
            f"the cache {cache_root} is stale: {labels_path} changed since the cache was "
            f"made; {rebuild_hint(manifest, cache_root)}"
        )
    return manifest


def cached_inputs(manifest: dict) -> list[str]:
    """The inputs a cache holds: ["rgb"], or ["rgb", "depth"] (caches before depth: RGB)."""
    return manifest.get("inputs", ["rgb"])


def image_channels(inputs: list[str]) -> int:
    """Channels of a cached image: 3 for RGB, 4 with depth's uint8 channel."""
    return 4 if depth.uses_depth(inputs) else 3


def check_cache_files(
    cache_root: Path, area: str, num_frames: int, size: int, channels: int = 3
) -> None:
    """Raise a DataError unless both arrays of `area` have exactly the expected length."""
    image_bytes = channels * size * size
    for file_name, frame_bytes in [(CACHE_IMAGES, image_bytes), (CACHE_MASKS, size * size)]:
        path = cache_root / f"area_{area}" / file_name
        expected = num_frames * frame_bytes
        actual = path.stat().st_size if path.is_file() else None
        if actual != expected:
            found = "is missing" if actual is None else f"has {actual:,} bytes"
            raise DataError(
                f"{path} {found}, expected {expected:,} ({num_frames} frames of {size}x{size}): "
                f"the cache is truncated or damaged; rebuild it with python -m seglab.cache write"
            )


class CachedDataset(Dataset):
    """Frames of a cache written by `python -m seglab.cache write`, read like a StanfordDataset.

    `ds[i]` is `(image (3, S, S) uint8, mask (S, S) uint8)` at the cached size S, equal to
    `data.StanfordDataset(source_root, areas, data.eval_transforms(S))[i]`; `ds.frames[i]`
    is the Frame of the original PNGs (present or not). With `inputs=["rgb", "depth"]` (a
    cache written with --depth) the image is a `(4, S, S)` depth.RGBDImage, equal to
    `depth.DepthDataset`'s. Transforms are called as
    `transforms(tv_tensors.Image, tv_tensors.Mask)`, like StanfordDataset's; here the mask
    holds the `(S, S)` class ids, so training crops and flips start from S x S.

    The arrays are memory-mapped on first use in each process: DataLoader workers map the
    files themselves instead of receiving copies of them.
    """

    def __init__(
        self,
        root: str | Path,
        areas: list[str] | None = None,
        transforms: T.Transform | None = None,
        inputs: list[str] | tuple[str, ...] = ("rgb",),
    ) -> None:
        self.root = Path(root)
        manifest = read_cache_manifest(self.root)
        if depth.uses_depth(inputs) and not depth.uses_depth(cached_inputs(manifest)):
            raise DataError(
                f"the cache {self.root} holds no depth; for --inputs rgb depth "
                f"{rebuild_hint(manifest, self.root)} --depth"
            )
        self.channels = image_channels(cached_inputs(manifest))  # stored per frame
        self.with_depth = depth.uses_depth(inputs)  # handed out per frame
        self.size: int = manifest["size"]
        self.source_root = Path(manifest["source_root"])
        self.num_frames_per_area = {area: len(names) for area, names in manifest["areas"].items()}
        self.frames: list[data.Frame] = []
        self.rows: list[tuple[str, int]] = []  # (area, row in its arrays) of each frame
        for area in self.resolve_areas(areas):
            names = manifest["areas"][area]
            check_cache_files(self.root, area, len(names), self.size, self.channels)
            self.frames += [data.Frame.at(self.source_root, area, name) for name in names]
            self.rows += [(area, row) for row in range(len(names))]
        self.areas = sorted({frame.area for frame in self.frames})
        self.transforms = transforms
        self.arrays_by_area: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.arrays_pid: int | None = None

    def resolve_areas(self, areas: list[str] | None) -> list[str]:
        """The requested areas in their order, checked against the cached ones."""
        cached = list(self.num_frames_per_area)

        def not_found(area: str) -> str:
            return (
                f"area {area!r} is not in the cache {self.root} (cached areas: "
                f"{', '.join(cached)}); add it with python -m seglab.cache write --areas ..."
            )

        return data.match_areas(areas, cached, not_found)

    def __getstate__(self) -> dict:
        # Pickled for a worker process: send the file names, never the mapped arrays.
        state = self.__dict__.copy()
        state["arrays_by_area"], state["arrays_pid"] = {}, None
        return state

    def arrays(self, area: str) -> tuple[np.ndarray, np.ndarray]:
        """The read-only maps of `area`: images `(N, C, S, S)` and masks `(N, S, S)` uint8."""
        if self.arrays_pid != os.getpid():  # a forked worker maps the files anew
            self.arrays_by_area, self.arrays_pid = {}, os.getpid()
        if area not in self.arrays_by_area:
            count, size = self.num_frames_per_area[area], self.size
            folder = self.root / f"area_{area}"
            shape = (count, self.channels, size, size)
            images = np.memmap(folder / CACHE_IMAGES, np.uint8, "r", shape=shape)
            masks = np.memmap(folder / CACHE_MASKS, np.uint8, "r", shape=(count, size, size))
            self.arrays_by_area[area] = (images, masks)
        return self.arrays_by_area[area]

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame `index` as `(image (3, S, S) uint8, mask (S, S) uint8)`, transforms applied
        (with depth: `(4, S, S)`)."""
        area, row = self.rows[index]
        images, masks = self.arrays(area)
        # np.array copies out of the map: the tensors own writable memory.
        if self.with_depth:
            image = depth.RGBDImage(torch.from_numpy(np.array(images[row])))
        else:
            image = tv_tensors.Image(torch.from_numpy(np.array(images[row, :3])))
        mask = torch.from_numpy(np.array(masks[row]))
        if self.transforms is not None:
            image, mask = self.transforms(image, tv_tensors.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)

    def label_mask(self, index: int) -> torch.Tensor:
        """The class ids of frame `index` at the cached size, no transforms: `(S, S)` uint8."""
        area, row = self.rows[index]
        return torch.from_numpy(np.array(self.arrays(area)[1][row]))


def open_dataset(
    root: str | Path,
    areas: list[str] | None = None,
    transforms: T.Transform | None = None,
    skip_bad: bool = False,
    img_size: int | None = None,
    inputs: list[str] | tuple[str, ...] = ("rgb",),
) -> data.StanfordDataset | CachedDataset:
    """A CachedDataset when `root` holds a cache.json, else a data.StanfordDataset (a
    depth.DepthDataset when `inputs` holds "depth").

    `img_size`, when given, is the size the samples will be cropped or resized to; a cache
    of smaller frames is refused rather than silently upsampled. `skip_bad` concerns raw
    PNGs only: every frame of a cache was readable when it was written.
    """
    root = Path(root)
    if (root / CACHE_MANIFEST).is_file():
        dataset = CachedDataset(root, areas, transforms, inputs)
        if img_size is not None and img_size > dataset.size:
            raise DataError(
                f"the cache {root} holds {dataset.size}x{dataset.size} frames, smaller than "
                f"the requested image size {img_size}: lower --img-size or make a cache with "
                f"--size {img_size} or more"
            )
        return dataset
    if any(root.glob(f"area_*/{CACHE_IMAGES}")):
        raise DataError(
            f"{root} is an unfinished cache (it has no {CACHE_MANIFEST}): its "
            "`python -m seglab.cache write` run was interrupted; run it again"
        )
    if depth.uses_depth(inputs):
        return depth.DepthDataset(root, areas, transforms, skip_bad)
    return data.StanfordDataset(root, areas, transforms, skip_bad)


# ----------------------------------------------------------------------------------------
# Writing a cache


class FramesForCache(Dataset):
    """`(index, image, mask, error)` per frame of a StanfordDataset, for the cache writer.

    A broken frame yields empty tensors and the error message instead of raising, so that
    loader workers keep going and the writer decides what to do with it.
    """

    def __init__(self, source: data.StanfordDataset) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor, str]:
        try:
            image, mask = self.source.load(index)
        except DataError as error:
            return index, torch.empty(0), torch.empty(0), str(error)
        return index, image, mask.to(torch.uint8), ""


# The lock file of a cache folder while `cache write` writes it: two runs on one --out
# would each delete the other's files and leave a manifest naming files that are gone.
CACHE_LOCK = ".lock"


@contextlib.contextmanager
def locked_cache_dir(out: Path):
    """Create `out` and hold an exclusive lock on OUT/.lock until the block ends (the system
    releases it when the process dies in any way: seglab/filesystem.py); DataError when
    another process holds it."""
    out.mkdir(parents=True, exist_ok=True)
    lock_path = out / CACHE_LOCK
    with open(lock_path, "a+") as lock:
        if filesystem.try_lock(lock) is False:
            raise DataError(
                f"--out {out} is being written by another `cache write`: wait for it to end, or "
                "choose another --out"
            )
        try:
            yield
        finally:
            # Removed while still held, so that a later run locks a file of its own (Windows
            # refuses to remove an open file: there it stays, and is unlocked).
            with contextlib.suppress(OSError):
                lock_path.unlink()
            with contextlib.suppress(OSError):
                filesystem.unlock(lock)


def check_free_space(out: Path, needed: int) -> None:
    """DataError when the disk of `out` (or of its nearest existing parent: nothing is created
    before this check) has less than `needed` bytes free."""
    existing = out
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise DataError(
            f"the cache needs {needed / 1e9:.1f} GB and {existing} has {free / 1e9:.1f} GB free: "
            "free some space, pick another --out, or a smaller --size"
        )


def write_to(file, payload: bytes) -> None:
    """file.write, whose OSError (a full disk) names the file: Python leaves it unnamed."""
    try:
        file.write(payload)
    except OSError as error:
        raise OSError(error.errno, error.strerror, file.name) from None


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
            known = entry.name in (CACHE_MANIFEST, CACHE_MANIFEST + ".tmp", CACHE_LOCK) or (
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
    with_depth: bool = False,
) -> dict:
    """Decode every frame of `areas` under `root` once, resized to `size` x `size`, into `out`.

    Images are resized with antialiased bilinear and masks with nearest neighbour, exactly as
    `data.eval_transforms(size)`; `with_depth` adds the depth channel of depth.DepthDataset.
    A broken frame stops the run, or with `skip_bad` is left out and listed in the manifest.
    Returns the manifest, which is written last.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    root, out = Path(root).resolve(), Path(out).resolve()
    inputs = ["rgb", "depth"] if with_depth else ["rgb"]
    reader = depth.DepthDataset if with_depth else data.StanfordDataset
    source = reader(root, areas, data.eval_transforms(size))
    check_free_space(out, len(source) * (image_channels(inputs) + 1) * size * size)
    created = not out.exists()
    try:
        with locked_cache_dir(out):
            prepare_cache_dir(out)
            try:
                return write_frames(source, out, size, inputs, root, workers, skip_bad, progress)
            except BaseException as error:  # a full disk, Ctrl-C: no half-written cache
                remove_partial_cache(out)
                if isinstance(error, OSError) and error.filename is None:  # a file's close
                    error.filename = str(out)
                raise
    finally:
        if created and out.is_dir() and not any(out.iterdir()):  # refused or failed
            out.rmdir()


def remove_partial_cache(out: Path) -> None:
    """Delete what an interrupted `cache write` wrote in `out`."""
    with contextlib.suppress(OSError):
        for name in (CACHE_MANIFEST, CACHE_MANIFEST + ".tmp"):
            (out / name).unlink(missing_ok=True)
        for folder in out.glob("area_*"):
            for name in (CACHE_IMAGES, CACHE_MASKS):
                (folder / name).unlink(missing_ok=True)
            folder.rmdir()


def write_frames(
    source, out: Path, size: int, inputs: list[str], root: Path, workers: int,
    skip_bad: bool, progress: bool,
) -> dict:  # fmt: skip
    """write_cache's work in the prepared folder `out`: the frames, then the manifest."""
    from tqdm import tqdm

    names: dict[str, list[str]] = {}
    skipped: list[str] = []
    loader = DataLoader(
        FramesForCache(source),
        batch_size=None,
        num_workers=workers,
        multiprocessing_context=data.worker_context(workers),
    )
    with contextlib.ExitStack() as open_files:
        files: dict[str, tuple] = {}
        for index, image, mask, error in tqdm(
            loader, total=len(source), desc=f"cache {size}px", disable=not progress
        ):
            frame = source.frames[index]
            if error and not skip_bad:
                raise DataError(f"{error} (find every such frame with `python -m seglab.check`)")
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
            write_to(images_file, image.numpy().tobytes())
            write_to(masks_file, mask.numpy().tobytes())
            names[frame.area].append(frame.name)
    manifest = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "size": size,
        "source_root": str(root),
        "labels_sha256": downloads.file_sha256(root / data.LABELS_FILE),
        "num_labels": len(source.label_table) - 1,
        "classes": list(data.CLASSES),
        "inputs": inputs,
        "image_array": f"(N, {image_channels(inputs)}, size, size) uint8 RGB (antialiased "
        "bilinear resize), then depth (depth.py's channel, nearest resize) when inputs has it",
        "mask_array": "(N, size, size) uint8 class ids, nearest resize",
        "skipped": skipped,
        "areas": names,
    }
    # Written to a side file and renamed: the manifest appears complete or not at all.
    temporary = out / (CACHE_MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(temporary, out / CACHE_MANIFEST)
    return manifest


# ----------------------------------------------------------------------------------------
# Command line


def int_at_least(minimum: int):
    """An argparse type: an int of at least `minimum`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def command_write(args: argparse.Namespace) -> int:
    manifest = write_cache(
        args.datadir, args.out, args.size, args.areas, args.workers, args.skip_bad,
        with_depth=args.depth,
    )  # fmt: skip
    num_frames = sum(len(names) for names in manifest["areas"].values())
    gigabytes = num_frames * (image_channels(manifest["inputs"]) + 1) * args.size**2 / 1e9
    print(
        f"wrote {num_frames} frames of areas {', '.join(manifest['areas'])} at "
        f"{args.size}x{args.size} to {args.out} ({gigabytes:.2f} GB)"
    )
    if manifest["skipped"]:
        print(f"left out {len(manifest['skipped'])} unreadable frame(s), listed in cache.json")
    inputs = " --inputs rgb depth" if args.depth else ""
    command = f"python main.py train --datadir {args.out} --img-size {args.size}{inputs}"
    print(f"train on it with: {command}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="decode every frame once, resized, into a cache")
    cli.add_data_arguments(write)
    write.add_argument("--out", required=True, help="cache directory to write (new or a cache)")
    write.add_argument(
        "--size",
        type=cli.int_range(1, cli.MAX_IMG_SIZE),
        default=256,
        help="frame side in px, at most --img-size's limit (default 256)",
    )
    write.add_argument("--workers", type=int_at_least(0), default=0, help="decoding processes")
    write.add_argument(
        "--skip-bad", action="store_true", help="leave unreadable frames out instead of stopping"
    )
    write.add_argument(
        "--depth", action="store_true", help="also store depth (for main.py --inputs rgb depth)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run(command_write, args, (DataError,))


if __name__ == "__main__":
    sys.exit(main())
