"""Check every file of a Stanford 2D-3D-S tree before a long run: one line per problem.

    python check.py --datadir ROOT [--areas 1 2]

A problem is a PNG that does not decode whole (damaged, cut short, not a PNG), an rgb file
without its semantic file or the reverse, or an rgb / semantic pair of different sizes.
The exit status is 0 when nothing was found, 1 otherwise. Each PNG is decoded completely
with Pillow, which raises on a broken compressed stream that passes the checksums, where
torchvision's decoder would crash the process.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import data
from data import DataError, Frame


def checked_png_size(path: Path) -> tuple[int, int]:
    """(height, width) of a PNG after decoding all of it with Pillow."""
    from PIL import Image

    raw = data.read_png_bytes(path)
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
        return data.size_mismatch(frame, image_size, semantic_size)
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
    root: Path, areas: list[str] | None, progress: bool = True
) -> tuple[int, list[str]]:
    """The number of frames checked, and one message per problem under `root`: missing
    partners first, then broken frames."""
    from tqdm import tqdm

    frames, unlabelled = data.find_frames(root, areas)  # first: it names a missing root
    data.load_label_table(root / data.LABELS_FILE)
    problems = [f"{frame.semantic_path} is missing" for frame in unlabelled]
    problems += [f"{path} is missing" for path in missing_rgb_files(root, areas)]
    for frame in tqdm(frames, desc="check", disable=not progress):
        problem = check_frame(frame)
        if problem:
            problems.append(problem)
    return len(frames), problems


@data.stops_at_unanswered_questions
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data.add_data_arguments(parser)
    args = parser.parse_args(argv)
    root = Path(args.datadir)
    try:
        num_frames, problems = find_problems(root, args.areas)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem)
    print(f"checked {num_frames} frames: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
