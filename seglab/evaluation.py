"""The machinery of `main.py test`: frames that name themselves in a batch, batches of one
size, and the areas a model is tested on by default.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import data
import metrics
import utils


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


def test_loader(
    dataset, indices: list[int], batch_size: int, workers: int, device: torch.device
) -> torch.utils.data.DataLoader:
    """A loader of `(images, masks, frame indices)` batches of the frames `indices` of
    `dataset`, in order (under torchrun, each process its own share)."""
    frames = torch.utils.data.Subset(FramesWithIndex(dataset), indices)
    loader = data.make_loader(frames, batch_size, workers, pin_memory=device.type == "cuda")
    loader.collate_fn = collate_same_size
    return loader


def default_test_folder(model: str, areas: list[str]) -> Path:
    """Where `test` writes without --out: beside the checkpoint, or in the current folder
    for a model given by URL."""
    folder = Path(".") if "://" in model else Path(model).parent
    return folder / f"test-{'-'.join(areas)}"


class AreaScores:
    """The confusion matrix of each area, besides the total that `evaluate` keeps, and the
    predicted masks of the frames when `predictions_dir` is given."""

    def __init__(self, dataset, predictions_dir: Path | None) -> None:
        self.frames = dataset.frames
        self.per_area = {area: metrics.ConfusionMatrix(data.NUM_CLASSES) for area in dataset.areas}
        self.predictions_dir = predictions_dir
        if predictions_dir is not None:
            predictions_dir.mkdir(parents=True, exist_ok=True)

    def update(self, images, targets, predictions, frame_indices: torch.Tensor) -> None:
        """`evaluate`'s on_batch: the batch's rows go to the matrix of their frame's area."""
        areas_of_batch = [self.frames[index].area for index in frame_indices.tolist()]
        for area in dict.fromkeys(areas_of_batch):
            rows = [i for i, name in enumerate(areas_of_batch) if name == area]
            self.per_area[area].update(predictions[rows], targets[rows])
        if self.predictions_dir is not None:
            for prediction, index in zip(predictions.cpu(), frame_indices.tolist(), strict=True):
                path = self.predictions_dir / f"{self.frames[index].name}.png"
                utils.save_class_ids(prediction, path)

    def compute(self) -> dict[str, dict]:
        """The scores of each area that had frames, summed over processes under torchrun."""
        for confusion in self.per_area.values():
            confusion.all_reduce()
        return {
            area: confusion.compute()
            for area, confusion in self.per_area.items()
            if confusion.matrix is not None
        }


def write_test_results(out: Path, summary: dict, matrix: torch.Tensor) -> None:
    """OUT/metrics.json (the scores of `summary` and the confusion matrix) and
    OUT/confusion_matrix.png."""
    summary = {**summary, "confusion_matrix": matrix.tolist()}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    figure = metrics.confusion_matrix_figure(matrix, data.CLASSES)
    figure.savefig(out / "confusion_matrix.png", dpi=100)
    print(f"wrote {out / 'metrics.json'} and {out / 'confusion_matrix.png'}")


def print_test_scores(results: dict, area_results: dict, tested_areas: list[str]) -> None:
    """The report of `test`: every score, then with several areas each area's mIoU and
    pixel accuracy, and the mIoU of all together (the figure to report)."""
    print(metrics.format_report(results, data.CLASSES))
    if len(area_results) <= 1:
        print(f"mIoU: {results['miou']:.4f}")
        return
    for area, scores in area_results.items():
        print(
            f"area {area}: mIoU {scores['miou']:.4f}, pixel accuracy "
            f"{scores['pixel_accuracy']:.4f} ({tested_areas.count(area)} frames)"
        )
    print(f"mIoU: {results['miou']:.4f} (areas {', '.join(area_results)} together)")
