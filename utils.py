"""Colors for the 14 classes and helpers that turn masks into pictures.

The class names live in data.py (``CLASSES``); their display colors live here, in the
same order, and nowhere else.
"""

from __future__ import annotations

import numpy as np
import torch

# One RGB color per class, in the order of data.CLASSES. <UNK> is black so that ignored
# pixels read as "no label" in every figure.
CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),  # <UNK>
    (255, 187, 120),  # beam
    (23, 190, 207),  # board
    (148, 103, 189),  # bookcase
    (174, 199, 232),  # ceiling
    (214, 39, 40),  # chair
    (127, 127, 127),  # clutter
    (188, 189, 34),  # column
    (140, 86, 75),  # door
    (44, 160, 44),  # floor
    (227, 119, 194),  # sofa
    (255, 127, 14),  # table
    (31, 119, 180),  # wall
    (152, 223, 138),  # window
)


def colorize(mask: torch.Tensor) -> torch.Tensor:
    """Class ids to colors: `(H, W)` or `(B, H, W)` int -> `(3, H, W)` or `(B, 3, H, W)` uint8."""
    palette = torch.tensor(CLASS_COLORS, dtype=torch.uint8, device=mask.device)
    colors = palette[mask.long().clamp(0, len(CLASS_COLORS) - 1)]  # (..., H, W, 3)
    return colors.movedim(-1, -3).contiguous()


def overlay(image: torch.Tensor, mask: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Blend the colorized mask over the image: `(3, H, W)` uint8 + `(H, W)` -> `(3, H, W)` uint8.

    Unknown pixels keep the plain image.
    """
    colors = colorize(mask).float()
    blended = (1 - alpha) * image.float() + alpha * colors
    blended = torch.where(mask.unsqueeze(0) == 0, image.float(), blended)
    return blended.round().clamp(0, 255).to(torch.uint8)


def legend_handles(class_names: tuple[str, ...] | None = None) -> list:
    """Matplotlib patches, one per class, for `figure.legend(handles=...)`."""
    from matplotlib.patches import Patch

    if class_names is None:
        from data import CLASSES as class_names
    return [
        Patch(facecolor=np.array(color) / 255.0, edgecolor="black", label=name)
        for name, color in zip(class_names, CLASS_COLORS, strict=True)
    ]


def comparison_grid(
    images: torch.Tensor, targets: torch.Tensor, predictions: torch.Tensor
) -> torch.Tensor:
    """One row per sample: input | ground truth | prediction, for TensorBoard.

    images `(B, 3, H, W)` uint8, targets and predictions `(B, H, W)` integer class ids.
    Returns `(3, B * H, 3 * W)` uint8.
    """
    rows = torch.cat([images, colorize(targets), colorize(predictions)], dim=3)  # (B, 3, H, 3W)
    return torch.cat(list(rows), dim=1)
