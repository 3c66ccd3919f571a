"""losses.py: each loss against its formula or PyTorch, ignored pixels, low precision, the
registry that build_loss reads, and the class weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import losses

K = data.NUM_CLASSES
IGNORE = data.IGNORE_INDEX


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------

WEIGHTS = torch.linspace(0.5, 2.0, K)


def loss_batch(
    seed: int = 0, dtype: torch.dtype = torch.float32, scale: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (2, K, 5, 6) leaf tensor with grad, targets (2, 5, 6) int64 with ignored pixels."""
    generator = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(2, K, 5, 6, generator=generator)).to(dtype).requires_grad_()
    targets = torch.randint(0, K, (2, 5, 6), generator=generator)
    targets[0, :2] = IGNORE
    return logits, targets


def make_loss(name: str, **options: float) -> losses.Loss:
    weights = WEIGHTS if name in ("wce", "focal", "ce+dice") else None
    return losses.build_loss(name, K, IGNORE, class_weights=weights, **options)


def test_cross_entropy_follows_pytorch_conventions() -> None:
    logits, targets = loss_batch()
    ce = losses.build_loss("ce", K)(logits, targets)
    wce = losses.build_loss("wce", K, class_weights=WEIGHTS)(logits, targets)
    ones = losses.build_loss("wce", K, class_weights=[1.0] * K)(logits, targets)
    torch.testing.assert_close(ce, F.cross_entropy(logits, targets, ignore_index=IGNORE))
    torch.testing.assert_close(
        wce, F.cross_entropy(logits, targets, weight=WEIGHTS, ignore_index=IGNORE)
    )
    torch.testing.assert_close(ones, ce)


def test_focal_with_gamma_zero_is_cross_entropy() -> None:
    logits, targets = loss_batch(1)
    ce = losses.build_loss("ce", K)(logits, targets)
    wce = losses.build_loss("wce", K, class_weights=WEIGHTS)(logits, targets)
    focal = losses.build_loss("focal", K, gamma=0.0)(logits, targets)
    weighted_focal = losses.build_loss("focal", K, class_weights=WEIGHTS, gamma=0)(logits, targets)
    torch.testing.assert_close(focal, ce)
    torch.testing.assert_close(weighted_focal, wce)


def test_focal_matches_its_formula() -> None:
    logits, targets = loss_batch(2)
    loss = losses.focal_loss(logits, targets, IGNORE, gamma=2.0, class_weights=WEIGHTS)
    probs = torch.softmax(logits.detach().double(), dim=1).numpy()
    total = weight_sum = 0.0
    for b, y, x in np.ndindex(*targets.shape):
        t = int(targets[b, y, x])
        if t != IGNORE:
            p = probs[b, t, y, x]
            total += -float(WEIGHTS[t]) * (1 - p) ** 2 * math.log(p)
            weight_sum += float(WEIGHTS[t])
    assert loss.item() == pytest.approx(total / weight_sum, rel=1e-5)


def test_dice_matches_its_formula() -> None:
    logits, targets = loss_batch(3)
    loss = losses.dice_loss(logits, targets, IGNORE, smooth=1.0)
    probs = torch.softmax(logits.detach().double(), dim=1).numpy()
    dice = []
    for c in range(1, K):
        intersection = cardinality = 0.0
        for b, y, x in np.ndindex(*targets.shape):
            t = int(targets[b, y, x])
            if t != IGNORE:
                intersection += probs[b, c, y, x] * (t == c)
                cardinality += probs[b, c, y, x] + (t == c)
        dice.append((2 * intersection + 1.0) / (cardinality + 1.0))
    assert loss.item() == pytest.approx(1 - sum(dice) / len(dice), rel=1e-5)


def test_dice_is_near_zero_for_a_confident_correct_prediction() -> None:
    _, targets = loss_batch(4)
    logits = 30.0 * F.one_hot(targets, K).permute(0, 3, 1, 2).float()
    assert losses.dice_loss(logits, targets).item() < 1e-3


def test_ce_plus_dice_is_the_sum() -> None:
    logits, targets = loss_batch(5)
    total = losses.build_loss("ce+dice", K, class_weights=WEIGHTS, smooth=2.0)(logits, targets)
    wce = losses.weighted_cross_entropy_loss(logits, targets, IGNORE, class_weights=WEIGHTS)
    torch.testing.assert_close(total, wce + losses.dice_loss(logits, targets, IGNORE, 2.0))


@pytest.mark.parametrize("name", losses.available_losses)
def test_ignored_pixels_get_exactly_zero_gradient(name: str) -> None:
    logits, targets = loss_batch(6)
    make_loss(name)(logits, targets).backward()
    ignored = (targets == IGNORE).unsqueeze(1).expand_as(logits)
    assert (logits.grad[ignored] == 0).all()
    assert (logits.grad[~ignored] != 0).any()


@pytest.mark.parametrize("name", losses.available_losses)
def test_ignored_pixel_logits_do_not_change_the_loss(name: str) -> None:
    logits, targets = loss_batch(7)
    loss = make_loss(name)
    changed = torch.where((targets == IGNORE).unsqueeze(1), 100 * torch.randn_like(logits), logits)
    torch.testing.assert_close(loss(changed, targets), loss(logits, targets), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", losses.available_losses)
def test_a_fully_ignored_batch_gives_zero_with_a_gradient(name: str) -> None:
    logits, targets = loss_batch(8)
    value = make_loss(name)(logits, torch.full_like(targets, IGNORE))
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", losses.available_losses)
def test_losses_are_finite_for_large_low_precision_logits(name: str, dtype: torch.dtype) -> None:
    logits, targets = loss_batch(9, dtype=dtype, scale=1e4)
    loss = make_loss(name)
    value = loss(logits, targets)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    # Computing in float32 gives the float32 result, not one rounded to 8 or 11 bits.
    torch.testing.assert_close(value, loss(logits.detach().float(), targets))
    value.backward()
    assert logits.grad.dtype == dtype and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", losses.available_losses)
def test_losses_compute_in_float32_under_autocast(name: str) -> None:
    _, targets = loss_batch(10)
    layer = torch.nn.Conv2d(3, K, kernel_size=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(torch.randn(2, 3, 5, 6))
        value = make_loss(name)(logits, targets)
    assert logits.dtype == torch.bfloat16
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_build_loss_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="ce, wce, focal, dice, ce\\+dice"):
        losses.build_loss("lovasz", K)
    with pytest.raises(ValueError, match="class_weights"):
        losses.build_loss("wce", K)
    with pytest.raises(ValueError, match="wce"):
        losses.build_loss("ce", K, class_weights=WEIGHTS)
    with pytest.raises(ValueError, match="gamma"):
        losses.build_loss("ce", K, gamma=2.0)
    with pytest.raises(ValueError, match="gamma"):
        losses.build_loss("focal", K, gamma=-1.0)
    with pytest.raises(ValueError, match="one value per class"):
        losses.build_loss("wce", K, class_weights=[1.0] * (K - 1))
    with pytest.raises(ValueError, match="ignore_index"):
        losses.build_loss("ce", K, ignore_index=K)
    logits, targets = loss_batch()
    with pytest.raises(ValueError, match="built for 5 classes"):
        losses.build_loss("ce", 5)(logits, targets)
    with pytest.raises(ValueError, match="do not match"):
        losses.build_loss("dice", K)(logits, targets[:, :4])


# --------------------------------------------------------------------------------------------
# Class weights
# --------------------------------------------------------------------------------------------

# Pixel shares in the spirit of 2D-3D-S: wall common, sofa rare, <UNK> first.
SHARES = [0.05, 0.02, 0.01, 0.04, 0.15, 0.02, 0.12, 0.015, 0.04, 0.13, 0.0033, 0.03, 0.337, 0.02]


@pytest.mark.parametrize("method", losses.available_weight_methods)
def test_rarer_classes_get_larger_weights(method: str) -> None:
    weights = losses.class_weights_from_frequencies(SHARES, method)
    assert weights.dtype == torch.float32 and weights.shape == (K,)
    assert weights[IGNORE] == 0
    assert weights[1:].mean().item() == pytest.approx(1.0)
    rarest_first = sorted(range(1, K), key=lambda c: SHARES[c])
    ordered = weights[rarest_first]
    assert (ordered[:-1] >= ordered[1:]).all()
    assert weights[10] > weights[12]  # sofa over wall, strictly


def test_weight_methods_differ_in_strength() -> None:
    ratio = {}
    for method in losses.available_weight_methods:
        weights = losses.class_weights_from_frequencies(SHARES, method)
        ratio[method] = (weights[10] / weights[12]).item()  # sofa / wall
    assert ratio["inverse"] == pytest.approx(0.337 / 0.0033, rel=1e-5)
    assert ratio["inverse_sqrt"] == pytest.approx(math.sqrt(0.337 / 0.0033), rel=1e-5)
    assert 1 < ratio["effective"] < ratio["inverse"]


def test_class_weights_take_counts_and_handle_unseen_classes() -> None:
    counts = [1000 * share for share in SHARES]
    torch.testing.assert_close(
        losses.class_weights_from_frequencies(counts, "effective"),
        losses.class_weights_from_frequencies(SHARES, "effective"),
    )
    unseen = list(SHARES)
    unseen[10] = 0.0
    weights = losses.class_weights_from_frequencies(unseen, "inverse")
    assert weights[10] == weights[1:].max() and torch.isfinite(weights).all()


def test_class_weights_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="inverse, inverse_sqrt, effective"):
        losses.class_weights_from_frequencies(SHARES, "median")
    with pytest.raises(ValueError, match=">= 0"):
        losses.class_weights_from_frequencies([0.5, -0.1, 0.6])
    with pytest.raises(ValueError, match="all zero"):
        losses.class_weights_from_frequencies([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="beta"):
        losses.class_weights_from_frequencies(SHARES, "effective", beta=1.0)


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


def test_available_losses_are_the_registry() -> None:
    assert losses.available_losses == ("ce", "wce", "focal", "dice", "ce+dice")
    assert losses.available_losses == tuple(losses.LOSSES)


def test_options_come_from_the_signatures() -> None:
    assert losses.default_options("ce") == {}
    assert losses.default_options("wce") == {}
    assert losses.default_options("focal") == {"gamma": 2.0}
    assert losses.default_options("dice") == {"smooth": 1.0}
    assert losses.default_options("ce+dice") == {"smooth": 1.0}
    with pytest.raises(ValueError, match="available: ce, wce"):
        losses.default_options("lovasz")


def test_build_loss_keeps_its_messages() -> None:
    with pytest.raises(ValueError, match=r"^loss 'wce' needs class_weights, e\.g\. from class_w"):
        losses.build_loss("wce", K)
    for name in ("ce", "dice"):
        message = rf"^loss '{name}' takes no class_weights; use 'wce', 'focal' or 'ce\+dice'$"
        with pytest.raises(ValueError, match=message):
            losses.build_loss(name, K, class_weights=WEIGHTS)
    with pytest.raises(ValueError, match=r"got unknown options \['smooth'\]; it accepts: gamma$"):
        losses.build_loss("focal", K, smooth=1.0)
    with pytest.raises(ValueError, match="it accepts: none$"):
        losses.build_loss("wce", K, class_weights=WEIGHTS, gamma=1.0)
    # The losses check their own options, and build_loss already calls them once.
    with pytest.raises(ValueError, match=r"^focal loss needs gamma >= 0, got nan$"):
        losses.build_loss("focal", K, gamma=math.nan)
    with pytest.raises(ValueError, match=r"^focal loss needs a finite gamma, got inf$"):
        losses.build_loss("focal", K, gamma=math.inf)
    for name in ("dice", "ce+dice"):
        with pytest.raises(ValueError, match=r"^dice smoothing must be > 0, got 0\.0$"):
            losses.build_loss(name, K, smooth=0.0)
        with pytest.raises(ValueError, match=r"^dice smoothing must be finite, got inf$"):
            losses.build_loss(name, K, smooth=math.inf)


def test_a_new_loss_takes_one_function_and_one_entry(monkeypatch) -> None:
    def scaled_cross_entropy(
        logits: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int = IGNORE,
        class_weights: torch.Tensor | None = None,
        scale: float = 1.0,
    ) -> torch.Tensor:
        if class_weights is None:
            return scale * losses.cross_entropy_loss(logits, targets, ignore_index)
        weighted = losses.weighted_cross_entropy_loss
        return scale * weighted(logits, targets, ignore_index, class_weights=class_weights)

    monkeypatch.setitem(losses.LOSSES, "scaled", scaled_cross_entropy)
    assert losses.default_options("scaled") == {"scale": 1.0}
    logits, targets = loss_batch(11)
    expected = 3 * F.cross_entropy(logits, targets, weight=WEIGHTS, ignore_index=IGNORE)
    scaled = losses.build_loss("scaled", K, class_weights=WEIGHTS, scale=3.0)
    torch.testing.assert_close(scaled(logits, targets), expected)
    with pytest.raises(ValueError, match="it accepts: scale"):
        losses.build_loss("scaled", K, gamma=2.0)
    # It is now one of the losses that take class weights.
    with pytest.raises(ValueError, match=r"use 'wce', 'focal', 'ce\+dice' or 'scaled'"):
        losses.build_loss("ce", K, class_weights=WEIGHTS)
