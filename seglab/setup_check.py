"""Is this machine ready for the lab? The check a student runs before the session:

    python progress.py --setup          # about 20 seconds
    python progress.py --setup 60       # a longer, steadier measurement

It prints the versions of Python and torch, the device that training will use, whether PNG
files decode and TensorBoard writes its events, and how long the training of Q13 will take
on this machine. The exit status is 0 when everything works.

None of the lab's answers is needed, so the check runs in the students' version before a
single question is answered. It times a stand-in of Q13's training instead of the training
itself: frames of the synthetic data set at Q13's size, decoded by data.read_png in loader
workers, a network with the convolutions of Q13's UNet (without its skip connections,
which cost little), its training and validation steps, and what every epoch adds
(TensorBoard's figures, the checkpoints). `estimate_q13` adds them up as Q13's command runs
them.

torch and the project's modules are imported inside the functions: on a machine without
them the check says so in a line instead of a traceback.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MIN_PYTHON = (3, 10)
DEFAULT_SECONDS = 20.0


@dataclass(frozen=True)
class Q13Run:
    """What Q13's command in LAB.md does: its data, model, epochs, batches and loader
    workers (tests/test_setup_check.py checks them against the handout)."""

    train_frames: int = 200  # areas 1 2 3 4 6 of `seglab.synthetic --images-per-area 40`
    val_frames: int = 40  # area 5a
    frame_size: int = 160  # seglab.synthetic --size 160
    img_size: int = 128
    epochs: int = 10
    batch_size: int = 8
    workers: int = 2  # main.py train's default
    num_blocks: int = 3
    base_chan: int = 16

    @property
    def steps_per_epoch(self) -> int:
        return self.train_frames // self.batch_size  # the last incomplete batch is dropped

    @property
    def val_batches_per_epoch(self) -> int:
        return math.ceil(self.val_frames / self.batch_size)


Q13_RUN = Q13Run()
# The convolutions of Q13's UNet (3 blocks, base_chan 16) on 128 px crops, in the order the
# network runs them: (input channels, output channels, side of the map, kernel side). The
# 3x3 ones are followed by ReLU and BatchNorm, as in the UNet.
Q13_CONVOLUTIONS: tuple[tuple[int, int, int, int], ...] = (
    (3, 16, 128, 3), (16, 16, 128, 3),
    (16, 32, 64, 3), (32, 32, 64, 3),
    (32, 64, 32, 3), (64, 64, 32, 3),
    (64, 128, 16, 3), (128, 128, 16, 3),
    (128, 64, 32, 3), (128, 64, 32, 3), (64, 64, 32, 3),
    (64, 32, 64, 3), (64, 32, 64, 3), (32, 32, 64, 3),
    (32, 16, 128, 3), (32, 16, 128, 3), (16, 16, 128, 3),
    (16, 14, 128, 1),
)  # fmt: skip


@dataclass
class Result:
    """One line of the report: what was checked, whether it works, and the detail."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{self.name:<12} {'' if self.ok else 'FAILED: '}{self.detail}"


# ----------------------------------------------------------------------------------------
# The stand-in of Q13's training


def stand_in_network(num_classes: int = 14):
    """A network with the convolutions of Q13_CONVOLUTIONS, each 3x3 one followed by ReLU
    and BatchNorm: it costs what Q13's UNet costs to train, and needs none of the lab's
    answers."""
    from torch import nn

    class StandIn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList()
            for cin, cout, _, kernel in Q13_CONVOLUTIONS[:-1]:
                conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
                self.layers.append(nn.Sequential(conv, nn.ReLU(inplace=True), nn.BatchNorm2d(cout)))
            cin, _, _, kernel = Q13_CONVOLUTIONS[-1]
            self.layers.append(nn.Conv2d(cin, num_classes, kernel))

        def forward(self, x):
            for layer, (cin, _, side, _) in zip(self.layers, Q13_CONVOLUTIONS, strict=True):
                x = layer(reshaped(x, cin, side))
            return x

    return StandIn()


def reshaped(x, channels: int, side: int):
    """`x` brought to `side` pixels (max-pooled or upsampled, as the UNet does) and to
    `channels` channels (repeated, where the UNet concatenates a map of the same size)."""
    import torch.nn.functional as F

    if x.shape[-1] > side:
        x = F.max_pool2d(x, x.shape[-1] // side)
    elif x.shape[-1] < side:
        x = F.interpolate(x, scale_factor=side // x.shape[-1])
    if x.shape[1] < channels:
        x = x.repeat(1, channels // x.shape[1], 1, 1)
    return x


class StandInFrames:
    """`length` samples read from the frames of a synthetic tree, over and over, as Q13's
    loader reads them: both PNGs of a frame decoded by data.read_png, resized to the
    training size, the mask made class ids."""

    def __init__(self, root: Path, img_size: int, length: int) -> None:
        import data

        self.frames = data.list_frames(root)
        self.img_size, self.length = img_size, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        import torch.nn.functional as F

        import data

        frame = self.frames[index % len(self.frames)]
        image = data.read_png(frame.rgb_path)
        colors = data.read_png(frame.semantic_path, labels=True)
        size = (self.img_size, self.img_size)
        image = F.interpolate(image[None].float(), size=size, mode="bilinear")[0].byte()
        colors = F.interpolate(colors[None], size=size, mode="nearest")[0]
        return image, colors[0] % data.NUM_CLASSES  # not the real classes: what they cost


def loader_of(frames: StandInFrames, workers: int):
    """A loader as main.py builds one for Q13: batches of Q13's size from `workers`
    persistent processes, started the way this platform starts them (spawn on Windows and
    macOS, fork on Linux; $SEGLAB_START_METHOD where set)."""
    import torch

    import data

    return torch.utils.data.DataLoader(
        frames,
        batch_size=Q13_RUN.batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        multiprocessing_context=data.worker_context(workers),
    )


def endless(loader) -> Iterator:
    """The batches of `loader`, epoch after epoch."""
    while True:
        yield from loader


def synchronize(device) -> None:
    """Wait until the device has run its queued work (GPUs run asynchronously)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seconds_per_step(step, batches: Iterator, device, seconds: float, least: int) -> float:
    """Wall time per call of `step(images, targets)` on the batches, waits for the loader
    included: two calls to warm up, then calls for about `seconds` (at least `least`)."""
    ends = []
    while len(ends) < 2 + least or ends[-1] - ends[1] < seconds:
        step(*next(batches))
        synchronize(device)
        ends.append(time.perf_counter())
    return (ends[-1] - ends[1]) / (len(ends) - 2)


def training_step(model, optimizer, device, precision: tuple[bool, str]):
    """main.py's training step for the stand-in: the batch to the device and normalized,
    forward, cross-entropy, backward, clipping, AdamW."""
    import torch
    from torch import nn

    import data

    amp, dtype = precision
    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == "float16")
    loss_fn = nn.CrossEntropyLoss(ignore_index=0)

    def step(images, targets) -> None:
        model.train()
        images = data.normalize(images.to(device))
        with torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=amp):
            logits = model(images)
        loss = loss_fn(logits.float(), targets.to(device).long())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()

    return step


def validation_step(model, device):
    """A validation batch: forward pass, argmax, the confusion counts of the batch."""
    import torch

    import data

    @torch.no_grad()
    def step(images, targets) -> None:
        model.eval()
        predictions = model(data.normalize(images.to(device))).argmax(dim=1)
        pairs = targets.to(device).long() * data.NUM_CLASSES + predictions
        torch.bincount(pairs.flatten(), minlength=data.NUM_CLASSES**2).cpu()

    return step


@dataclass
class Q13Parts:
    """The measured parts of Q13's run, in seconds."""

    imports: float  # Python's start: torch, the project's modules
    workers: float  # a loader's workers started, until their first batch
    train_step: float
    val_batch: float
    epoch_extra: float  # TensorBoard's validation figures, the checkpoints


def estimate_q13(parts: Q13Parts) -> float:
    """Seconds of Q13's command: the imports, the workers of two loaders (training and
    validation), and each epoch's training steps, validation batches (and the preview
    frames of TensorBoard, half a batch) and the rest."""
    epoch = (
        Q13_RUN.steps_per_epoch * parts.train_step
        + (Q13_RUN.val_batches_per_epoch + 0.5) * parts.val_batch
        + parts.epoch_extra
    )
    return parts.imports + 2 * parts.workers + Q13_RUN.epochs * epoch


def measure_q13(root: Path, device, seconds: float, imports: float, tensorboard: float):
    """Q13Parts measured here in about `seconds`, with the seconds of the imports and of
    TensorBoard's writing measured by the other checks."""
    import torch

    from seglab import checkpoints, devices

    frames = StandInFrames(root, Q13_RUN.img_size, Q13_RUN.train_frames)
    loader = loader_of(frames, Q13_RUN.workers)
    start = time.perf_counter()
    batches = endless(loader)
    next(batches)  # spawned workers (Windows, macOS) import torch again, each
    workers = time.perf_counter() - start
    model = stand_in_network().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    train = training_step(model, optimizer, device, devices.precision(device, None, None))
    train_step = seconds_per_step(train, batches, device, 0.8 * seconds, least=3)
    validate = validation_step(model, device)
    val_batch = seconds_per_step(validate, batches, device, 0.1 * seconds, least=2)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        checkpoints.save_checkpoint(state, Path(scratch) / "last.pt")
        saving = time.perf_counter() - start
    # Every epoch writes last.pt, and best.pt while the score improves.
    return Q13Parts(imports, workers, train_step, val_batch, tensorboard + 2 * saving)


def format_duration(seconds: float) -> str:
    """ "45 s", "2 min 5 s", "1 h 10 min"."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


# ----------------------------------------------------------------------------------------
# The checks


def check_python() -> Result:
    version = platform.python_version()
    if sys.version_info < MIN_PYTHON:
        return Result("Python", False, f"{version}: the lab needs Python 3.10 or newer")
    return Result("Python", True, f"{version} ({platform.system()} {platform.machine()})")


def import_libraries() -> tuple[Result, float]:
    """Import torch and what a training run imports; the result and the seconds it took."""
    start = time.perf_counter()
    try:
        import torch
        import torch.utils.tensorboard  # noqa: F401
        import torchvision

        import main  # noqa: F401  (the program: every module of the project it imports)
    except ImportError as error:
        advice = "install the requirements as docs/install.md says"
        return Result("torch", False, f"cannot import {error.name}: {advice}"), 0.0
    seconds = time.perf_counter() - start
    versions = f"{torch.__version__}, torchvision {torchvision.__version__}"
    return Result("torch", True, versions), seconds


def check_device():
    """The device that `main.py train` picks (--device auto), in words; and the device."""
    import torch

    from seglab import devices

    device = devices.pick_device("auto")
    if device.type == "cuda":
        detail = f"cuda: {torch.cuda.get_device_name(device)}"
    elif device.type == "mps":
        detail = "mps: the GPU of this Mac (Apple silicon)"
    else:
        detail = f"cpu: {os.cpu_count()} cores, no GPU that PyTorch can use"
    return Result("device", True, detail), device


def check_png(root: Path) -> Result:
    """data.read_png decodes a frame and its labels, in the size they were written."""
    import data

    frame = data.list_frames(root)[0]
    try:
        shapes = {tuple(data.read_png(frame.rgb_path).shape)}
        shapes.add(tuple(data.read_png(frame.semantic_path, labels=True).shape))
    except data.DataError as error:
        return Result("PNG", False, str(error))
    side = Q13_RUN.frame_size
    if shapes != {(3, side, side)}:
        return Result("PNG", False, f"decoded {sorted(shapes)}, expected (3, {side}, {side})")
    decoder = "libspng (pyspng)" if data.pyspng is not None else "torchvision"
    return Result("PNG", True, f"decoding works ({decoder})")


def check_tensorboard(folder: Path) -> tuple[Result, float]:
    """Write what each epoch of training writes (scalars, an image, the confusion matrix
    figure), then read it back; the result and the seconds that writing took."""
    import torch
    from torch.utils.tensorboard import SummaryWriter

    import data
    import metrics

    start = time.perf_counter()
    writer = SummaryWriter(str(folder))
    writer.add_scalar("val/miou", 0.5, 1)
    writer.add_image("val/input_truth_prediction", torch.zeros(3, 64, 192, dtype=torch.uint8), 1)
    matrix = torch.eye(data.NUM_CLASSES, dtype=torch.int64)
    writer.add_figure("val/confusion_matrix", metrics.confusion_matrix_figure(matrix), 1)
    writer.close()
    seconds = time.perf_counter() - start
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as error:
        return Result("TensorBoard", False, f"cannot import {error.name}"), seconds
    events = EventAccumulator(str(folder))
    events.Reload()
    tags = events.Tags()
    if "val/miou" not in tags["scalars"] or "val/confusion_matrix" not in tags["images"]:
        return Result("TensorBoard", False, f"the events read back lack tags: {tags}"), seconds
    return Result("TensorBoard", True, "events written and read back"), seconds


def run_checks(seconds: float = DEFAULT_SECONDS) -> Iterator[Result]:
    """Each check's Result as it is done; the measurement of Q13's training lasts about
    `seconds`. Stops after a failed check that the later ones need."""
    yield check_python()
    torch_result, import_seconds = import_libraries()
    yield torch_result
    if not torch_result.ok:
        return
    from seglab import synthetic

    device_result, device = check_device()
    yield device_result
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "data"
        # Two batches of frames of Q13's size, read over and over.
        count = 2 * Q13_RUN.batch_size
        synthetic.generate(root, ["1"], count, Q13_RUN.frame_size, progress=False)
        png_result = check_png(root)
        yield png_result
        tensorboard_result, tensorboard_seconds = check_tensorboard(Path(scratch) / "runs")
        yield tensorboard_result
        if not (png_result.ok and tensorboard_result.ok):
            return
        start = time.perf_counter()
        parts = measure_q13(root, device, seconds, import_seconds, tensorboard_seconds)
        measured = time.perf_counter() - start
    fps = Q13_RUN.batch_size / parts.train_step
    yield Result(
        "Q13",
        True,
        f"training will take about {format_duration(estimate_q13(parts))} here "
        f"({Q13_RUN.epochs} epochs at {fps:.0f} frames/s; measured in {measured:.0f} s)",
    )


def main(seconds: float = DEFAULT_SECONDS) -> int:
    """Print each check's line as it is done; 0 when every one passed."""
    print(f"Checking this machine for the lab (about {seconds:.0f} s)", flush=True)
    passed = True
    for result in run_checks(seconds):
        print(result.line(), flush=True)
        passed = passed and result.ok
    print("ready for the lab" if passed else "not ready: see docs/install.md")
    return 0 if passed else 1
