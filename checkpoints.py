"""Checkpoints and run folders that survive a crash, a kill or a full disk.

A checkpoint is a dict of plain data (tensors, numbers, strings, lists, dicts), written
atomically and read with `torch.load(..., weights_only=True)`, which refuses any Python
object that could run code. main.py decides what goes in it; this module writes, reads and
checks it, rebuilds its model, and keeps the run folder's metrics.jsonl in step with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import pickle
import platform
import posixpath
import re
import secrets
import sys
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import torch
from torch import nn

import data
import models

# The run folder's lock (RunFolderLock) is one the operating system releases when its
# process ends in any way (kill -9, a crash, a laptop that shuts down), so it is never left
# stale; a lock *file* that exists while a run goes on would need cleaning by hand after a
# crash. POSIX has flock (fcntl); Windows has no fcntl but locks byte ranges of a file
# (msvcrt.locking, Windows' LockFile), which it also releases when the process ends. Both
# come with Python: no dependency.
try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:  # every system but Windows
    msvcrt = None

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
    sync_folder(path.parent)  # make the rename itself durable


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk where the system allows it. POSIX
    opens a folder to fsync it; Windows refuses to open a folder with os.open, and some file
    systems refuse the fsync: there the rename is still atomic (the old file or the new
    one, whole), it only may not survive a power cut that follows it at once."""
    try:
        directory = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(directory)
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
    if checkpoint["img_size"] <= 0 or checkpoint["epoch"] < 0:
        raise CheckpointError(f"{path}: its img_size or epoch is out of range")
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


# The files of a run: a new run never starts in a folder that holds one of them.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")
EVENTS_GLOB = "events.out.tfevents.*"


def run_files_in(run_dir: Path) -> list[str]:
    """The names of the run files (checkpoints, metrics, TensorBoard events) in `run_dir`."""
    if not run_dir.is_dir():
        return []
    names = [name for name in RUN_FILES if (run_dir / name).exists()]
    return names + sorted(p.name for p in run_dir.glob(EVENTS_GLOB))[:1]


def find_resume(resume: str | None, logdir: str, name: str | None) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to continue (None: a new run).

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
        load_checkpoint(path)  # raises with its message
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


# msvcrt.locking locks bytes against reading too: it locks this one byte, far past the
# holder's line, so that another process can still read who holds the folder.
WINDOWS_LOCK_OFFSET = 1 << 20


def try_lock(file) -> bool | None:
    """Lock the open `file` for this process without waiting: True when it is locked, False
    when another process holds it, None on a system with neither flock nor msvcrt."""
    try:
        if fcntl is not None:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif msvcrt is not None:
            os.lseek(file.fileno(), WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            return None
    except OSError:
        return False
    return True


def unlock(file) -> None:
    """Release the lock of `try_lock` before closing `file`. Closing releases a flock at once;
    Windows releases a closed file's byte locks only when it gets to it, and asks programs
    to unlock first."""
    if fcntl is None and msvcrt is not None:
        os.lseek(file.fileno(), WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(file.fileno(), msvcrt.LK_UNLCK, 1)


class RunFolderLock:
    """One process per run folder: an exclusive lock on RUN_DIR/.lock, held from `acquire`
    to the end of the `with` block (by the main process only: `active`). The operating
    system releases it when the process ends in any way, kill -9 included, so it is never
    left stale. The file holds the holder's process id and host, for the message.

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
        locked = try_lock(self.file)
        if locked is False:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise CheckpointError(
                f"{self.run_dir} is in use by process {holder}: one run folder, one training; "
                "wait for it to end, or choose another --name"
            ) from None
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
                    unlock(self.file)
            self.file.close()


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


# ----------------------------------------------------------------------------------------
# Models by URL, following torch.hub's conventions

# At least this many hex digits of the SHA-256 in the file name: 8 digits leave a damaged or
# wrong file one chance in four billion to pass, fewer would make the check a formality.
MIN_HASH_DIGITS = 8
DOWNLOAD_CHUNK = 1 << 20
# Seconds a connection may stay silent before the download is given up, so that a stalled
# server ends in a message instead of a process that waits forever.
DOWNLOAD_TIMEOUT = 60
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def local_model_file(model: str, progress: bool = True) -> Path:
    """`model` itself when it is a local path; for an http(s) URL, the file downloaded once
    into torch.hub's cache ($TORCH_HOME/hub/checkpoints, i.e. Path(torch.hub.get_dir()) /
    "checkpoints") under the file name of the URL.

    As in torch.hub, that name carries the first hex digits of the file's SHA-256 before its
    extension (`NAME-<hex>.pt`, at least 8 digits): the download, and a cached copy each time
    it is used again, must hash to that prefix. A download is written to a temporary file in
    the cache folder and renamed into place only when it is whole and matches, so a refused
    download leaves nothing behind. `progress` shows a bar on stderr while downloading.

    Raises CheckpointError for a URL whose name has no hash prefix, for a failed, cut short
    or mismatching download, and for a cached file that no longer matches its name.
    """
    scheme = SCHEME.match(model)
    if scheme is None:
        return Path(model)  # load_checkpoint says so when it does not exist
    if scheme.group(1).lower() not in ("http", "https"):
        raise CheckpointError(f"cannot download {model}: only http:// and https:// URLs work")
    name, prefix = hashed_file_name(model)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if cached.exists():
        check_cached_file(cached, prefix)
    else:
        download_checked(model, cached, prefix, progress)
    return cached


def hashed_file_name(url: str) -> tuple[str, str]:
    """The file name of `url` and the SHA-256 prefix it carries (torch.hub.HASH_REGEX, the
    same rule torch.hub.load_state_dict_from_url applies to the same name)."""
    name = posixpath.basename(urllib.parse.urlsplit(url).path)
    match = torch.hub.HASH_REGEX.search(name)
    digits = match.group(1) if match else ""
    if MIN_HASH_DIGITS <= len(digits) <= 64:
        return name, digits
    found = f" (it has {len(digits)})" if digits else ""
    raise CheckpointError(
        f"cannot download {url}: its file name {name!r} must end in "
        f"-<first {MIN_HASH_DIGITS} or more hex digits of its SHA-256> before the extension"
        f"{found}, e.g. unet-1a2b3c4d.pt; compute the hash with `sha256sum FILE` and rename "
        "the file before publishing it"
    )


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in chunks (checkpoints can be hundreds of MB)."""
    sha256 = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(DOWNLOAD_CHUNK):
            sha256.update(chunk)
    return sha256.hexdigest()


def check_cached_file(path: Path, prefix: str) -> None:
    """Trust a cached download only while it still hashes to the prefix of its name: a
    copy damaged on disk, or replaced by hand, would otherwise load as if it were the model
    the URL names. It is not replaced here: it may be the only copy on a machine offline."""
    try:
        digest = file_sha256(path)
    except OSError as error:
        raise CheckpointError(f"cannot read the cached model {path}: {error}") from None
    if not digest.startswith(prefix):
        raise CheckpointError(
            f"the cached model {path} does not match its name: its SHA-256 is {digest}, "
            f"which does not start with {prefix}; delete it to download it again"
        )


def download_checked(url: str, destination: Path, prefix: str, progress: bool) -> None:
    """Download `url` to `destination` when the bytes arrive whole and hash to `prefix`;
    otherwise raise CheckpointError and leave nothing in the folder."""
    folder = destination.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot create the model cache {folder}: {error}") from None
    # A name of its own per call, so that two processes fetching the same URL (torchrun)
    # never write into each other's file; the last rename wins with the same bytes.
    temporary = folder / f".{destination.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    failed = f"cannot download {url} (expected SHA-256 prefix {prefix})"
    untouched = f"nothing was written to {folder}"
    try:
        digest, received, length = stream_to_file(url, temporary, destination.name, progress)
        if length is not None and received != length:
            raise CheckpointError(
                f"{failed}: the connection closed after {received} of {length} bytes; {untouched}"
            )
        if not digest.startswith(prefix):
            raise CheckpointError(
                f"{failed}: the downloaded file's SHA-256 is {digest}, which does not start "
                f"with {prefix}; {untouched}"
            )
        os.replace(temporary, destination)
    # HTTPError is a URLError is an OSError: the most precise message first.
    except urllib.error.HTTPError as error:
        raise CheckpointError(f"{failed}: HTTP {error.code} {error.reason}; {untouched}") from None
    except urllib.error.URLError as error:
        raise CheckpointError(f"{failed}: {error.reason}; {untouched}") from None
    except (http.client.HTTPException, OSError, ValueError) as error:
        # IncompleteRead of a chunked reply, a reset or timed out connection, a full disk,
        # a malformed URL
        detail = str(error) or type(error).__name__
        raise CheckpointError(f"{failed}: {detail}; {untouched}") from None
    finally:
        temporary.unlink(missing_ok=True)  # also on Ctrl-C
    sync_folder(folder)  # the file is in place; only durability is at stake


def stream_to_file(url: str, path: Path, label: str, progress: bool) -> tuple[str, int, int | None]:
    """Write the body of `url` to the new file `path`, flushed to disk, with a progress bar
    named `label`; return its SHA-256, the bytes received and the Content-Length announced
    (None without one).

    torch.hub.download_url_to_file is not used: http.client returns a body that the server
    cut short as if it were complete, and only the hash check would then notice, with a
    misleading message; here the byte count is compared with Content-Length."""
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "segmentation-lab"})
    sha256 = hashlib.sha256()
    received = 0
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response:
        announced = response.headers.get("Content-Length", "")
        length = int(announced) if announced.strip().isdigit() else None
        # Permissions as for any new file (umask), not mkstemp's 0600: the cache may be shared.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with (
            open(descriptor, "wb") as file,
            tqdm(
                total=length,
                desc=label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                disable=not progress,
            ) as bar,
        ):
            while chunk := response.read(DOWNLOAD_CHUNK):
                file.write(chunk)
                sha256.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            file.flush()
            os.fsync(file.fileno())
    return sha256.hexdigest(), received, length
