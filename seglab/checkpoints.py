"""The checkpoint: what it holds, how it is written and read, and how a run comes back
from it.

A checkpoint is a dict of plain data (tensors, numbers, strings, lists, dicts), written
atomically and read with `torch.load(..., weights_only=True)`, which refuses any Python
object that could run code. `make_checkpoint` says what goes in it, `load_checkpoint` checks
what comes out, `model_from_checkpoint` rebuilds its model, and `restore_run` and
`restore_args` continue its run (`--resume`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import warnings
import zipfile
import zlib
from pathlib import Path

import torch
from torch import nn

import data
import models
from seglab import cli, devices, filesystem

CHECKPOINT_FORMAT = "segmentation-lab/1"
# What every checkpoint holds; main.make_checkpoint writes these and the training state.
REQUIRED_KEYS = ("model_config", "model_state", "classes", "img_size", "epoch", "args")
# What a checkpoint must also hold to continue its run.
RESUME_KEYS = ("optimizer_state", "scheduler_state", "scaler_state", "step", "best_miou")
# What a checkpoint written in the middle of an epoch holds of where it was.
POSITION_KEYS = ("batches_done", "world_size", "loss_sum", "good_steps", "random_states")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says what differs or what to do."""


def save_checkpoint(state: dict, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, flushed to disk, then renamed
    over `path`. A crash at any moment leaves either the old or the new file, both whole.
    A state holding a NaN or infinite tensor is refused: it would replace a good file."""
    bad = non_finite_tensors(state)
    if bad:
        kept = "the previous one is kept" if path.exists() else "there is no earlier one"
        raise CheckpointError(
            f"not writing {path}: {len(bad)} tensor(s) hold NaN or inf values (e.g. {bad[0]}), "
            f"the run diverged; {kept}. Lower --lr, or try --no-amp"
        )
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # a full disk fails in torch.save as either
        kept = "the previous one is kept" if path.exists() else "there is no earlier one"
        raise CheckpointError(f"cannot write {path} ({error}); {kept}") from None
    finally:
        temporary.unlink(missing_ok=True)
    filesystem.sync_folder(path.parent)  # make the rename itself durable


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint of this project. Never unpickles code: `weights_only=True` refuses
    any Python object other than tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        sibling = path.with_name("best.pt")
        hint = f" ({sibling} exists and can be used instead)" if sibling.is_file() else ""
        raise CheckpointError(f"checkpoint {path} does not exist{hint}")
    damaged = damaged_member(path)
    if damaged is not None:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its part {damaged} fails its checksum (a copy or "
            "a disk changed its bytes); copy it again or use another checkpoint"
        )
    try:
        with warnings.catch_warnings():
            # A bare pickle of another protocol makes torch warn before it refuses the file.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many kinds for a damaged or foreign file
        raise CheckpointError(load_failure(path, error)) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project ({CHECKPOINT_FORMAT})")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    check_types(checkpoint, path, {"img_size": int, "epoch": int, "args": dict})
    if not 0 < checkpoint["img_size"] <= cli.MAX_IMG_SIZE or checkpoint["epoch"] < 0:
        raise CheckpointError(
            f"{path}: its img_size ({checkpoint['img_size']}; at most {cli.MAX_IMG_SIZE}) or "
            f"epoch ({checkpoint['epoch']}) is out of range"
        )
    bad = non_finite_tensors(checkpoint)
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} tensor(s) hold NaN or inf values (e.g. {bad[0]}), the run that "
            "wrote it diverged; use an earlier checkpoint"
        )
    return checkpoint


def check_resumable(checkpoint: dict, path: str | Path) -> None:
    """Refuse a checkpoint that lacks the training state `--resume` needs."""
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{path} cannot be resumed: it lacks {', '.join(missing)} (test and predict can "
            "still use it)"
        )
    check_types(
        checkpoint,
        path,
        {
            "optimizer_state": dict,
            "scheduler_state": dict,
            "scaler_state": dict,
            "step": int,
            "best_miou": (int, float),
            "position": dict,
        },
    )
    position = checkpoint.get("position")
    if position is not None:
        check_types(
            position,
            f"{path} (its position in the epoch)",
            {"batches_done": int, "world_size": int, "loss_sum": (int, float),
             "good_steps": int, "random_states": dict},
        )  # fmt: skip
        missing = [key for key in POSITION_KEYS if key not in position]
        if missing:
            raise CheckpointError(
                f"{path} cannot be resumed: its position in the epoch lacks {', '.join(missing)}"
            )


def check_types(checkpoint: dict, path: str | Path, types: dict) -> None:
    """CheckpointError naming the first of `types`' keys whose value has another type (bool
    is not taken for int); absent keys are not checked."""
    for key, expected in types.items():
        value = checkpoint.get(key)
        if key in checkpoint and (isinstance(value, bool) or not isinstance(value, expected)):
            raise CheckpointError(
                f"{path}: its {key} is a {type(value).__name__}, not a "
                f"{getattr(expected, '__name__', 'number')}; the file is damaged or not ours"
            )


def non_finite_tensors(state, prefix: str = "") -> list[str]:
    """The keys (dotted paths) of the floating-point tensors in `state`, a checkpoint's
    nested dicts and lists, that hold a NaN or an infinity."""
    if torch.is_tensor(state):
        finite = not state.is_floating_point() or bool(torch.isfinite(state).all())
        return [] if finite else [prefix]
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [
        key
        for name, value in items
        for key in non_finite_tensors(value, f"{prefix}.{name}" if prefix else str(name))
    ]


# The first bytes of what torch.save writes (a zip archive), and of a bare pickle.
ZIP_SIGNATURE = b"PK\x03\x04"
PICKLE_PROTOCOL_OPCODE = 0x80


def damaged_member(path: Path) -> str | None:
    """The name of the first part of a checkpoint (a zip archive, as torch.save writes) whose
    bytes fail their CRC-32, else None. torch.load does not check them: a flipped byte in a
    tensor's data loads silently as another weight. Reading the file costs about a second a
    gigabyte. Anything that is not a readable zip archive is left to torch.load to report."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return None
    except zlib.error:  # a compressed part whose stream is broken
        return "a compressed part"


def check_model_size(config: dict, path: str | Path) -> None:
    """Refuse a model configuration larger than the flags of `train` allow (cli.MAX_*),
    counted on the meta device: a damaged or hostile checkpoint asking for 6 blocks of 2048
    channels must not allocate hundreds of gigabytes before its weights fail to fit."""
    too_large = [
        f"{key} {config[key]} (at most {limit})"
        for key, limit in (
            ("num_blocks", cli.MAX_UNET_BLOCKS),
            ("base_chan", cli.MAX_BASE_CHANNELS),
        )
        if isinstance(config.get(key), int) and config[key] > limit
    ]
    if not too_large:
        with torch.device("meta"):  # shapes only, no memory
            count = models.count_parameters(models.build_model(**config))
        if count > cli.MAX_UNET_PARAMETERS:
            too_large.append(f"{count:,} parameters (at most {cli.MAX_UNET_PARAMETERS:,})")
    if too_large:
        raise CheckpointError(f"{path}: its model is too large: {', '.join(too_large)}")


def load_failure(path: Path, error: Exception) -> str:
    """Why torch.load(weights_only=True) failed on `path`, in one line. torch's own message
    advises loading again with weights_only=False, which would run whatever code an
    untrusted file holds: that advice is never passed on."""
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except OSError as read_error:
        return f"cannot read checkpoint {path}: {read_error.strerror}"
    if not head:
        return f"checkpoint {path} is empty (0 bytes): it was cut short or never written"
    if head != ZIP_SIGNATURE and head[0] != PICKLE_PROTOCOL_OPCODE:
        return (
            f"{path} is not a PyTorch checkpoint: its bytes are neither a zip archive nor a pickle"
        )
    refused = isinstance(error, pickle.UnpicklingError) and "Weights only" in str(error)
    if refused and ("GLOBAL" in str(error) or head == ZIP_SIGNATURE):
        # A file of torch.save whose pickle holds an object, or an instruction (a newer
        # pickle protocol), that the plain-data unpickler does not accept.
        return (
            f"refused to load {path}: it holds Python objects that could run code, and only "
            f"plain data is accepted ({torch_detail(error)})"
        )
    if head != ZIP_SIGNATURE:
        return (
            f"{path} is not a checkpoint of this project: it is a pickle that torch.save did "
            f"not write ({torch_detail(error)})"
        )
    return f"cannot read checkpoint {path}: it is damaged or cut short ({torch_detail(error)})"


def torch_detail(error: Exception) -> str:
    """The informative part of torch.load's message: its first line without the advice
    about weights_only, or the line that names the refused object."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported operand" in line:
            return line.removeprefix("WeightsUnpickler error: ")
    sentences = re.split(r"(?<=\.) ", lines[0]) if lines else [type(error).__name__]
    kept = [s for s in sentences if "weights_only" not in s and "trusted source" not in s]
    return " ".join(kept[:2]) or type(error).__name__


def model_from_checkpoint(checkpoint: dict, path: str | Path) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights, checked against the
    classes of this project."""
    classes = list(checkpoint["classes"])
    if classes != list(data.CLASSES):
        raise CheckpointError(
            f"{path} was trained for {len(classes)} classes ({', '.join(classes)}) but this "
            f"project has {data.NUM_CLASSES} ({', '.join(data.CLASSES)})"
        )
    config = dict(checkpoint["model_config"])
    if config.get("num_classes") != len(classes):
        raise CheckpointError(
            f"{path}: its model has {config.get('num_classes')} classes but its class list "
            f"has {len(classes)}"
        )
    config.pop("pretrained", None)  # the stored weights replace any pretrained ones
    try:
        check_model_size(config, path)
        model = models.build_model(**config)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot build its model {config}: {error}") from None
    load_model_state(model, checkpoint["model_state"], path)
    return model


def load_model(path: Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The model of the checkpoint file `path` on `device`, in eval mode, and the checkpoint."""
    checkpoint = load_checkpoint(path)
    return model_from_checkpoint(checkpoint, path).to(device).eval(), checkpoint


def load_model_state(model: nn.Module, state: dict, path: str | Path) -> None:
    """load_state_dict with a message that names the keys and shapes that differ."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
        for key in set(expected) & set(state)
        if state[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} weights (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unknown weights (e.g. {unexpected[0]})")
    if wrong_shape:
        problems.append(f"shapes differ: {'; '.join(sorted(wrong_shape)[:3])}")
    if problems:
        raise CheckpointError(f"{path} does not fit its model: {', '.join(problems)}")
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------
# A training run in a checkpoint, and back (`run` is main.Run)


def plain_args(args: argparse.Namespace) -> dict:
    """The arguments as JSON-compatible data, for checkpoints and TensorBoard."""
    return {key: value for key, value in vars(args).items() if key not in ("func", "given")}


def make_checkpoint(
    run, model_config: dict, args: argparse.Namespace, position: dict | None = None
) -> dict:
    """Everything needed to use the model (config, classes, image size, normalization) and
    to resume the run (optimizer, scheduler, scaler, counters, arguments, and for a run
    stopped mid-epoch its `position`), as plain data."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "model_config": model_config,
        "model_state": run.model.state_dict(),
        "classes": list(data.CLASSES),
        "img_size": args.img_size,
        "inputs": list(args.inputs),
        "normalization": {"mean": list(data.MEAN), "std": list(data.STD)},
        "epoch": run.epoch,
        "step": run.step,
        "metrics": run.metrics or {},
        "best_miou": run.best_miou,
        "args": plain_args(args),
        "optimizer_state": run.optimizer.state_dict(),
        "scheduler_state": run.scheduler.state_dict(),
        "scaler_state": run.scaler.state_dict(),
    }
    if position is not None:
        checkpoint["position"] = position
    if run.training_data is not None:
        checkpoint["training_data"] = run.training_data
    return checkpoint


def training_data(frames) -> dict:
    """What a resumed run must train on as before: the number of training frames, a hash
    of their names in order, and the number of processes (each takes a share of every
    batch). `frames` is the Subset of data.get_datasets."""
    names = "\n".join(
        f"{frame.area}/{frame.name}" for frame in (frames.dataset.frames[i] for i in frames.indices)
    )
    return {
        "frames": len(frames.indices),
        "frames_sha256": hashlib.sha256(names.encode()).hexdigest(),
        "world_size": devices.world_size(),
    }


def check_training_data(saved: dict | None, current: dict, path: Path) -> None:
    """Refuse to resume a run on other frames or with another number of processes: its
    learning rate schedule, batches and data order would silently change."""
    if saved is None or current is None:  # a checkpoint from before they were recorded
        return
    changes = []
    if saved.get("frames") != current["frames"]:
        changes.append(f"{current['frames']} training frames (the run has {saved.get('frames')})")
    elif saved.get("frames_sha256") != current["frames_sha256"]:
        changes.append(f"other training frames than the run's {current['frames']}")
    if saved.get("world_size") != current["world_size"]:
        changes.append(
            f"{current['world_size']} process(es) (the run has {saved.get('world_size')})"
        )
    if changes:
        raise CheckpointError(
            f"--resume {path}: {'; '.join(changes)}. Resume with the run's data (--datadir, "
            "--areas, --subset) and process count, or start a new run"
        )


def restore_run(run, checkpoint: dict, path: Path) -> None:
    """Load the states and counters of a checkpoint into `run`."""
    check_training_data(checkpoint.get("training_data"), run.training_data, path)
    load_model_state(run.model, checkpoint["model_state"], path)
    try:
        run.optimizer.load_state_dict(checkpoint["optimizer_state"])
        run.scheduler.load_state_dict(checkpoint["scheduler_state"])
        if checkpoint["scaler_state"]:  # empty: saved when the scaler was off
            run.scaler.load_state_dict(checkpoint["scaler_state"])
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{path}: its training state does not fit ({error})") from None
    run.step, run.epoch = checkpoint["step"], checkpoint["epoch"]
    run.best_miou, run.metrics = checkpoint["best_miou"], checkpoint["metrics"]
    position = checkpoint.get("position")
    if position is not None:
        if position["world_size"] != devices.world_size():
            raise devices.UsageError(
                f"{path} stopped in the middle of an epoch with {position['world_size']} "
                f"process(es): resume it with as many (here: {devices.world_size()})"
            )
        run.batches_done, run.random_states = position["batches_done"], position["random_states"]
        run.loss_sum, run.good_steps = position["loss_sum"], position["good_steps"]


# Flags that say how to run, not what is trained: a resumed run may give other values.
HOW_TO_RUN = frozenset(
    {
        "resume", "datadir", "device", "workers", "stop_after", "checkpoint_minutes",
        "log_every", "compile", "channels_last", "skip_bad", "max_bad_steps", "logdir", "name",
    }
)  # fmt: skip


def restore_args(args: argparse.Namespace, checkpoint: dict) -> argparse.Namespace:
    """A resumed run keeps its configuration: a flag given beside --resume that would change
    it is refused by name; only where to read data and how to run may change (HOW_TO_RUN)."""
    saved = checkpoint["args"]
    changed = [
        f"--{key.replace('_', '-')} {getattr(args, key)} (the run has {saved[key]})"
        for key in sorted(getattr(args, "given", set()) - HOW_TO_RUN)
        if key in saved and getattr(args, key) != saved[key]
    ]
    if changed:
        raise devices.UsageError(
            f"a resumed run keeps its configuration; not applied: {'; '.join(changed)}. Drop "
            "them, or start a new run with another --name"
        )
    # An option the checkpoint predates takes its value from this command line.
    restored = argparse.Namespace(**{**vars(args), **saved})
    for key in HOW_TO_RUN | {"func", "given"}:
        if hasattr(args, key):
            setattr(restored, key, getattr(args, key))
    restored.datadir = args.datadir or data.default_datadir(saved.get("datadir"))
    if isinstance(restored.pretrained, bool):  # a run from when --pretrained was a switch
        restored.pretrained = "imagenet" if restored.pretrained else "none"
    for key in ("workers", "channels_last"):  # unset: the run's own
        if getattr(args, key) is None:
            setattr(restored, key, saved.get(key))
    return restored
