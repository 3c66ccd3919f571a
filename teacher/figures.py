"""The figures of LAB.md, made by the project's own code from synthetic data.

    python teacher/figures.py        # docs/lab/{sample,unet,curves,predictions,confusion}.png

One command, a few minutes on 2 CPU cores: it writes a small synthetic data set (the lab's
own, 160 px), draws one frame with its labels (`python -m seglab.explore show`), draws the handout's
UNet with the tensor shapes of a real forward pass, trains the small UNet of Q13 for a few
epochs (`python main.py train`), plots its curves from `metrics.jsonl`, segments test
frames with its best checkpoint, and keeps the confusion matrix of `python main.py test`.
Everything but the pictures goes to a temporary folder (or --work). Teacher side: the
student bundle ships the pictures, not this script.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

# The project's root, whose modules this script draws with.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import data  # noqa: E402
import main  # noqa: E402
import models  # noqa: E402
import utils  # noqa: E402
from seglab import checkpoints, explore, synthetic  # noqa: E402

FIGURES_DIR = Path(__file__).resolve().parents[1] / "docs" / "lab"
DPI = 80  # small files: the pictures ship in every student bundle
# The training of Q13, shortened to a few epochs on the lab's synthetic data.
TRAIN_AREAS, VAL_AREA, TEST_AREA = ["1", "2", "3", "4", "6"], "5a", "5b"
TRAINING_FLAGS = [
    "--model", "unet", "--num-blocks", "3", "--base-chan", "16", "--img-size", "128",
    "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "20", "--workers", "0",
    "--device", "cpu", "--seed", "0",
]  # fmt: skip


def quietly(command: list[str]) -> None:
    """`python main.py COMMAND` in this process, its output hidden; SystemExit if it fails."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = main.main(command)
    if code != 0:
        sys.exit(f"python main.py {' '.join(command)} failed:\n{output.getvalue()[-2000:]}")


def sample_figure(datadir: Path, out: Path) -> None:
    """A frame and its colorized labels with the legend, as `python -m seglab.explore show`
    draws it."""
    with contextlib.redirect_stdout(io.StringIO()):
        code = explore.main(["show", "--datadir", str(datadir), "--areas", "3", "--out", str(out)])
    if code != 0:
        sys.exit("python -m seglab.explore show failed")


def unet_stages(model: nn.Module, size: int) -> tuple[list[tuple], list[tuple], tuple, tuple]:
    """Shapes of a forward pass of `model` on a (1, 3, size, size) batch, on the meta device:
    (encoder features per level, up block outputs per level, bottleneck, logits)."""
    encoder_features, up_outputs = [], []
    hooks = [
        block.register_forward_hook(lambda m, i, o: encoder_features.append(tuple(o[1].shape)))
        for block in model.encoder.blocks
    ]
    hooks += [
        block.register_forward_hook(lambda m, i, o: up_outputs.append(tuple(o.shape)))
        for block in model.decoder.blocks
    ]
    bottleneck = []
    hooks.append(
        model.encoder.register_forward_hook(lambda m, i, o: bottleneck.append(tuple(o[0].shape)))
    )
    logits = model(torch.empty(1, 3, size, size, device="meta"))
    for hook in hooks:
        hook.remove()
    return encoder_features, up_outputs, bottleneck[0], tuple(logits.shape)


def shape_text(shape: tuple) -> str:
    return "(B, " + ", ".join(str(n) for n in shape[1:]) + ")"


def unet_figure(out: Path, size: int = 256) -> None:
    """The default UNet as a U: encoder levels down the left, decoder up the right, the skip
    connections across, each box with the shape of the tensor it outputs."""
    with torch.device("meta"):
        model = models.build_unet(data.NUM_CLASSES)
    features, ups, bottleneck, logits = unet_stages(model, size)
    levels = len(features)
    figure, axes = plt.subplots(figsize=(10, 5.6))
    axes.set_xlim(0, 10)
    axes.set_ylim(-0.6, levels + 1.3)
    axes.axis("off")
    box = {"boxstyle": "round,pad=0.3", "linewidth": 1}

    def draw(x: float, y: float, text: str, color: str) -> None:
        axes.text(x, y, text, ha="center", va="center", fontsize=8.5, bbox={**box, "fc": color})

    def arrow(start: tuple, end: tuple, style: str = "-|>", color: str = "black") -> None:
        axes.annotate("", end, start, arrowprops={"arrowstyle": style, "color": color, "lw": 1})

    top = levels + 0.4
    draw(1.3, top + 0.75, f"input\n{shape_text((1, 3, size, size))}", "white")
    draw(8.7, top + 0.75, f"logits\n{shape_text(logits)}", "white")
    for level, (feature, up) in enumerate(zip(features, reversed(ups), strict=True)):
        y = top - level
        draw(1.3, y, f"conv block {level + 1}\n{shape_text(feature)}", "#cfe2f3")
        draw(8.7, y, f"up block {levels - level}\n{shape_text(up)}", "#d9ead3")
        arrow((2.45, y), (7.55, y), color="#888888")
        axes.text(5, y + 0.12, "skip: concatenate", ha="center", fontsize=7.5, color="#666666")
        if level + 1 < levels:
            arrow((1.3, y - 0.3), (1.3, y - 0.7))
            axes.text(1.45, y - 0.5, "max-pool /2", fontsize=7)
            arrow((8.7, y - 0.7), (8.7, y - 0.3))
            axes.text(8.85, y - 0.5, "upsample x2", fontsize=7)
    bottom = top - levels
    draw(5, bottom, f"last block {shape_text(bottleneck)}\n+ decoder's first block", "#fce5cd")
    arrow((1.3, bottom + 0.7), (3.6, bottom))
    arrow((6.4, bottom), (8.7, bottom + 0.7))
    arrow((1.3, top + 0.4), (1.3, top + 0.3))
    arrow((8.7, top + 0.3), (8.7, top + 0.4))
    axes.set_title(
        f"UNet, 4 blocks, base_chan 64: tensor shapes for a {size} x {size} batch "
        "(Conv 3x3 - ReLU - BatchNorm layers, 1 x 1 conv to the 14 classes)",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(out, dpi=DPI)
    plt.close(figure)


def curves_figure(run_dir: Path, out: Path) -> None:
    """Training loss and validation scores per epoch, from the run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [record["epoch"] for record in records]
    figure, (loss_axes, score_axes) = plt.subplots(1, 2, figsize=(9, 3.4))
    loss_axes.plot(epochs, [record["train_loss"] for record in records], marker="o")
    loss_axes.set(xlabel="epoch", ylabel="training loss (cross-entropy)", title="train/loss")
    for name in ("pixel_accuracy", "mean_accuracy", "miou"):
        score_axes.plot(epochs, [record["val"][name] for record in records], marker="o", label=name)
    score_axes.set(xlabel="epoch", ylabel="validation score", ylim=(0, 1), title="val (area 5a)")
    score_axes.legend(fontsize=8)
    for axes in (loss_axes, score_axes):
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=DPI)
    plt.close(figure)


def predictions_figure(run_dir: Path, datadir: Path, out: Path, count: int = 3) -> None:
    """Test frames: input | ground truth | prediction of the run's best checkpoint."""
    checkpoint = checkpoints.load_checkpoint(run_dir / "best.pt")
    model = checkpoints.model_from_checkpoint(checkpoint, run_dir / "best.pt").eval()
    segmenter = models.Segmenter(model, checkpoint["img_size"])
    dataset = data.StanfordDataset(datadir, [TEST_AREA])
    step = max(1, len(dataset) // count)
    figure, axes = plt.subplots(count, 3, figsize=(7.5, 2.5 * count))
    for row, index in enumerate(range(0, step * count, step)):
        image, truth = dataset[index]
        with torch.no_grad():
            prediction = main.predict_image(segmenter, image, "cpu")
        pictures = [image, utils.colorize(truth), utils.colorize(prediction)]
        for column, (picture, title) in enumerate(
            zip(pictures, ["input", "ground truth", "prediction"], strict=True)
        ):
            axes[row, column].imshow(picture.permute(1, 2, 0).numpy())
            axes[row, column].axis("off")
            if row == 0:
                axes[row, column].set_title(title)
    figure.legend(handles=utils.legend_handles(), loc="center right", fontsize=8)
    figure.subplots_adjust(left=0.01, right=0.8, top=0.94, bottom=0.01, wspace=0.03, hspace=0.03)
    figure.savefig(out, dpi=DPI)
    plt.close(figure)


def shrink(path: Path) -> None:
    """Rewrite a PNG with a palette of at most 256 colors, a third of the size or less, in
    which the class colors of data.CLASS_COLORS stay exact (the legends, the masks).

    A plot has fewer colors than that and keeps them all. A photo gets an adaptive palette
    for its other colors, plus the class colors as entries of their own: a pixel of a class
    color maps to its own entry, never to a blend that median cut would put in its place.
    """
    from PIL import Image

    with Image.open(path) as picture:
        rgb = picture.convert("RGB")
    if rgb.getcolors(maxcolors=256) is None:
        others = 256 - len(data.CLASS_COLORS)
        adaptive = rgb.quantize(colors=others, method=Image.Quantize.MEDIANCUT)
        # Entries others, others + 1, ...: the class colors, given to their pixels by hand
        # (PIL's own lookup of a fixed palette is approximate).
        indices = np.array(adaptive)
        pixels = np.asarray(rgb)
        class_colors = []
        for entry, color in enumerate(data.CLASS_COLORS.values(), start=others):
            indices[(pixels == np.array(color, dtype=np.uint8)).all(axis=-1)] = entry
            class_colors += color
        reduced = Image.fromarray(indices, mode="P")
        reduced.putpalette(adaptive.getpalette()[: 3 * others] + class_colors)
    else:
        reduced = rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    reduced.save(path, optimize=True)


def make_figures(work: Path, epochs: int) -> None:
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    datadir = work / "data"
    print("writing the synthetic data set")
    areas = [*TRAIN_AREAS, VAL_AREA, TEST_AREA]
    synthetic.generate(datadir, areas, images_per_area=40, size=160, seed=0, progress=False)
    sample_figure(datadir, FIGURES_DIR / "sample.png")
    unet_figure(FIGURES_DIR / "unet.png")
    print(f"training the small UNet for {epochs} epochs")
    quietly(
        ["train", "--datadir", str(datadir), "--areas", *TRAIN_AREAS, "--val-areas", VAL_AREA,
         *TRAINING_FLAGS, "--epochs", str(epochs), "--logdir", str(work / "runs"),
         "--name", "figures"]
    )  # fmt: skip
    run_dir = work / "runs" / "figures"
    curves_figure(run_dir, FIGURES_DIR / "curves.png")
    predictions_figure(run_dir, datadir, FIGURES_DIR / "predictions.png")
    print("testing on area 5b")
    quietly(
        ["test", "--model", str(run_dir / "best.pt"), "--datadir", str(datadir),
         "--areas", TEST_AREA, "--out", str(work / "test"), "--workers", "0", "--device", "cpu"]
    )  # fmt: skip
    shutil.copy(work / "test" / "confusion_matrix.png", FIGURES_DIR / "confusion.png")
    test_miou = json.loads((work / "test" / "metrics.json").read_text())["miou"]
    print(f"test mIoU of the figures' run: {test_miou:.4f}")
    for path in sorted(FIGURES_DIR.glob("*.png")):
        shrink(path)
        size = path.stat().st_size // 1024
        print(f"wrote {path.relative_to(FIGURES_DIR.parents[1])} ({size} KB)")


def main_figures(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs of the training run")
    parser.add_argument("--work", help="folder for the data and the run (default: temporary)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.work:
        make_figures(Path(args.work), args.epochs)
    else:
        with tempfile.TemporaryDirectory() as work:
            make_figures(Path(work), args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main_figures())
