"""What training shows in TensorBoard: the run's configuration, every validation score,
preview frames with their labels and predictions, and the confusion matrix.

    tensorboard --logdir runs
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

import data
import metrics
import utils
from seglab import devices
from seglab.checkpoints import plain_args

# The writers of open_tensorboard not closed yet (see closing_writers).
OPEN_WRITERS: list = []


def open_tensorboard(run_dir: Path, resuming: bool, step: int, args, model_config: dict):
    """A SummaryWriter on the run folder, with the run's configuration as text."""
    from torch.utils.tensorboard import SummaryWriter

    # After a crash, events logged past the resumed checkpoint are dropped (purge_step),
    # so that the retrained epochs do not appear twice.
    writer = SummaryWriter(log_dir=str(run_dir), purge_step=step if resuming else None)
    config_text = json.dumps({"args": plain_args(args), "model": model_config}, indent=2)
    writer.add_text("config", f"```\n{config_text}\n```", step)
    OPEN_WRITERS.append(writer)
    return writer


@contextlib.contextmanager
def closing_writers():
    """Close the writers that open_tensorboard opens inside the block when it ends, in any
    way. TensorBoard writes its events from a thread of its own and reopens the file for
    each write: a writer left open after a failure could write its events file again after
    the run folder was cleaned (runfolder.cleaned_if_unsaved), or lose its last events."""
    try:
        yield
    finally:
        while OPEN_WRITERS:
            with contextlib.suppress(OSError):  # a full disk: the error in flight matters more
                OPEN_WRITERS.pop().close()


def preview_batch(dataset, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same `count` validation frames every epoch: `(N, 3, S, S)` uint8, `(N, S, S)`."""
    step = max(1, len(dataset) // count)
    samples = [dataset[i] for i in range(0, len(dataset), step)[:count]]
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


@torch.no_grad()
def predict_preview(model: torch.nn.Module, inputs: torch.Tensor, amp: bool) -> torch.Tensor:
    """Class ids `(N, S, S)` int64 on the CPU for the network inputs of the preview frames,
    `(N, C, S, S)` float32 on the model's device."""
    model.eval()
    with devices.autocast(inputs.device, enabled=amp):
        return model(inputs).argmax(dim=1).cpu()


def log_validation(
    writer, results: dict, confusion, preview: tuple, predictions: torch.Tensor, step: int
) -> None:
    """Every mean score, per-class IoU, the preview frames `(images, targets)` beside their
    `predictions` (`(N, S, S)` class ids) and the confusion matrix in TensorBoard, at
    optimizer step `step` (one x-axis for training and validation)."""
    for key, value in results.items():
        if isinstance(value, float):  # the means; the lists are per class
            writer.add_scalar(f"val/{key}", value, step)
    for name, iou in zip(data.CLASSES, results["iou"], strict=True):
        if not math.isnan(iou):
            writer.add_scalar(f"val_iou/{name}", iou, step)
    images, targets = preview
    grid = utils.comparison_grid(images[:, :3], targets, predictions)
    writer.add_image("val/input_truth_prediction", grid, step)
    figure = metrics.confusion_matrix_figure(confusion.matrix, data.CLASSES)
    writer.add_figure("val/confusion_matrix", figure, step)
    writer.flush()
