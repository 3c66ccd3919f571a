"""Checkpoints and run folders that survive a crash, a kill or a full disk.

A checkpoint is a dict of plain data (tensors, numbers, strings, lists, dicts), written
atomically and read with `torch.load(..., weights_only=True)`, which refuses any Python
object that could run code. main.py decides what goes in it; this module writes, reads and
checks it, rebuilds its model, and keeps the run folder's metrics.jsonl in step with it.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from torch import nn

import data
import models

CHECKPOINT_FORMAT = "segmentation-lab/1"
# What every checkpoint holds; main.make_checkpoint writes these and the training state.
REQUIRED_KEYS = ("model_config", "model_state", "classes", "img_size", "epoch", "args")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says what differs or what to do."""


def save_checkpoint(state: dict, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, flushed to disk, then renamed
    over `path`. A crash at any moment leaves either the old or the new file, both whole."""
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
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint of this project. Never unpickles code: `weights_only=True` refuses
    any Python object other than tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        sibling = path.with_name("best.pt")
        hint = f" ({sibling} exists and can be used instead)" if sibling.is_file() else ""
        raise CheckpointError(f"checkpoint {path} does not exist{hint}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(
            f"refused to load {path}: it holds Python objects that could run code, and only "
            f"plain data is accepted ({first_line})"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project ({CHECKPOINT_FORMAT})")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    return checkpoint


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
        model = models.build_model(**config)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot build its model {config}: {error}") from None
    load_model_state(model, checkpoint["model_state"], path)
    return model


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
# The run folder


def prepare_run_dir(run_dir: Path, resuming: bool, main_process: bool = True) -> None:
    """Make the run's folder ready (the main process creates it). A new run never overwrites
    an older one; a resumed run continues in the folder of its checkpoint."""
    # Every process checks, so that under torchrun all of them stop with this message
    # instead of the others failing later on a connection that rank 0 closed.
    if not resuming and (run_dir / "last.pt").exists():
        raise CheckpointError(
            f"{run_dir} already holds a run: continue it with --resume {run_dir}/last.pt "
            "or choose another --name"
        )
    if not main_process:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    # A run killed while saving leaves the temporary file of that checkpoint behind.
    for leftover in run_dir.glob(".*.pt.*.tmp"):
        leftover.unlink()
    if not resuming:  # drop the lines of a run killed before its first checkpoint
        trim_jsonl(run_dir / "metrics.jsonl", 0)


def append_jsonl(path: Path, record: dict) -> None:
    """Add one JSON line to `path` and flush it to disk."""
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())


def trim_jsonl(path: Path, last_epoch: int) -> None:
    """Keep the lines of epochs up to `last_epoch`, once each: after a crash the run resumes
    from the last checkpoint, and the epochs after it are trained (and written) again."""
    if not path.exists():
        return
    kept: dict[int, str] = {}
    for line in path.read_text().splitlines():
        try:
            epoch = json.loads(line)["epoch"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by the crash
        if epoch <= last_epoch:
            kept[epoch] = line
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(kept[e] + "\n" for e in sorted(kept)))
    os.replace(temporary, path)
