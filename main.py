"""Train, test and run semantic segmentation models on Stanford 2D-3D-S.

    python main.py train --datadir D --areas 1 2 3 4 6 --val-areas 5a
    python main.py test --model runs/NAME/best.pt --areas 5b
    python main.py predict --model runs/NAME/best.pt photo.jpg --out predictions
    python main.py export --model runs/NAME/best.pt --out model.onnx
    torchrun --nproc_per_node 4 main.py train ...        (one process per GPU)

One plain loop: the same code runs on a CUDA GPU (mixed precision, channels_last, pinned
memory) and on a CPU. `python main.py COMMAND --help` explains every flag. The machinery
lives in modules of its own: devices.py (GPU, torchrun, precision), checkpoints.py (saving,
loading, downloading), cache.py (pre-decoded data sets), export.py (ONNX and torch.export),
cli.py (errors as one line).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import cache
import checkpoints
import cli
import data
import depth
import devices
import export
import losses
import metrics
import models
import utils
from checkpoints import CheckpointError

NUM_PREVIEW_IMAGES = 4  # validation frames shown in TensorBoard every epoch


class TrainingStopped(Exception):
    """Training gave up (too many NaN losses); the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------
# Training


@dataclass
class Run:
    """What training changes step after step, and what a checkpoint saves of it."""

    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    step: int = 0  # optimizer steps taken: the x-axis of every TensorBoard curve
    bad_steps_in_a_row: int = 0  # non-finite losses since the last good step


@dataclass(frozen=True)
class StepOptions:
    """How each training step runs, from the command line."""

    amp: bool  # mixed precision in the forward pass
    channels_last: bool  # memory format of the images
    jitter: float  # strength of data.jitter_colors (0: off)
    clip_grad: float  # max gradient norm (0: no clipping)
    max_bad_steps: int  # non-finite losses in a row before giving up


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step`: a linear warmup, then
    a poly (power 0.9) or cosine decay towards 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return (1.0 - progress) ** 0.9


def network_input(images: torch.Tensor, jitter: float = 0.0) -> torch.Tensor:
    """A batch of the loader, on the device, as the network takes it: `(B, 3, H, W)` uint8
    RGB -> color-jittered (by `jitter`, 0 for none) and normalized float32.

    A model trained with depth gets `(B, 4, H, W)`: the fourth channel is not a color and
    skips the jitter; depth.py says what the network sees of it.
    """
    rgb = data.normalize(data.jitter_colors(images[:, :3], jitter))
    if images.shape[1] == 3:
        return rgb
    return torch.cat([rgb, depth.depth_features(images[:, 3:])], dim=1)


def train_one_epoch(
    run: Run,
    train_model: nn.Module,
    loader,
    device: torch.device,
    options: StepOptions,
    description: str,
    writer,
) -> float:
    """One pass over the training set; returns the mean loss of the steps taken.

    `train_model` is `run.model`, wrapped in DistributedDataParallel under torchrun.
    """
    train_model.train()
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    total_loss, good_steps, skipped = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=description, disable=not devices.is_main_process())
    for images, targets in bar:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True).long()  # uint8 in the loader
        images = network_input(images, options.jitter).contiguous(memory_format=memory_format)

        with devices.autocast(device, enabled=options.amp):
            logits = train_model(images)
        loss = run.loss_fn(logits, targets)  # the losses compute in float32
        if not loss_is_finite(loss, run, options.max_bad_steps):
            skipped += 1
            continue

        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if options.clip_grad > 0:
            run.scaler.unscale_(run.optimizer)
            nn.utils.clip_grad_norm_(train_model.parameters(), options.clip_grad)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        run.step += 1

        loss_value = loss.item()
        total_loss += loss_value
        good_steps += 1
        frames_per_second = good_steps * len(images) / (time.perf_counter() - start)
        lr = run.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", fps=f"{frames_per_second:.1f}")
        if writer is not None:
            writer.add_scalar("train/loss", loss_value, run.step)
            writer.add_scalar("train/lr", lr, run.step)
    if skipped:
        print(f"{description}: skipped {skipped} steps with a non-finite loss")
    return total_loss / good_steps if good_steps else math.nan


def loss_is_finite(loss: torch.Tensor, run: Run, max_bad_steps: int) -> bool:
    """False for a NaN or inf loss (fp16 overflow, a bad batch), which must not reach the
    weights; TrainingStopped after `max_bad_steps` of them in a row."""
    finite = torch.isfinite(loss).to(torch.float32)
    # Under DDP every process has to take the same decision, or the gradient sync hangs.
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() == 1:
        run.bad_steps_in_a_row = 0
        return True
    run.optimizer.zero_grad(set_to_none=True)
    run.bad_steps_in_a_row += 1
    tqdm.write(f"warning: non-finite loss at step {run.step}, step skipped")
    if run.bad_steps_in_a_row >= max_bad_steps:
        raise TrainingStopped(
            f"{run.bad_steps_in_a_row} non-finite losses in a row (--max-bad-steps "
            f"{max_bad_steps}): training stopped, the last good checkpoint is kept. "
            "Lower --lr, or try --no-amp."
        )
    return False


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
    full_resolution: bool = False,
    on_batch=None,
) -> metrics.ConfusionMatrix:
    """Confusion matrix of `model` over `loader`, summed over processes under DDP.

    With `full_resolution`, the masks are larger than the images and the logits are
    upsampled to the mask size before the argmax. `on_batch(images, targets, predictions,
    *rest)` sees every batch on the device (uint8 images, int64 class ids), with whatever
    the loader yields after images and targets.
    """
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    confusion = metrics.ConfusionMatrix(data.NUM_CLASSES, data.IGNORE_INDEX)
    for images, targets, *rest in tqdm(
        loader, desc="evaluate", disable=not devices.is_main_process()
    ):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True).long()  # uint8 in the loader
        inputs = network_input(images).contiguous(memory_format=memory_format)
        with devices.autocast(device, enabled=amp):
            logits = model(inputs)
        if full_resolution and logits.shape[-2:] != targets.shape[-2:]:
            logits = F.interpolate(
                logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False
            )
        predictions = logits.argmax(dim=1)
        confusion.update(predictions, targets)
        if on_batch is not None:
            on_batch(images, targets, predictions, *rest)
    confusion.all_reduce()
    return confusion


def train(args: argparse.Namespace) -> int:
    """The `train` command: build the run (data, model, loss, optimizer), then train and
    validate epoch by epoch, saving last.pt and best.pt."""
    resume = checkpoints.load_checkpoint(args.resume) if args.resume else None
    if resume is not None:
        args = restore_args(args, resume)
        if resume["epoch"] >= args.epochs:
            print(f"{args.resume}: the run is finished ({args.epochs} epochs); nothing to do")
            return 0
    args.datadir = args.datadir or data.default_datadir()
    args.areas = args.areas or list(data.FOLDS[args.fold or 1][0])  # fold 1 by default
    args.workers = 2 if args.workers is None else args.workers
    rank, world_size, local_rank = devices.setup_distributed()
    device = devices.pick_device(args.device, local_rank)
    # bfloat16 on a CPU is 2x faster than float32 on some (AVX-512 BF16) and 18x slower on
    # others: opt in with --amp after `python bench.py` says it pays.
    args.amp = device.type == "cuda" if args.amp is None else args.amp
    args.channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    run_dir = Path(args.resume).parent if args.resume else Path(args.logdir) / args.name
    checkpoints.prepare_run_dir(run_dir, resume is not None, devices.is_main_process())
    devices.seed_everything(args.seed)

    # The data: loaders of uint8 images and class ids, from PNGs or a cache.
    train_loader, val_loader = data.get_dataloaders(
        args.datadir, args.areas, args.val_areas, args.img_size, args.batch_size,
        args.workers, args.subset, args.val_fraction, args.seed,
        pin_memory=device.type == "cuda", skip_bad=args.skip_bad,
        open_dataset=functools.partial(
            cache.open_dataset, img_size=args.img_size, inputs=args.inputs
        ),
    )  # fmt: skip
    train_set, val_set = train_loader.dataset, val_loader.dataset
    data.require_labelled_pixels(train_set.dataset, train_set.indices, "training")
    if len(train_loader) == 0:
        raise data.DataError(
            f"{len(train_set)} training frames make no full batch of {args.batch_size}: "
            "lower --batch-size or use more frames"
        )
    if devices.is_main_process():
        print(
            f"{len(train_set)} training frames, {len(val_set)} validation frames, "
            f"device {device}, {world_size} process(es)"
        )

    # The run: model, loss, optimizer with its learning rate schedule, loss scaler.
    cin = depth.input_channels(args.inputs)
    model_config = models.model_config(args.model, data.NUM_CLASSES, **model_options(args), cin=cin)
    model = models.build_model(**model_config).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = training_loss(args.loss, train_set, args.class_weights, args.weight_method)
    optimizer, scheduler = build_optimizer(
        model, args.lr, args.weight_decay, args.schedule, args.warmup_steps,
        total_steps=args.epochs * len(train_loader),
    )  # fmt: skip
    # Loss scaling keeps small float16 gradients from vanishing; with bfloat16 or float32
    # it is not needed and the scaler is a no-op.
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    run = Run(model, loss_fn, optimizer, scheduler, scaler)
    start_epoch, best_miou = restore_run(run, resume, args.resume) if resume else (0, -1.0)
    train_model = devices.distribute(model, device)

    writer, preview = None, None
    if devices.is_main_process():
        if resume is not None:
            print(f"resuming {run_dir} after epoch {start_epoch}")
            checkpoints.trim_jsonl(run_dir / "metrics.jsonl", start_epoch)
        writer = open_tensorboard(run_dir, resume is not None, run.step, args, model_config)
        preview = preview_batch(val_set, NUM_PREVIEW_IMAGES)

    options = StepOptions(
        args.amp, args.channels_last, args.jitter, args.clip_grad, args.max_bad_steps
    )
    end_epoch = args.epochs if args.stop_after is None else min(args.epochs, args.stop_after)
    for epoch in range(start_epoch, end_epoch):
        seed_epoch(train_loader, args.seed + epoch, epoch)
        epoch_start = time.perf_counter()
        description = f"epoch {epoch + 1}/{args.epochs}"
        train_loss = train_one_epoch(
            run, train_model, train_loader, device, options, description, writer
        )
        confusion = evaluate(model, val_loader, device, args.amp, args.channels_last)
        results = confusion.compute()
        report_bad_frames(train_set, val_set)
        if not devices.is_main_process():
            continue

        print(metrics.format_report(results, data.CLASSES))
        print(f"epoch {epoch + 1}: train loss {train_loss:.4f}, val mIoU {results['miou']:.4f}")
        log_validation(writer, results, confusion, model, preview, device, args.amp, run.step)
        record = {
            "epoch": epoch + 1,
            "step": run.step,
            "train_loss": train_loss,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - epoch_start,
            "val": results,
        }
        is_best = results["miou"] > best_miou
        best_miou = max(best_miou, results["miou"])
        checkpoint = make_checkpoint(run, model_config, args, epoch + 1, results, best_miou)
        save_epoch(run_dir, record, checkpoint, is_best)

    if writer is not None:
        writer.close()
        print(f"best val mIoU {best_miou:.4f}; checkpoints in {run_dir}")
    if dist.is_initialized():
        dist.barrier()
    return 0


def seed_epoch(loader, seed: int, epoch: int) -> None:
    """Data order and augmentations depend only on (seed, epoch, number of workers), so
    that a resumed run sees the same batches as an uninterrupted one."""
    torch.manual_seed(seed)
    loader.generator.manual_seed(seed)
    if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        loader.sampler.set_epoch(epoch)


def model_options(args: argparse.Namespace) -> dict:
    """The command-line values of the options that model `args.model` has (its builder's
    keyword arguments in models.py, e.g. num_blocks and base_chan for the UNet)."""
    names = models.default_options(args.model)
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def training_loss(name: str, train_set, shares_file: str | None, weight_method: str):
    """The loss `name` of losses.py; "wce" weighs the classes by the pixel shares of the
    training frames (or of a `data.py histogram --out` file)."""
    class_weights = None
    if name == "wce":
        if shares_file:
            shares = cli.read_pixel_shares(shares_file, data.NUM_CLASSES)
        else:
            counts = data.class_histogram(train_set.dataset, train_set.indices)
            shares = (counts / counts.sum().clamp(min=1)).tolist()
        class_weights = losses.class_weights_from_frequencies(shares, weight_method).tolist()
    return losses.build_loss(name, data.NUM_CLASSES, data.IGNORE_INDEX, class_weights=class_weights)


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW, and its learning rate: a warmup of at most half the steps, then the decay."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup_steps = min(warmup_steps, total_steps // 2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, total_steps, warmup_steps, schedule)
    )
    return optimizer, scheduler


def save_epoch(run_dir: Path, record: dict, checkpoint: dict, is_best: bool) -> None:
    """The epoch's line of metrics.jsonl, then last.pt (and best.pt when it is the best)."""
    # The metrics line goes first: if the run dies before the checkpoint is written,
    # resuming trims the line and trains the epoch again.
    checkpoints.append_jsonl(run_dir / "metrics.jsonl", record)
    if is_best:
        checkpoints.save_checkpoint(checkpoint, run_dir / "best.pt")
    checkpoints.save_checkpoint(checkpoint, run_dir / "last.pt")


def report_bad_frames(*subsets) -> None:
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


# ----------------------------------------------------------------------------------------
# TensorBoard


def open_tensorboard(run_dir: Path, resuming: bool, step: int, args, model_config: dict):
    """A SummaryWriter on the run folder, with the run's configuration as text."""
    from torch.utils.tensorboard import SummaryWriter

    # After a crash, events logged past the resumed checkpoint are dropped (purge_step),
    # so that the retrained epochs do not appear twice.
    writer = SummaryWriter(log_dir=str(run_dir), purge_step=step if resuming else None)
    config_text = json.dumps({"args": plain_args(args), "model": model_config}, indent=2)
    writer.add_text("config", f"```\n{config_text}\n```", step)
    return writer


def preview_batch(dataset, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same `count` validation frames every epoch: `(N, 3, S, S)` uint8, `(N, S, S)`."""
    step = max(1, len(dataset) // count)
    samples = [dataset[i] for i in range(0, len(dataset), step)[:count]]
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


def log_validation(writer, results: dict, confusion, model, preview, device, amp: bool, step):
    """Every mean score, per-class IoU, the preview grid and the confusion matrix in
    TensorBoard, at optimizer step `step` (one x-axis for training and validation)."""
    for key, value in results.items():
        if isinstance(value, float):  # the means; the lists are per class
            writer.add_scalar(f"val/{key}", value, step)
    for name, iou in zip(data.CLASSES, results["iou"], strict=True):
        if not math.isnan(iou):
            writer.add_scalar(f"val_iou/{name}", iou, step)
    images, targets = preview
    model.eval()
    with torch.no_grad(), devices.autocast(device, enabled=amp):
        predictions = model(network_input(images.to(device))).argmax(dim=1).cpu()
    grid = utils.comparison_grid(images[:, :3], targets, predictions)
    writer.add_image("val/input_truth_prediction", grid, step)
    figure = metrics.confusion_matrix_figure(confusion.matrix, data.CLASSES)
    writer.add_figure("val/confusion_matrix", figure, step)
    writer.flush()


# ----------------------------------------------------------------------------------------
# What a checkpoint holds: plain data only, loadable with torch.load(weights_only=True)


def plain_args(args: argparse.Namespace) -> dict:
    """The arguments as JSON-compatible data, for checkpoints and TensorBoard."""
    return {key: value for key, value in vars(args).items() if key != "func"}


def make_checkpoint(
    run: Run, model_config: dict, args: argparse.Namespace, epoch: int, results, best_miou
) -> dict:
    """Everything needed to use the model (config, classes, image size, normalization) and
    to resume the run (optimizer, scheduler, scaler, counters, arguments), as plain data."""
    return {
        "format": checkpoints.CHECKPOINT_FORMAT,
        "model_config": model_config,
        "model_state": run.model.state_dict(),
        "classes": list(data.CLASSES),
        "img_size": args.img_size,
        "inputs": list(args.inputs),
        "normalization": {"mean": list(data.MEAN), "std": list(data.STD)},
        "epoch": epoch,
        "step": run.step,
        "metrics": results,
        "best_miou": best_miou,
        "args": plain_args(args),
        "optimizer_state": run.optimizer.state_dict(),
        "scheduler_state": run.scheduler.state_dict(),
        "scaler_state": run.scaler.state_dict(),
    }


def restore_run(run: Run, checkpoint: dict, path: str) -> tuple[int, float]:
    """Load the states of a checkpoint into `run`; returns (epochs done, best val mIoU)."""
    checkpoints.load_model_state(run.model, checkpoint["model_state"], path)
    run.optimizer.load_state_dict(checkpoint["optimizer_state"])
    run.scheduler.load_state_dict(checkpoint["scheduler_state"])
    run.scaler.load_state_dict(checkpoint["scaler_state"])
    run.step = checkpoint["step"]
    return checkpoint["epoch"], checkpoint["best_miou"]


def restore_args(args: argparse.Namespace, checkpoint: dict) -> argparse.Namespace:
    """A resumed run keeps its configuration; only where to read data and how to run may
    change (datadir, device, workers)."""
    # An option the checkpoint predates takes its value from this command line.
    restored = argparse.Namespace(**{**vars(args), **checkpoint["args"]})
    for key in ("resume", "device", "stop_after", "func"):
        setattr(restored, key, getattr(args, key))
    restored.datadir = args.datadir or data.default_datadir(restored.datadir)
    if isinstance(restored.pretrained, bool):  # a run from when --pretrained was a switch
        restored.pretrained = "imagenet" if restored.pretrained else "none"
    restored.workers = restored.workers if args.workers is None else args.workers
    return restored


# ----------------------------------------------------------------------------------------
# Test and predict


def test(args: argparse.Namespace) -> int:
    rank, world_size, local_rank = devices.setup_distributed()
    device = devices.pick_device(args.device, local_rank)
    model_file = checkpoints.local_model_file(args.model)
    if model_file.suffix == ".onnx":
        raise devices.UsageError(
            f"test scores a checkpoint (.pt); run {model_file.name} on pictures with predict"
        )
    checkpoint = checkpoints.load_checkpoint(model_file)
    model = checkpoints.model_from_checkpoint(checkpoint, model_file).to(device)
    datadir = args.datadir or data.default_datadir(checkpoint["args"].get("datadir"))
    areas = args.areas or default_test_areas(datadir, checkpoint)
    img_size = checkpoint["img_size"]
    transforms = data.eval_transforms(img_size, resize_mask=args.at_train_size)
    # On a cache, "full resolution" is the cached size.
    inputs = checkpoint.get("inputs", ["rgb"])
    dataset = cache.open_dataset(datadir, areas, transforms, img_size=img_size, inputs=inputs)
    indices = data.subset_indices(len(dataset), args.subset)
    frames = torch.utils.data.Subset(FramesWithIndex(dataset), indices)
    loader = data.make_loader(frames, args.batch_size, False, args.workers, device.type == "cuda")
    loader.collate_fn = collate_same_size
    out = Path(args.out or Path(args.model).parent / f"test-{'-'.join(dataset.areas)}")
    if devices.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        print(f"testing {args.model} on {len(frames)} frames of areas {', '.join(dataset.areas)}")

    if args.save_predictions:
        (out / "predictions").mkdir(parents=True, exist_ok=True)
    # One confusion matrix per area besides the total: the scores of each area.
    per_area = {area: metrics.ConfusionMatrix(data.NUM_CLASSES) for area in dataset.areas}
    area_of_frame = [frame.area for frame in dataset.frames]

    def on_batch(images, targets, predictions, frame_indices):
        areas_of_batch = [area_of_frame[index] for index in frame_indices.tolist()]
        for area in dict.fromkeys(areas_of_batch):
            rows = [i for i, name in enumerate(areas_of_batch) if name == area]
            per_area[area].update(predictions[rows], targets[rows])
        if args.save_predictions:
            for prediction, index in zip(predictions.cpu(), frame_indices.tolist(), strict=True):
                name = dataset.frames[index].name
                utils.save_class_ids(prediction, out / "predictions" / f"{name}.png")

    amp = device.type == "cuda"
    confusion = evaluate(
        model, loader, device, amp, full_resolution=not args.at_train_size, on_batch=on_batch
    )
    for area_confusion in per_area.values():
        area_confusion.all_reduce()
    if not devices.is_main_process():
        return 0
    results = confusion.compute()
    area_results = {
        area: area_confusion.compute()
        for area, area_confusion in per_area.items()
        if area_confusion.matrix is not None
    }
    print(metrics.format_report(results, data.CLASSES))
    if len(area_results) > 1:
        tested = [area_of_frame[index] for index in indices]
        for area, scores in area_results.items():
            print(
                f"area {area}: mIoU {scores['miou']:.4f}, pixel accuracy "
                f"{scores['pixel_accuracy']:.4f} ({tested.count(area)} frames)"
            )
        print(f"mIoU: {results['miou']:.4f} (areas {', '.join(dataset.areas)} together)")
    else:
        print(f"mIoU: {results['miou']:.4f}")
    summary = {
        "model": str(args.model),
        "datadir": str(datadir),
        "areas": dataset.areas,
        "frames": len(frames),
        "full_resolution": not args.at_train_size,
        "per_area": area_results,
        **results,
        "confusion_matrix": confusion.matrix.tolist(),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    figure = metrics.confusion_matrix_figure(confusion.matrix, data.CLASSES)
    figure.savefig(out / "confusion_matrix.png", dpi=100)
    print(f"wrote {out / 'metrics.json'} and {out / 'confusion_matrix.png'}")
    return 0


class FramesWithIndex(torch.utils.data.Dataset):
    """`(image, mask, index)` for each frame of `dataset`: batches name their own frames,
    whatever order the sampler hands them in."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return (*self.dataset[index], index)


def collate_same_size(samples: list[tuple]) -> tuple:
    """Batch `(image, mask, index)` samples whose masks share one size, else a DataError
    naming two sizes: full-resolution scores compare the logits at each mask's own size,
    and a batch holds one size."""
    sizes = {tuple(sample[1].shape) for sample in samples}
    if len(sizes) > 1:
        first, second = sorted(sizes)[:2]
        raise data.DataError(
            f"the test frames have different sizes ({first[1]}x{first[0]} and "
            f"{second[1]}x{second[0]}): score them with --batch-size 1, or at the training "
            "size with --at-train-size"
        )
    return torch.utils.data.default_collate(samples)


def default_test_areas(root: str, checkpoint: dict) -> list[str]:
    """The test areas of the model's fold, less those it was validated on; without a fold,
    the areas under `root` that the model was not trained on."""
    run_args = checkpoint["args"]
    fold = run_args.get("fold")
    if fold is not None:
        validated = {
            a for area in run_args.get("val_areas") or [] for a in data.normalize_area(area)
        }
        areas = [area for area in data.FOLDS[fold][1] if area not in validated]
        if not areas:
            raise data.DataError(f"fold {fold}'s test areas were all validated on: pass --areas")
        return areas
    if not Path(root).is_dir():
        raise data.DataError(data.missing_datadir_message(root))
    if not data.areas_on_disk(root):
        raise data.DataError(f"no area_* folder under {root}: is this a 2D-3D-S root or cache?")
    trained = {a for area in run_args.get("areas") or [] for a in data.normalize_area(area)}
    held_out = [area for area in data.areas_on_disk(root) if area not in trained]
    if not held_out:
        raise data.DataError(f"every area under {root} was used for training: pass --areas")
    return held_out


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


@torch.no_grad()
def predict_image(segmenter: models.Segmenter, image: torch.Tensor, device) -> torch.Tensor:
    """Class ids `(H, W)` int64 for one `(3, H, W)` uint8 image of any size.

    The segmenter scales the image to about the training resolution, keeping its aspect
    ratio, and scales the logits back to the original size (see models.Segmenter).
    """
    logits = segmenter(image[None].to(device))  # (1, K, H, W) float32
    return logits.argmax(dim=1)[0].cpu()


def segment_with_onnxruntime(session, image: torch.Tensor) -> torch.Tensor:
    """Class ids `(H, W)` int64 for one `(3, H, W)` uint8 image, by a model exported with
    `python main.py export` and loaded in `session`, an onnxruntime.InferenceSession.

    The ONNX model takes `image`, a numpy array `(N, 3, H, W)` uint8 of any size, and gives
    `logits`, `(N, K, H, W)` float32 at the same size.
    """
    # >>> Q14: run the exported model with onnxruntime
    (logits,) = session.run(["logits"], {"image": image[None].numpy()})
    return torch.from_numpy(logits[0].argmax(axis=0))
    # <<< Q14


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


def load_segmenter(
    model: str, device: torch.device
) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[str]]:
    """`segment(image (3, H, W) uint8) -> class ids (H, W) int64` for a checkpoint, or for
    an ONNX file run with onnxruntime; `model` is a path or a URL. Also returns the model's
    inputs: a model trained with depth takes `(4, H, W)` (see depth.py)."""
    model_file = checkpoints.local_model_file(model)
    if model_file.suffix == ".onnx":
        session = export.onnx_session(model_file)
        export.read_onnx_metadata(session)  # refuses a file made for other classes
        return functools.partial(segment_with_onnxruntime, session), ["rgb"]
    checkpoint = checkpoints.load_checkpoint(model_file)
    network = checkpoints.model_from_checkpoint(checkpoint, model_file).to(device).eval()
    inputs = checkpoint.get("inputs", ["rgb"])
    segmenter_class = depth.RGBDSegmenter if depth.uses_depth(inputs) else models.Segmenter
    segmenter = segmenter_class(network, checkpoint["img_size"])
    return functools.partial(predict_image, segmenter, device=device), inputs


def predict(args: argparse.Namespace) -> int:
    out = Path(args.out)
    paths = expand_inputs(args.images)
    stems = cli.output_stems(paths, out, PREDICTION_SUFFIXES)  # before anything is written
    segment, inputs = load_segmenter(args.model, devices.pick_device(args.device))
    depth_files = depth_files_of(paths, args.depth, depth.uses_depth(inputs), args.model)
    cli.make_output_folder(out)
    failures = 0
    for path, stem, depth_file in zip(paths, stems, depth_files, strict=True):
        try:
            image = read_image(path)
            if depth.uses_depth(inputs):
                image = depth.attach_depth(image, path, depth_file)
        except (ValueError, data.DataError) as error:
            print(f"error: {error}", file=sys.stderr)
            failures += 1
            continue
        save_prediction(image[:3], segment(image), out, stem)
        print(f"{path} -> {out / stem}_mask.png, _overlay.png, _legend.png")
    if failures:
        print(f"{failures} input(s) could not be read", file=sys.stderr)
    return 1 if failures else 0


def depth_files_of(
    paths: list[Path], given: list[str] | None, needs_depth: bool, model: str
) -> list[Path | None]:
    """The depth file of each image for `predict`: `--depth` in order, else found by name in
    a 2D-3D-S tree (None where there is none); all None for an RGB model."""
    if given is not None and not needs_depth:
        raise devices.UsageError(f"--depth: {model} reads RGB only; leave --depth out")
    if given is None:
        return [depth.depth_file_in_tree(path) if needs_depth else None for path in paths]
    if len(given) != len(paths):
        raise devices.UsageError(
            f"--depth names {len(given)} file(s) for {len(paths)} image(s): give one per image, "
            "in the same order"
        )
    return [Path(file) for file in given]


def export_model(args: argparse.Namespace) -> int:
    """The `export` command: the checkpoint's model as ONNX (.onnx) or torch.export (.pt2)."""
    out = Path(args.out)
    if out.suffix not in (".onnx", ".pt2"):
        raise devices.UsageError(f"--out {out}: name an .onnx or a .pt2 file")
    if not out.parent.is_dir():
        raise devices.UsageError(f"--out {out}: the folder {out.parent} does not exist")
    model_file = checkpoints.local_model_file(args.model)
    checkpoint = checkpoints.load_checkpoint(model_file)
    if depth.uses_depth(checkpoint.get("inputs", ["rgb"])):
        raise devices.UsageError(
            f"{args.model} was trained with depth; export writes RGB models only (run it "
            "with `main.py predict`)"
        )
    network = checkpoints.model_from_checkpoint(checkpoint, model_file)
    segmenter = models.Segmenter(network, checkpoint["img_size"])
    if out.suffix == ".onnx":
        export.export_onnx(segmenter, checkpoint, out)
    else:
        export.export_program(segmenter, out)
    print(
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): uint8 images of any size in, logits out"
    )
    return 0


# ----------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = cli.HelpFormatter
    unet = models.default_options("unet")
    environment = f"${data.DATADIR_VARIABLE}"

    train_parser = commands.add_parser("train", help="train a model", formatter_class=defaults)
    train_parser.set_defaults(func=train)
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
        help="what the model sees: rgb, or rgb depth (the data set's depth images, see depth.py)",
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
        help="wce: pixel shares from `data.py histogram --out`",
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
        help="data loading processes (default: 2, or the resumed run's: augmentations "
        "depend on the worker count)",
    )
    add("--logdir", default="runs", help="where runs are written")
    add("--name", type=cli.folder_name, default=None, help="run name (default: model and time)")
    add("--resume", default=None, help="continue the run of this last.pt")
    add("--seed", type=cli.int_range(0, cli.MAX_SEED), default=0, help="random seed")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to train")
    add(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mixed precision (default: on for CUDA, off on CPU)",
    )
    add(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format (default: on for CUDA)",
    )
    add(
        "--stop-after",
        type=cli.int_range(1),
        default=None,
        metavar="EPOCHS",
        help="end this invocation after EPOCHS epochs (e.g. a cluster time limit); "
        "continue later with --resume",
    )
    add("--skip-bad", action="store_true", help="skip unreadable frames instead of stopping")
    add(
        "--max-bad-steps",
        type=cli.int_range(1),
        default=20,
        help="stop after this many NaN losses in a row",
    )

    test_parser = commands.add_parser(
        "test", help="evaluate a checkpoint", formatter_class=defaults
    )
    test_parser.set_defaults(func=test)
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
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run")

    predict_parser = commands.add_parser("predict", help="segment images", formatter_class=defaults)
    predict_parser.set_defaults(func=predict)
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
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run")

    export_parser = commands.add_parser(
        "export", help="write a model for programs without this project", formatter_class=defaults
    )
    export_parser.set_defaults(func=export_model)
    add = export_parser.add_argument
    add("--model", required=True, help="checkpoint (best.pt or last.pt), path or URL")
    add("--out", required=True, help="model.onnx (ONNX) or model.pt2 (torch.export program)")
    return parser


# The errors of a user, not of the code: each ends the program with one line (cli.run).
USER_ERRORS = (
    data.DataError,
    CheckpointError,
    TrainingStopped,
    devices.UsageError,
    export.ExportError,
    models.WeightsError,
    cli.FlagError,
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and args.resume is None:  # a resumed run has its own flags
        try:
            cli.check_train_flags(
                args.model, args.num_blocks, args.base_chan, args.loss, args.class_weights
            )
        except cli.FlagError as error:
            parser.error(str(error))  # exit status 2, like any flag argparse refuses
    if getattr(args, "name", "") is None:
        args.name = f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        return cli.run(args.func, args, USER_ERRORS)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
