"""Check every file of a Stanford 2D-3D-S tree before a long run: one line per problem.

    python -m seglab.check --datadir ROOT [--areas 1 2]

A problem is a PNG that does not decode whole (damaged, cut short, not a PNG, too large), a
file that is not a regular file (a FIFO would block the reading), a semantic PNG that is not
8-bit RGB (a grayscale or palette copy has lost its labels), an rgb file without its semantic
file or the reverse, an rgb / semantic pair of different sizes, a depth file that is not a
16-bit grayscale PNG of its frame's size (with --depth, also a missing one), or an area
without a single labelled pixel. An empty or malformed label list is an error.
The exit status is 0 when nothing was found, 1 otherwise. Each PNG is decoded completely
with Pillow, which raises on a broken compressed stream that passes the checksums, where
torchvision's decoder would crash the process.

Also the checks training makes of its data set: a labelled pixel somewhere, and the frames
left out with --skip-bad.
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

import data
from data import DataError, Frame
from seglab import cli, devices


def decoded_png(path: Path, labels: bool = False) -> np.ndarray:
    """The pixels of a PNG, `(H, W)` or `(H, W, C)` uint8, after decoding all of it with
    Pillow; with `labels`, of a semantic PNG, which must be 8-bit RGB."""
    from PIL import Image

    raw = data.read_png_bytes(path, labels)
    try:
        with warnings.catch_warnings():
            # Past Pillow's decompression-bomb limit it warns, past twice the limit it
            # raises: either way a frame that size is refused here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as image:
                return np.asarray(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(f"cannot read {path}: too large ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read {path}: {error}") from None


def check_frame(
    frame: Frame, label_table: torch.Tensor, need_depth: bool = False
) -> tuple[str | None, bool]:
    """Why one frame cannot be used (unreadable file, sizes differ, a depth file that is not
    a 16-bit grayscale PNG, or none with `need_depth`), or None when it is fine; and whether
    it has a labelled pixel."""
    try:
        image = decoded_png(frame.rgb_path)
        semantic = decoded_png(frame.semantic_path, labels=True)
        depth_problem = check_depth(frame, image.shape[:2], need_depth)
    except DataError as error:
        return str(error), False
    if image.shape[:2] != semantic.shape[:2]:
        return data.size_mismatch(frame, image.shape[:2], semantic.shape[:2]), False
    if depth_problem:
        return depth_problem, False
    colors = torch.from_numpy(np.array(semantic[..., :3])).permute(2, 0, 1)  # a writable copy
    return None, bool(data.decode_semantic(colors, label_table).any())


def check_depth(frame: Frame, size: tuple[int, ...], need_depth: bool) -> str | None:
    """What is wrong with the depth file of `frame` when there is one (as `train --inputs
    rgb depth` reads it), or its absence with `need_depth`; DataError for an unreadable one."""
    from seglab import depth

    if not frame.depth_path.exists():
        return f"{frame.depth_path} is missing" if need_depth else None
    values = depth.read_depth(frame.depth_path)
    if tuple(values.shape[1:]) != tuple(size):
        return f"{frame.depth_path} is {tuple(values.shape[1:])} but its rgb file is {tuple(size)}"
    return None


def missing_rgb_files(root: Path, areas: list[str] | None) -> list[Path]:
    """The rgb files that the semantic files of the given areas lack."""
    missing = []
    for area in data.resolve_areas(root, areas):
        semantic_folder = data.frame_folder(root, area, "semantic")
        for semantic_path in sorted(semantic_folder.glob(f"*{data.SEMANTIC_SUFFIX}")):
            frame = Frame.at(root, area, semantic_path.name.removesuffix(data.SEMANTIC_SUFFIX))
            if not frame.rgb_path.is_file():
                missing.append(frame.rgb_path)
    return missing


def find_problems(
    root: Path, areas: list[str] | None, progress: bool = True, need_depth: bool = False
) -> tuple[int, list[str]]:
    """The number of frames checked, and one message per problem under `root`: missing
    partners first, then broken frames (`need_depth`: a frame without depth is one)."""
    from tqdm import tqdm

    frames, unlabelled = data.find_frames(root, areas)  # first: it names a missing root
    label_table = data.load_label_table(root / data.LABELS_FILE)
    problems = [f"{frame.semantic_path} is missing" for frame in unlabelled]
    problems += [f"{path} is missing" for path in missing_rgb_files(root, areas)]
    readable: dict[str, int] = {}  # area -> frames read whole
    labelled: set[str] = set()  # areas with a labelled pixel
    for frame in tqdm(frames, desc="check", disable=not progress):
        problem, has_labels = check_frame(frame, label_table, need_depth)
        if problem:
            problems.append(problem)
        else:
            readable[frame.area] = readable.get(frame.area, 0) + 1
        if has_labels:
            labelled.add(frame.area)
    for area, count in readable.items():
        if area not in labelled:
            problems.append(
                f"area {area}: no labelled pixel in its {count} readable frames (every pixel "
                f"decodes to <UNK> with {root / data.LABELS_FILE})"
            )
    return len(frames), problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=cli.HelpFormatter
    )
    cli.add_data_arguments(parser)
    parser.add_argument(
        "--depth",
        action="store_true",
        help="every frame needs its depth file, as for train --inputs rgb depth (without "
        "it, the depth files present are checked)",
    )
    args = parser.parse_args(argv)
    return cli.run(report_problems, args, (DataError,))


def report_problems(args: argparse.Namespace) -> int:
    """Print every problem found under `args.datadir`; exit status 1 when there is one."""
    num_frames, problems = find_problems(Path(args.datadir), args.areas, need_depth=args.depth)
    for problem in problems:
        print(problem)
    print(f"checked {num_frames} frames: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())


def report_skipped_frames(*subsets) -> None:
    """List the files of the frames left out so far (--skip-bad), each once: without
    --val-areas the training and validation sets share their files. A cache has none."""
    bad = dict.fromkeys(
        path
        for subset in subsets
        if isinstance(subset.dataset, data.StanfordDataset)
        for path in subset.dataset.bad_paths()
    )
    if bad and devices.is_main_process():
        print(f"skipped {len(bad)} frame(s) with an unreadable or missing file so far:")
        for path in bad:
            print(f"  {path}")


def require_labelled_pixels(
    dataset: torch.utils.data.Dataset, indices: list[int], what: str
) -> None:
    """DataError unless some frame `indices` of `dataset` has a labelled (not <UNK>) pixel.

    Stops at the first such frame, so a usable data set costs one frame; a set without any
    label would train to a loss of 0 and score nothing.
    """
    unreadable = []
    for index in indices:
        try:
            if dataset.label_mask(index).any():
                return
        except DataError as error:
            unreadable.append(error)  # the loader names it, or skips it with --skip-bad
    if unreadable:
        raise unreadable[0]
    raise DataError(
        f"the {len(indices)} {what} frames have no labelled pixel: every pixel decodes to "
        f"<UNK>; check the label list {data.LABELS_FILE} and the semantic PNGs with "
        "`python -m seglab.check`"
    )
