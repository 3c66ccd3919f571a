"""The run folder: its files, its lock, its metrics.jsonl, and what `--resume` continues.

    runs/NAME/last.pt           the latest checkpoint (end of an epoch, or mid-epoch on a stop)
    runs/NAME/best.pt           the checkpoint of the best validation mIoU so far
    runs/NAME/metrics.jsonl     one line of scores per epoch, in step with last.pt
    runs/NAME/events.out.*      TensorBoard's

A new run never starts in a folder that holds one of them, and one process at a time works
in a folder (RunFolderLock).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from seglab import checkpoints, devices, filesystem, runstate
from seglab.checkpoints import CheckpointError

# The files of a run: a new run never starts in a folder that holds one of them.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")
EVENTS_GLOB = "events.out.tfevents.*"


def run_files_in(run_dir: Path) -> list[str]:
    """The names of the run files (checkpoints, metrics, TensorBoard events) in `run_dir`."""
    if not run_dir.is_dir():
        return []
    names = [name for name in RUN_FILES if (run_dir / name).exists()]
    return names + sorted(p.name for p in run_dir.glob(EVENTS_GLOB))[:1]


def find_resume(
    resume: str | None, logdir: str, name: str | None, name_given: bool = True
) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to continue (None: a new run). `name_given`: the
    user gave --name (else it is the default made of the model and the time).

    `resume` is None (a new run in LOGDIR/NAME), the path of a run's last.pt, or "auto":
    LOGDIR/NAME/last.pt when it exists, else a new run there, so that the same command,
    launched again (a requeued cluster job), continues its run.
    """
    if resume is None or resume == "auto":
        if name is None:
            raise CheckpointError("--resume auto needs --name: it continues LOGDIR/NAME")
        run_dir = Path(logdir) / name
        last = run_dir / "last.pt"
        return run_dir, (last if resume == "auto" and last.exists() else None)
    path = Path(resume)
    if path.name == "best.pt":
        raise CheckpointError(
            f"--resume {path}: best.pt is the best epoch's model, not where the run stopped; "
            f"resume {path.with_name('last.pt')}"
        )
    if path.name != "last.pt":
        raise CheckpointError(
            f"--resume {path}: resume a run's last.pt (its folder is the run's), or use auto"
        )
    if not path.is_file():  # before anything is written to its folder (the lock)
        checkpoints.load_checkpoint(path)  # raises with its message
    if name_given and name is not None and (Path(logdir) / name).resolve() != path.parent.resolve():
        # The run continues in its own folder: --name would be silently ignored.
        raise CheckpointError(
            f"--resume {path} continues the run in {path.parent}, not in {Path(logdir) / name} "
            f"(--logdir {logdir} --name {name}): drop --name, or start a new run without "
            "--resume"
        )
    return path.parent, path


def prepare_run_dir(run_dir: Path, resuming: bool, main_process: bool, restart: bool) -> None:
    """Make the run's folder ready (the main process creates it). A new run never writes
    over the files of another one; a resumed run continues in the folder of its checkpoint.

    `restart`: the folder may hold the metrics and events of a run that never wrote a
    checkpoint (`--resume auto` of a run killed in its first epoch); they are dropped.
    """
    # Every process checks, so that under torchrun all of them stop with this message
    # instead of the others failing later on a connection that rank 0 closed.
    found = run_files_in(run_dir)
    has_checkpoint = bool({"last.pt", "best.pt"} & set(found))
    if not resuming and found and not (restart and not has_checkpoint):
        raise CheckpointError(
            f"{run_dir} already holds a run ({', '.join(found)}): continue it with --resume "
            f"{run_dir}/last.pt (or --resume auto --name {run_dir.name}), or choose another "
            "--name"
        )
    if not main_process:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    # A run killed while saving leaves the temporary file of that checkpoint behind.
    for leftover in run_dir.glob(".*.pt.*.tmp"):
        leftover.unlink()
    if not resuming:  # drop the lines of a run killed before its first checkpoint
        trim_jsonl(run_dir / "metrics.jsonl", 0)


class RunFolderLock:
    """One process per run folder: an exclusive lock on RUN_DIR/.lock, held from `acquire`
    to the end of the `with` block (by the main process only: `active`). The operating
    system releases it when the process ends in any way, kill -9 included, so it is never
    left stale (seglab/filesystem.py). The file holds the holder's process id and host, for
    the message.

    On a system without file locks (neither flock nor msvcrt, which no platform of PyTorch
    lacks) the run goes on unlocked, with a warning: refusing to train would be worse than
    the rare second training in the same folder."""

    def __init__(self, run_dir: Path, active: bool = True) -> None:
        self.run_dir, self.active, self.file, self.locked = run_dir, active, None, False

    def __enter__(self) -> RunFolderLock:
        return self

    def acquire(self) -> None:
        """Take the lock, creating the folder; CheckpointError when another process has it.
        Called once the inputs are known to be good: before, nothing is written."""
        if not self.active:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(self.run_dir / ".lock", "a+")  # noqa: SIM115 (held while training)
        except OSError as error:
            raise CheckpointError(f"cannot use the run folder {self.run_dir}: {error}") from None
        locked = filesystem.try_lock(self.file)
        if locked is False:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise CheckpointError(
                f"{self.run_dir} is in use by process {holder}: one run folder, one training; "
                "wait for it to end, or choose another --name"
            )
        if locked is None:
            print(
                f"warning: this system has no file locks: nothing stops a second training in "
                f"{self.run_dir} at the same time",
                file=sys.stderr,
            )
        self.locked = bool(locked)
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()} on {platform.node()}\n")
        self.file.flush()

    def __exit__(self, *exc_info) -> None:
        if self.file is not None:
            if self.locked:
                with contextlib.suppress(OSError):  # closing the file releases it too
                    filesystem.unlock(self.file)
            self.file.close()


def progress_files(run_dir: Path) -> set[Path]:
    """The TensorBoard events and the metrics.jsonl in `run_dir`."""
    metrics = run_dir / "metrics.jsonl"
    return set(run_dir.glob(EVENTS_GLOB)) | ({metrics} if metrics.exists() else set())


@contextlib.contextmanager
def cleaned_if_unsaved(run_dir: Path, lock: RunFolderLock, new_run: bool):
    """Around a new run: when it fails before saving any checkpoint, delete the events and
    metrics files it made (not those there before, which may be another run's). Left
    behind, they would make the same command refuse the folder as holding a run, and
    suggest a --resume of a last.pt that does not exist. Only the process holding the
    folder's lock deletes anything."""
    before = progress_files(run_dir)
    try:
        yield
    except BaseException:
        saved = (run_dir / "last.pt").exists() or (run_dir / "best.pt").exists()
        if new_run and lock.file is not None and not saved:
            for path in progress_files(run_dir) - before:
                with contextlib.suppress(OSError):  # the error being raised matters more
                    path.unlink()
        raise


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


def restore_best(run_dir: Path, checkpoint: dict, run) -> None:
    """On resuming `run` from `checkpoint` (RUN_DIR/last.pt): put back best.pt when a run was
    killed between saving last.pt and best.pt. When the checkpoint's epoch was the best,
    best.pt is that checkpoint; when best.pt is missing and its epoch's weights are lost,
    the run forgets its best score, so that the next epoch writes best.pt. Rank 0 only."""
    if not devices.is_main_process():
        return
    best = run_dir / "best.pt"
    epoch = checkpoint["epoch"]
    at_boundary = "position" not in checkpoint  # mid-epoch weights are not its epoch's
    was_best = epoch > 0 and checkpoint["metrics"].get("miou") == checkpoint["best_miou"]
    if at_boundary and was_best and best_epoch(best) != epoch:
        checkpoints.save_checkpoint(checkpoint, best)
        tqdm.write(f"wrote {best}: the run stopped before saving it after epoch {epoch}")
    if not best.exists() and epoch > 0:
        run.best_miou = -1.0


def best_epoch(path: Path) -> int | None:
    """The epoch of the checkpoint at `path`, or None when there is none to read."""
    if not path.is_file():
        return None
    try:
        return checkpoints.load_checkpoint(path)["epoch"]
    except CheckpointError:
        return None


def save_epoch(run_dir: Path, record: dict, checkpoint: dict, is_best: bool) -> None:
    """The epoch's line of metrics.jsonl, then last.pt (and best.pt when it is the best)."""
    # The metrics line goes first: if the run dies before the checkpoint is written,
    # resuming trims the line and trains the epoch again. last.pt before best.pt: a run
    # folder with a best.pt always has its last.pt.
    append_jsonl(run_dir / "metrics.jsonl", record)
    checkpoints.save_checkpoint(checkpoint, run_dir / "last.pt")
    if is_best:
        checkpoints.save_checkpoint(checkpoint, run_dir / "best.pt")


def save_mid_epoch(run, run_dir: Path, model_config: dict, args) -> None:
    """last.pt in the middle of an epoch (a stop request, --checkpoint-minutes): the run,
    its position in the epoch's data order and its random states. Every process calls it;
    rank 0 writes, and the others wait until the file is whole."""
    if devices.is_main_process():
        position = {
            "batches_done": run.batches_done,
            "world_size": devices.world_size(),  # each process's share of the order
            "loss_sum": run.loss_sum,
            "good_steps": run.good_steps,
            "random_states": runstate.random_states(),
        }
        checkpoint = checkpoints.make_checkpoint(run, model_config, args, position)
        checkpoints.save_checkpoint(checkpoint, run_dir / "last.pt")
        tqdm.write(f"saved {run_dir / 'last.pt'} at step {run.step}")
    if dist.is_initialized():
        dist.barrier()
