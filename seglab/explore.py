"""Look at a data set, raw or cached: one frame with its labels, or the share of each class.

    python -m seglab.explore show --datadir ROOT --areas 3 --index 0 --out sample.png
    python -m seglab.explore histogram --datadir ROOT --areas 1 2 3 4 6 --out hist.json

`--datadir` is a 2D-3D-S root or a cache of `python -m seglab.cache write`. The histogram's
JSON file is what `main.py train --loss wce --class-weights FILE` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import data
from data import CLASS_COLORS, CLASSES, DataError
from seglab import cache, cli


def command_histogram(datadir: str, areas: list[str] | None, out: str | None, open_dataset) -> None:
    dataset = open_dataset(datadir, areas, None, False)
    counts = data.class_histogram(dataset)
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
    if out:
        text = json.dumps(result, indent=2) + "\n"
        write_whole(Path(out), lambda temporary: temporary.write_text(text))
        print(f"wrote {out}")


def command_show(datadir: str, areas: list[str] | None, index: int, out: str, open_dataset) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    dataset = open_dataset(datadir, areas, None, False)
    if not 0 <= index < len(dataset):
        raise DataError(f"--index {index} is out of range: {len(dataset)} frames")
    image, mask = dataset[index]
    frame = dataset.frames[index]
    present = [CLASSES[i] for i in torch.unique(mask).tolist()]
    print(f"frame   {frame.name} (area {frame.area}, room {frame.room})")
    print(f"image   shape {tuple(image.shape)} dtype {image.dtype}")
    print(f"mask    shape {tuple(mask.shape)} dtype {mask.dtype}")
    print(f"classes {', '.join(present)}")
    figure, axes = plt.subplots(1, 2, figsize=(11, 5))
    axes[0].imshow(image.permute(1, 2, 0).numpy())
    axes[0].set_title(f"area {frame.area}, {frame.room}")
    palette = torch.tensor(list(CLASS_COLORS.values()), dtype=torch.uint8)
    axes[1].imshow(palette[mask.long()].numpy())  # (H, W, 3): each class id becomes its color
    axes[1].set_title("labels")
    for axis in axes:
        axis.axis("off")
    legend = [Patch(color=[c / 255 for c in rgb], label=name) for name, rgb in CLASS_COLORS.items()]
    figure.legend(handles=legend, loc="center right", fontsize=8)
    figure.subplots_adjust(right=0.85)
    picture_format = Path(out).suffix.lstrip(".").lower()
    write_whole(
        Path(out), lambda temporary: figure.savefig(temporary, dpi=100, format=picture_format)
    )
    plt.close(figure)
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=cli.HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="plot one frame, its colorized labels and legend")
    cli.add_data_arguments(show)
    show.add_argument("--index", type=int, default=0, help="frame index in the listed areas")
    show.add_argument("--out", default="sample.png", help="picture to write")
    histogram = commands.add_parser("histogram", help="pixel share of each class")
    cli.add_data_arguments(histogram)
    histogram.add_argument("--out", default=None, help="also write the numbers as JSON")
    return parser


def write_whole(out: Path, write) -> None:
    """`write(temporary)` beside `out`, then renamed over it: a full disk or a folder that
    cannot be written leaves no half-written `out`, and an earlier `out` whole. An OSError
    names `out` (cli.run prints it in one line)."""
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, out)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(out)) from None
    finally:
        temporary.unlink(missing_ok=True)


def picture_formats() -> list[str]:
    """The file extensions that matplotlib writes (png, pdf, svg, jpg...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return sorted(FigureCanvasAgg(Figure()).get_supported_filetypes())


def check_output_file(out: str | Path, picture: bool = False) -> None:
    """DataError unless `out` can be written as a new or replaced file: its folder exists,
    it is not a folder itself, and with `picture` its extension is a picture format."""
    out = Path(out)
    if picture and out.suffix.lstrip(".").lower() not in picture_formats():
        raise DataError(
            f"--out {out}: {out.suffix or 'no extension'} is not a picture format; end the name "
            f"in one of {', '.join('.' + name for name in picture_formats())}"
        )
    if out.is_dir():
        raise DataError(f"--out {out} is a folder: name a file")
    if out.parent.exists() and not out.parent.is_dir():
        raise DataError(f"--out {out}: {out.parent} is a file, not a folder")
    if not out.parent.is_dir():
        raise DataError(f"--out {out}: the folder {out.parent} does not exist; create it first")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run(run_command, args, (DataError,))


def run_command(args: argparse.Namespace) -> int:
    if args.out is not None:
        check_output_file(args.out, picture=args.command == "show")
    if args.command == "show":
        command_show(args.datadir, args.areas, args.index, args.out, cache.open_dataset)
    else:
        command_histogram(args.datadir, args.areas, args.out, cache.open_dataset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
