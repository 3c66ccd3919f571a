"""How fast the data pipeline, the metrics and the models run on this machine.

    python -m seglab.bench                   # synthetic 1080x1080 frames, a few minutes
    python -m seglab.bench --quick           # fewer frames and shorter timings
    python -m seglab.bench --datadir D       # real 2D-3D-S frames (a sample of --frames of them)

One table, grouped; each group's first row is its reference and the last column is the
speed-up over it:

- loaders: a naive per-frame reference (PIL decode, int64 label map in numpy, PIL crop,
  resize and color jitter, numpy flip and normalization) against our raw-PNG path
  (data.StanfordDataset) and our pre-decoded cache (cache.CachedDataset), both with
  data.train_transforms (color jitter and normalization happen later, a batch at a time on
  the device), through a DataLoader with 0 and with --workers worker processes;
- that color jitter per frame: torchvision's ColorJitter on one frame against
  data.jitter_colors on a batch on the device;
- PNG and label decoding per frame; a metric update per batch against torchmetrics;
- a training step and an inference step of the demo UNet and of the handout's UNet in
  float32, channels_last and autocast; the step of the training loop itself
  (main.train_one_epoch), eager and compiled by torch.compile, and how many times per step
  it makes the host wait for the device; the latency of the demo UNet on a full 1080x1080 frame,
  and of `python main.py predict` on a 1080x1080 photo, PyTorch against onnxruntime;
- the time and the peak resident memory of a whole `python main.py predict` process on a
  50-megapixel photo, with a checkpoint and with an ONNX file.

It also checks that the fast paths give the samples they should and prints the result.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from PIL import Image, ImageEnhance
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_png

import data
import losses
import metrics
import models
from seglab import cache, cli, devices, export

# (name, num_blocks, base_chan, img_size) of the two UNets of the project.
DEMO_UNET = ("demo UNet (3 blocks, base 16)", 3, 16, 128)
HANDOUT_UNET = ("handout UNet (4 blocks, base 64)", 4, 64, 256)
FULL_FRAME = 1080


# ----------------------------------------------------------------------------------------
# The naive reference loader


def naive_class_table(labels_path: Path) -> np.ndarray:
    """Label index -> class id as an int64 array, the last entry standing for "no data"."""
    return data.load_label_table(labels_path).numpy().astype(np.int64)


def naive_classes(semantic: np.ndarray, class_table: np.ndarray) -> np.ndarray:
    """Semantic colors `(H, W, 3)` uint8 -> class ids `(H, W)` int64, in numpy.

    The straightforward numpy way, independent of data.decode_semantic: a zero byte before
    each pixel's three bytes makes a big-endian 32-bit label index, read through a view;
    the int64 table then gives the classes.
    """
    height, width, _ = semantic.shape
    four_bytes = np.zeros((height, width, 4), dtype=np.uint8)
    four_bytes[..., 1:] = semantic
    label_index = four_bytes.view(">u4")[..., 0]
    return class_table[np.minimum(label_index, len(class_table) - 1)]


def pil_decode(path: Path) -> np.ndarray:
    """PIL: `(H, W, 3)` uint8."""
    return np.asarray(Image.open(path).convert("RGB"))


def naive_label_map(semantic_path: Path, class_table: np.ndarray) -> np.ndarray:
    """PIL decode of a semantic PNG, then its `(H, W)` int64 class ids."""
    return naive_classes(pil_decode(semantic_path), class_table)


def naive_sample(
    frame: data.Frame, class_table: np.ndarray, img_size: int, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward per-frame pipeline: decode, label, random crop and resize, flip,
    color jitter, normalize; the augmentations of data.train_transforms and
    data.jitter_colors.

    Returns `(3, S, S)` float32 normalized and `(S, S)` int64.
    """
    image = Image.open(frame.rgb_path).convert("RGB")
    classes = naive_label_map(frame.semantic_path, class_table)
    height, width = classes.shape
    side = int(min(height, width) * math.sqrt(rng.uniform(0.25, 1.0)))
    top, left = rng.randint(0, height - side), rng.randint(0, width - side)
    box = (left, top, left + side, top + side)
    image = image.resize((img_size, img_size), Image.BILINEAR, box=box)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(rng.uniform(0.8, 1.2))
    pixels = np.asarray(image)
    # Nearest neighbour for labels: the source pixel under the centre of each output pixel.
    offsets = ((np.arange(img_size) + 0.5) * side / img_size).astype(np.int64)
    mask = classes[(top + offsets)[:, None], (left + offsets)[None, :]]
    if rng.random() < 0.5:
        pixels, mask = pixels[:, ::-1], mask[:, ::-1]
    normalized = (pixels.astype(np.float32) / 255.0 - np.float32(data.MEAN)) / np.float32(data.STD)
    image_tensor = torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)))
    return image_tensor, torch.from_numpy(np.ascontiguousarray(mask))


class NaiveDataset(Dataset):
    """The frames of a StanfordDataset through `naive_sample`."""

    def __init__(self, source: data.StanfordDataset, img_size: int) -> None:
        self.frames = source.frames
        self.class_table = naive_class_table(source.root / data.LABELS_FILE)
        self.img_size = img_size
        self.rng = random.Random(0)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return naive_sample(self.frames[index], self.class_table, self.img_size, self.rng)


# ----------------------------------------------------------------------------------------
# Timing


def endless_indices(num_frames: int, seed: int = 0) -> Iterator[int]:
    """Shuffled passes over `range(num_frames)`, forever: a sampler for timed loaders."""
    rng = random.Random(seed)
    while True:
        order = list(range(num_frames))
        rng.shuffle(order)
        yield from order


def loader_frames_per_second(
    dataset: Dataset, batch_size: int, workers: int, seconds: float
) -> float:
    """Frames per second a DataLoader delivers in steady state.

    The clock starts once the batches prefetched while the workers started are consumed,
    and stops after `seconds`.
    """
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=endless_indices(len(dataset)),
        num_workers=workers,
        prefetch_factor=2 if workers else None,
    )
    batches = iter(loader)
    for _ in range(1 + 2 * workers):
        next(batches)
    frames, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images, _ = next(batches)
        frames += len(images)
    elapsed = time.perf_counter() - start
    del batches  # shuts the workers down
    return frames / elapsed


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


def per_frame_ms(function: Callable, inputs: list, repeats: int = 1) -> float:
    """Milliseconds of `function(x)` per input: the best of `repeats` passes over `inputs`,
    after one warm-up call."""
    function(inputs[0])
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for item in inputs:
            function(item)
        passes.append(1000 * (time.perf_counter() - start) / len(inputs))
    return min(passes)


def row(group: str, name: str, fps: float | None, ms: float | None, unit: str) -> dict:
    return {"group": group, "name": name, "fps": fps, "ms": ms, "unit": unit}


# ----------------------------------------------------------------------------------------
# The measurements


def bench_loaders(
    raw: data.StanfordDataset,
    cache_root: Path,
    img_size: int,
    batch_size: int,
    workers: int,
    seconds: float,
    rounds: int,
) -> list[dict]:
    """Frames/s of the naive, raw and cached loaders with 0 and `workers` workers.

    The paths take turns for `rounds` rounds and each keeps its best round: other processes
    on the machine can only slow a round down.
    """
    transforms = data.train_transforms(img_size)
    paths = {
        "naive reference (PIL, int64 labels, numpy)": NaiveDataset(raw, img_size),
        f"raw PNG, data.StanfordDataset ({OUR_DECODER})": data.StanfordDataset(
            raw.root, None, transforms
        ),
        "cache, cache.CachedDataset": cache.CachedDataset(cache_root, None, transforms),
    }
    rows = []
    for num_workers in sorted({0, workers}):
        group = f"loader, {img_size}px train samples, {num_workers} workers"
        best = dict.fromkeys(paths, 0.0)
        for _ in range(rounds):
            for name, dataset in paths.items():
                fps = loader_frames_per_second(dataset, batch_size, num_workers, seconds)
                best[name] = max(best[name], fps)
        rows += [row(group, name, fps, 1000 / fps, "frame") for name, fps in best.items()]
    return rows


def bench_jitter(
    batch_size: int, img_size: int, seconds: float, device: torch.device
) -> list[dict]:
    """Milliseconds per frame of the color jitter: torchvision's, one frame at a time as a
    loader would, against data.jitter_colors on a whole batch on `device`."""
    images = torch.randint(0, 256, (batch_size, 3, img_size, img_size), dtype=torch.uint8)
    per_frame = T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)
    on_device = images.to(device)
    cpu = torch.device("cpu")
    frame_ms = 1000 * median_seconds(lambda: [per_frame(x) for x in images], cpu, seconds)
    batch_ms = 1000 * median_seconds(lambda: data.jitter_colors(on_device, 0.2), device, seconds)
    group = f"color jitter, {batch_size}x{img_size}x{img_size} batch"
    frame_name = "torchvision ColorJitter, frame by frame (cpu)"
    batch_name = f"data.jitter_colors, the whole batch ({device.type})"
    return [
        row(group, frame_name, None, frame_ms / batch_size, "frame"),
        row(group, batch_name, None, batch_ms / batch_size, "frame"),
    ]


def torchvision_decode(path: Path) -> torch.Tensor:
    """torchvision.io.decode_png: `(3, H, W)` uint8."""
    encoded = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    return decode_png(encoded, ImageReadMode.RGB)


def spng_decode(path: Path) -> np.ndarray:
    """pyspng (libspng): `(H, W, 3)` uint8."""
    return data.pyspng.load(path.read_bytes(), "RGB")


# The decoder of data.read_png, which skips pyspng when it is not installed.
OUR_DECODER = "pyspng" if data.pyspng is not None else "torchvision.io.decode_png"


def png_decoders() -> dict[str, Callable[[Path], object]]:
    """The PNG decoders available here, by name, each `path -> pixels`."""
    decoders = {"PIL": pil_decode, "torchvision.io.decode_png": torchvision_decode}
    if data.pyspng is not None:
        decoders["pyspng"] = spng_decode
    return decoders


def bench_decoding(
    raw: data.StanfordDataset, img_size: int, max_frames: int, repeats: int
) -> list[dict]:
    """Milliseconds per frame to decode the PNGs and to turn semantic colors into classes."""
    frames = raw.frames[:max_frames]
    rows = []
    for kind in ("RGB", "semantic"):
        paths = [frame.rgb_path if kind == "RGB" else frame.semantic_path for frame in frames]
        for name, decode in png_decoders().items():
            label = f"{name} (ours)" if name == OUR_DECODER else name
            ms = per_frame_ms(decode, paths, repeats)
            rows.append(row(f"decode the {kind} PNG", label, None, ms, "frame"))

    class_table = naive_class_table(raw.root / data.LABELS_FILE)
    semantic_arrays = [pil_decode(frame.semantic_path) for frame in frames]
    semantic_tensors = [data.read_png(frame.semantic_path) for frame in frames]
    resize = T.Resize((img_size, img_size), interpolation=T.InterpolationMode.NEAREST)
    resized = [resize(tv_tensors.Mask(s)).as_subclass(torch.Tensor) for s in semantic_tensors]
    size = semantic_tensors[0].shape[-1]
    group = "semantic colors -> class ids"
    timings = [
        (f"int64 numpy, {size}px", lambda s: naive_classes(s, class_table), semantic_arrays),
        (
            f"uint8 table, {size}px (data.decode_semantic)",
            lambda s: data.decode_semantic(s, raw.label_table),
            semantic_tensors,
        ),
        (
            f"uint8 table after the resize to {img_size}px (our raw path)",
            lambda s: data.decode_semantic(s, raw.label_table),
            resized,
        ),
    ]
    for name, function, inputs in timings:
        rows.append(row(group, name, None, per_frame_ms(function, inputs, repeats), "frame"))
    return rows


def bench_metrics(batch_size: int, size: int, repeats: int, device: torch.device) -> list[dict]:
    """Milliseconds per update of a `(batch_size, size, size)` batch of class ids: torchmetrics'
    Jaccard index with and without its argument checks (the reference, when installed), then
    our metrics.ConfusionMatrix. Each is the median of `repeats` updates."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, size, size)
    targets = torch.randint(0, data.NUM_CLASSES, shape, generator=generator).to(device)
    preds = torch.randint(0, data.NUM_CLASSES, shape, generator=generator).to(device)

    # torchmetrics first: it is the reference of the group.
    candidates: list[tuple[str, Callable[[], object]]] = []
    try:
        from torchmetrics.classification import MulticlassJaccardIndex
    except ImportError:
        print(
            "torchmetrics is not installed: timing ours only (pip install torchmetrics)",
            file=sys.stderr,
        )
    else:
        for validate in (True, False):
            metric = MulticlassJaccardIndex(
                data.NUM_CLASSES,
                average=None,
                ignore_index=data.IGNORE_INDEX,
                validate_args=validate,
            ).to(device)
            name = f"torchmetrics MulticlassJaccardIndex (validate_args={validate})"
            # A partial, not a lambda, binds this loop's metric rather than the last one.
            candidates.append((name, functools.partial(metric.update, preds, targets)))
    ours = metrics.ConfusionMatrix(data.NUM_CLASSES, data.IGNORE_INDEX)
    candidates.append(("ConfusionMatrix (ours)", lambda: ours.update(preds, targets)))

    group = f"metric update, {batch_size}x{size}x{size} batch"
    return [
        row(group, name, None, 1000 * median_seconds(step, device, max_runs=repeats), "batch")
        for name, step in candidates
    ]


def model_variants(device: torch.device) -> list[tuple[str, torch.dtype | None, bool]]:
    """(name, autocast dtype or None, channels_last) of each way to run a model."""
    variants = [("float32", None, False), ("float32, channels_last", None, True)]
    if device.type == "cuda":
        variants.append(("autocast float16, channels_last", torch.float16, True))
        if torch.cuda.is_bf16_supported():
            variants.append(("autocast bfloat16, channels_last", torch.bfloat16, True))
    else:
        variants.append(("autocast bfloat16, channels_last", torch.bfloat16, True))
    return variants


def unet_step_seconds(
    num_blocks: int,
    base_chan: int,
    batch_size: int,
    img_size: int,
    device: torch.device,
    variant: tuple[str, torch.dtype | None, bool],
    train: bool,
    seconds: float,
    max_runs: int,
) -> float:
    """Median seconds of one training step (AdamW) or one inference step of a fresh UNet on a
    `(batch_size, 3, img_size, img_size)` batch."""
    _, dtype, channels_last = variant
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = models.build_model("unet", data.NUM_CLASSES, num_blocks=num_blocks, base_chan=base_chan)
    model = model.to(device, memory_format=memory_format).train(train)
    shape = (batch_size, 3, img_size, img_size)
    images = data.normalize(torch.randint(0, 256, shape, dtype=torch.uint8, device=device))
    images = images.contiguous(memory_format=memory_format)
    targets = torch.randint(0, data.NUM_CLASSES, (batch_size, img_size, img_size), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # float16 needs loss scaling to keep small gradients; bfloat16 does not.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def train_step() -> None:
        with devices.autocast(device, enabled=dtype is not None, dtype=dtype):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), targets, ignore_index=data.IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def inference_step() -> None:
        with (
            torch.inference_mode(),
            devices.autocast(device, enabled=dtype is not None, dtype=dtype),
        ):
            model(images)

    return median_seconds(train_step if train else inference_step, device, seconds, max_runs)


def bench_model(
    spec: tuple[str, int, int, int],
    batch_size: int,
    device: torch.device,
    seconds: float,
    max_runs: int,
) -> list[dict]:
    """Frames/s of a training step and of an inference step, per variant."""
    name, num_blocks, base_chan, img_size = spec
    rows = []
    for train in (True, False):
        group = f"{name}, {img_size}px, {'training step' if train else 'inference'}"
        for variant in model_variants(device):
            print(f"  {group}: {variant[0]}", file=sys.stderr, flush=True)
            step = unet_step_seconds(
                num_blocks,
                base_chan,
                batch_size,
                img_size,
                device,
                variant,
                train,
                seconds,
                max_runs,
            )
            unit = f"batch of {batch_size}"
            rows.append(row(group, variant[0], batch_size / step, 1000 * step, unit))
    return rows


class HostWaits:
    """Counts, while active, the calls that make the host wait for a tensor's value (on
    a GPU each one drains the queue of work): .item(), .tolist(), bool(), float(), ...
    Calls made by the DataLoader's and the sampler's own code are left out: their tensors
    never leave the CPU."""

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")

    def __init__(self) -> None:
        self.count = 0
        self.originals = {name: getattr(torch.Tensor, name) for name in self.METHODS}

    def __enter__(self) -> HostWaits:
        for name, original in self.originals.items():

            def counted(tensor, *args, _original=original, **kwargs):
                caller = sys._getframe(1).f_code.co_filename
                self.count += "torch/utils/data" not in caller
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc_info) -> None:
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)


def training_loop_step(
    device: torch.device, compiled: bool, batch_size: int, steps: int
) -> tuple[float, float, float]:
    """(seconds per step, host waits per step, seconds of the first two steps) of the
    training loop itself, main.train_one_epoch, on the demo UNet in float32 with the
    default --log-every, over `steps` batches held in memory."""
    import main
    from seglab import preemption, runstate

    _, num_blocks, base_chan, img_size = DEMO_UNET
    torch.manual_seed(0)
    model = models.build_model("unet", data.NUM_CLASSES, num_blocks=num_blocks, base_chan=base_chan)
    model = model.to(device)
    loss_fn = losses.build_loss("ce", data.NUM_CLASSES, data.IGNORE_INDEX)
    optimizer, scheduler = main.build_optimizer(model, 1e-3, 1e-4, "poly", 10, 10 * steps)
    scaler = devices.loss_scaler(device, float16=False)
    run = main.Run(model, loss_fn, optimizer, scheduler, scaler, runstate.TrainingHealth(device))
    train_model = devices.training_model(model, device, compile=compiled)
    log_every = main.build_parser().parse_args(["train"]).log_every
    options = main.StepOptions(False, torch.bfloat16, False, 0.2, 1.0, 20, log_every)
    images = torch.randint(0, 256, (batch_size, 3, img_size, img_size), dtype=torch.uint8)
    targets = torch.randint(0, data.NUM_CLASSES, (batch_size, img_size, img_size))
    stop = preemption.StopRequests()

    def epoch(batches: int) -> float:
        run.step, run.batches_done = 0, 0  # checks at steps 10, 20, ... and at the end
        start = time.perf_counter()
        main.train_one_epoch(
            run, train_model, [(images, targets.to(torch.uint8))] * batches, device, options,
            "bench", None, stop, lambda: None,
        )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    first_steps = epoch(2)  # warm-up; with torch.compile, the compilation
    with HostWaits() as waits:
        seconds = epoch(steps)
    return seconds / steps, waits.count / steps, first_steps


def bench_training_loop(device: torch.device, steps: int, compile_too: bool) -> list[dict]:
    """The training loop's step, eager and compiled, and how often it waits for the device."""
    name, _, _, img_size = DEMO_UNET
    batch_size = 32 if device.type == "cuda" else 8
    group = f"{name}, {img_size}px, main.train_one_epoch step, float32"
    rows = []
    for compiled in (False, True) if compile_too else (False,):
        print(f"  {group}: compiled={compiled}", file=sys.stderr, flush=True)
        step, waits, first = training_loop_step(device, compiled, batch_size, steps)
        how = f"torch.compile (first 2 steps: {first:.0f} s)" if compiled else "eager"
        variant = f"{how}; host waits {waits:.2g} per step"
        rows.append(row(group, variant, batch_size / step, 1000 * step, f"batch of {batch_size}"))
    return rows


def bench_full_frame(device: torch.device, seconds: float, max_runs: int) -> list[dict]:
    """Latency of the demo UNet on one full-resolution frame, per variant."""
    name, num_blocks, base_chan, _ = DEMO_UNET
    group = f"{name}, one {FULL_FRAME}x{FULL_FRAME} frame, inference"
    rows = []
    for variant in model_variants(device):
        print(f"  {group}: {variant[0]}", file=sys.stderr, flush=True)
        latency = unet_step_seconds(
            num_blocks, base_chan, 1, FULL_FRAME, device, variant, False, seconds, max_runs
        )
        rows.append(row(group, variant[0], 1 / latency, 1000 * latency, "frame"))
    return rows


def bench_onnx_frame(device: torch.device, seconds: float, max_runs: int) -> list[dict]:
    """Latency of `python main.py predict` on one full-resolution photo: the demo UNet in
    models.Segmenter (resize, normalize, segment, resize back), PyTorch eager against the
    same graph exported to ONNX and run by onnxruntime (on the device when it can)."""
    name, num_blocks, base_chan, img_size = DEMO_UNET
    group = f"{name}, predict on one {FULL_FRAME}x{FULL_FRAME} photo"
    config = models.model_config(
        "unet", data.NUM_CLASSES, num_blocks=num_blocks, base_chan=base_chan
    )
    segmenter = models.Segmenter(models.build_model(**config), img_size).eval().to(device)
    photo = torch.randint(0, 256, (1, 3, FULL_FRAME, FULL_FRAME), dtype=torch.uint8)
    print(f"  {group}: PyTorch eager", file=sys.stderr, flush=True)
    on_device = photo.to(device)
    with torch.inference_mode():
        eager = median_seconds(lambda: segmenter(on_device), device, seconds, max_runs)
    rows = [row(group, f"PyTorch eager ({device.type})", 1 / eager, 1000 * eager, "frame")]
    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime is not installed: timing PyTorch only", file=sys.stderr)
        return rows
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "demo.onnx"
        print(f"  {group}: exporting to ONNX", file=sys.stderr, flush=True)
        export.export_onnx(segmenter.cpu(), {"model_config": config, "img_size": img_size}, path)
        session = export.onnx_session(path)
    provider = session.get_providers()[0].removesuffix("ExecutionProvider")
    print(f"  {group}: onnxruntime ({provider})", file=sys.stderr, flush=True)
    pixels = {"image": photo.numpy()}
    latency = median_seconds(
        lambda: session.run(None, pixels), torch.device("cpu"), seconds, max_runs
    )
    rows.append(
        row(
            group,
            f"onnxruntime {onnxruntime.__version__} ({provider})",
            1 / latency,
            1000 * latency,
            "frame",
        )
    )
    return rows


LARGE_PHOTO = (6124, 8165)  # height, width: 50 megapixels, a 4:3 camera's photo


def write_large_photo(path: Path, height: int, width: int) -> None:
    """A smooth photo of `height` x `width` pixels, as an uncompressed BMP (quick to write)."""
    rows = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    columns = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = rows.astype(np.uint8)
    pixels[..., 1] = columns.astype(np.uint8)
    pixels[..., 2] = ((rows + columns) / 2).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def predict_peak_memory(model: Path, photo: Path, out: Path) -> tuple[float, int]:
    """Seconds and peak resident bytes of a `python main.py predict` process on `photo`.
    A process of its own runs it and reports the peak of its one child (ru_maxrss), so that
    no other child of the caller counts."""
    main_py = Path(__file__).resolve().parents[1] / "main.py"
    command = [sys.executable, str(main_py), "predict", "--model", str(model), str(photo)]
    command += ["--out", str(out), "--device", "cpu"]
    measure = (
        "import resource, subprocess, sys, time; start = time.perf_counter(); "
        "status = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
        "print(status, time.perf_counter() - start, peak)"
    )
    result = subprocess.run(
        [sys.executable, "-c", measure, *command], capture_output=True, text=True, check=True
    )
    status, seconds, peak_kb = result.stdout.split()
    if status != "0":
        raise RuntimeError(f"predict on {photo} ended with status {status}")
    return float(seconds), int(peak_kb) * 1024  # Linux reports ru_maxrss in kilobytes


def bench_predict_memory() -> list[dict]:
    """Time and peak memory of `python main.py predict` on a 50-megapixel photo, with the
    demo UNet as a checkpoint and as an ONNX file (when onnxruntime is installed)."""
    from seglab import checkpoints

    name, num_blocks, base_chan, img_size = DEMO_UNET
    height, width = LARGE_PHOTO
    group = f"{name}, predict on a {height * width / 1e6:.0f}-megapixel photo (one process)"
    config = models.model_config(
        "unet", data.NUM_CLASSES, num_blocks=num_blocks, base_chan=base_chan
    )
    checkpoint = {
        "format": checkpoints.CHECKPOINT_FORMAT, "model_config": config, "epoch": 1,
        "model_state": models.build_model(**config).state_dict(), "args": {},
        "classes": list(data.CLASSES), "img_size": img_size,
    }  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as folder:
        folder = Path(folder)
        photo = folder / "photo.bmp"
        write_large_photo(photo, height, width)
        model_files = [folder / "model.pt"]
        checkpoints.save_checkpoint(checkpoint, model_files[0])
        try:
            export.export_checkpoint(str(model_files[0]), folder / "model.onnx")
            model_files.append(folder / "model.onnx")
        except export.ExportError as error:
            print(f"not timing ONNX: {error}", file=sys.stderr)
        for model_file in model_files:
            print(f"  {group}: {model_file.suffix}", file=sys.stderr, flush=True)
            seconds, peak = predict_peak_memory(model_file, photo, folder / "out")
            variant = f"{model_file.suffix} file: peak {peak / 2**30:.2f} GiB resident"
            rows.append(row(group, variant, 1 / seconds, 1000 * seconds, "photo"))
    return rows


# ----------------------------------------------------------------------------------------
# Equality checks


def same_samples(first: tuple[torch.Tensor, ...], second: tuple[torch.Tensor, ...]) -> bool:
    return all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(first, second, strict=True))


def same_pixels(path: Path, decoders) -> bool:
    """Do all `decoders` and data.read_png give the same pixels for the PNG at `path`?"""
    ours = data.read_png(path).numpy()
    for decode in decoders:
        pixels = np.asarray(decode(path))
        if pixels.shape[-1] == 3:  # (H, W, 3) -> (3, H, W)
            pixels = pixels.transpose(2, 0, 1)
        if not np.array_equal(pixels, ours):
            return False
    return True


def check_samples(
    raw: data.StanfordDataset, cache_root: Path, img_size: int, max_frames: int
) -> list[tuple[str, bool]]:
    """(what, equal?) for the claims the fast paths rely on, over the first `max_frames`."""
    indices = range(min(len(raw), max_frames))
    decoders_equal = all(
        same_pixels(path, png_decoders().values())
        for frame in raw.frames[: len(indices)]
        for path in (frame.rgb_path, frame.semantic_path)
    )
    class_table = naive_class_table(raw.root / data.LABELS_FILE)
    labels_equal = all(
        np.array_equal(raw.label_mask(i).numpy(), naive_label_map(frame.semantic_path, class_table))
        for i, frame in zip(indices, raw.frames, strict=False)
    )

    # The raw path crops and resizes the semantic colors, then decodes the labels; decoding
    # first must give the same sample (same random draws, nearest resize of masks).
    transforms = data.train_transforms(img_size)
    raw_train = data.StanfordDataset(raw.root, None, transforms)

    def labels_decoded_first(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        frame = raw.frames[index]
        image = tv_tensors.Image(data.read_png(frame.rgb_path))
        image, mask = transforms(image, tv_tensors.Mask(raw.label_mask(index)))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)

    crops_equal = True
    for index in indices:
        torch.manual_seed(index)
        ours = raw_train[index]
        torch.manual_seed(index)
        crops_equal &= same_samples(ours, labels_decoded_first(index))

    cached = cache.CachedDataset(cache_root)
    raw_eval = data.StanfordDataset(raw.root, None, data.eval_transforms(cached.size))
    cache_equal = all(same_samples(cached[i], raw_eval[i]) for i in range(len(cached)))
    decoder_names = ", ".join(png_decoders())
    return [
        (
            f"PNG pixels: data.read_png == {decoder_names} ({2 * len(indices)} files)",
            decoders_equal,
        ),
        (f"uint8-table labels == naive int64 labels ({len(indices)} full frames)", labels_equal),
        (
            f"raw path {img_size}px train samples == labels decoded before the crop "
            f"({len(indices)} frames)",
            crops_equal,
        ),
        (
            f"cached samples == StanfordDataset with eval_transforms({cached.size}) "
            f"({len(cached)} frames)",
            cache_equal,
        ),
    ]


# ----------------------------------------------------------------------------------------
# Data, table and command line


def sample_tree(datadir: Path, areas: list[str] | None, num_frames: int, out: Path) -> Path:
    """A 2D-3D-S tree under `out` of symbolic links to `num_frames` frames spread over
    `datadir`, so that the raw, cached and naive paths all read the same frames."""
    frames = data.list_frames(datadir, areas)
    (out / "assets").mkdir(parents=True)
    (out / data.LABELS_FILE).symlink_to((datadir / data.LABELS_FILE).resolve())
    for index in data.subset_indices(len(frames), num_frames):
        frame = frames[index]
        for path in (frame.rgb_path, frame.semantic_path):
            link = out / path.relative_to(datadir)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
    return out


def format_number(value: float | None) -> str:
    """Three significant digits, whole numbers from 100 up, blank for None."""
    if value is None:
        return ""
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def format_table(rows: list[dict]) -> str:
    """A Markdown table; the first row of each group is its reference for the speed-up."""
    header = ["measure", "variant", "frames/s", "ms", "ms per", "speed-up"]
    right_aligned = {2, 3, 5}
    lines = [header]
    for group, group_rows in itertools.groupby(rows, key=lambda r: r["group"]):
        group_rows = list(group_rows)
        reference_ms = group_rows[0]["ms"]
        for position, r in enumerate(group_rows):
            speedup = "reference" if position == 0 else f"{reference_ms / r['ms']:.2f}x"
            measure = group if position == 0 else ""
            fps, ms = format_number(r["fps"]), format_number(r["ms"])
            lines.append([measure, r["name"], fps, ms, r["unit"], speedup])
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]

    def markdown_line(cells: list[str]) -> str:
        padded = [
            cell.rjust(width) if column in right_aligned else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rules = [
        "-" * (width + 1) + ":" if column in right_aligned else "-" * (width + 2)
        for column, width in enumerate(widths)
    ]
    separator = "|" + "|".join(rules) + "|"
    return "\n".join([markdown_line(lines[0]), separator, *map(markdown_line, lines[1:])])


def machine_description(device: torch.device) -> str:
    cpu = f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}"
    accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return (
        f"{cpu}; {accelerator}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.system()} {platform.machine()}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames, shorter timings")
    parser.add_argument(
        "--datadir", default=None, help="2D-3D-S root (default: make synthetic frames)"
    )
    parser.add_argument("--areas", nargs="+", default=None, help="areas to sample frames from")
    parser.add_argument(
        "--frames", type=int, default=None, help="frames to read (default 32, quick 12)"
    )
    parser.add_argument("--img-size", type=int, default=256, help="training sample size, px")
    parser.add_argument("--batch-size", type=int, default=16, help="loader batch size")
    parser.add_argument("--workers", type=int, default=2, help="loader workers to compare with 0")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for the models"
    )
    parser.add_argument("--skip-models", action="store_true", help="time the data side only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run(run_benchmark, args, ())


def run_benchmark(args: argparse.Namespace) -> int:
    """Time everything `args` asks for and print the table."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device here; use --device cpu")
    num_frames = args.frames or (12 if args.quick else 32)
    if num_frames < 2 or args.img_size < 16 or args.batch_size < 1 or args.workers < 0:
        raise SystemExit("error: need --frames >= 2, --img-size >= 16, --batch-size >= 1")
    loader_timing = (2.0, 1) if args.quick else (3.0, 3)  # seconds per round, rounds
    model_seconds = 1.0 if args.quick else 4.0
    threads = torch.get_num_threads()
    print(machine_description(device), flush=True)
    if os.getloadavg()[0] > 0.5:
        print("note: other processes are running; they slow every timing down", file=sys.stderr)

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        workdir = Path(workdir)
        if args.datadir is None:
            from seglab import synthetic

            print(f"making {num_frames} synthetic {FULL_FRAME}px frames", file=sys.stderr)
            root = workdir / "data"
            per_area = math.ceil(num_frames / 2)
            synthetic.generate(root, ["1", "2"], per_area, FULL_FRAME, seed=0)
        else:
            root = sample_tree(Path(args.datadir), args.areas, num_frames, workdir / "data")
        raw = data.StanfordDataset(root)
        print(f"caching {len(raw)} frames at {args.img_size}px", file=sys.stderr, flush=True)
        cache_root = workdir / "cache"
        cache.write_cache(root, cache_root, args.img_size, progress=False)

        # Loader numbers are per core: one thread in the main process, one per worker.
        torch.set_num_threads(1)
        print("timing loaders and decoding", file=sys.stderr, flush=True)
        rows += bench_loaders(
            raw, cache_root, args.img_size, args.batch_size, args.workers, *loader_timing
        )
        rows += bench_jitter(args.batch_size, args.img_size, loader_timing[0], device)
        rows += bench_decoding(raw, args.img_size, num_frames, 1 if args.quick else 3)
        print("checking samples", file=sys.stderr, flush=True)
        checks = check_samples(raw, cache_root, args.img_size, max_frames=8)
        torch.set_num_threads(threads)

    print("timing metrics", file=sys.stderr, flush=True)
    rows += bench_metrics(16, 256, 5 if args.quick else 20, device)
    if not args.skip_models:
        on_gpu = device.type == "cuda"
        print("timing models", file=sys.stderr, flush=True)
        rows += bench_model(DEMO_UNET, 32 if on_gpu else 8, device, model_seconds, 50)
        handout_batch = 16 if on_gpu else 1 if args.quick else 2
        handout_runs = 50 if on_gpu else 1 if args.quick else 2
        rows += bench_model(HANDOUT_UNET, handout_batch, device, model_seconds, handout_runs)
        rows += bench_training_loop(device, 10 if args.quick else 30, compile_too=True)
        rows += bench_full_frame(device, model_seconds, 1 if args.quick else 5)
        rows += bench_onnx_frame(device, model_seconds, 1 if args.quick else 5)
        rows += bench_predict_memory()

    print(format_table(rows))
    print()
    for claim, holds in checks:
        print(f"{'OK      ' if holds else 'MISMATCH'} {claim}")
    return 0 if all(holds for _, holds in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
