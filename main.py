"""Train, test and run semantic segmentation models on Stanford 2D-3D-S.

    python main.py train --datadir D --areas 1 2 3 4 6 --val-areas 5a
    python main.py test --model runs/NAME/best.pt --areas 5b
    python main.py predict --model runs/NAME/best.pt photo.jpg --out predictions
    python main.py export --model runs/NAME/best.pt --out model.onnx
    torchrun --nproc_per_node 4 main.py train ...        (one process per GPU)

One plain loop: the same code runs on a CUDA GPU (mixed precision, channels_last, pinned
memory) and on a CPU. `python main.py COMMAND --help` explains every flag.

The file reads top to bottom: the training step and epoch, evaluation, the `train` command
that wires data, model, loss and optimizer into the loop, then `test`, `predict` and
`export`. The machinery they call is in the package seglab/ (its __init__.py lists it).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import losses
import metrics
import models
from seglab import (
    cache,
    check,
    checkpoints,
    cli,
    depth,
    devices,
    downloads,
    evaluation,
    export,
    flags,
    inference,
    preemption,
    runfolder,
    runstate,
    tensorboard_log,
)

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
    training_data: dict | None = None  # frames and processes, which a resumed run must keep


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
    skips the jitter; seglab/depth.py says what the network sees of it.
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
    name_given = "name" in getattr(args, "given", {"name"})  # --resume keeps the run's name
    run_dir, resume_path = runfolder.find_resume(args.resume, args.logdir, args.name, name_given)
    devices.setup_distributed()
    with (
        runfolder.RunFolderLock(run_dir, devices.is_main_process()) as lock,
        runfolder.cleaned_if_unsaved(run_dir, lock, new_run=resume_path is None),
        tensorboard_log.closing_writers(),  # before the cleaning, which it must not race
        preemption.StopRequests(args.checkpoint_minutes) as stop,
    ):
        return train_in(run_dir, lock, resume_path, args, stop)


def train_in(
    run_dir: Path,
    lock: runfolder.RunFolderLock,
    resume_path: Path | None,
    args: argparse.Namespace,
    stop: preemption.StopRequests,
) -> int:
    """Build the run (data, model, loss, optimizer), then train and validate epoch by
    epoch, saving last.pt and best.pt. Returns the exit status."""
    resume = checkpoints.load_checkpoint(resume_path) if resume_path else None
    if resume is not None:
        checkpoints.check_resumable(resume, resume_path)
        args = checkpoints.restore_args(args, resume)
        if resume["epoch"] >= args.epochs:
            print(f"{resume_path}: the run is finished ({args.epochs} epochs); nothing to do")
            return 0
    device = flags.settle_train_defaults(args)
    devices.seed_everything(args.seed)
    train_loader, val_loader = build_loaders(args, device)
    # The inputs are good: take the run folder (one process per folder), and only then
    # write to it.
    lock.acquire()
    runfolder.prepare_run_dir(
        run_dir, resume is not None, devices.is_main_process(), restart=args.resume == "auto"
    )
    run, model_config = build_run(args, device, train_loader)
    if resume is not None:
        checkpoints.restore_run(run, resume, resume_path)
        runfolder.restore_best(run_dir, resume, run)
    train_model = devices.training_model(run.model, device, args.sync_bn, args.compile)

    writer, preview = None, None  # TensorBoard: rank 0 only
    if devices.is_main_process():
        if resume is not None:
            print(f"resuming {run_dir} at epoch {run.epoch + 1}, batch {run.batches_done + 1}")
            runfolder.trim_jsonl(run_dir / "metrics.jsonl", run.epoch)
        resuming = resume is not None
        writer = tensorboard_log.open_tensorboard(run_dir, resuming, run.step, args, model_config)
        preview = tensorboard_log.preview_batch(val_loader.dataset, NUM_PREVIEW_IMAGES)

    options = StepOptions(
        args.amp, getattr(torch, args.amp_dtype), args.channels_last, args.jitter,
        args.clip_grad, args.max_bad_steps, args.log_every,
    )  # fmt: skip
    save_position = functools.partial(runfolder.save_mid_epoch, run, run_dir, model_config, args)
    # --stop-after counts the epochs of this invocation (a partial one included).
    end_epoch = args.epochs if args.stop_after is None else run.epoch + args.stop_after
    for epoch in range(run.epoch, min(end_epoch, args.epochs)):
        runstate.seed_epoch(train_loader, args.seed + epoch, epoch, run)
        epoch_start = time.perf_counter()
        description = f"epoch {epoch + 1}/{args.epochs}"
        if train_one_epoch(
            run, train_model, train_loader, device, options, description, writer, stop,
            save_position,
        ):  # fmt: skip
            return preemption.stopped_on_request(run, run_dir, stop, writer)
        train_loss = runstate.mean_or_nan(run.loss_sum, run.good_steps)
        confusion = evaluate(run.model, val_loader, device, args.amp, args.channels_last)
        results = confusion.compute()
        check.report_skipped_frames(train_loader.dataset.frames, val_loader.dataset)
        is_best = results["miou"] > run.best_miou
        run.epoch, run.batches_done, run.loss_sum, run.good_steps = epoch + 1, 0, 0.0, 0
        run.best_miou, run.metrics = max(run.best_miou, results["miou"]), results
        if devices.is_main_process():
            print(metrics.format_report(results, data.CLASSES))
            print(f"epoch {epoch + 1}: train loss {train_loss:.4f}, val mIoU {results['miou']:.4f}")
            predictions = tensorboard_log.predict_preview(
                run.model, network_input(preview[0].to(device)), args.amp
            )
            tensorboard_log.log_validation(
                writer, results, confusion, preview, predictions, run.step
            )
            record = {
                "epoch": epoch + 1,
                "step": run.step,
                "train_loss": train_loss,
                "lr": run.optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - epoch_start,
                "val": results,
            }
            checkpoint = checkpoints.make_checkpoint(run, model_config, args)
            runfolder.save_epoch(run_dir, record, checkpoint, is_best)
        # A signal during validation: the epoch is saved. After the last epoch there is
        # nothing left to resume, and the run ends as finished.
        finished = epoch + 1 == args.epochs
        if stop.poll(True, device)[1] and not finished:
            return preemption.stopped_on_request(run, run_dir, stop, writer)

    if writer is not None:
        writer.close()
        print(f"best val mIoU {run.best_miou:.4f}; checkpoints in {run_dir}")
    if dist.is_initialized():
        dist.barrier()
    return 0


def build_loaders(args: argparse.Namespace, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """The training and validation loaders of uint8 images and class ids, from PNGs or a
    cache. The training batches depend on (seed, epoch, batch) only, not on the loader
    workers, so that a run can stop anywhere and continue exactly (seglab/runstate.py)."""
    open_dataset = functools.partial(cache.open_dataset, img_size=args.img_size, inputs=args.inputs)
    train_set, val_set = data.get_datasets(
        args.datadir, args.areas, args.val_areas, args.img_size, args.subset,
        args.val_fraction, args.seed, args.skip_bad, open_dataset,
    )  # fmt: skip
    check.require_labelled_pixels(train_set.dataset, train_set.indices, "training")
    pin_memory = device.type == "cuda"
    train_loader = runstate.training_loader(
        train_set, args.batch_size, args.workers, pin_memory, args.seed
    )
    val_loader = data.make_loader(
        val_set, args.batch_size, args.workers, pin_memory, runstate.ignore_stop_signals
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
    return train_loader, val_loader


def build_run(args: argparse.Namespace, device: torch.device, train_loader) -> tuple[Run, dict]:
    """The run: model, loss, optimizer with its learning rate schedule, loss scaler; and the
    model's configuration, which the checkpoints record."""
    cin = depth.input_channels(args.inputs)
    model_config = models.model_config(
        args.model, data.NUM_CLASSES, **flags.model_options(args), cin=cin
    )
    model = models.build_model(**model_config).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_set = train_loader.dataset.frames  # the Subset of data.get_datasets
    loss_fn = training_loss(args.loss, train_set, args.class_weights, args.weight_method)
    optimizer, scheduler = build_optimizer(
        model, args.lr, args.weight_decay, args.schedule, args.warmup_steps,
        total_steps=args.epochs * len(train_loader),
    )  # fmt: skip
    scaler = devices.loss_scaler(device, args.amp and args.amp_dtype == "float16")
    run = Run(model, loss_fn, optimizer, scheduler, scaler, runstate.TrainingHealth(device))
    run.training_data = checkpoints.training_data(train_set)  # which a resume must keep
    return run, model_config


def training_loss(name: str, train_set, shares_file: str | None, weight_method: str):
    """The loss `name` of losses.py; "wce" weighs the classes by the pixel shares of the
    training frames (or of a `python -m seglab.explore histogram --out` file)."""
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


# ----------------------------------------------------------------------------------------
# Test and predict


def test(args: argparse.Namespace) -> int:
    """The `test` command: score a checkpoint on the test areas, at the labels' full
    resolution; print the scores of each area and of all together, and write them to
    OUT/metrics.json with the confusion matrix."""
    _, _, local_rank = devices.setup_distributed()
    device = devices.pick_device(args.device, local_rank)
    model_file = downloads.local_model_file(args.model)
    if model_file.suffix == ".onnx":
        raise devices.UsageError(
            f"test scores a checkpoint (.pt); run {model_file.name} on pictures with predict"
        )
    model, checkpoint = checkpoints.load_model(model_file, device)
    datadir = args.datadir or data.default_datadir(checkpoint["args"].get("datadir"))
    areas = args.areas or evaluation.default_test_areas(datadir, checkpoint)
    img_size = checkpoint["img_size"]
    transforms = data.eval_transforms(img_size, resize_mask=args.at_train_size)
    # On a cache, "full resolution" is the cached size.
    inputs = checkpoint.get("inputs", ["rgb"])
    dataset = cache.open_dataset(datadir, areas, transforms, img_size=img_size, inputs=inputs)
    indices = data.subset_indices(len(dataset), args.subset)
    loader = evaluation.test_loader(dataset, indices, args.batch_size, args.workers, device)
    out = Path(args.out) if args.out else evaluation.default_test_folder(args.model, dataset.areas)
    if devices.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        print(f"testing {args.model} on {len(indices)} frames of areas {', '.join(dataset.areas)}")

    predictions_dir = out / "predictions" if args.save_predictions else None
    per_area = evaluation.AreaScores(dataset, predictions_dir)
    confusion = evaluate(
        model, loader, device, amp=device.type == "cuda", full_resolution=not args.at_train_size,
        on_batch=per_area.update,
    )  # fmt: skip
    area_results = per_area.compute()
    if not devices.is_main_process():
        return 0
    results = confusion.compute()
    tested_areas = [dataset.frames[index].area for index in indices]
    evaluation.print_test_scores(results, area_results, tested_areas)
    summary = {
        "model": str(args.model),
        "datadir": str(datadir),
        "areas": dataset.areas,
        "frames": len(indices),
        "full_resolution": not args.at_train_size,
        "per_area": area_results,
        **results,
    }
    evaluation.write_test_results(out, summary, confusion.matrix)
    return 0


def predict_image(segmenter: models.Segmenter, image: torch.Tensor, device) -> torch.Tensor:
    """Class ids `(H, W)` int64 for one `(3, H, W)` uint8 image of any size.

    The segmenter scales the image to about the training resolution, keeping its aspect
    ratio, and scales the logits back to the original size (see models.Segmenter); the
    argmax of `segmenter(image[None])`, computed in parts (inference.segment_in_parts).
    """
    return inference.segment_in_parts(segmenter, image, device).long()


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


def load_segmenter(
    model: str, device: torch.device
) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[str]]:
    """`segment(image (3, H, W) uint8) -> class ids (H, W) int64` for a checkpoint, or for
    an ONNX file run with onnxruntime; `model` is a path or a URL. Also returns the model's
    inputs: a model trained with depth takes `(4, H, W)` (see seglab/depth.py)."""
    model_file = downloads.local_model_file(model)
    if model_file.suffix == ".onnx":
        # Q14's function on pictures up to 4 MP; larger ones in parts, to bound the memory.
        return inference.onnx_segment(model_file, segment_with_onnxruntime), ["rgb"]
    network, checkpoint = checkpoints.load_model(model_file, device)
    inputs = checkpoint.get("inputs", ["rgb"])
    segmenter_class = depth.RGBDSegmenter if depth.uses_depth(inputs) else models.Segmenter
    segmenter = segmenter_class(network, checkpoint["img_size"])
    return functools.partial(inference.segment_in_parts, segmenter, device=device), inputs


def predict(args: argparse.Namespace) -> int:
    """The `predict` command: segment pictures of any size, writing for each its mask, an
    overlay and a legend; exit status 1 when an input could not be read."""
    out = Path(args.out)
    paths = inference.expand_inputs(args.images)
    # The output names are checked before anything is written.
    stems = cli.output_stems(paths, out, inference.PREDICTION_SUFFIXES)
    segment, inputs = load_segmenter(args.model, devices.pick_device(args.device))
    needs_depth = depth.uses_depth(inputs)
    depth_files = inference.depth_files_of(paths, args.depth, needs_depth, args.model)
    cli.make_output_folder(out)
    failures = inference.segment_files(segment, paths, stems, depth_files, needs_depth, out)
    if failures:
        print(f"{failures} input(s) could not be read", file=sys.stderr)
    return 1 if failures else 0


def export_model(args: argparse.Namespace) -> int:
    """The `export` command: the checkpoint's model as ONNX (.onnx) or torch.export (.pt2)."""
    export.export_checkpoint(args.model, Path(args.out))
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
    """The command line: every command and flag is in seglab/flags.py."""
    return flags.build_parser(COMMANDS, description=__doc__.split("\n")[0])


# The errors of a user, not of the code: each ends the program with one line (cli.run).
USER_ERRORS = (
    data.DataError, checkpoints.CheckpointError, downloads.DownloadError, TrainingStopped,
    devices.UsageError, export.ExportError, cli.FlagError,
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = flags.parse_args(build_parser(), sys.argv[1:] if argv is None else argv)
    return devices.run_with_peers(lambda: cli.run(args.func, args, USER_ERRORS))


if __name__ == "__main__":
    sys.exit(main())
