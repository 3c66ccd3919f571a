"""Pictures of masks: colorized class ids, overlays, legends and comparison grids.

Each class's color is defined once, beside its name, in `data.CLASS_COLORS`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data import CLASS_COLORS


def colorize(mask: torch.Tensor) -> torch.Tensor:
    """Class ids to colors: `(H, W)` or `(B, H, W)` int -> `(3, H, W)` or `(B, 3, H, W)` uint8."""
    palette = torch.tensor(list(CLASS_COLORS.values()), dtype=torch.uint8, device=mask.device)
    colors = palette[mask.long().clamp(0, len(palette) - 1)]  # (..., H, W, 3)
    return colors.movedim(-1, -3).contiguous()


def overlay(image: torch.Tensor, mask: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Blend the colorized mask over the image: `(3, H, W)` uint8 + `(H, W)` -> `(3, H, W)` uint8.

    Unknown pixels keep the plain image.
    """
    colors = colorize(mask).float()
    blended = (1 - alpha) * image.float() + alpha * colors
    blended = torch.where(mask.unsqueeze(0) == 0, image.float(), blended)
    return blended.round().clamp(0, 255).to(torch.uint8)


def legend_handles() -> list:
    """Matplotlib patches, one per class in the order of data.CLASSES, for
    `figure.legend(handles=...)`."""
    from matplotlib.patches import Patch

    return [
        Patch(facecolor=np.array(color) / 255.0, edgecolor="black", label=name)
        for name, color in CLASS_COLORS.items()
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


def save_class_ids(mask: torch.Tensor, path: Path) -> None:
    """Write `(H, W)` class ids as a palette PNG: its pixel values are the class ids and its
    palette holds the class colors, so an image viewer shows the colors and
    `numpy.array(PIL.Image.open(path))` gives back the ids, `(H, W)` uint8."""
    from PIL import Image

    image = Image.fromarray(mask.to(torch.uint8).cpu().numpy())  # mode "L": one byte a pixel
    image.putpalette([channel for color in CLASS_COLORS.values() for channel in color])
    image.save(path)
