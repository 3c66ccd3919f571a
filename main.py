"""Train, test and run semantic segmentation models on Stanford 2D-3D-S.

    python main.py train --datadir D --areas 1 2 3 4 6 --val-areas 5a
    python main.py test --model runs/NAME/best.pt --areas 5b
    python main.py predict --model runs/NAME/best.pt photo.jpg --out predictions
    python main.py export --model runs/NAME/best.pt --out model.onnx
    torchrun --nproc_per_node 4 main.py train ...        (one process per GPU)

One plain loop: the same code runs on a CUDA GPU (mixed precision, channels_last, pinned
memory) and on a CPU. `python main.py COMMAND --help` explains every flag. The machinery
lives in modules of its own: devices.py (GPU, torchrun, precision), checkpoints.py (saving,
loading, downloading, the run folder), runstate.py (exact resume, the device-side health of
the step), preemption.py (stopping on a cluster's signal), cache.py (pre-decoded data
sets), export.py (ONNX and torch.export), flags.py (the commands and their flags), cli.py
(argument types, errors as one line).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
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
import flags
import losses
import metrics
import models
import preemption
import runstate
import utils
from checkpoints import CheckpointError

NUM_PREVIEW_IMAGES = 4  # validation frames shown in TensorBoard every epoch


class TrainingStopped(Exception):
    """Training gave up (weights or losses not finite); the last good checkpoint is kept."""


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
    health: runstate.TrainingHealth  # loss and skipped steps, summed on the device
    step: int = 0  # optimizer steps taken: the x-axis of every TensorBoard curve
    epoch: int = 0  # epochs done
    batches_done: int = 0  # batches of the current epoch done (a run stopped mid-epoch)
    loss_sum: float = 0.0  # this epoch's summed loss of the good steps, as of the last check
    good_steps: int = 0  # this epoch's steps with finite gradients, as of the last check
    best_miou: float = -1.0
    metrics: dict | None = None  # the last validation's scores
    random_states: dict | None = None  # of a run stopped mid-epoch, put back when resuming


@dataclass(frozen=True)
class StepOptions:
    """How each training step runs, from the command line."""

    amp: bool  # mixed precision in the forward pass
    amp_dtype: torch.dtype  # float16 (with loss scaling) or bfloat16
    channels_last: bool  # memory format of the images
    jitter: float  # strength of data.jitter_colors (0: off)
    clip_grad: float  # max gradient norm (0: no clipping)
    max_bad_steps: int  # non-finite steps in a row before giving up
    log_every: int  # steps between checks: the only times the host waits for the device


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
    stop: preemption.StopRequests,
    save_position: Callable[[], None],
) -> bool:
    """One pass over the training set, from batch `run.batches_done` on. Returns True when
    a stop was requested (a cluster's signal): the position is then saved.

    `train_model` is `run.model`, wrapped in DistributedDataParallel under torchrun and
    compiled with --compile. The step never waits for the device: the loss scaler skips
    a step whose gradients are not finite, and the loss is read every `log_every` steps.
    """
    train_model.train()
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    total = run.batches_done + len(loader)
    bar = tqdm(
        loader, desc=description, initial=run.batches_done, total=total,
        disable=not devices.is_main_process(),
    )  # fmt: skip
    for images, targets in bar:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True).long()  # uint8 in the loader
        images = network_input(images, options.jitter).contiguous(memory_format=memory_format)

        with devices.autocast(device, enabled=options.amp, dtype=options.amp_dtype):
            logits = train_model(images)
        loss = run.loss_fn(logits, targets)  # the losses compute in float32

        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
        # The norm is also the step's health: NaN or inf when a gradient is.
        grad_norm = nn.utils.clip_grad_norm_(
            train_model.parameters(), options.clip_grad or math.inf
        )
        run.scaler.step(run.optimizer)  # skipped, on the device, when a gradient is not finite
        run.scaler.update()
        run.scheduler.step()
        run.step += 1
        run.batches_done += 1
        run.health.record(loss, grad_norm)

        at_check = run.step % options.log_every == 0 or run.batches_done == total
        if at_check:
            check_progress(run, bar, writer, options.max_bad_steps)
        save, stop_now = stop.poll(at_check, device)
        if save:
            if not at_check:  # the weights are checked before every checkpoint
                check_progress(run, bar, writer, options.max_bad_steps)
            save_position()
        if stop_now:
            return True
    return False


def check_progress(run: Run, bar, writer, max_bad_steps: int) -> None:
    """Read the loss and the skipped steps since the last check (the one moment the host
    waits for the device), show and log them; TrainingStopped when a weight is no longer
    finite or `max_bad_steps` steps in a row were skipped."""
    last_good = "the last good checkpoint is kept. Lower --lr, or try --no-amp"
    try:
        loss_sum, good, bad, most_in_a_row = run.health.check(run.model)
    except runstate.NonFiniteWeights as error:
        raise TrainingStopped(
            f"weights became NaN or infinite by step {run.step} ({error}): training "
            f"stopped, {last_good}"
        ) from None
    run.loss_sum += loss_sum
    run.good_steps += good
    if bad and devices.is_main_process():
        tqdm.write(f"warning: {bad} step(s) skipped for non-finite gradients by step {run.step}")
    if most_in_a_row >= max_bad_steps:
        raise TrainingStopped(
            f"{most_in_a_row} non-finite steps in a row (--max-bad-steps {max_bad_steps}): "
            f"training stopped, {last_good}"
        )
    if good:
        lr = run.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{loss_sum / good:.3f}", lr=f"{lr:.2e}")
        if writer is not None:
            writer.add_scalar("train/loss", loss_sum / good, run.step)
            writer.add_scalar("train/lr", lr, run.step)


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
    """The `train` command: start a run, or continue one (--resume), in a run folder that
    no other process uses meanwhile; SIGTERM and SIGUSR1 stop it resumably."""
    run_dir, resume_path = checkpoints.find_resume(args.resume, args.logdir, args.name)
    devices.setup_distributed()
    with (
        checkpoints.RunFolderLock(run_dir, devices.is_main_process()) as lock,
        preemption.StopRequests(args.checkpoint_minutes) as stop,
    ):
        return train_in(run_dir, lock, resume_path, args, stop)


def train_in(
    run_dir: Path,
    lock: checkpoints.RunFolderLock,
    resume_path: Path | None,
    args: argparse.Namespace,
    stop: preemption.StopRequests,
) -> int:
    """Build the run (data, model, loss, optimizer), then train and validate epoch by
    epoch, saving last.pt and best.pt. Returns the exit status."""
    resume = checkpoints.load_checkpoint(resume_path) if resume_path else None
    if resume is not None:
        checkpoints.check_resumable(resume, resume_path)
        args = restore_args(args, resume)
        if resume["epoch"] >= args.epochs:
            print(f"{resume_path}: the run is finished ({args.epochs} epochs); nothing to do")
            return 0
    args.datadir = args.datadir or data.default_datadir()
    args.areas = args.areas or list(data.FOLDS[args.fold or 1][0])  # fold 1 by default
    args.workers = 2 if args.workers is None else args.workers
    device = devices.pick_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    args.amp, args.amp_dtype = devices.precision(device, args.amp, args.amp_dtype)
    args.channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    devices.seed_everything(args.seed)

    # The data: loaders of uint8 images and class ids, from PNGs or a cache.
    default_loaders = data.get_dataloaders(
        args.datadir, args.areas, args.val_areas, args.img_size, args.batch_size,
        args.workers, args.subset, args.val_fraction, args.seed,
        pin_memory=device.type == "cuda", skip_bad=args.skip_bad,
        open_dataset=functools.partial(
            cache.open_dataset, img_size=args.img_size, inputs=args.inputs
        ),
    )  # fmt: skip
    val_loader = default_loaders[1]
    val_loader.worker_init_fn = runstate.ignore_stop_signals
    train_set, val_set = default_loaders[0].dataset, val_loader.dataset
    # Batches that depend on (seed, epoch, batch) only, not on the loader workers: a run
    # can stop anywhere and continue exactly.
    train_loader = runstate.training_loader(
        train_set, args.batch_size, args.workers, device.type == "cuda", args.seed
    )
    data.require_labelled_pixels(train_set.dataset, train_set.indices, "training")
    # The inputs are good: take the run folder (one process per folder), and only then
    # write to it.
    lock.acquire()
    checkpoints.prepare_run_dir(
        run_dir, resume is not None, devices.is_main_process(), restart=args.resume == "auto"
    )
    if len(train_loader) == 0:
        raise data.DataError(
            f"{len(train_set)} training frames make no full batch of {args.batch_size} per "
            "process: lower --batch-size or use more frames"
        )
    if devices.is_main_process():
        print(
            f"{len(train_set)} training frames, {len(val_set)} validation frames, "
            f"device {device}, {devices.world_size()} process(es)"
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
    scaler = loss_scaler(device, args.amp and args.amp_dtype == "float16")
    run = Run(model, loss_fn, optimizer, scheduler, scaler, runstate.TrainingHealth(device))
    if resume is not None:
        restore_run(run, resume, resume_path)
    train_model = devices.training_model(model, device, args.sync_bn, args.compile)

    writer, preview = None, None
    if devices.is_main_process():
        if resume is not None:
            print(f"resuming {run_dir} at epoch {run.epoch + 1}, batch {run.batches_done + 1}")
            checkpoints.trim_jsonl(run_dir / "metrics.jsonl", run.epoch)
        writer = open_tensorboard(run_dir, resume is not None, run.step, args, model_config)
        preview = preview_batch(val_set, NUM_PREVIEW_IMAGES)

    options = StepOptions(
        args.amp, getattr(torch, args.amp_dtype), args.channels_last, args.jitter,
        args.clip_grad, args.max_bad_steps, args.log_every,
    )  # fmt: skip
    save_position = functools.partial(save_mid_epoch, run, run_dir, model_config, args)
    # --stop-after counts the epochs of this invocation (a partial one included).
    end_epoch = args.epochs if args.stop_after is None else run.epoch + args.stop_after
    for epoch in range(run.epoch, min(end_epoch, args.epochs)):
        seed_epoch(train_loader, args.seed + epoch, epoch, run)
        epoch_start = time.perf_counter()
        description = f"epoch {epoch + 1}/{args.epochs}"
        if train_one_epoch(
            run, train_model, train_loader, device, options, description, writer, stop,
            save_position,
        ):  # fmt: skip
            return stopped_on_request(run, run_dir, stop, writer)
        train_loss = runstate.mean_or_nan(run.loss_sum, run.good_steps)
        confusion = evaluate(model, val_loader, device, args.amp, args.channels_last)
        results = confusion.compute()
        report_bad_frames(train_set, val_set)
        is_best = results["miou"] > run.best_miou
        run.epoch, run.batches_done, run.loss_sum, run.good_steps = epoch + 1, 0, 0.0, 0
        run.best_miou, run.metrics = max(run.best_miou, results["miou"]), results
        if devices.is_main_process():
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
            save_epoch(run_dir, record, make_checkpoint(run, model_config, args), is_best)
        if stop.poll(True, device)[1]:  # a signal during validation: the epoch is saved
            return stopped_on_request(run, run_dir, stop, writer)

    if writer is not None:
        writer.close()
        print(f"best val mIoU {run.best_miou:.4f}; checkpoints in {run_dir}")
    if dist.is_initialized():
        dist.barrier()
    return 0


def seed_epoch(loader, seed: int, epoch: int, run: Run) -> None:
    """Data order and augmentations depend only on (seed, epoch), so that a resumed run
    sees the same batches as an uninterrupted one; a run stopped in the middle of the epoch
    continues at its batch, with its random states."""
    torch.manual_seed(seed)
    loader.sampler.set_epoch(epoch, run.batches_done)
    if run.random_states is not None:
        runstate.restore_random_states(run.random_states)
        run.random_states = None


def loss_scaler(device: torch.device, float16: bool) -> torch.amp.GradScaler:
    """The loss scaler: with float16 it keeps small gradients from vanishing (a dynamic
    scale); in every precision it skips, on the device, a step whose gradients are not
    finite, so that the step never waits for the host to decide."""
    if not devices.can_scale_loss(device):
        # A torch without the scaler's kernels for Apple's GPU: no scaler (and no float16,
        # devices.precision refuses it). A non-finite step then reaches the weights, and the
        # check that follows stops training with the last good checkpoint kept.
        return torch.amp.GradScaler(device.type, enabled=False)
    if float16:
        return torch.amp.GradScaler(device.type)
    # A fixed scale of 1: a backoff factor that rounds to 1 in float32, no growth.
    return torch.amp.GradScaler(
        device.type, init_scale=1.0, backoff_factor=1 - 1e-9, growth_interval=2**31 - 1
    )


def stopped_on_request(run: Run, run_dir: Path, stop, writer) -> int:
    """The last words of a run stopped by a signal, its position saved: exit status
    EXIT_RESUMABLE."""
    if writer is not None:
        writer.close()
    if devices.is_main_process():
        print(
            f"stopped ({stop.describe()}) at epoch {run.epoch + 1}, batch {run.batches_done}: "
            f"resumable, continue with --resume {run_dir / 'last.pt'} (exit status "
            f"{preemption.EXIT_RESUMABLE})"
        )
    return preemption.EXIT_RESUMABLE


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
    # fused: one kernel for all parameters, and the loss scaler can skip a step on the
    # device (found_inf) instead of asking the host.
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    warmup_steps = min(warmup_steps, total_steps // 2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, total_steps, warmup_steps, schedule)
    )
    return optimizer, scheduler


def save_epoch(run_dir: Path, record: dict, checkpoint: dict, is_best: bool) -> None:
    """The epoch's line of metrics.jsonl, then last.pt (and best.pt when it is the best)."""
    # The metrics line goes first: if the run dies before the checkpoint is written,
    # resuming trims the line and trains the epoch again. last.pt before best.pt: a run
    # folder with a best.pt always has its last.pt.
    checkpoints.append_jsonl(run_dir / "metrics.jsonl", record)
    checkpoints.save_checkpoint(checkpoint, run_dir / "last.pt")
    if is_best:
        checkpoints.save_checkpoint(checkpoint, run_dir / "best.pt")


def save_mid_epoch(run: Run, run_dir: Path, model_config: dict, args) -> None:
    """last.pt in the middle of an epoch (a stop request, --checkpoint-minutes): the run,
    its position in the epoch's data order and its random states. Every process calls it;
    rank 0 writes, and the others wait until the file is whole."""
    if devices.is_main_process():
        position = {
            "batches_done": run.batches_done,
            "world_size": devices.world_size(),  # each process's share of the order
            "loss_sum": run.loss_sum,
            "good_steps": run.good_steps,
            "random_states": runstate.random_states(),
        }
        checkpoint = make_checkpoint(run, model_config, args, position)
        checkpoints.save_checkpoint(checkpoint, run_dir / "last.pt")
        tqdm.write(f"saved {run_dir / 'last.pt'} at step {run.step}")
    if dist.is_initialized():
        dist.barrier()


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
    return {key: value for key, value in vars(args).items() if key not in ("func", "given")}


def make_checkpoint(
    run: Run, model_config: dict, args: argparse.Namespace, position: dict | None = None
) -> dict:
    """Everything needed to use the model (config, classes, image size, normalization) and
    to resume the run (optimizer, scheduler, scaler, counters, arguments, and for a run
    stopped mid-epoch its `position`), as plain data."""
    checkpoint = {
        "format": checkpoints.CHECKPOINT_FORMAT,
        "model_config": model_config,
        "model_state": run.model.state_dict(),
        "classes": list(data.CLASSES),
        "img_size": args.img_size,
        "inputs": list(args.inputs),
        "normalization": {"mean": list(data.MEAN), "std": list(data.STD)},
        "epoch": run.epoch,
        "step": run.step,
        "metrics": run.metrics or {},
        "best_miou": run.best_miou,
        "args": plain_args(args),
        "optimizer_state": run.optimizer.state_dict(),
        "scheduler_state": run.scheduler.state_dict(),
        "scaler_state": run.scaler.state_dict(),
    }
    if position is not None:
        checkpoint["position"] = position
    return checkpoint


def restore_run(run: Run, checkpoint: dict, path: Path) -> None:
    """Load the states and counters of a checkpoint into `run`."""
    checkpoints.load_model_state(run.model, checkpoint["model_state"], path)
    try:
        run.optimizer.load_state_dict(checkpoint["optimizer_state"])
        run.scheduler.load_state_dict(checkpoint["scheduler_state"])
        if checkpoint["scaler_state"]:  # empty: saved when the scaler was off
            run.scaler.load_state_dict(checkpoint["scaler_state"])
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{path}: its training state does not fit ({error})") from None
    run.step, run.epoch = checkpoint["step"], checkpoint["epoch"]
    run.best_miou, run.metrics = checkpoint["best_miou"], checkpoint["metrics"]
    position = checkpoint.get("position")
    if position is not None:
        if position["world_size"] != devices.world_size():
            raise devices.UsageError(
                f"{path} stopped in the middle of an epoch with {position['world_size']} "
                f"process(es): resume it with as many (here: {devices.world_size()})"
            )
        run.batches_done, run.random_states = position["batches_done"], position["random_states"]
        run.loss_sum, run.good_steps = position["loss_sum"], position["good_steps"]


# Flags that say how to run, not what is trained: a resumed run may give other values.
HOW_TO_RUN = frozenset(
    {
        "resume", "datadir", "device", "workers", "stop_after", "checkpoint_minutes",
        "log_every", "compile", "channels_last", "skip_bad", "max_bad_steps", "logdir", "name",
    }
)  # fmt: skip


def restore_args(args: argparse.Namespace, checkpoint: dict) -> argparse.Namespace:
    """A resumed run keeps its configuration: a flag given beside --resume that would change
    it is refused by name; only where to read data and how to run may change (HOW_TO_RUN)."""
    saved = checkpoint["args"]
    changed = [
        f"--{key.replace('_', '-')} {getattr(args, key)} (the run has {saved[key]})"
        for key in sorted(getattr(args, "given", set()) - HOW_TO_RUN)
        if key in saved and getattr(args, key) != saved[key]
    ]
    if changed:
        raise devices.UsageError(
            f"a resumed run keeps its configuration; not applied: {'; '.join(changed)}. Drop "
            "them, or start a new run with another --name"
        )
    # An option the checkpoint predates takes its value from this command line.
    restored = argparse.Namespace(**{**vars(args), **saved})
    for key in HOW_TO_RUN | {"func", "given"}:
        if hasattr(args, key):
            setattr(restored, key, getattr(args, key))
    restored.datadir = args.datadir or data.default_datadir(saved.get("datadir"))
    if isinstance(restored.pretrained, bool):  # a run from when --pretrained was a switch
        restored.pretrained = "imagenet" if restored.pretrained else "none"
    for key in ("workers", "channels_last"):  # unset: the run's own
        if getattr(args, key) is None:
            setattr(restored, key, saved.get(key))
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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": train,
    "test": test,
    "predict": predict,
    "export": export_model,
}


def build_parser() -> argparse.ArgumentParser:
    """The command line: every command and flag is in flags.py."""
    return flags.build_parser(COMMANDS, description=__doc__.split("\n")[0])


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
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and args.resume is None:  # a resumed run has its own flags
        try:
            cli.check_train_flags(
                args.model, args.num_blocks, args.base_chan, args.loss, args.class_weights
            )
        except cli.FlagError as error:
            parser.error(str(error))  # exit status 2, like any flag argparse refuses
    if args.command == "train":
        # What the command line sets, apart from the defaults: a resumed run checks it.
        args.given = cli.given_options(flags.train_parser_of(parser), argv[1:]) - {"func"}
        if args.name is None and args.resume != "auto":
            args.name = f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        return cli.run(args.func, args, USER_ERRORS)
    except RuntimeError as error:
        if not devices.lost_a_peer(error):
            raise
        # One line, not a traceback per process: the process that failed printed why.
        print(
            f"error: process {dist.get_rank()} stopped: another process ended (see its message)",
            file=sys.stderr,
        )
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
