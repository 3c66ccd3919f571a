"""Self-checks of the lab: each question of LAB.md has its own, run with

    python -m pytest tests/test_lab.py -k q05        (the checks of Q5)
    python -m pytest tests/test_lab.py               (all of them)

Every check is named test_qNN_..., NN being the question number in two digits, so that
`-k q01` selects Q1 and not Q10. A failing check says in one sentence what was expected and
what came out, and the likely mistake when it can tell; an answer that raises an exception is
reported in one line with the file and line that raised it; a question still answered by its
stub says so, with the file and function to edit. The checks use tiny tensors and a tiny
synthetic data set (made once per run by tests/conftest.py): the whole file runs in a few
seconds on a CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import json
import math
import re
import signal
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from PIL import Image
from torch import nn
from torchvision import tv_tensors

import data
import losses
import main
import metrics
import models
from seglab import explore, export

CHECK_NAME = re.compile(r"^test_q(?P<number>\d\d)_")
STUB_MESSAGE = re.compile(r"^Q(?P<number>\d+): (?P<task>.*)$", re.DOTALL)


# ----------------------------------------------------------------------------------------
# Verdicts


def stub_verdict(question: int, message: str) -> str:
    """The sentence for a NotImplementedError raised while checking `question`."""
    match = STUB_MESSAGE.match(message)
    if not match:
        return f"Q{question}: your code raised NotImplementedError({message!r})"
    todo = f"Q{match['number']} is not implemented yet: {match['task']}"
    if int(match["number"]) == question:
        return todo
    return f"Q{question} needs Q{match['number']} first. {todo}"


def channel_hint(match: re.Match) -> str:
    """The hint for a convolution that got other channels than it was built for."""
    expected, got = int(match["expected"]), int(match["got"])
    if got * 2 == expected:
        return (
            f"the convolution after the concatenation gets {got} channels instead of "
            f"{expected}: concatenate along the channels, torch.cat([...], dim=1) of "
            "(B, C, H, W) tensors (dim 0 is the batch, 2 and 3 the height and width)"
        )
    return "a layer gets another number of channels than it was built for: check cin and cout"


# Exceptions raised by an answer, and the likely mistake behind each: (question or None for
# every question, a regular expression searched in "ErrorType: message", the hint or a
# function of the match that returns it).
EXCEPTION_HINTS: list[tuple[int | None, str, str | Callable[[re.Match], str]]] = [
    (
        1,
        r"out of (bounds|range)|index \d+ is out",
        "an index past the end of the table? send "
        "every such index to the table's last entry (clamp) before the lookup",
    ),
    (
        1,
        r"[Ee]xpected dtype (int|long)|must be long|IntTensor or a LongTensor|to type uint8_t",
        "the label index "
        "must be int32 or int64: convert the channels before multiplying (uint8 stops at 255)",
    ),
    (
        8,
        r"Sizes of tensors must match",
        "the first up block needs the coarsest encoder "
        "features: walk them from the last to the first (reversed)",
    ),
    (
        10,
        r"is invalid for input of size",
        "bincount counts up to the largest pair present: "
        "give it minlength=num_classes * num_classes",
    ),
    (
        None,
        r"Sizes of tensors must match|size of tensor a .* must match",
        "two maps of different "
        "sizes meet: check the padding of the convolutions and which encoder features each up "
        "block receives",
    ),
    (7, r"to have (?P<expected>\d+) channels, but got (?P<got>\d+) channels", channel_hint),
    (
        None,
        r"expected input\[.*\] to have \d+ channels|mat1 and mat2 shapes",
        "a layer gets "
        "another number of channels than it was built for: check cin and cout of each layer",
    ),
    (
        14,
        r"Unexpected input data type",
        "the ONNX model takes the pixels "
        "as they are, a uint8 numpy array, not floats: image[None].numpy(), no conversion",
    ),
    (
        14,
        r"INVALID_ARGUMENT|Invalid rank",
        "the ONNX model takes a "
        "(N, 3, H, W) uint8 numpy array: add the batch dimension (image[None].numpy())",
    ),
]

LAB_FOLDER = Path(__file__).resolve().parents[1]


def where_raised(error: BaseException) -> str:
    """ "file.py:LINE, in function" of the deepest frame of the lab's own files (not the
    checks), so that the student knows which of their lines raised; "" if none."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        path = Path(frame.filename).resolve()
        if path.parent == LAB_FOLDER:
            return f"{path.name}:{frame.lineno}, in {frame.name}"
    return ""


def exception_verdict(question: int, error: Exception) -> str:
    """One line for an exception raised by an answer: what, where, and the likely mistake."""
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    what = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
    place = where_raised(error)
    message = f"Q{question}: your code raised {what}" + (f" ({place})" if place else "")
    for hint_question, pattern, hint in EXCEPTION_HINTS:
        match = re.search(pattern, what)
        if hint_question in (None, question) and match:
            return f"{message}; {hint if isinstance(hint, str) else hint(match)}"
    return message


# Seconds that one check may take (a few on a laptop, more on a busy machine), and the
# training run of Q13 and Q14: an answer stuck in an endless loop fails its check instead of
# hanging the checks forever. A check that needs longer says so with @takes_up_to(seconds).
CHECK_DEADLINE_S = 60
TRAINING_DEADLINE_S = 180


def takes_up_to(seconds: float) -> Callable:
    """Give the self-check below a deadline of its own (put it above @self_check)."""

    def mark(check: Callable) -> Callable:
        check.deadline_s = seconds
        return check

    return mark


class DeadlinePassed(Exception):
    """Raised into a check that runs longer than its deadline."""


# The questions whose answer already ran out of time in a check: their other checks fail at
# once, so that an endless loop costs one deadline per question, not one per check.
_out_of_time: set[int] = set()


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise DeadlinePassed in this thread if the block runs longer than `seconds`.

    A watcher thread waits; when time is up, it asks Python to raise the exception in the
    checked thread at its next Python instruction (a `while True: pass` stops there; a
    single C call that never returns would not, but answers of this lab do not make one).
    """
    checked_thread = threading.get_ident()
    finished = threading.Event()

    def watch() -> None:
        if not finished.wait(seconds):
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(checked_thread), ctypes.py_object(DeadlinePassed)
            )

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        finished.set()
        watcher.join()


# A KeyboardInterrupt is the student's Ctrl-C only when the signal came: the same exception
# raised by an answer is a wrong answer, reported like any other.
_ctrl_c_pressed = threading.Event()


def _on_ctrl_c(signal_number, frame) -> None:
    _ctrl_c_pressed.set()
    raise KeyboardInterrupt


if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, _on_ctrl_c)


def self_check(check: Callable) -> Callable:
    """Decorate a check named test_qNN_...: a stub, a failed expectation, an exception raised
    by the answer or an answer that never returns comes out as one plain sentence about
    QNN, never a traceback."""
    match = CHECK_NAME.match(check.__name__)
    if not match:
        raise ValueError(f"{check.__name__}: a self-check is named test_qNN_...")
    question = int(match["number"])

    @functools.wraps(check)
    def run(*args, **kwargs):
        seconds = getattr(run, "deadline_s", CHECK_DEADLINE_S)
        try:
            if question in _out_of_time:
                raise DeadlinePassed
            with deadline(seconds):
                return check(*args, **kwargs)
        except NotImplementedError as error:
            message = stub_verdict(question, str(error))
        except AssertionError as error:
            message = f"Q{question}: {error}"
        except DeadlinePassed:
            _out_of_time.add(question)
            message = (
                f"Q{question}: did not finish in {seconds} s; an endless loop in "
                "your code (a while loop whose condition never changes?)"
            )
        except KeyboardInterrupt as error:
            if _ctrl_c_pressed.is_set():
                raise
            message = exception_verdict(question, error)
        except Exception as error:  # an answer that crashes: say where and, if known, why
            message = exception_verdict(question, error)
        # Outside the except clauses, so that the report shows no chained traceback.
        pytest.fail(message, pytrace=False)

    return run


def expect(condition: bool, message: str) -> None:
    """Fail the current check with `message`: what was expected, and what came out."""
    if not condition:
        raise AssertionError(message)


def shape_of(value: object) -> str:
    """A tensor's shape as a tuple, or what the value is instead."""
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    return f"a {type(value).__name__}, not a tensor"


def expect_tensor(value: object, shape: tuple, dtype: torch.dtype, what: str) -> None:
    expect(
        isinstance(value, torch.Tensor) and tuple(value.shape) == shape,
        f"{what} should have shape {shape}, got {shape_of(value)}",
    )
    expect(value.dtype == dtype, f"{what} should be {dtype}, got {value.dtype}")


# ----------------------------------------------------------------------------------------
# Q1: decode_semantic

CHAIR_INDEX = 65536 * 1 + 256 * 2 + 3  # a label index that needs all three channels
TABLE_LABELS = 70_000  # labels in the check's list; the table has one more entry
FILLER = data.CLASSES.index("clutter")  # the class of every other label of the list


def small_label_table() -> torch.Tensor:
    """A table of 70,000 labels as load_label_table makes it: label k < 14 is class k, label
    CHAIR_INDEX a chair, every other label clutter, and one last entry 0 for every index
    past the list. No label of the list is 0 beyond the first: an index that wraps around
    the table instead of landing on its last entry reads a class, not 0."""
    table = torch.full((TABLE_LABELS + 1,), FILLER, dtype=torch.uint8)
    table[: data.NUM_CLASSES] = torch.arange(data.NUM_CLASSES, dtype=torch.uint8)
    table[CHAIR_INDEX] = data.CLASSES.index("chair")
    table[-1] = 0
    return table


def encode_labels(label_indices: list[list[int]]) -> torch.Tensor:
    """Label indices (H, W) -> the (3, H, W) uint8 colors of a semantic PNG."""
    indices = torch.tensor(label_indices, dtype=torch.int64)
    return torch.stack([indices // 65536 % 256, indices // 256 % 256, indices % 256]).byte()


def decoding_mistake(label_indices: list[list[int]], decoded: list[list[int]]) -> str:
    """The likely mistake behind a wrong decoding of `label_indices`, or ""."""
    table = small_label_table()
    indices = torch.tensor(label_indices)
    colors = encode_labels(label_indices).long()
    wrapped = table[indices % len(table)].tolist()
    for bits in (8, 16):  # R * 65536 + G * 256 + B computed in a too small integer type
        overflowed = (colors[0] * 65536 + colors[1] * 256 + colors[2]) % 2**bits
        if decoded == table[overflowed.clamp(max=len(table) - 1)].tolist():
            return (
                f"; the label index overflowed (computed in {bits}-bit integers?): convert the "
                "channels to int32 or int64 before multiplying"
            )
    if decoded == wrapped:
        return (
            "; indices past the end of the table wrap around (index % len(table)?): send "
            "them to the last entry instead (clamp)"
        )
    return "; the label index of a pixel is R * 65536 + G * 256 + B"


@self_check
def test_q01_label_colors_become_class_ids():
    wall, floor = data.CLASSES.index("wall"), data.CLASSES.index("floor")
    label_indices = [[wall, CHAIR_INDEX, floor], [0, floor, wall]]
    semantic = encode_labels(label_indices)
    original = semantic.clone()
    decoded = data.decode_semantic(semantic, small_label_table())
    expect_tensor(decoded, (2, 3), torch.uint8, "decode_semantic of a (3, 2, 3) image")
    chair = data.CLASSES.index("chair")
    expected = [[wall, chair, floor], [0, floor, wall]]
    expect(
        decoded.tolist() == expected,
        f"expected the class ids {expected}, got {decoded.tolist()}"
        + decoding_mistake(label_indices, decoded.tolist()),
    )
    expect(torch.equal(semantic, original), "decode_semantic must not modify its input")


@self_check
def test_q01_no_data_and_unknown_colors_are_class_0():
    no_data = 0x0D0D0D  # 855,309: far past the end of the list
    wall = data.CLASSES.index("wall")
    label_indices = [[no_data, TABLE_LABELS, 2**24 - 1, TABLE_LABELS - 1, wall]]
    decoded = data.decode_semantic(encode_labels(label_indices), small_label_table())
    expect_tensor(decoded, (1, 5), torch.uint8, "decode_semantic of a (3, 1, 5) image")
    expected = [[0, 0, 0, FILLER, wall]]
    expect(
        decoded.tolist() == expected,
        "#0D0D0D and every index past the end of the label list should be class 0 (<UNK>), "
        f"the last label of the list its own class: expected {expected}, got "
        f"{decoded.tolist()}" + decoding_mistake(label_indices, decoded.tolist()),
    )


# ----------------------------------------------------------------------------------------
# Q2: StanfordDataset.load


@self_check
def test_q02_a_sample_is_an_image_and_its_class_ids(synthetic_root):
    dataset = data.StanfordDataset(synthetic_root, ["1"])
    sample = dataset[0]
    expect(isinstance(sample, tuple) and len(sample) == 2, "a sample should be (image, mask)")
    image, mask = sample
    expect_tensor(image, (3, 64, 64), torch.uint8, "the image of a 64x64 frame")
    expect_tensor(mask, (64, 64), torch.uint8, "the mask of a 64x64 frame")
    expect(
        torch.equal(image, data.read_png(dataset.frames[0].rgb_path)),
        "without transforms the image should be the rgb PNG as it is",
    )
    expect(
        torch.equal(mask, dataset.label_mask(0)),
        "without transforms the mask should be the decoded semantic PNG",
    )


@self_check
def test_q02_transforms_move_image_and_mask_together(synthetic_root):
    flip_and_shrink = T.Compose([T.RandomHorizontalFlip(p=1.0), T.Resize(32, antialias=True)])
    transformed = data.StanfordDataset(synthetic_root, ["1"], transforms=flip_and_shrink)
    image, mask = transformed[0]
    expect_tensor(image, (3, 32, 32), torch.uint8, "the image after a resize to 32")
    expect_tensor(
        mask,
        (32, 32),
        torch.uint8,
        "the mask after a resize to 32 (wrap it in tv_tensors.Mask so the transform sees it)",
    )
    plain = data.StanfordDataset(synthetic_root, ["1"])
    expected_image = flip_and_shrink(tv_tensors.Image(data.read_png(plain.frames[0].rgb_path)))
    expected_mask = flip_and_shrink(tv_tensors.Mask(plain.label_mask(0)))
    expect(
        torch.equal(image, expected_image.as_subclass(torch.Tensor)),
        "the image should be flipped and resized by the transforms",
    )
    expect(
        torch.equal(mask, expected_mask.as_subclass(torch.Tensor)),
        "the mask should be flipped and resized exactly like the image (nearest neighbour)",
    )


# ----------------------------------------------------------------------------------------
# Q3: exploring with data.py show and histogram


@self_check
def test_q03_show_prints_shapes_and_writes_a_picture(synthetic_root, tmp_path, capsys):
    picture = tmp_path / "sample.png"
    args = ["show", "--datadir", str(synthetic_root), "--areas", "1", "--out", str(picture)]
    run_command(args, "python -m seglab.explore show", explore.main)
    printed = capsys.readouterr().out
    for expected in ("(3, 64, 64)", "(64, 64)", "torch.uint8"):
        expect(expected in printed, f"data.py show should print {expected}, it printed:\n{printed}")
    expect(picture.is_file(), f"data.py show should write {picture}")


@self_check
def test_q03_histogram_counts_every_pixel(synthetic_root, tmp_path):
    out = tmp_path / "histogram.json"
    args = ["histogram", "--datadir", str(synthetic_root), "--areas", "1", "2"]
    run_command([*args, "--out", str(out)], "python -m seglab.explore histogram", explore.main)
    result = json.loads(out.read_text())
    expected_pixels = 12 * 64 * 64  # 6 frames of 64x64 in each of the two areas
    expect(
        sum(result["pixel_count"]) == expected_pixels,
        f"12 frames of 64x64 hold {expected_pixels} pixels, the histogram counts "
        f"{sum(result['pixel_count'])}",
    )
    expect(
        len(result["pixel_share"]) == data.NUM_CLASSES
        and math.isclose(sum(result["pixel_share"]), 1.0, rel_tol=1e-5),
        f"expected {data.NUM_CLASSES} shares summing to 1, got {result['pixel_share']}",
    )


# ----------------------------------------------------------------------------------------
# Q4: train_transforms and jitter_colors

STRIPE = 8  # pixels per stripe of the test pattern


def striped_pair(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A (3, S, S) uint8 image of vertical stripes whose red value encodes the class
    (class * 20), and its (S, S) uint8 mask; classes 1, 2, ... from left to right."""
    classes = (torch.arange(size) // STRIPE + 1).expand(size, size)
    image = torch.stack([classes * 20, 255 - classes * 20, torch.full_like(classes, 90)])
    return image.byte(), classes.byte()


def apply(transform: Callable, image: torch.Tensor, mask: torch.Tensor) -> tuple:
    """Call a v2 transform on (image, mask) the way StanfordDataset does."""
    out_image, out_mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
    return out_image.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor)


@self_check
def test_q04_crops_have_the_requested_size():
    image, mask = striped_pair()
    transform = data.train_transforms(32)
    out_image, out_mask = apply(transform, image, mask)
    expect_tensor(out_image, (3, 32, 32), torch.uint8, "train_transforms(32) of an image")
    expect_tensor(out_mask, (32, 32), torch.uint8, "train_transforms(32) of a (H, W) mask")
    colors = torch.stack([mask, mask, mask])
    _, out_colors = apply(transform, image, colors)
    expect_tensor(out_colors, (3, 32, 32), torch.uint8, "train_transforms(32) of a color mask")


@self_check
def test_q04_image_and_mask_stay_aligned():
    image, mask = striped_pair()
    transform = data.train_transforms(64)
    for seed in range(8):
        torch.manual_seed(seed)
        out_image, out_mask = apply(transform, image, mask)
        # Bilinear resizing blends colors at stripe borders: compare inside the stripes.
        inside = torch.ones_like(out_mask, dtype=torch.bool)
        for shift in (-2, -1, 1, 2):
            inside &= out_mask == torch.roll(out_mask, shift, dims=1)
        inside[:, :2] = inside[:, -2:] = False
        class_of_color = (out_image[0].float() / 20).round().to(torch.uint8)
        agreement = (class_of_color == out_mask)[inside].float().mean().item()
        expect(
            agreement > 0.99,
            f"with seed {seed}, image and mask disagree on {1 - agreement:.0%} of the pixels: "
            "every geometric transform must move both the same way",
        )


@self_check
def test_q04_masks_are_resized_without_blending():
    image, mask = striped_pair()
    transform = data.train_transforms(48)
    for seed in range(8):
        torch.manual_seed(seed)
        _, out_mask = apply(transform, image, mask)
        new_values = set(out_mask.unique().tolist()) - set(mask.unique().tolist())
        expect(
            not new_values,
            f"the mask holds class ids {sorted(new_values)} that the input did not: masks "
            "must be resized with nearest neighbour, never blended",
        )


@self_check
def test_q04_crops_and_flips_are_random():
    image, mask = striped_pair()
    transform = data.train_transforms(32)
    crops, flips = set(), 0
    for seed in range(16):
        torch.manual_seed(seed)
        _, out_mask = apply(transform, image, mask)
        crops.add(tuple(out_mask[0].tolist()))
        steps = torch.diff(out_mask[0].long())
        flips += int((steps < 0).sum() > (steps > 0).sum())
    expect(len(crops) > 8, f"16 random crops gave only {len(crops)} different results")
    expect(0 < flips < 16, f"{flips} of 16 samples were flipped left-right: expected about half")


@self_check
def test_q04_floors_stay_below_ceilings():
    image, mask = striped_pair()
    image, mask = image.transpose(1, 2), mask.T  # horizontal stripes: class 1 at the top
    transform = data.train_transforms(32)
    for seed in range(16):
        torch.manual_seed(seed)
        _, out_mask = apply(transform, image, mask)
        expect(
            bool((torch.diff(out_mask[:, 0].long()) >= 0).all()),
            f"with seed {seed}, the frame came out upside down: indoor frames have the floor "
            "below and the ceiling above, and the test frames too; flip left-right only "
            "(no RandomVerticalFlip)",
        )


@self_check
def test_q04_crops_follow_the_scale_argument():
    image, mask = striped_pair()  # 8 stripes of 8 pixels
    for scale, classes_expected, what in [
        ((1.0, 1.0), lambda n: n == 8, "all 8 stripes (the whole frame)"),
        ((1 / 16, 1 / 16), lambda n: n <= 4, "at most 4 of the 8 stripes (a sixteenth)"),
    ]:
        transform = data.train_transforms(32, scale=scale)
        for seed in range(8):
            torch.manual_seed(seed)
            _, out_mask = apply(transform, image, mask)
            found = len(out_mask.unique())
            expect(
                classes_expected(found),
                f"train_transforms(32, scale={scale}) should crop {what}, the crop of seed "
                f"{seed} holds {found} stripes: pass `scale` on to RandomResizedCrop",
            )


@self_check
def test_q04_crops_keep_the_colors():
    image = torch.empty(3, 40, 40, dtype=torch.uint8)
    image[0], image[1], image[2] = 100, 120, 140
    mask = torch.full((40, 40), 3, dtype=torch.uint8)
    torch.manual_seed(0)
    out_image, out_mask = apply(data.train_transforms(32), image, mask)
    expect(
        torch.equal(out_image, image[:, :32, :32]) and bool((out_mask == 3).all()),
        "a crop of a plain-colored frame should keep its color: train_transforms does the "
        "geometric steps only, jitter_colors the colors",
    )


@self_check
def test_q04_jitter_colors_keeps_shape_dtype_and_gray():
    images = torch.full((6, 3, 8, 8), 100, dtype=torch.uint8)
    torch.manual_seed(0)
    out = data.jitter_colors(images, 0.4)
    expect_tensor(out, (6, 3, 8, 8), torch.uint8, "jitter_colors of a (6, 3, 8, 8) uint8 batch")
    expect(
        torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2]),
        "a gray image must stay gray: brightness, contrast and saturation never tint",
    )
    levels = {int(value) for value in out[:, 0, 0, 0]}
    expect(
        len(levels) > 1,
        f"all 6 gray images came out at level {levels}: each image draws its own factors",
    )
    expect(
        any(level < 100 for level in levels) and any(level > 100 for level in levels),
        f"brightness should go both ways from 100 with strength 0.4, got levels {sorted(levels)}",
    )


@self_check
def test_q04_jitter_colors_clips_instead_of_wrapping():
    bright = torch.full((4, 3, 4, 4), 250, dtype=torch.uint8)
    torch.manual_seed(1)
    out = data.jitter_colors(bright, 0.5)
    expect(
        int(out.min()) >= 100,
        f"250 scaled by up to 1.5 must clip at 255, not wrap around; got {int(out.min())}",
    )


def two_tone(left: tuple[int, int, int], right: tuple[int, int, int]) -> torch.Tensor:
    """16 images (16, 3, 4, 8) uint8: the left half of color `left`, the right of `right`."""
    images = torch.empty(16, 3, 4, 8, dtype=torch.uint8)
    images[..., :4] = torch.tensor(left, dtype=torch.uint8).view(1, 3, 1, 1)
    images[..., 4:] = torch.tensor(right, dtype=torch.uint8).view(1, 3, 1, 1)
    return images


def luma(pixels: torch.Tensor) -> torch.Tensor:
    """Gray level of `(..., 3)` colors."""
    return pixels @ torch.tensor([0.299, 0.587, 0.114])


@self_check
def test_q04_jitter_colors_changes_the_contrast():
    images = two_tone((40, 40, 40), (120, 120, 120))
    torch.manual_seed(2)
    out = data.jitter_colors(images, 0.2).float()
    dark, light = out[:, 0, 0, 0], out[:, 0, 0, -1]
    # Brightness scales both tones alike; contrast pulls them towards (or pushes them away
    # from) their mean: only contrast changes (light - dark) / (light + dark).
    contrast = ((light - dark) / (light + dark)) / ((120 - 40) / (120 + 40))
    expect(
        (contrast - contrast[0]).abs().max() > 0.01 or (contrast[0] - 1).abs() < 0.01,
        f"all 16 images got the same contrast factor ({float(contrast[0]):.3f}): each image "
        "draws its own factors (one per image, not one per batch)",
    )
    expect(
        (contrast - 1).abs().max() > 0.1,
        "the contrast of a two-tone image never changed: jitter the contrast too",
    )


@self_check
def test_q04_jitter_colors_treats_each_image_on_its_own():
    images = two_tone((40, 40, 40), (120, 120, 120))
    others = images.clone()
    others[1:] = 250  # the same first image among very bright ones
    torch.manual_seed(4)
    alone = data.jitter_colors(images, 0.3)[0]
    torch.manual_seed(4)
    among_bright = data.jitter_colors(others, 0.3)[0]
    expect(
        torch.equal(alone, among_bright),
        "the jitter of an image changed with the other images of the batch: take the mean "
        "gray of the contrast step over each image on its own (dims 1, 2, 3), not over the "
        "whole batch",
    )


@self_check
def test_q04_jitter_colors_changes_the_saturation():
    gray_color, red_color = (20, 20, 20), (150, 50, 50)
    torch.manual_seed(3)
    out = data.jitter_colors(two_tone(gray_color, red_color), 0.2).float()
    gray, red = out[:, :, 0, 0], out[:, :, 0, -1]  # (16, 3) each
    # Brightness and contrast scale colorfulness (red - green) and gray-level differences
    # by the same factor; saturation scales colorfulness alone.
    colorfulness = (red[:, 0] - red[:, 1]) / (red_color[0] - red_color[1])
    gray_levels = (luma(red) - luma(gray)) / (
        luma(torch.tensor(red_color).float()) - luma(torch.tensor(gray_color).float())
    )
    saturation = colorfulness / gray_levels
    expect(
        (saturation - saturation[0]).abs().max() > 0.01 or (saturation[0] - 1).abs() < 0.01,
        f"all 16 images got the same saturation factor ({float(saturation[0]):.3f}): each "
        "image draws its own factors (one per image, not one per batch)",
    )
    expect(
        (saturation - 1).abs().max() > 0.1,
        "the colorfulness of a red image never changed beyond brightness and contrast: "
        "jitter the saturation too",
    )


# ----------------------------------------------------------------------------------------
# Q5 to Q9: the UNet


def conv_bn_parameters(cin: int, cout: int) -> int:
    """Parameters of a Conv 3x3 with bias followed by a BatchNorm: weights, bias, scale, shift."""
    return cin * cout * 9 + cout + 2 * cout


def up_block_parameters(cin: int, cout: int) -> int:
    return (
        conv_bn_parameters(cin, cin // 2)
        + conv_bn_parameters(cin, cout)
        + (conv_bn_parameters(cout, cout))
    )


def leaf_layers(module: nn.Module) -> list[str]:
    """The layer types of `module` in the order they were created, containers left out."""
    return [type(m).__name__ for m in module.modules() if not list(m.children())]


def applied_layers(module: nn.Module, run: Callable[[], object]) -> list[str]:
    """The layer types of `module` in the order that `run()` applies them, containers left
    out: the order of the computation, whatever the order in which __init__ made them."""
    order: list[str] = []
    hooks = [
        layer.register_forward_hook(
            lambda layer, inputs, output: order.append(type(layer).__name__)
        )
        for layer in module.modules()
        if not list(layer.children())
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return order


def parameter_mistake(module: nn.Module) -> str:
    """The likely reason why `module` has another parameter count than the handout's, or ""."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if any(conv.bias is None for conv in convs):
        return " (bias=False? the convolutions of the handout keep their bias)"
    if not any(isinstance(m, nn.BatchNorm2d) for m in module.modules()):
        return " (no BatchNorm2d? each convolution is followed by ReLU and BatchNorm)"
    return ""


def expect_every_layer_used(module: nn.Module, run: Callable[[], object], what: str) -> None:
    """Fail unless `run()` applies every Conv2d and BatchNorm2d of `module` exactly once."""
    calls: dict[str, int] = {}
    hooks = []
    for name, layer in module.named_modules():
        if isinstance(layer, nn.Conv2d | nn.BatchNorm2d):
            calls[name] = 0

            def count(layer, inputs, output, name=name):
                calls[name] += 1

            hooks.append(layer.register_forward_hook(count))
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    unused = [name for name, count in calls.items() if count == 0]
    expect(not unused, f"{what}: the layers {unused} are created but never applied in forward")
    repeated = [name for name, count in calls.items() if count > 1]
    expect(not repeated, f"{what}: the layers {repeated} are applied more than once")


@self_check
def test_q05_conv_block_shapes():
    torch.manual_seed(0)
    block = models.UNetConvBlock(3, 8)
    result = block(torch.randn(2, 3, 16, 12))
    expect(
        isinstance(result, tuple) and len(result) == 2,
        "UNetConvBlock.forward should return (pooled outputs, features)",
    )
    pooled, features = result
    expect(
        not (shape_of(pooled) == "(2, 8, 16, 12)" and shape_of(features) == "(2, 8, 8, 6)"),
        "the results come in the wrong order: forward returns (pooled outputs, features)",
    )
    expect_tensor(pooled, (2, 8, 8, 6), torch.float32, "the pooled output of (2, 3, 16, 12)")
    expect_tensor(features, (2, 8, 16, 12), torch.float32, "the features of (2, 3, 16, 12)")
    expect(
        torch.equal(pooled, F.max_pool2d(features, 2)),
        "the pooled output should be the 2x2 max-pool of the features",
    )


@self_check
def test_q05_conv_block_layers():
    block = models.UNetConvBlock(3, 8)
    expected = ["Conv2d", "ReLU", "BatchNorm2d", "Conv2d", "ReLU", "BatchNorm2d", "MaxPool2d"]
    layers = applied_layers(block, lambda: block(torch.randn(1, 3, 8, 8)))
    expect(layers == expected, f"expected forward to apply {expected} in this order, got {layers}")
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    expect(
        all(conv.kernel_size == (3, 3) and conv.padding == (1, 1) for conv in convs),
        "both convolutions should be 3x3 with padding 1, so that they keep H and W",
    )
    expected_count = conv_bn_parameters(3, 8) + conv_bn_parameters(8, 8)
    count = models.count_parameters(block)
    expect(
        count == expected_count,
        f"expected {expected_count} parameters, got {count}" + parameter_mistake(block),
    )
    expect_every_layer_used(block, lambda: block(torch.randn(1, 3, 8, 8)), "UNetConvBlock")


class StandInConvBlock(nn.Module):
    """A parameter-free stand-in for UNetConvBlock, so that the checks of Q6 need no Q5:
    (B, cin, H, W) -> pooled (B, cout, H/2, W/2) and features (B, cout, H, W)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.cout = cout

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = x.mean(dim=1, keepdim=True).expand(-1, self.cout, -1, -1).contiguous()
        return F.max_pool2d(features, 2), features


@self_check
def test_q06_encoder_shapes(monkeypatch):
    monkeypatch.setattr(models, "UNetConvBlock", StandInConvBlock)
    encoder = models.UNetEncoder(3, num_blocks=2, base_chan=4)
    expect(
        getattr(encoder, "cout", None) == 16,
        f"encoder.cout should be 4 * 2**2 = 16, got {getattr(encoder, 'cout', None)}",
    )
    outputs, features = encoder(torch.randn(1, 3, 16, 20))
    expect_tensor(outputs, (1, 16, 4, 5), torch.float32, "the encoder outputs of a 16x20 image")
    shapes = [tuple(f.shape) for f in features]
    expected = [(1, 4, 16, 20), (1, 8, 8, 10)]
    expect(shapes == expected, f"expected features of shapes {expected}, got {shapes}")


@self_check
def test_q06_encoder_last_block_layers(monkeypatch):
    monkeypatch.setattr(models, "UNetConvBlock", StandInConvBlock)
    encoder = models.UNetEncoder(3, num_blocks=2, base_chan=4)
    layers = leaf_layers(encoder)[-3:]
    expect(
        layers == ["Conv2d", "ReLU", "BatchNorm2d"],
        f"the last block should be Conv 3x3 - ReLU - BatchNorm in this order, got {layers}",
    )
    count = models.count_parameters(encoder)  # the stand-in blocks have none
    expected = conv_bn_parameters(8, 16)
    expect(
        count == expected,
        f"expected {expected} parameters in the last block (Conv 3x3 8 -> 16 and BatchNorm), "
        f"got {count}" + parameter_mistake(encoder),
    )
    expect_every_layer_used(encoder, lambda: encoder(torch.randn(1, 3, 8, 8)), "UNetEncoder")


@self_check
def test_q07_up_block_shapes():
    block = models.UNetUpConvBlock(16, 8)
    outputs = block(torch.randn(2, 16, 4, 5), torch.randn(2, 8, 8, 10))
    expect_tensor(outputs, (2, 8, 8, 10), torch.float32, "UNetUpConvBlock(16, 8) of (2, 16, 4, 5)")
    count = models.count_parameters(block)
    expected = up_block_parameters(16, 8)
    expect(
        count == expected,
        f"expected {expected} parameters (Conv 16 -> 8 after the upsampling, then Conv "
        f"16 -> 8 and Conv 8 -> 8, each with a BatchNorm), got {count}" + parameter_mistake(block),
    )
    expect_every_layer_used(
        block, lambda: block(torch.randn(1, 16, 2, 2), torch.randn(1, 8, 4, 4)), "UNetUpConvBlock"
    )


@self_check
def test_q07_up_block_uses_the_skip_connection():
    torch.manual_seed(0)
    block = models.UNetUpConvBlock(16, 8).eval()
    inputs, skip = torch.randn(1, 16, 4, 4), torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        first, second = block(inputs, skip), block(inputs, skip + 1.0)
    expect(
        not torch.allclose(first, second),
        "the output does not depend on encoder_features: concatenate them to the upsampled map",
    )


@self_check
def test_q07_up_block_concatenates_upsampled_map_then_skip():
    # Cut the convolution after the concatenation from its last cin // 2 input channels:
    # with the upsampled map first and the encoder features after it, as the handout asks,
    # the output no longer depends on the encoder features.
    torch.manual_seed(0)
    block = models.UNetUpConvBlock(16, 4).eval()
    after_concat = [
        m
        for m in block.modules()
        if isinstance(m, nn.Conv2d) and m.in_channels == 16 and m.out_channels == 4
    ]
    expect(len(after_concat) == 1, "expected one Conv 16 -> 4 after the concatenation")
    with torch.no_grad():
        after_concat[0].weight[:, 8:] = 0
        inputs, skip = torch.randn(1, 16, 4, 4), torch.randn(1, 8, 8, 8)
        first, second = block(inputs, skip), block(inputs, skip + 1.0)
    expect(
        torch.allclose(first, second),
        "the skip connection is concatenated in the wrong order: torch.cat([upsampled, "
        "encoder_features], dim=1), the upsampled map first",
    )


@self_check
def test_q08_decoder_shapes():
    decoder = models.UNetDecoder(16, num_blocks=2, num_classes=5)
    features = [torch.randn(1, 4, 16, 20), torch.randn(1, 8, 8, 10)]
    logits = decoder(torch.randn(1, 16, 4, 5), features)
    expect_tensor(logits, (1, 5, 16, 20), torch.float32, "the logits of the decoder")
    expected = conv_bn_parameters(16, 16) + up_block_parameters(16, 8)
    expected += up_block_parameters(8, 4) + 4 * 5 + 5
    count = models.count_parameters(decoder)
    last_conv = [m for m in decoder.modules() if isinstance(m, nn.Conv2d)][-1]
    hint = parameter_mistake(decoder)
    if last_conv.kernel_size != (1, 1):
        hint = f" (the last convolution is {last_conv.kernel_size}: the logits come from a 1x1)"
    expect(count == expected, f"expected {expected} parameters, got {count}{hint}")
    expect_every_layer_used(
        decoder, lambda: decoder(torch.randn(1, 16, 4, 5), features), "UNetDecoder"
    )


@self_check
def test_q08_decoder_refuses_a_wrong_number_of_feature_maps():
    decoder = models.UNetDecoder(16, num_blocks=2, num_classes=5)
    try:
        decoder(torch.randn(1, 16, 4, 4), [torch.randn(1, 8, 8, 8)])
    except ValueError:
        return
    except NotImplementedError:
        raise
    except Exception as error:  # the decoder must name the problem itself
        raise AssertionError(
            "a decoder of 2 up blocks given 1 feature map should raise a ValueError that says "
            f"so, it raised {type(error).__name__}: {error}"
        ) from None
    raise AssertionError("a decoder of 2 up blocks given 1 feature map should raise a ValueError")


@self_check
def test_q08_whole_unet_matches_the_handout():
    # On the meta device nothing is allocated: even the full-size UNet builds at once.
    with torch.device("meta"):
        unet = models.build_unet(data.NUM_CLASSES)
        demo_unet = models.build_unet(data.NUM_CLASSES, num_blocks=3, base_chan=16)
        logits = unet(torch.empty(1, 3, 64, 48))
    expect_tensor(logits, (1, data.NUM_CLASSES, 64, 48), torch.float32, "the UNet's logits")
    for model, expected in [(unet, 34_527_886), (demo_unet, 537_646)]:
        count = models.count_parameters(model)
        expect(count == expected, f"expected a UNet of {expected:,} parameters, got {count:,}")


@self_check
def test_q09_unet_takes_any_image_size():
    unet = models.UNet(num_classes=5, num_blocks=3, base_chan=4).eval()
    try:
        with torch.no_grad():
            logits = unet(torch.randn(1, 3, 50, 37))
    except RuntimeError as error:
        first_line = str(error).splitlines()[0]
        raise AssertionError(
            f"a 50x37 image fails ({first_line}): pad it to a multiple of 2**num_blocks "
            "before the encoder and crop the logits back"
        ) from None
    expect_tensor(logits, (1, 5, 50, 37), torch.float32, "the logits of a 50x37 image")


class PassThrough(nn.Module):
    """Stands in for the encoder and the decoder of Q9's check: the images go through as
    they are, so that the UNet's "logits" are its padded and cropped input."""

    def forward(self, images: torch.Tensor, features: object = None) -> object:
        return images if features is not None else (images, [])


@self_check
def test_q09_logits_stay_aligned_with_the_pixels():
    unet = models.UNet(num_classes=3, num_blocks=3, base_chan=4).eval()
    unet.encoder, unet.decoder = PassThrough(), PassThrough()
    images = torch.arange(50 * 37, dtype=torch.float32).view(1, 1, 50, 37).expand(1, 3, -1, -1)
    with torch.no_grad():
        output = unet(images)
    expect_tensor(output, (1, 3, 50, 37), torch.float32, "the output of a 50x37 image")
    expect(
        torch.equal(output, images),
        "the logits are shifted against the pixels of the image (and so against their "
        "labels): pad at the bottom and on the right, (0, pad_right, 0, pad_bottom), so "
        "that the crop [..., :H, :W] keeps every pixel in its place",
    )


# ----------------------------------------------------------------------------------------
# Q10, Q11: confusion matrix and scores


@self_check
def test_q10_hand_counted_confusion_matrix():
    targets = torch.tensor([[0, 1, 1, 2, 3, 3]])
    preds = torch.tensor([[1, 1, 2, 2, 3, 0]])
    matrix = metrics.confusion_counts(preds, targets, num_classes=4, ignore_index=0)
    expect_tensor(matrix, (4, 4), torch.int64, "the confusion matrix of 4 classes")
    expected = [[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [1, 0, 0, 1]]
    expect(
        matrix.tolist() == expected,
        f"expected {expected} (rows: true class, columns: predicted, the ignored row 0 "
        f"empty), got {matrix.tolist()}" + confusion_mistake(matrix, preds, targets, 0),
    )


def count_pairs(rows: torch.Tensor, columns: torch.Tensor, num_classes: int, empty_row: int):
    """(K, K) int64 counts of the pairs (rows[i], columns[i]), pixel by pixel, the row
    `empty_row` left empty: the confusion matrix when rows are the targets."""
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for row, column in zip(rows.flatten().tolist(), columns.flatten().tolist(), strict=True):
        if row != empty_row:
            matrix[row, column] += 1
    return matrix


def confusion_mistake(
    matrix: torch.Tensor, preds: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> str:
    """The likely mistake behind a wrong confusion matrix of `preds` against `targets`."""
    num_classes = len(matrix)
    expected = count_pairs(targets, preds, num_classes, ignore_index)
    if torch.equal(matrix, count_pairs(preds, targets, num_classes, ignore_index)):
        return "; rows and columns swapped? rows are the true class: pair t * K + p"
    if torch.equal(matrix.T, expected):
        return "; rows and columns swapped? rows are the true class, columns the predicted"
    if matrix[ignore_index].any():
        return f"; the row of ignore_index ({ignore_index}) should stay empty"
    if not torch.equal(matrix[:, ignore_index], expected[:, ignore_index]):
        return (
            f"; the column of ignore_index ({ignore_index}) counts labelled pixels predicted "
            "as <UNK>: keep it, only the row is emptied"
        )
    return ""


@self_check
def test_q10_classes_absent_from_the_batch_keep_their_rows():
    targets = torch.tensor([[1, 1, 2]])
    preds = torch.tensor([[1, 2, 2]])
    matrix = metrics.confusion_counts(preds, targets, num_classes=6, ignore_index=0)
    expect_tensor(matrix, (6, 6), torch.int64, "the confusion matrix of 6 classes, 3 absent")
    expect(int(matrix.sum()) == 3, f"3 labelled pixels, the matrix counts {int(matrix.sum())}")


@self_check
def test_q10_matches_a_count_pixel_by_pixel():
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 6, (2, 8, 8), generator=generator)
    preds = torch.randint(0, 6, (2, 8, 8), generator=generator)
    expected = torch.zeros(6, 6, dtype=torch.int64)
    for true, predicted in zip(targets.flatten().tolist(), preds.flatten().tolist(), strict=True):
        if true != 2:
            expected[true, predicted] += 1
    matrix = metrics.confusion_counts(preds, targets, num_classes=6, ignore_index=2)
    expect_tensor(matrix, (6, 6), torch.int64, "the confusion matrix of 6 classes")
    expect(
        torch.equal(matrix, expected),
        f"on a random batch, with ignore_index=2, expected {expected.tolist()}, got "
        f"{matrix.tolist()}" + confusion_mistake(matrix, preds, targets, 2),
    )


def expect_close(value: object, expected: float, what: str, hint: str = "") -> None:
    number = float(value)
    same = math.isclose(number, expected, rel_tol=1e-6) or (
        math.isnan(expected) and math.isnan(number)
    )
    if not hint and math.isnan(number) and not math.isnan(expected):
        hint = "a mean over NaN values? the means leave out the NaN classes (torch.nanmean)"
    expect(
        same, f"{what} should be {expected:.6g}, got {number:.6g}" + (f"; {hint}" if hint else "")
    )


IGNORED_CLASS_HINT = "the ignored class is NaN in every score and never in a mean"


@self_check
def test_q11_hand_computed_scores():
    # Class 0 is ignored; one pixel of class 1 was predicted as class 0, a plain miss.
    matrix = torch.tensor([[0, 0, 0], [1, 8, 1], [0, 4, 6]])
    scores = metrics.scores_from_confusion(matrix, ignore_index=0)
    expected = {
        "iou": [math.nan, 8 / 14, 6 / 11],
        "accuracy": [math.nan, 8 / 10, 6 / 10],
        "f1": [math.nan, 16 / 22, 12 / 17],
    }
    for name, values in expected.items():
        for index, value in enumerate(values):
            hint = IGNORED_CLASS_HINT if index == 0 else ""
            expect_close(scores[name][index], value, f"{name} of class {index}", hint)
    expect_close(scores["miou"], (8 / 14 + 6 / 11) / 2, "miou")
    expect_close(scores["mean_accuracy"], 0.7, "mean_accuracy")
    expect_close(scores["macro_f1"], (16 / 22 + 12 / 17) / 2, "macro_f1")
    expect_close(scores["pixel_accuracy"], 14 / 20, "pixel_accuracy")


@self_check
def test_q11_absent_classes_are_left_out_of_the_means():
    # Class 3 never occurs; class 2 is predicted but absent from the targets.
    matrix = torch.tensor([[0, 0, 0, 0], [0, 6, 2, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    scores = metrics.scores_from_confusion(matrix, ignore_index=0)
    expect_close(
        scores["iou"][3],
        math.nan,
        "the IoU of a class never seen nor predicted",
        "counted as 0? a class absent from targets and predictions is NaN (0 / 0), and left out "
        "of the means",
    )
    expect_close(scores["iou"][2], 0.0, "the IoU of a class predicted but absent")
    expect_close(scores["accuracy"][2], math.nan, "the accuracy of a class absent")
    expect_close(scores["miou"], (6 / 8 + 0.0) / 2, "miou (classes 1 and 2 only)")
    expect_close(scores["mean_accuracy"], 6 / 8, "mean_accuracy (class 1 only)")


# Pixel shares of the 14 classes over the whole data set, in the order of data.CLASSES.
DATASET_SHARES = (1.26, 1.57, 2.71, 7.17, 9.94, 3.87, 11.23, 3.05, 10.98, 8.45, 0.33, 2.88,
                  33.67, 2.88)  # fmt: skip


@self_check
def test_q11_always_wall_scores_as_in_the_handout():
    wall = data.CLASSES.index("wall")
    matrix = torch.zeros(data.NUM_CLASSES, data.NUM_CLASSES, dtype=torch.int64)
    matrix[1:, wall] = torch.tensor([round(share * 100) for share in DATASET_SHARES[1:]])
    scores = metrics.scores_from_confusion(matrix)
    labelled = sum(DATASET_SHARES[1:])
    expect_close(scores["pixel_accuracy"], 33.67 / labelled, "the pixel accuracy")
    expect_close(scores["miou"], 33.67 / labelled / 13, "the mIoU")
    expect_close(scores["mean_accuracy"], 1 / 13, "the mean accuracy")
    wall_f1 = 2 * 33.67 / (2 * 33.67 + labelled - 33.67)
    expect_close(scores["macro_f1"], wall_f1 / 13, "the macro F1")


# ----------------------------------------------------------------------------------------
# Q12: class weights


def expect_weights(weights: object, expected: list[float], method: str) -> None:
    expect_tensor(weights, (len(expected),), torch.float32, f"the {method} weights")
    hint = ""
    if not torch.isfinite(weights).all():
        hint = (
            "; a class of share 0 got the weight 1 / 0 = inf (and the mean with it): give each "
            "unobserved class the largest weight of the observed ones"
        )
    elif not math.isclose(float(weights[1:].mean()), 1.0, rel_tol=1e-4):
        hint = (
            f"; the weights of the classes other than ignore_index should have a mean of 1, "
            f"theirs is {float(weights[1:].mean()):.4g}"
        )
    elif (weights[1:] == 0).any():
        hint = "; an unobserved class gets the largest weight of the observed ones, not 0"
    expect(
        torch.allclose(weights, torch.tensor(expected), rtol=1e-5),
        f"{method}: expected the weights {[round(w, 4) for w in expected]}, got "
        f"{[round(w, 4) for w in weights.tolist()]}{hint}",
    )


def normalized(raw: list[float]) -> list[float]:
    """0 for the ignored class 0, then `raw` scaled to mean 1."""
    mean = sum(raw) / len(raw)
    return [0.0] + [value / mean for value in raw]


@self_check
def test_q12_inverse_and_inverse_sqrt_weights():
    # The share of class 0 (ignored) does not count: the others are 1/2, 1/4, 1/4.
    freqs = [0.1, 0.45, 0.225, 0.225]
    weights = losses.class_weights_from_frequencies(freqs, method="inverse")
    expect_weights(weights, normalized([2.0, 4.0, 4.0]), "inverse")
    weights = losses.class_weights_from_frequencies(freqs, method="inverse_sqrt")
    expect_weights(weights, normalized([math.sqrt(2), 2.0, 2.0]), "inverse_sqrt")


@self_check
def test_q12_effective_number_weights():
    # The ignored class holds a fifth of the pixels: the others are 1/2, 1/4, 1/4 of the rest.
    freqs = [0.2, 0.4, 0.2, 0.2]
    beta, num_samples = 0.99, 100
    weights = losses.class_weights_from_frequencies(
        freqs, method="effective", beta=beta, num_samples=num_samples
    )
    raw = [(1 - beta) / (1 - beta ** (share * num_samples)) for share in (0.5, 0.25, 0.25)]
    expect_weights(weights, normalized(raw), "effective")


@self_check
def test_q12_unseen_class_gets_the_largest_weight():
    weights = losses.class_weights_from_frequencies([5, 800, 200, 0], method="inverse")
    expect_weights(weights, normalized([1.25, 5.0, 5.0]), "inverse, from pixel counts")


# ----------------------------------------------------------------------------------------
# Q13, Q14: training, testing and predicting from the command line


def train_tiny_run(synthetic_root: Path, logdir: Path) -> Path | Exception:
    """One epoch of a tiny UNet with the core's loss (the plain cross-entropy: the weighted
    one needs the homework Q12); the run folder, or the error when training fails."""
    args = [
        "train", "--datadir", str(synthetic_root), "--areas", "1", "--val-areas", "2",
        "--num-blocks", "2", "--base-chan", "4", "--img-size", "32", "--loss", "ce",
        "--epochs", "1", "--batch-size", "2", "--warmup-steps", "1", "--workers", "0",
        "--device", "cpu", "--logdir", str(logdir), "--name", "tiny",
    ]  # fmt: skip
    try:
        with deadline(TRAINING_DEADLINE_S):
            run_command(args, "python main.py train")
    except DeadlinePassed:
        return AssertionError(
            f"the tiny training run did not finish in {TRAINING_DEADLINE_S} s; an endless "
            "loop in one of your answers? their own checks say which"
        )
    except Exception as error:  # reported by the checks that need the run
        return error
    return logdir / "tiny"


@pytest.fixture(scope="module")
def tiny_run(synthetic_root, tmp_path_factory) -> Path | Exception:
    """The tiny run of train_tiny_run, made once; the error instead when training fails, so
    that each check reports it under its own question."""
    return train_tiny_run(synthetic_root, tmp_path_factory.mktemp("lab-runs"))


def run_command(args: list[str], what: str, script_main: Callable = main.main) -> None:
    """Run `python main.py ARGS` (or the script of `script_main`) in this process; when it
    fails, an AssertionError naming `what` and the line the program printed about the cause,
    or the NotImplementedError of the unanswered question that it names."""
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        code = script_main(args)
    if code != 0:
        lines = [line for line in errors.getvalue().splitlines() if line.strip()]
        cause = lines[-1] if lines else f"exit code {code}"
        unanswered = re.match(r"error: (Q\d+: .* see LAB\.md)", cause)
        if unanswered:  # reported as the question that the command needs first
            raise NotImplementedError(unanswered[1])
        raise AssertionError(f"{what} failed: {cause}")


def run_directory(tiny_run: Path | Exception) -> Path:
    if isinstance(tiny_run, Exception):
        raise tiny_run
    return tiny_run


@self_check
def test_q13_training_writes_checkpoints_and_metrics(tiny_run):
    run = run_directory(tiny_run)
    for name in ("best.pt", "last.pt", "metrics.jsonl"):
        expect((run / name).is_file(), f"training should write {run / name}")
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    expect(math.isfinite(record["train_loss"]), f"the training loss is {record['train_loss']}")
    expect(0 <= record["val"]["miou"] <= 1, f"the validation mIoU is {record['val']['miou']}")


@self_check
def test_q14_test_command_scores_a_held_out_area(tiny_run, synthetic_root, tmp_path):
    run = run_directory(tiny_run)
    args = ["test", "--model", str(run / "best.pt"), "--datadir", str(synthetic_root)]
    args += ["--areas", "5a", "--out", str(tmp_path), "--workers", "0", "--device", "cpu"]
    run_command(args, "python main.py test")
    result = json.loads((tmp_path / "metrics.json").read_text())
    expect(result["areas"] == ["5a"], f"expected the test on area 5a, got {result['areas']}")
    expect(0 <= result["miou"] <= 1, f"the test mIoU is {result['miou']}")


@self_check
def test_q14_predict_keeps_the_size_of_any_image(tiny_run, tmp_path):
    run = run_directory(tiny_run)
    photo = tmp_path / "photo.jpg"
    # 300x200: not a multiple of the UNet's 2**num_blocks, nor of the training size.
    pixels = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photo)
    out = tmp_path / "predictions"
    args = ["predict", "--model", str(run / "best.pt"), str(photo), "--out", str(out)]
    run_command([*args, "--device", "cpu"], "python main.py predict")
    with Image.open(out / "photo_mask.png") as mask:
        size = mask.size
    expect(size == (300, 200), f"a 300x200 photo gave a {size[0]}x{size[1]} mask")


class StandInNetwork(nn.Module):
    """A 3x3 conv to the 14 classes: Q14's ONNX check needs no answer of another question."""

    size_multiple = 4  # what models.Segmenter reads from every model

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, data.NUM_CLASSES, kernel_size=3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)


@takes_up_to(600)  # the export alone takes half a minute on a busy machine
@self_check
def test_q14_optional_onnxruntime_gives_the_classes_of_predict(tmp_path):

    torch.manual_seed(0)
    segmenter = models.Segmenter(StandInNetwork().eval(), img_size=32)
    onnx_file = tmp_path / "model.onnx"
    export.export_onnx(segmenter, {"model_config": {"name": "stand-in"}, "img_size": 32}, onnx_file)
    session = export.onnx_session(onnx_file)
    for height, width in [(250, 333), (97, 301)]:
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
        ids = main.segment_with_onnxruntime(session, image)
        expect(
            data.NUM_CLASSES not in tuple(getattr(ids, "shape", ())),
            f"segment_with_onnxruntime returned {shape_of(ids)}: the class of a pixel is the "
            "argmax of its logits over the axis of the classes",
        )
        expect_tensor(ids, (height, width), torch.int64, "segment_with_onnxruntime(session, image)")
        agree = (ids == main.predict_image(segmenter, image, "cpu")).float().mean().item()
        expect(
            agree >= 0.999,
            f"onnxruntime and predict give the same class to {agree:.1%} of the pixels of a "
            f"{width}x{height} image, expected at least 99.9 %",
        )
