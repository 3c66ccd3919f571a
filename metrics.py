"""Segmentation metrics from one confusion matrix: per-class IoU, accuracy and F1, their means.

Stanford 2D-3D-S is very unbalanced: wall covers about a third of the pixels, sofa a third of
a percent. Pixel accuracy alone therefore says little (a model that never predicts sofa loses
almost nothing in it), so the scores below are per class, and their means weigh every class
the same. Pixels labelled ``<UNK>`` (``data.IGNORE_INDEX``) count nowhere.

Metrics
-------
``ConfusionMatrix`` accumulates a (K, K) int64 matrix over a whole evaluation run: rows are the
true class, columns the predicted class. Pixels whose target is the ignore index are left out,
so its row stays zero. Predicting the ignore class on a labelled pixel is an ordinary mistake:
it is a miss for the true class. All scores come from the matrix of the whole run, not from
per-image scores averaged afterwards. For a class c, with TP = matrix[c, c], FN = row sum - TP
and FP = column sum - TP:

    IoU      = TP / (TP + FP + FN)
    accuracy = TP / (TP + FN)             (per-class accuracy, i.e. recall)
    F1       = 2 TP / (2 TP + FP + FN)    (= Dice score)

Absent classes. A score whose denominator is zero is undefined and reported as NaN; the means
(mIoU, mean accuracy, macro F1) average over the non-NaN classes only. In detail:

- class absent from both targets and predictions: IoU, accuracy and F1 are NaN, so it is left
  out of every mean (there is no evidence either way);
- class predicted but absent from the targets: IoU = F1 = 0 (the false positives are
  penalised), accuracy NaN (there is no pixel to recall);
- class in the targets but never predicted: IoU = accuracy = F1 = 0;
- the ignore class: always NaN, never in a mean.

Libraries differ here. torchmetrics (``MulticlassJaccardIndex`` etc. with ``average=None``)
gives 0, its ``zero_division``, wherever we give NaN, the ignore class included. Its macro IoU
leaves out the same classes as our mIoU, but its macro F1 and accuracy average over every class
with TP + FP + FN > 0: the ignore class counts as 0 when it is predicted on labelled pixels,
and for accuracy so does a class that is only predicted.

The losses that train a model for these scores are in ``losses.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
import torch.distributed as dist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from data import CLASSES, IGNORE_INDEX

# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _check_class_setup(num_classes: int, ignore_index: int) -> None:
    """Raise ValueError unless num_classes >= 2 and 0 <= ignore_index < num_classes.

    Shared with losses.py, which imports it from here (metrics never imports losses).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int class id, got {ignore_index!r}")
    if not 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index must be in [0, {num_classes}), got {ignore_index}")


def _is_integer(tensor: torch.Tensor) -> bool:
    """True for integer dtypes (bool excluded): the dtypes of class ids. Used by losses.py too."""
    return not (
        tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool
    )


def _as_class_ids(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Check shapes and dtypes; return predicted class ids shaped like targets.

    preds: (B, H, W) integer class ids or (B, K, H, W) float logits; targets: (B, H, W) integer.
    """
    if not isinstance(preds, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise ValueError("preds and targets must be torch tensors")
    if not _is_integer(targets):
        raise ValueError(f"targets must hold integer class ids, got dtype {targets.dtype}")
    if preds.device != targets.device:
        raise ValueError(f"preds are on {preds.device} but targets on {targets.device}")
    if preds.dim() == targets.dim() + 1:
        expected = (targets.shape[0], num_classes, *targets.shape[1:])
        if tuple(preds.shape) != expected or not preds.dtype.is_floating_point:
            raise ValueError(
                f"logits must be float of shape {expected} for targets {tuple(targets.shape)} "
                f"and num_classes={num_classes}, got {preds.dtype} {tuple(preds.shape)}"
            )
        return preds.argmax(dim=1)
    if preds.shape != targets.shape or not _is_integer(preds):
        raise ValueError(
            "preds must be integer class ids shaped like targets or float logits (B, K, H, W); "
            f"got preds {preds.dtype} {tuple(preds.shape)}, targets {tuple(targets.shape)}"
        )
    return preds


def confusion_counts(
    preds: torch.Tensor, targets: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Confusion matrix of one batch, counted with a single bincount.

    preds, targets: same shape, e.g. (B, H, W), integer class ids in [0, K). Returns (K, K)
    int64 on their device: rows = true class, columns = predicted class, the row of
    ignore_index zero. Predicted ids outside [0, K) are not checked (that would cost a
    device-to-host copy per batch); argmax of K logits is always in range.
    """
    # >>> Q10: count the (true, predicted) pairs of the batch
    # The pair (true t, predicted p) goes to bin t * K + p: one pass over all pixels.
    pair_index = targets.reshape(-1).long() * num_classes + preds.reshape(-1).long()
    try:
        counts = torch.bincount(pair_index, minlength=num_classes * num_classes)
    except RuntimeError as error:
        raise ValueError(f"class ids must be in [0, {num_classes}): {error}") from error
    if counts.numel() != num_classes * num_classes:
        raise ValueError(f"targets contain class ids >= num_classes={num_classes}")
    matrix = counts.view(num_classes, num_classes)
    # Ignored pixels are exactly the row of ignore_index. Zeroing it drops them without a
    # boolean mask, which on CUDA would wait for the device on every batch.
    matrix[ignore_index] = 0
    return matrix
    # <<< Q10


def scores_from_confusion(
    matrix: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> dict[str, torch.Tensor]:
    """Per-class and mean scores from a confusion matrix (absent classes: see module docstring).

    matrix: (K, K) integer counts, rows = true class. Returns float64 tensors: ``iou``,
    ``accuracy``, ``f1`` of shape (K,); 0-dim ``miou``, ``mean_accuracy``, ``macro_f1``,
    ``pixel_accuracy``; and ``support`` (K,) int64, the number of labelled pixels per class.
    """
    # >>> Q11: compute the scores from the confusion matrix
    support = matrix.sum(dim=1)
    counts = matrix.double()  # exact for counts below 2**53
    true_positives = counts.diagonal()
    false_negatives = counts.sum(dim=1) - true_positives
    false_positives = counts.sum(dim=0) - true_positives
    # A zero denominator comes with a zero numerator, and 0 / 0 is NaN in floating point:
    # exactly the convention for a class absent from the targets (and the predictions).
    iou = true_positives / (true_positives + false_positives + false_negatives)
    accuracy = true_positives / (true_positives + false_negatives)
    f1 = 2 * true_positives / (2 * true_positives + false_positives + false_negatives)
    for per_class in (iou, accuracy, f1):
        per_class[ignore_index] = math.nan
    return {
        "iou": iou,
        "miou": iou.nanmean(),
        "pixel_accuracy": true_positives.sum() / counts.sum(),
        "accuracy": accuracy,
        "mean_accuracy": accuracy.nanmean(),
        "f1": f1,
        "macro_f1": f1.nanmean(),
        "support": support,
    }
    # <<< Q11


class ConfusionMatrix:
    """Confusion matrix accumulated over batches, on the device of the first batch.

    ``matrix`` is None until the first ``update``, then (K, K) int64: rows = true class,
    columns = predicted class. Pixels whose target is ``ignore_index`` are left out.
    ``update`` adds no host synchronisation of its own (no ``.item()``, no boolean masks),
    so it can run every batch; on CUDA, ``torch.bincount`` itself reads the largest index
    back to size its output.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        _check_class_setup(num_classes, ignore_index)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix: torch.Tensor | None = None

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch: preds (B, H, W) integer ids or (B, K, H, W) float logits (argmax over
        dim 1); targets (B, H, W) integer ids."""
        pred_ids = _as_class_ids(preds, targets, self.num_classes)
        counts = confusion_counts(pred_ids, targets, self.num_classes, self.ignore_index)
        if self.matrix is None:
            self.matrix = counts
        else:
            self.matrix += counts.to(self.matrix.device)

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self.matrix = None

    def all_reduce(self) -> None:
        """Sum the matrix over all processes; a no-op unless torch.distributed is initialised.

        Every process must call it, including one that saw no batch.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self.matrix is None:
            # NCCL only reduces CUDA tensors; other backends take CPU tensors.
            on_cuda = dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else "cpu"
            shape = (self.num_classes, self.num_classes)
            self.matrix = torch.zeros(shape, dtype=torch.int64, device=device)
        dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def compute(self) -> dict[str, float | list[float] | list[int]]:
        """Scores as plain Python numbers, ready for json.dump (which writes NaN as NaN).

        Per class (lists of K floats): ``iou``, ``accuracy`` (recall), ``f1``; means (floats):
        ``miou``, ``mean_accuracy``, ``macro_f1``; ``pixel_accuracy`` over the labelled pixels;
        ``support`` (K ints): labelled pixels per true class. NaN marks an undefined score.
        """
        if self.matrix is None:
            raise RuntimeError("ConfusionMatrix.compute() needs at least one update() first")
        scores = scores_from_confusion(self.matrix.cpu(), self.ignore_index)
        return {name: value.tolist() for name, value in scores.items()}


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.2f}"


_REPORT_KEYS = ("iou", "accuracy", "f1", "miou", "mean_accuracy", "macro_f1", "pixel_accuracy")


def format_report(
    results: dict[str, float | list[float] | list[int]],
    class_names: Sequence[str] = CLASSES,
) -> str:
    """Text table of per-class IoU, accuracy, F1 and pixel share (in %), then the means.

    results: the dict returned by ``ConfusionMatrix.compute()``. Undefined scores show as "-".
    """
    missing = [key for key in _REPORT_KEYS if key not in results]
    if missing:
        raise KeyError(f"results lack {missing}; pass the dict from ConfusionMatrix.compute()")
    if len(class_names) != len(results["iou"]):
        raise ValueError(
            f"got {len(class_names)} class names for {len(results['iou'])} classes in results"
        )
    support = results.get("support") or [0] * len(class_names)
    total = sum(support)
    width = max(len("class"), *(len(name) for name in class_names))
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'acc':>6}  {'F1':>6}  {'share':>6}"]
    for index, name in enumerate(class_names):
        values = [results[key][index] for key in ("iou", "accuracy", "f1")]
        values.append(support[index] / total if total else math.nan)
        lines.append(f"{name:<{width}}  " + "  ".join(f"{_percent(v):>6}" for v in values))
    means = [results[key] for key in ("miou", "mean_accuracy", "macro_f1")]
    lines.append(f"{'mean':<{width}}  " + "  ".join(f"{_percent(v):>6}" for v in means))
    lines.append(f"pixel accuracy {_percent(results['pixel_accuracy'])}  (all scores in %)")
    return "\n".join(lines)


def confusion_matrix_figure(
    matrix: torch.Tensor | np.ndarray, class_names: Sequence[str] = CLASSES
) -> Figure:
    """Row-normalised confusion matrix as a figure: row c shows where the pixels of class c went.

    matrix: (K, K) counts, rows = true class. Rows without pixels (the ignored class) are grey.
    Returns a Figure on the Agg canvas (no pyplot state): save it with ``fig.savefig(path)`` or
    pass it to ``SummaryWriter.add_figure``.
    """
    counts = torch.as_tensor(matrix).detach().cpu().double()
    if counts.dim() != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"matrix must be square (K, K), got shape {tuple(counts.shape)}")
    num_classes = counts.shape[0]
    if len(class_names) != num_classes:
        raise ValueError(f"got {len(class_names)} class names for a {num_classes}-class matrix")
    normalised = (counts / counts.sum(dim=1, keepdim=True)).numpy()  # NaN for empty rows

    side = 2.0 + 0.5 * num_classes
    figure = Figure(figsize=(side + 1.0, side), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    # Grey marks rows without pixels, so they do not read as "0 % correct".
    colormap = matplotlib.colormaps["Blues"].with_extremes(bad="0.85")
    image = axes.imshow(np.ma.masked_invalid(normalised), cmap=colormap, vmin=0.0, vmax=1.0)
    ticks = np.arange(num_classes)
    axes.set_xticks(ticks, labels=list(class_names), rotation=45, ha="right")
    axes.set_yticks(ticks, labels=list(class_names))
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title("Confusion matrix (% of each true class)")
    figure.colorbar(image, ax=axes, shrink=0.8)
    for row, col in zip(*np.nonzero(normalised >= 0.005), strict=True):
        value = normalised[row, col]
        color = "white" if value > 0.5 else "black"
        axes.text(col, row, f"{100 * value:.0f}", ha="center", va="center", color=color, fontsize=7)
    return figure
