"""Training losses for unbalanced classes, and the class weights of the weighted ones.

Why a metric cannot be the loss. The mIoU counts pixels after an argmax: a small change of the
weights leaves almost every argmax, hence the score, unchanged, so its gradient is zero almost
everywhere. Training needs a smooth function of the softmax probabilities that is low when the
metric is high; the losses below are such surrogates.

- ``ce``: cross-entropy, -log p_t per pixel; every pixel counts the same, so wall dominates.
- ``wce``: cross-entropy where a pixel of class c counts w_c, larger for rare classes (see
  ``class_weights_from_frequencies``).
- ``focal``: -(1 - p_t)**gamma * log p_t (Lin et al. 2017): well-classified pixels count less.
- ``dice``: 1 - soft F1 (Dice) per class, averaged over classes: each class counts the same.
- ``ce+dice``: the sum of the two, steadier than Dice alone.

``build_loss(name, ...)`` returns ``loss(logits, targets)`` for ``logits`` (B, K, H, W) of any
float dtype and ``targets`` (B, H, W) int64. Every loss computes in float32, gives ignored
pixels zero weight and zero gradient, averages over the other pixels, and returns 0 (not NaN)
for a batch whose pixels are all ignored.

Adding a loss takes one function and one entry in ``LOSSES``. The function's parameters are
``logits, targets, ignore_index=IGNORE_INDEX``, then ``class_weights`` if the loss takes per-class
weights (without a default when it needs them, with ``None`` when they are optional), then its
options, each with its default. ``build_loss`` reads all of that from the signature, as
``models.model_config`` does for the models. The function checks its own options' values:
``build_loss`` calls it once on a single ignored pixel, so a bad value fails there.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from data import IGNORE_INDEX
from metrics import _check_class_setup, _is_integer

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

available_weight_methods: tuple[str, ...] = ("inverse", "inverse_sqrt", "effective")


# --------------------------------------------------------------------------------------------
# The losses
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


def _cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    class_weights: torch.Tensor | Sequence[float] | None,
) -> torch.Tensor:
    """Cross-entropy of ``cross_entropy_loss``, weighted when class_weights (K,) is not None."""
    _check_loss_inputs(logits, targets)
    logits, targets = logits.float(), targets.long()
    if class_weights is not None:
        class_weights = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
    pixel_weights = _per_pixel_weights(class_weights, targets, targets != ignore_index)
    pixel_losses = F.cross_entropy(
        logits, targets, weight=class_weights, ignore_index=ignore_index, reduction="none"
    )
    return _safe_mean(pixel_losses.sum(), pixel_weights.sum())


def cross_entropy_loss(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Cross-entropy averaged over non-ignored pixels; 0-dim float32.

    logits (B, K, H, W) float, targets (B, H, W) int64. Same value as
    ``F.cross_entropy(ignore_index=...)``, but 0 instead of NaN when every pixel is ignored.
    """
    return _cross_entropy(logits, targets, ignore_index, None)


def weighted_cross_entropy_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    *,
    class_weights: torch.Tensor | Sequence[float],
) -> torch.Tensor:
    """Cross-entropy with per-class weights (K,), averaged over non-ignored pixels; 0-dim float32.

    The sum of weighted pixel losses is divided by the sum of the weights of the non-ignored
    pixels, as ``F.cross_entropy(weight=..., reduction="mean")`` does. class_weights is
    keyword-only because it has no default: the loss makes no sense without it.
    """
    return _cross_entropy(logits, targets, ignore_index, class_weights)


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    class_weights: torch.Tensor | Sequence[float] | None = None,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Softmax focal loss (Lin et al. 2017), averaged over non-ignored pixels; 0-dim float32.

    Pixel loss: -w[t] * (1 - p_t)**gamma * log p_t, with p_t the softmax probability of the
    true class t and w the optional class_weights (K,), the "alpha" of the paper. The mean is
    divided by the sum of w over the non-ignored pixels, so gamma = 0 gives the cross-entropy
    of ``weighted_cross_entropy_loss`` (or of ``cross_entropy_loss`` without weights) exactly.
    """
    _check_loss_inputs(logits, targets)
    if not gamma >= 0:  # also refuses NaN
        raise ValueError(f"focal loss needs gamma >= 0, got {gamma}")
    if not math.isfinite(gamma):  # (1 - p_t)**inf would give NaN gradients
        raise ValueError(f"focal loss needs a finite gamma, got {gamma}")
    targets = targets.long()
    valid = targets != ignore_index
    log_p_true = F.log_softmax(logits.float(), dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)
    pixel_losses = -log_p_true
    if gamma != 0:
        # 1 - p_t as -expm1(log p_t) stays accurate when p_t is close to 1. The clamp keeps
        # pow's gradient finite at p_t == 1 when gamma < 1.
        one_minus_p = (-torch.expm1(log_p_true)).clamp_min(torch.finfo(torch.float32).tiny)
        pixel_losses = one_minus_p.pow(gamma) * pixel_losses
    pixel_weights = _per_pixel_weights(class_weights, targets, valid)
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
    if not smooth > 0:  # also refuses NaN
        raise ValueError(f"dice smoothing must be > 0, got {smooth}")
    if not math.isfinite(smooth):  # inf / inf would make the loss NaN
        raise ValueError(f"dice smoothing must be finite, got {smooth}")
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


def ce_plus_dice_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    class_weights: torch.Tensor | Sequence[float] | None = None,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy (weighted by class_weights (K,) if given) plus Dice loss; 0-dim float32.

    The cross-entropy gives steady per-pixel gradients, the Dice term makes every class count
    the same whatever its area.
    """
    cross_entropy = _cross_entropy(logits, targets, ignore_index, class_weights)
    return cross_entropy + dice_loss(logits, targets, ignore_index, smooth)


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

# Every loss by name. The parameters of each function after (logits, targets, ignore_index)
# tell build_loss whether it takes class_weights and which options it has, with their defaults.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "ce": cross_entropy_loss,
    "wce": weighted_cross_entropy_loss,
    "focal": focal_loss,
    "dice": dice_loss,
    "ce+dice": ce_plus_dice_loss,
}

available_losses: tuple[str, ...] = tuple(LOSSES)

# The parameters of a loss function that are not options: build_loss passes them itself.
_NOT_OPTIONS = ("logits", "targets", "ignore_index", "class_weights")


def _check_name(name: str) -> None:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(LOSSES)}")


def default_options(name: str) -> dict[str, float]:
    """The options of loss ``name`` and their defaults, e.g. {"gamma": 2.0} for "focal"."""
    _check_name(name)
    parameters = inspect.signature(LOSSES[name]).parameters
    return {key: param.default for key, param in parameters.items() if key not in _NOT_OPTIONS}


def _class_weights_parameter(name: str) -> inspect.Parameter | None:
    """The ``class_weights`` parameter of loss ``name``; None when it takes no weights."""
    return inspect.signature(LOSSES[name]).parameters.get("class_weights")


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


def _check_class_weights(name: str, weights: torch.Tensor | None) -> None:
    """Refuse weights for a loss without class_weights, and their absence where required."""
    parameter = _class_weights_parameter(name)
    if parameter is None and weights is not None:
        *others, last = [repr(key) for key in LOSSES if _class_weights_parameter(key) is not None]
        choices = f"{', '.join(others)} or {last}" if others else last
        raise ValueError(f"loss {name!r} takes no class_weights; use {choices}")
    if parameter is not None and parameter.default is parameter.empty and weights is None:
        raise ValueError(
            f"loss {name!r} needs class_weights, e.g. from class_weights_from_frequencies()"
        )


def build_loss(
    name: str,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    class_weights: Sequence[float] | torch.Tensor | None = None,
    **options: float,
) -> Loss:
    """Return ``loss(logits, targets) -> 0-dim float32`` for one of the ``LOSSES``.

    logits (B, K, H, W) any float dtype, targets (B, H, W) int64. ``class_weights`` (K,):
    required by "wce", optional for "focal" and "ce+dice", refused by "ce" and "dice" (as the
    signatures in ``LOSSES`` say). Options, see ``default_options``: ``gamma`` (focal, default
    2), ``smooth`` (dice and ce+dice, default 1).
    """
    _check_name(name)
    _check_class_setup(num_classes, ignore_index)
    defaults = default_options(name)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        accepted = ", ".join(defaults) or "none"
        raise ValueError(f"loss {name!r} got unknown options {unknown}; it accepts: {accepted}")
    weights = _as_class_weights(class_weights, num_classes)
    _check_class_weights(name, weights)
    keywords = {**defaults, **options}
    if weights is not None:
        keywords["class_weights"] = weights
    loss_function = LOSSES[name]

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dim() < 2 or logits.shape[1] != num_classes:
            raise ValueError(
                f"loss built for {num_classes} classes got logits of shape {tuple(logits.shape)}"
            )
        return loss_function(logits, targets, ignore_index, **keywords)

    # One ignored pixel: the loss checks its options now rather than at the first training step.
    with torch.no_grad():
        loss(torch.zeros(1, num_classes, 1, 1), torch.full((1, 1, 1), ignore_index))
    return loss


# --------------------------------------------------------------------------------------------
# Class weights
# --------------------------------------------------------------------------------------------


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
