"""metrics.py: confusion-matrix scores against brute force and torchmetrics, the report and
figure; and bench.py's timing of the metric update."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassJaccardIndex,
)

import data
import metrics
from seglab import bench

K = data.NUM_CLASSES
IGNORE = data.IGNORE_INDEX
PER_CLASS = ("iou", "accuracy", "f1")
MEANS = ("miou", "mean_accuracy", "macro_f1", "pixel_accuracy")


def random_batch(
    seed: int, shape: tuple[int, ...] = (3, 9, 11)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, preds) int64 with ~25 % ignored pixels and every kind of absent class.

    Targets are 1-8 or the ignored 0; predictions are 0-6 (0 being a mistake), 9 or 10. So
    7 and 8 are only in the targets, 9 and 10 only predicted, 11-13 absent from both sides.
    """
    rng = np.random.default_rng(seed)
    targets = rng.integers(1, 9, size=shape)
    targets[rng.random(shape) < 0.25] = IGNORE
    preds = rng.choice([0, 1, 2, 3, 4, 5, 6, 9, 10], size=shape)
    # Agreeing on a good share of pixels keeps the scores away from 0.
    agree = (rng.random(shape) < 0.4) & (targets <= 6)
    preds[agree] = targets[agree]
    return torch.from_numpy(targets), torch.from_numpy(preds)


def reference_scores(preds: torch.Tensor, targets: torch.Tensor) -> dict[str, object]:
    """The documented convention, with plain Python loops over pixels and classes."""
    matrix = [[0] * K for _ in range(K)]
    for pred, target in zip(preds.flatten().tolist(), targets.flatten().tolist(), strict=True):
        if target != IGNORE:
            matrix[target][pred] += 1
    iou, accuracy, f1 = [], [], []
    for c in range(K):
        tp = matrix[c][c]
        fn = sum(matrix[c]) - tp
        fp = sum(matrix[r][c] for r in range(K)) - tp
        if c == IGNORE:
            iou.append(math.nan)
            accuracy.append(math.nan)
            f1.append(math.nan)
            continue
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
        accuracy.append(tp / (tp + fn) if tp + fn else math.nan)
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan)

    def mean(values: list[float]) -> float:
        kept = [v for v in values if not math.isnan(v)]
        return sum(kept) / len(kept)

    total = sum(sum(row) for row in matrix)
    return {
        "matrix": matrix,
        "iou": iou,
        "accuracy": accuracy,
        "f1": f1,
        "miou": mean(iou),
        "mean_accuracy": mean(accuracy),
        "macro_f1": mean(f1),
        "pixel_accuracy": sum(matrix[c][c] for c in range(K)) / total,
    }


def assert_same_scores(ours: dict[str, object], expected: dict[str, object]) -> None:
    for key in PER_CLASS:
        np.testing.assert_allclose(ours[key], expected[key], rtol=0, atol=1e-6, equal_nan=True)
    for key in MEANS:
        assert ours[key] == pytest.approx(expected[key], abs=1e-6), key


def logits_for(preds: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) float32 logits whose argmax is preds."""
    logits = torch.randn(
        preds.shape[0], K, *preds.shape[1:], generator=torch.Generator().manual_seed(1)
    )
    return logits + 10 * F.one_hot(preds, K).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------
# ConfusionMatrix and scores
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_scores_match_brute_force(seed: int) -> None:
    targets, preds = random_batch(seed)
    matrix = metrics.ConfusionMatrix(K)
    matrix.update(preds, targets)
    expected = reference_scores(preds, targets)
    assert matrix.matrix.tolist() == expected["matrix"]
    assert_same_scores(matrix.compute(), expected)


def test_absent_class_convention() -> None:
    targets, preds = random_batch(0)
    matrix = metrics.ConfusionMatrix(K)
    matrix.update(preds, targets)
    results = matrix.compute()
    for key in PER_CLASS:
        assert math.isnan(results[key][IGNORE]), key
        for absent in (11, 12, 13):  # in neither targets nor predictions
            assert math.isnan(results[key][absent]), key
    for target_only in (7, 8):
        assert results["iou"][target_only] == results["accuracy"][target_only] == 0.0
        assert results["f1"][target_only] == 0.0
    for predicted_only in (9, 10):
        assert results["iou"][predicted_only] == results["f1"][predicted_only] == 0.0
        assert math.isnan(results["accuracy"][predicted_only])
    # The means skip NaN: mIoU is the mean over classes 1-10 only.
    assert results["miou"] == pytest.approx(sum(results["iou"][1:11]) / 10)


def test_logits_and_class_ids_agree() -> None:
    targets, preds = random_batch(1)
    from_ids, from_logits = metrics.ConfusionMatrix(K), metrics.ConfusionMatrix(K)
    from_ids.update(preds, targets)
    from_logits.update(logits_for(preds), targets)
    assert torch.equal(from_ids.matrix, from_logits.matrix)
    assert json.dumps(from_ids.compute()) == json.dumps(from_logits.compute())


def test_two_updates_equal_one_on_the_concatenation() -> None:
    (targets_a, preds_a), (targets_b, preds_b) = random_batch(2), random_batch(3, (2, 9, 11))
    twice, once = metrics.ConfusionMatrix(K), metrics.ConfusionMatrix(K)
    twice.update(preds_a, targets_a)
    twice.update(logits_for(preds_b), targets_b)
    once.update(torch.cat([preds_a, preds_b]), torch.cat([targets_a, targets_b]))
    assert torch.equal(twice.matrix, once.matrix)


def test_ignored_pixels_count_nowhere() -> None:
    targets, preds = random_batch(4)
    matrix = metrics.ConfusionMatrix(K)
    matrix.update(preds, targets)
    other_preds = torch.where(targets == IGNORE, (preds + 5) % K, preds)
    other = metrics.ConfusionMatrix(K)
    other.update(other_preds, targets)
    assert torch.equal(matrix.matrix, other.matrix)
    assert matrix.matrix[IGNORE].sum() == 0
    assert matrix.matrix.sum() == (targets != IGNORE).sum()


def test_matrix_is_int64_on_first_device_and_reset_forgets() -> None:
    targets, preds = random_batch(5)
    matrix = metrics.ConfusionMatrix(K)
    assert matrix.matrix is None
    matrix.update(preds.to(torch.uint8), targets.to(torch.uint8))  # narrow dtypes must not wrap
    assert matrix.matrix.dtype == torch.int64 and matrix.matrix.device == targets.device
    assert_same_scores(matrix.compute(), reference_scores(preds, targets))
    matrix.reset()
    assert matrix.matrix is None
    with pytest.raises(RuntimeError, match="update"):
        matrix.compute()


def test_compute_is_json_ready() -> None:
    targets, preds = random_batch(6)
    matrix = metrics.ConfusionMatrix(K)
    matrix.update(preds, targets)
    results = matrix.compute()
    for key in PER_CLASS:
        assert len(results[key]) == K and all(type(v) is float for v in results[key])
    for key in MEANS:
        assert type(results[key]) is float
    expected_support = torch.bincount(targets.flatten(), minlength=K)
    expected_support[IGNORE] = 0
    assert results["support"] == expected_support.tolist()
    assert json.loads(json.dumps(results))["miou"] == pytest.approx(results["miou"])


def test_scores_match_torchmetrics() -> None:
    """Same numbers as torchmetrics where both define them.

    Conventions differ. Per class, torchmetrics gives 0 (its zero_division) where we give NaN:
    to a class absent from targets and predictions, to recall of a class absent from the
    targets, and to the ignore class. Its macro IoU skips the same classes as our mIoU, but its
    macro F1 and accuracy also average in the ignore class, as 0, whenever the model predicts
    it on labelled pixels (we never count it), and its macro accuracy counts a class that is
    predicted but absent from the targets as 0 (we leave it out: its recall is undefined).
    """
    targets, preds = random_batch(7, (4, 16, 16))
    matrix = metrics.ConfusionMatrix(K)
    matrix.update(preds, targets)
    ours = matrix.compute()
    theirs = {
        "iou": MulticlassJaccardIndex(K, average=None, ignore_index=IGNORE)(preds, targets),
        "accuracy": MulticlassAccuracy(K, average=None, ignore_index=IGNORE)(preds, targets),
        "f1": MulticlassF1Score(K, average=None, ignore_index=IGNORE)(preds, targets),
    }
    for key, their_values in theirs.items():
        for c in range(K):
            expected = 0.0 if math.isnan(ours[key][c]) else ours[key][c]
            assert their_values[c].item() == pytest.approx(expected, abs=1e-6), (key, c)

    macro_iou = MulticlassJaccardIndex(K, average="macro", ignore_index=IGNORE)(preds, targets)
    assert macro_iou.item() == pytest.approx(ours["miou"], abs=1e-6)
    assert matrix.matrix[:, IGNORE].sum() > 0  # the ignore class is predicted on labelled pixels
    defined_f1 = [value for value in ours["f1"] if not math.isnan(value)]
    macro_f1 = MulticlassF1Score(K, average="macro", ignore_index=IGNORE)(preds, targets)
    assert macro_f1.item() == pytest.approx(sum(defined_f1) / (len(defined_f1) + 1), abs=1e-6)
    assert macro_f1.item() < ours["macro_f1"]
    # Its macro accuracy also counts the predicted-only classes 9 and 10 as 0.
    defined_accuracy = [value for value in ours["accuracy"] if not math.isnan(value)]
    macro_accuracy = MulticlassAccuracy(K, average="macro", ignore_index=IGNORE)(preds, targets)
    expected_accuracy = sum(defined_accuracy) / (len(defined_accuracy) + 1 + 2)
    assert macro_accuracy.item() == pytest.approx(expected_accuracy, abs=1e-6)


def test_scores_from_confusion_returns_tensors() -> None:
    matrix = torch.tensor([[0, 0, 0], [1, 3, 0], [0, 2, 4]])
    scores = metrics.scores_from_confusion(matrix, ignore_index=0)
    assert torch.allclose(scores["iou"][1:], torch.tensor([3 / 6, 4 / 6], dtype=torch.float64))
    assert scores["pixel_accuracy"].item() == pytest.approx(7 / 10)
    assert scores["support"].tolist() == [0, 4, 6]


@pytest.mark.parametrize(
    ("preds", "targets", "message"),
    [
        (torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 5, dtype=torch.long), "shaped"),
        (torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 4), "integer"),
        (torch.zeros(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), "integer class ids"),
        (torch.zeros(2, K + 1, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), "logits"),
        (torch.zeros(2, 4, 4, dtype=torch.long), torch.full((2, 4, 4), K), "num_classes"),
        (torch.zeros(2, 4, 4, dtype=torch.long), torch.full((2, 4, 4), -1), r"\[0, 14\)"),
    ],
)
def test_update_rejects_bad_input(preds: torch.Tensor, targets: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metrics.ConfusionMatrix(K).update(preds, targets)


@pytest.mark.parametrize(("num_classes", "ignore_index"), [(1, 0), (K, K), (K, -1), (K, None)])
def test_confusion_matrix_rejects_bad_setup(num_classes: int, ignore_index: object) -> None:
    with pytest.raises(ValueError):
        metrics.ConfusionMatrix(num_classes, ignore_index)


def test_all_reduce_without_distributed_is_a_no_op() -> None:
    targets, preds = random_batch(8)
    matrix = metrics.ConfusionMatrix(K)
    matrix.update(preds, targets)
    before = matrix.matrix.clone()
    matrix.all_reduce()
    assert torch.equal(matrix.matrix, before)


# Runs in two fresh processes that import only data and metrics, which keeps start-up short.
ALL_REDUCE_WORKER = """
import sys
import torch
import torch.distributed as dist
import data
import metrics

rank, folder = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
matrix = metrics.ConfusionMatrix(data.NUM_CLASSES)
preds, targets = torch.load(f"{folder}/batch{rank}.pt")
matrix.update(preds, targets)
matrix.all_reduce()
torch.save(matrix.matrix, f"{folder}/summed{rank}.pt")
matrix.reset()  # now only rank 0 sees a batch; rank 1 must still join the reduction
if rank == 0:
    matrix.update(preds, targets)
matrix.all_reduce()
torch.save(matrix.matrix, f"{folder}/one_sided{rank}.pt")
dist.destroy_process_group()
"""


def test_all_reduce_sums_over_processes(tmp_path: Path) -> None:
    batches = [random_batch(9), random_batch(10)]
    for rank, (targets, preds) in enumerate(batches):
        torch.save((preds, targets), tmp_path / f"batch{rank}.pt")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", ALL_REDUCE_WORKER, str(rank), str(tmp_path)],
            cwd=Path(metrics.__file__).parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    for worker in workers:
        try:
            output = worker.communicate(timeout=120)[0].decode()
        except subprocess.TimeoutExpired:
            for other in workers:
                other.kill()
            raise
        assert worker.returncode == 0, output

    matrices = []
    for targets, preds in batches:
        matrix = metrics.ConfusionMatrix(K)
        matrix.update(preds, targets)
        matrices.append(matrix.matrix)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"summed{rank}.pt"), matrices[0] + matrices[1])
        assert torch.equal(torch.load(tmp_path / f"one_sided{rank}.pt"), matrices[0])


# --------------------------------------------------------------------------------------------
# Report and figure
# --------------------------------------------------------------------------------------------


def computed_results(seed: int = 10) -> tuple[metrics.ConfusionMatrix, dict[str, object]]:
    targets, preds = random_batch(seed)
    matrix = metrics.ConfusionMatrix(K)
    matrix.update(preds, targets)
    return matrix, matrix.compute()


def test_format_report_lists_every_class_and_the_means() -> None:
    _, results = computed_results()
    report = metrics.format_report(results)
    lines = report.splitlines()
    assert len(lines) == 1 + K + 2
    for name, line in zip(data.CLASSES, lines[1 : K + 1], strict=True):
        assert line.startswith(name)
    assert f"{100 * results['miou']:.2f}" in lines[K + 1]
    assert lines[1].split()[1:4] == ["-", "-", "-"]  # the ignored class has no scores
    assert f"{100 * results['pixel_accuracy']:.2f}" in lines[-1]


def test_format_report_rejects_mismatched_input() -> None:
    _, results = computed_results()
    with pytest.raises(ValueError, match="class names"):
        metrics.format_report(results, data.CLASSES[:-1])
    with pytest.raises(KeyError, match="compute"):
        metrics.format_report({"iou": results["iou"]})


def test_confusion_matrix_figure_is_row_normalised_with_class_names() -> None:
    matrix, _ = computed_results()
    figure = metrics.confusion_matrix_figure(matrix.matrix)
    assert isinstance(figure, Figure) and isinstance(figure.canvas, FigureCanvasAgg)
    axes = figure.axes[0]
    assert [label.get_text() for label in axes.get_xticklabels()] == list(data.CLASSES)
    assert [label.get_text() for label in axes.get_yticklabels()] == list(data.CLASSES)
    shown = np.ma.filled(axes.images[0].get_array(), np.nan)
    row_sums = np.nansum(shown, axis=1)
    labelled = matrix.matrix.sum(dim=1).numpy() > 0
    np.testing.assert_allclose(row_sums[labelled], 1.0)
    assert np.isnan(shown[IGNORE]).all()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    assert buffer.getvalue().startswith(b"\x89PNG")


def test_confusion_matrix_figure_goes_to_tensorboard(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    matrix, _ = computed_results()
    with SummaryWriter(tmp_path) as writer:
        writer.add_figure("confusion", metrics.confusion_matrix_figure(matrix.matrix), 0)
    assert any(path.name.startswith("events.out.tfevents") for path in tmp_path.iterdir())


def test_confusion_matrix_figure_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="square"):
        metrics.confusion_matrix_figure(torch.zeros(K, K - 1))
    with pytest.raises(ValueError, match="class names"):
        metrics.confusion_matrix_figure(torch.zeros(3, 3))


# --------------------------------------------------------------------------------------------
# Benchmark (bench.py's metric rows)
# --------------------------------------------------------------------------------------------


def test_bench_metrics_times_torchmetrics_then_ours() -> None:
    rows = bench.bench_metrics(batch_size=1, size=8, repeats=1, device=torch.device("cpu"))
    assert [row["name"].split()[0] for row in rows] == [
        "torchmetrics",
        "torchmetrics",
        "ConfusionMatrix",
    ]
    assert all(row["ms"] > 0 and row["unit"] == "batch" for row in rows)
    assert {row["group"] for row in rows} == {"metric update, 1x8x8 batch"}
    table = bench.format_table(rows)
    assert "ConfusionMatrix (ours)" in table and "MulticlassJaccardIndex" in table
    # torchmetrics with its checks is the reference of the group.
    assert "validate_args=True" in table.splitlines()[2] and "reference" in table.splitlines()[2]


def test_median_seconds_warms_up_then_stops_at_max_runs_or_seconds() -> None:
    cpu = torch.device("cpu")
    calls = []
    assert bench.median_seconds(lambda: calls.append(1), cpu, max_runs=3) >= 0
    assert len(calls) == 1 + 3  # the warm-up, then max_runs timed runs
    calls.clear()
    bench.median_seconds(lambda: calls.append(1), cpu, seconds=0)
    assert len(calls) == 1 + 1  # at least one timed run
