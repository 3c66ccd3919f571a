"""Segmentation metrics from one confusion matrix, and losses for unbalanced classes.

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
and for accuracy so does a class that is only predicted. Counting an absent class as 0 in a
mean would lower the mIoU of a split without sofa by 1/13 of its value.

Losses
------
``build_loss(name, ...)`` returns ``loss(logits, targets)`` for ``logits`` (B, K, H, W) of any
float dtype and ``targets`` (B, H, W) int64. Every loss computes in float32, gives ignored
pixels zero weight and zero gradient, averages over the other pixels, and returns 0 (not NaN)
for a batch whose pixels are all ignored.

Run ``python metrics.py bench`` to time ``ConfusionMatrix.update`` against torchmetrics.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence

import matplotlib
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from data import CLASSES, IGNORE_INDEX, NUM_CLASSES

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

available_losses: tuple[str, ...] = ("ce", "wce", "focal", "dice", "ce+dice")
available_weight_methods: tuple[str, ...] = ("inverse", "inverse_sqrt", "effective")

# Keyword options each loss accepts in build_loss, with their defaults.
_LOSS_OPTIONS: dict[str, dict[str, float]] = {
    "ce": {},
    "wce": {},
    "focal": {"gamma": 2.0},
    "dice": {"smooth": 1.0},
    "ce+dice": {"smooth": 1.0},
}


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _check_class_setup(num_classes: int, ignore_index: int) -> None:
    """Raise ValueError unless num_classes >= 2 and 0 <= ignore_index < num_classes."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int class id, got {ignore_index!r}")
    if not 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index must be in [0, {num_classes}), got {ignore_index}")


def _is_integer(tensor: torch.Tensor) -> bool:
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


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def _check_loss_inputs(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Raise ValueError unless logits are float (B, K, H, W) and targets integer (B, H, W)."""
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    if not _is_integer(targets):
        raise ValueError(f"targets must hold integer class ids, got {targets.dtype}")
    if (
        logits.dim() != targets.dim() + 1
        or logits.shape[0] != targets.shape[0]
        or (logits.shape[2:] != targets.shape[1:])
    ):
        raise ValueError(
            f"logits (B, K, H, W) and targets (B, H, W) do not match: {tuple(logits.shape)} "
            f"vs {tuple(targets.shape)}"
        )


def _per_pixel_weights(
    weights: torch.Tensor | Sequence[float] | None, targets: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """(B, H, W) float32 weight of each pixel: weights[target], or 1, and 0 where not valid."""
    if weights is None:
        return valid.float()
    weights = torch.as_tensor(weights, dtype=torch.float32, device=targets.device)
    return weights[targets] * valid


def _safe_mean(total: torch.Tensor, weight_sum: torch.Tensor) -> torch.Tensor:
    """total / weight_sum, but 0 when weight_sum is 0 (all pixels ignored): 0/0 would be NaN."""
    return total / torch.where(weight_sum > 0, weight_sum, torch.ones_like(weight_sum))


def cross_entropy_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    class_weights: torch.Tensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """Cross-entropy averaged over non-ignored pixels; 0-dim float32.

    logits (B, K, H, W) float, targets (B, H, W) int64. With class_weights (K,), the sum of
    weighted pixel losses is divided by the sum of the weights of the non-ignored pixels, as
    ``F.cross_entropy(weight=..., reduction="mean")`` does.
    """
    _check_loss_inputs(logits, targets)
    logits, targets = logits.float(), targets.long()
    if class_weights is not None:
        class_weights = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
    pixel_weights = _per_pixel_weights(class_weights, targets, targets != ignore_index)
    pixel_losses = F.cross_entropy(
        logits, targets, weight=class_weights, ignore_index=ignore_index, reduction="none"
    )
    return _safe_mean(pixel_losses.sum(), pixel_weights.sum())


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    gamma: float = 2.0,
    alpha: torch.Tensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """Softmax focal loss (Lin et al. 2017), averaged over non-ignored pixels; 0-dim float32.

    Pixel loss: -alpha[t] * (1 - p_t)**gamma * log p_t, with p_t the softmax probability of
    the true class t. gamma = 0 gives cross-entropy. With per-class alpha (K,), the mean is
    divided by the sum of alpha over the non-ignored pixels, so gamma = 0 gives the weighted
    cross-entropy of ``cross_entropy_loss(class_weights=alpha)`` exactly.
    """
    _check_loss_inputs(logits, targets)
    if gamma < 0:
        raise ValueError(f"focal loss needs gamma >= 0, got {gamma}")
    targets = targets.long()
    valid = targets != ignore_index
    log_p_true = F.log_softmax(logits.float(), dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)
    pixel_losses = -log_p_true
    if gamma != 0:
        # 1 - p_t as -expm1(log p_t) stays accurate when p_t is close to 1. The clamp keeps
        # pow's gradient finite at p_t == 1 when gamma < 1.
        one_minus_p = (-torch.expm1(log_p_true)).clamp_min(torch.finfo(torch.float32).tiny)
        pixel_losses = one_minus_p.pow(gamma) * pixel_losses
    pixel_weights = _per_pixel_weights(alpha, targets, valid)
    pixel_losses = torch.where(valid, pixel_losses * pixel_weights, 0.0)
    return _safe_mean(pixel_losses.sum(), pixel_weights.sum())


def dice_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Soft multiclass Dice loss from softmax probabilities; 0-dim float32.

    Per class c, summed over all non-ignored pixels of the batch (not per image):
    dice_c = (2 * sum(p_c * y_c) + smooth) / (sum(p_c) + sum(y_c) + smooth), y the one-hot
    target. The loss is 1 - mean of dice_c over the classes other than ignore_index. The
    smoothing term (in pixels) makes a class absent from the batch score 1 instead of 0/0
    when the model gives it no probability, and a fully ignored batch a loss of 0.
    """
    _check_loss_inputs(logits, targets)
    num_classes = logits.shape[1]
    targets = targets.long()
    valid = (targets != ignore_index).unsqueeze(1).float()  # (B, 1, H, W)
    probs = F.softmax(logits.float(), dim=1) * valid
    # scatter_ rather than F.one_hot, which checks the ids' range by reading them on the host.
    one_hot = torch.zeros_like(probs).scatter_(1, targets.unsqueeze(1), 1.0) * valid
    sum_dims = (0, *range(2, probs.dim()))
    intersection = (probs * one_hot).sum(dim=sum_dims)
    cardinality = probs.sum(dim=sum_dims) + one_hot.sum(dim=sum_dims)
    dice = (2 * intersection + smooth) / (cardinality + smooth)  # (K,)
    mean_dice = (dice.sum() - dice[ignore_index]) / (num_classes - 1)
    return 1 - mean_dice


def _as_class_weights(class_weights: object, num_classes: int) -> torch.Tensor | None:
    """Validate per-class weights; return them as a (K,) float32 tensor (or None)."""
    if class_weights is None:
        return None
    weights = torch.as_tensor(class_weights, dtype=torch.float32).detach().clone()
    if weights.shape != (num_classes,):
        raise ValueError(
            f"class_weights must have one value per class ({num_classes}), "
            f"got shape {tuple(weights.shape)}"
        )
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"class_weights must be finite and >= 0, got {weights.tolist()}")
    return weights


def build_loss(
    name: str,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    class_weights: Sequence[float] | torch.Tensor | None = None,
    **options: float,
) -> Loss:
    """Return ``loss(logits, targets) -> 0-dim float32`` for one of ``available_losses``.

    logits (B, K, H, W) any float dtype, targets (B, H, W) int64. ``class_weights`` (K,):
    required by "wce", used as per-class alpha by "focal", weights the cross-entropy term of
    "ce+dice", refused by "ce" and "dice". Options: ``gamma`` (focal, default 2),
    ``smooth`` (dice and ce+dice, default 1).
    """
    if name not in available_losses:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(available_losses)}")
    _check_class_setup(num_classes, ignore_index)
    unknown = sorted(set(options) - set(_LOSS_OPTIONS[name]))
    if unknown:
        accepted = ", ".join(_LOSS_OPTIONS[name]) or "none"
        raise ValueError(f"loss {name!r} got unknown options {unknown}; it accepts: {accepted}")
    settings = {**_LOSS_OPTIONS[name], **options}
    weights = _as_class_weights(class_weights, num_classes)
    if name == "wce" and weights is None:
        raise ValueError(
            "loss 'wce' needs class_weights, e.g. from class_weights_from_frequencies()"
        )
    if name in ("ce", "dice") and weights is not None:
        raise ValueError(f"loss {name!r} takes no class_weights; use 'wce', 'focal' or 'ce+dice'")
    if name == "focal" and not settings["gamma"] >= 0:
        raise ValueError(f"focal loss needs gamma >= 0, got {settings['gamma']}")
    if name in ("dice", "ce+dice") and not settings["smooth"] > 0:
        raise ValueError(f"dice smoothing must be > 0, got {settings['smooth']}")

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dim() < 2 or logits.shape[1] != num_classes:
            raise ValueError(
                f"loss built for {num_classes} classes got logits of shape {tuple(logits.shape)}"
            )
        if name == "focal":
            return focal_loss(logits, targets, ignore_index, settings["gamma"], weights)
        total = logits.new_zeros((), dtype=torch.float32)
        if name in ("ce", "wce", "ce+dice"):
            total = total + cross_entropy_loss(logits, targets, ignore_index, weights)
        if name in ("dice", "ce+dice"):
            total = total + dice_loss(logits, targets, ignore_index, settings["smooth"])
        return total

    return loss


def class_weights_from_frequencies(
    freqs: Sequence[float] | torch.Tensor,
    method: str = "inverse_sqrt",
    beta: float = 0.999,
    ignore_index: int = IGNORE_INDEX,
    num_samples: float = 10_000,
) -> torch.Tensor:
    """Per-class loss weights from pixel frequencies; returns (K,) float32.

    freqs: K pixel shares (or counts) per class, e.g. the share list of ``data.py histogram``.
    They are renormalised over the classes other than ignore_index. Methods, for share f_c:
    ``inverse`` 1 / f_c; ``inverse_sqrt`` 1 / sqrt(f_c); ``effective`` (Cui et al. 2019)
    (1 - beta) / (1 - beta**n_c), with n_c = f_c * num_samples samples. Neighbouring pixels
    are far from independent, so n_c is not the raw pixel count: the default treats the data
    as 10 000 samples, and with beta = 0.999 the effective number saturates near 1000, so
    classes above about 10 % get similar weights while rare ones approach inverse frequency.

    The weights have mean 1 over the classes other than ignore_index, which gets 0. A class
    with frequency 0 gets the largest weight of the observed classes: it is at least as rare,
    and a weight of 0 would silence it if it appears in the data trained on.
    """
    if method not in available_weight_methods:
        raise ValueError(
            f"unknown method {method!r}; available: {', '.join(available_weight_methods)}"
        )
    shares = torch.as_tensor(freqs, dtype=torch.float64).detach().clone()
    if shares.dim() != 1 or shares.numel() < 2:
        raise ValueError(
            f"freqs must be a flat list of per-class values, got {tuple(shares.shape)}"
        )
    _check_class_setup(shares.numel(), ignore_index)
    if not torch.isfinite(shares).all() or (shares < 0).any():
        raise ValueError(f"freqs must be finite and >= 0, got {shares.tolist()}")
    if method == "effective" and not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if method == "effective" and not num_samples > 0:
        raise ValueError(f"num_samples must be > 0, got {num_samples}")

    # >>> Q12: compute the class weights
    weighted = torch.ones_like(shares, dtype=torch.bool)
    weighted[ignore_index] = False
    if shares[weighted].sum() <= 0:
        raise ValueError("freqs are all zero outside ignore_index: no class to weight")
    shares = shares / shares[weighted].sum()
    observed = weighted & (shares > 0)
    weights = torch.zeros_like(shares)
    if method == "inverse":
        weights[observed] = 1 / shares[observed]
    elif method == "inverse_sqrt":
        weights[observed] = 1 / shares[observed].sqrt()
    else:
        # 1 - beta**n written with expm1 stays accurate when beta**n is close to 1.
        effective_number = -torch.expm1(shares[observed] * num_samples * math.log(beta))
        weights[observed] = (1 - beta) / effective_number
    weights[weighted & ~observed] = weights[observed].max()
    return (weights / weights[weighted].mean()).float()
    # <<< Q12


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------


def median_seconds(
    step: Callable[[], object],
    device: torch.device,
    seconds: float = math.inf,
    max_runs: int = 20,
) -> float:
    """Median wall time of `step()` after one warm-up call: at least one timed run, more
    until `seconds` have passed or `max_runs` are done. On CUDA the clock waits for the
    device, whose work is otherwise only queued."""

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()
    times = [timed()]
    while sum(times) < seconds and len(times) < max_runs:
        times.append(timed())
    return statistics.median(times)


def benchmark_update(
    batch_size: int = 16,
    size: int = 256,
    repeats: int = 20,
    num_classes: int = NUM_CLASSES,
    device: str = "cpu",
) -> list[dict[str, float | str]]:
    """Time one update with a (batch_size, size, size) batch of class ids, ours vs torchmetrics.

    Returns one row per implementation: ``name``, ``ms`` (median per update) and ``ratio``
    (its time / ours). torchmetrics is optional: without it only ours is timed.
    """
    if batch_size < 1 or size < 1 or repeats < 1:
        raise ValueError("batch_size, size and repeats must all be >= 1")
    torch_device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, size, size)
    targets = torch.randint(0, num_classes, shape, generator=generator).to(torch_device)
    preds = torch.randint(0, num_classes, shape, generator=generator).to(torch_device)

    ours = ConfusionMatrix(num_classes, IGNORE_INDEX)
    candidates: list[tuple[str, Callable[[], object]]] = [
        ("ConfusionMatrix (ours)", lambda: ours.update(preds, targets))
    ]
    try:
        from torchmetrics.classification import MulticlassJaccardIndex
    except ImportError:
        print("torchmetrics is not installed: timing ours only (pip install torchmetrics)")
    else:
        for validate in (True, False):
            metric = MulticlassJaccardIndex(
                num_classes, average=None, ignore_index=IGNORE_INDEX, validate_args=validate
            ).to(torch_device)
            name = f"torchmetrics MulticlassJaccardIndex (validate_args={validate})"
            candidates.append((name, functools.partial(metric.update, preds, targets)))

    rows: list[dict[str, float | str]] = []
    for name, step in candidates:
        ms = 1000 * median_seconds(step, torch_device, max_runs=repeats)
        rows.append({"name": name, "ms": ms})
    for row in rows:
        row["ratio"] = row["ms"] / rows[0]["ms"]
    return rows


def format_benchmark(rows: list[dict[str, float | str]]) -> str:
    """Text table of benchmark_update rows."""
    width = max(len(str(row["name"])) for row in rows)
    lines = [f"{'implementation':<{width}}  {'ms/update':>9}  {'x ours':>6}"]
    lines += [f"{row['name']:<{width}}  {row['ms']:>9.2f}  {row['ratio']:>6.2f}" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Segmentation metrics: benchmark tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="time ConfusionMatrix.update against torchmetrics")
    bench.add_argument("--batch-size", type=int, default=16)
    bench.add_argument("--size", type=int, default=256, help="image height and width")
    bench.add_argument("--repeats", type=int, default=20)
    bench.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: unknown device {args.device!r} (try cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    try:
        rows = benchmark_update(args.batch_size, args.size, args.repeats, device=args.device)
    except ValueError as error:
        parser.error(str(error))
    print(
        f"one update of a {args.batch_size}x{args.size}x{args.size} batch, "
        f"{NUM_CLASSES} classes, on {args.device}:"
    )
    print(format_benchmark(rows))


if __name__ == "__main__":
    main()
