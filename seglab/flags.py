"""The command line of main.py: its commands and every flag, with their help and checks.

Each flag's type (in seglab/cli.py) refuses a value that cannot work where it is parsed, so
a mistake ends with one `error:` line before anything runs or is written.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

import data
import losses
import models
from seglab import cli, depth, devices

# Where a command runs: auto picks an NVIDIA GPU (cuda), else Apple's GPU (mps), else the CPU.
DEVICES = ("auto", "cpu", "cuda", "mps")


def build_parser(
    run_command: dict[str, Callable[[argparse.Namespace], int]], description: str
) -> argparse.ArgumentParser:
    """The parser of main.py; `run_command` maps each command to the function that runs it."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = cli.HelpFormatter
    unet = models.default_options("unet")
    environment = f"${data.DATADIR_VARIABLE}"

    train_parser = commands.add_parser("train", help="train a model", formatter_class=defaults)
    train_parser.set_defaults(func=run_command["train"])
    add = train_parser.add_argument
    add(
        "--datadir",
        default=None,
        help=f"2D-3D-S root or cache folder (default: {environment}, else the resumed run's, "
        f"else {data.DEFAULT_DATADIR})",
    )
    areas_or_fold = train_parser.add_mutually_exclusive_group()
    areas_or_fold.add_argument(
        "--areas", nargs="+", default=None, help="training areas (default: fold 1's, 1 2 3 4 6)"
    )
    areas_or_fold.add_argument(
        "--fold",
        type=int,
        choices=sorted(data.FOLDS),
        default=None,
        help="the data set's fold: train on its training areas; test defaults to its test areas",
    )
    add(
        "--val-areas",
        nargs="+",
        default=None,
        help="validation areas; without them whole rooms of the training areas are held out",
    )
    add(
        "--val-fraction",
        type=cli.float_range(0.0, 1.0, include_minimum=False),
        default=0.2,
        help="share of rooms held out (no --val-areas)",
    )
    add("--model", default="unet", choices=models.available_models(), help="architecture")
    add(
        "--inputs",
        nargs="+",
        choices=depth.INPUTS,
        action=cli.InputsAction,
        default=["rgb"],
        help="what the model sees: rgb, or rgb depth (the data set's depth images, see "
        "seglab/depth.py)",
    )
    add(
        "--num-blocks",
        type=cli.int_range(1, cli.MAX_UNET_BLOCKS),
        help=f"UNet: encoder blocks (default {unet['num_blocks']})",
    )
    add(
        "--base-chan",
        type=cli.int_range(1, cli.MAX_BASE_CHANNELS),
        help=f"UNet: channels of the first block (default {unet['base_chan']})",
    )
    add(
        "--pretrained",
        default=None,
        choices=("none", "imagenet", "coco"),
        help="torchvision models: start from ImageNet backbone weights or from COCO segmentation "
        "weights (downloaded once by torchvision)",
    )
    add("--loss", default="ce", choices=losses.available_losses, help="training loss")
    add(
        "--weight-method",
        default="inverse_sqrt",
        choices=losses.available_weight_methods,
        help="wce: how class weights follow from the pixel shares",
    )
    add(
        "--class-weights",
        type=cli.pixel_shares_file(data.NUM_CLASSES),
        default=None,
        help="wce: pixel shares from `python -m seglab.explore histogram --out`",
    )
    add("--epochs", type=cli.int_range(1), default=30, help="passes over the training set")
    add("--batch-size", type=cli.int_range(1), default=8, help="frames per step (per process)")
    add(
        "--lr",
        type=cli.float_range(0.0, include_minimum=False),
        default=1e-3,
        help="AdamW learning rate",
    )
    add("--weight-decay", type=cli.float_range(0.0), default=1e-4, help="AdamW weight decay")
    add("--schedule", default="poly", choices=("poly", "cosine"), help="learning rate decay")
    add("--warmup-steps", type=cli.int_range(0), default=100, help="linear warmup steps")
    add(
        "--clip-grad",
        type=cli.float_range(0.0),
        default=1.0,
        help="max gradient norm (0: no clipping)",
    )
    add(
        "--img-size",
        type=cli.int_range(cli.MIN_IMG_SIZE, cli.MAX_IMG_SIZE),
        default=256,
        help="training crops are IMG_SIZE x IMG_SIZE",
    )
    add(
        "--jitter",
        type=cli.jitter_strength,
        default=0.2,
        help="color jitter: brightness, contrast and saturation vary by up to this (0: off)",
    )
    add(
        "--subset",
        type=cli.int_range(1),
        default=None,
        help="use only N frames (spread over the data)",
    )
    add(
        "--workers",
        type=cli.int_range(0, cli.MAX_WORKERS),
        default=None,
        help="data loading processes (default: 2, or the resumed run's); the batches and "
        "their augmentations do not depend on it",
    )
    add("--logdir", default="runs", help="where runs are written")
    add("--name", type=cli.folder_name, default=None, help="run name (default: model and time)")
    add(
        "--resume",
        default=None,
        metavar="LAST_PT|auto",
        help="continue the run of this last.pt (its own configuration); auto: continue "
        "LOGDIR/NAME/last.pt if it exists, else start it (the same command relaunched "
        "continues)",
    )
    add("--seed", type=cli.int_range(0, cli.MAX_SEED), default=0, help="random seed")
    add("--device", default="auto", choices=DEVICES, help="where to train")
    add(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mixed precision (default: on for CUDA, off on CPU and MPS)",
    )
    add(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format (default: on for CUDA)",
    )
    add(
        "--amp-dtype",
        default=None,
        choices=("float16", "bfloat16"),
        help="with --amp: float16 (with loss scaling) or bfloat16 (default: float16 on CUDA, "
        "bfloat16 on CPU, on MPS float16 where loss scaling runs there)",
    )
    add(
        "--stop-after",
        type=cli.int_range(1),
        default=None,
        metavar="EPOCHS",
        help="end this invocation after EPOCHS epochs of training (e.g. a cluster time "
        "limit); continue later with --resume",
    )
    add(
        "--checkpoint-minutes",
        type=cli.float_range(0),
        default=0.0,
        metavar="MINUTES",
        help="also save last.pt in the middle of an epoch this often (0: only at the end of "
        "each epoch and on SIGTERM/SIGUSR1), to bound what a crash can cost",
    )
    add(
        "--log-every",
        type=cli.int_range(1),
        default=10,
        metavar="STEPS",
        help="read the loss, log it and check the weights every STEPS steps: the only "
        "times the training step waits for the GPU",
    )
    add(
        "--sync-bn",
        action="store_true",
        help="under torchrun on GPUs: batch norm statistics over all processes' frames",
    )
    add(
        "--compile",
        action="store_true",
        help="torch.compile the model for training (a compilation of about a minute first)",
    )
    add("--skip-bad", action="store_true", help="skip unreadable frames instead of stopping")
    add(
        "--max-bad-steps",
        type=cli.int_range(1),
        default=20,
        help="stop after this many steps in a row with non-finite gradients",
    )

    test_parser = commands.add_parser(
        "test", help="evaluate a checkpoint", formatter_class=defaults
    )
    test_parser.set_defaults(func=run_command["test"])
    add = test_parser.add_argument
    add("--model", required=True, help="checkpoint (best.pt or last.pt), path or URL")
    add(
        "--datadir",
        default=None,
        help=f"2D-3D-S root or cache folder (default: {environment}, else the one the model "
        f"trained on, else {data.DEFAULT_DATADIR})",
    )
    add("--areas", nargs="+", default=None, help="areas to test (default: those not trained on)")
    add(
        "--out",
        default=None,
        help="output folder (default: test-AREAS beside the model)",
    )
    add(
        "--save-predictions",
        action="store_true",
        help="also write the predicted class ids (palette PNGs)",
    )
    add(
        "--at-train-size",
        action="store_true",
        help="score at the training size instead of the labels' full resolution",
    )
    add("--batch-size", type=cli.int_range(1), default=4, help="frames per batch")
    add("--subset", type=cli.int_range(1), default=None, help="use only N frames")
    add(
        "--workers",
        type=cli.int_range(0, cli.MAX_WORKERS),
        default=2,
        help="data loading processes",
    )
    add("--device", default="auto", choices=DEVICES, help="where to run")

    predict_parser = commands.add_parser("predict", help="segment images", formatter_class=defaults)
    predict_parser.set_defaults(func=run_command["predict"])
    add = predict_parser.add_argument
    add("images", nargs="+", help="image files or folders (PNG, JPEG, any size)")
    add("--model", required=True, help="checkpoint (.pt) or ONNX file (.onnx), path or URL")
    add(
        "--depth",
        nargs="+",
        type=cli.existing_file,
        default=None,
        metavar="FILE",
        help="models trained with depth: the depth PNG of each image, in the same order "
        "(default: found by name in a 2D-3D-S tree)",
    )
    add("--out", default="predictions", help="output folder")
    add("--device", default="auto", choices=DEVICES, help="where to run")

    export_parser = commands.add_parser(
        "export", help="write a model for programs without this project", formatter_class=defaults
    )
    export_parser.set_defaults(func=run_command["export"])
    add = export_parser.add_argument
    add("--model", required=True, help="checkpoint (best.pt or last.pt), path or URL")
    add("--out", required=True, help="model.onnx (ONNX) or model.pt2 (torch.export program)")
    return parser


def train_parser_of(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `train` subcommand's parser."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["train"]


def check_train_flags(
    model: str, num_blocks: int | None, base_chan: int | None, loss: str, class_weights
) -> None:
    """Refuse flags of `train` that cannot work together: FlagError says which."""
    if class_weights is not None and loss != "wce":
        raise cli.FlagError(
            f"--class-weights is used by --loss wce only, not by --loss {loss}: "
            "add --loss wce or leave --class-weights out"
        )
    if model == "unet":
        check_unet_size(num_blocks, base_chan)


def check_unet_size(num_blocks: int | None, base_chan: int | None) -> None:
    """Refuse a UNet of more than cli.MAX_UNET_PARAMETERS (counted without allocating them),
    which would exhaust the memory before the first step."""
    options = models.default_options("unet")
    options.update({k: v for k, v in (("num_blocks", num_blocks), ("base_chan", base_chan)) if v})
    try:
        with torch.device("meta"):  # shapes only, no memory
            model = models.build_unet(1, **options)
    except NotImplementedError:
        return  # the students' UNet is not written yet: the run names the question
    count = sum(parameter.numel() for parameter in model.parameters())
    if count > cli.MAX_UNET_PARAMETERS:
        raise cli.FlagError(
            f"--num-blocks {options['num_blocks']} with --base-chan {options['base_chan']} "
            f"makes a UNet of {count / 1e6:,.0f} M parameters, more than the "
            f"{cli.MAX_UNET_PARAMETERS / 1e6:,.0f} M that fit in memory: lower one of them"
        )


def model_options(args: argparse.Namespace) -> dict:
    """The command-line values of the options that model `args.model` has (its builder's
    keyword arguments in models.py, e.g. num_blocks and base_chan for the UNet)."""
    names = models.default_options(args.model)
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The flags of main.py's command line `argv`, checked; for `train`, also the flags the
    command line sets (`args.given`, which a resumed run checks) and the run's name."""
    args = parser.parse_args(argv)
    if args.command == "train" and args.resume is None:  # a resumed run has its own flags
        try:
            check_train_flags(
                args.model, args.num_blocks, args.base_chan, args.loss, args.class_weights
            )
        except cli.FlagError as error:
            parser.error(str(error))  # exit status 2, like any flag argparse refuses
    if args.command == "train":
        # What the command line sets, apart from the defaults: a resumed run checks it.
        args.given = cli.given_options(train_parser_of(parser), argv[1:]) - {"func"}
        if args.name is None and args.resume != "auto":
            args.name = f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def settle_train_defaults(args: argparse.Namespace) -> torch.device:
    """Fill in the flags whose default depends on the machine or the fold, in `args`; return
    the device to train on."""
    args.datadir = args.datadir or data.default_datadir()
    args.areas = args.areas or list(data.FOLDS[args.fold or 1][0])  # fold 1 by default
    args.workers = 2 if args.workers is None else args.workers
    device = devices.pick_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    args.amp, args.amp_dtype = devices.precision(device, args.amp, args.amp_dtype)
    args.channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    return device
