"""Command-line plumbing of every program: help texts, argument types, errors as one line.

A user's mistake (a missing file, a wrong flag, a broken checkpoint) ends the program with
`error: ...` on one line and exit status 2, never a traceback; a bug keeps its traceback.
Every flag is checked where it is parsed: the argument types below refuse a value that
cannot work (a batch of 0 frames, a NaN learning rate) before anything runs or is written.
"""

from __future__ import annotations

import _thread
import argparse
import errno
import functools
import json
import math
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

# The message of a stub in the students' version of the lab, as teacher/make_lab.py writes
# it: "Qn: TASK in FILE, see LAB.md".
LAB_STUB_MESSAGE = re.compile(r"^Q\d+: .* see LAB\.md$")

# The exit status of a program ended by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_STATUS = 130


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless it has none or its help already explains it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# Limits of the flags, each the largest value that can still make sense.
# Crops: the real frames are 1080 px, so a crop past twice that only upsamples them, and a
# UNet's 64-channel layers at 2048 x 2048 already take 1 GB each per frame in float32; below
# 16 px the deepest layer of a 4-block UNet is smaller than a pixel.
MIN_IMG_SIZE, MAX_IMG_SIZE = 16, 2048
# Each UNet block quadruples the parameters: 6 blocks of 64 channels are 554 M parameters
# (2.2 GB, about 9 GB with gradients and AdamW's state), 7 are 2.2 billion.
MAX_UNET_BLOCKS = 6
MAX_BASE_CHANNELS = 256  # 4 blocks of 256 channels are 552 M parameters too
MAX_UNET_PARAMETERS = 600_000_000  # what the two limits above allow one at a time
MAX_WORKERS = 128  # loader processes; more than cores only adds memory
MAX_SEED = 2**63 - 1  # torch's generators take a signed 64-bit seed


# ----------------------------------------------------------------------------------------
# Argument types. Each carries `bad_examples`, values it must refuse, which the tests feed
# to every flag that uses it.


def int_range(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer from `minimum` to `maximum` (included; None: no maximum)."""
    expected = f"an integer of at least {minimum}"
    if maximum is not None:
        expected = f"an integer from {minimum} to {maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.bad_examples = ["abc", "1.5", str(minimum - 1)]
    if maximum is not None:
        parse.bad_examples.append(str(maximum + 1))
    return parse


def float_range(
    minimum: float, maximum: float = math.inf, *, include_minimum: bool = True
) -> Callable[[str], float]:
    """argparse type: a finite number from `minimum` (included unless `include_minimum` is
    False) up to `maximum` (excluded; inf: no maximum). NaN and infinities are refused."""
    low = "at least" if include_minimum else "above"
    expected = f"a number {low} {minimum:g}"
    if maximum != math.inf:
        expected += f" and below {maximum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan  # not a number: refused below like one out of range
        above_minimum = value >= minimum if include_minimum else value > minimum
        if not (math.isfinite(value) and above_minimum and value < maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.bad_examples = ["abc", "nan", "inf", "-inf", f"{minimum - 0.01:g}"]
    if not include_minimum:
        parse.bad_examples.append(f"{minimum:g}")
    if maximum != math.inf:
        parse.bad_examples.append(f"{maximum:g}")
    return parse


def jitter_strength(text: str) -> float:
    """argparse type of --jitter: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # not a number: refused below like one out of range
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(
            f"expected a number from 0 up to (not including) 1, got {text!r}"
        )
    return value


jitter_strength.bad_examples = ["abc", "nan", "-0.1", "1", "1.5"]


def folder_name(text: str) -> str:
    """argparse type of a run name: one folder name, neither empty nor a path."""
    if not text.strip() or text in (".", "..") or "/" in text or "\\" in text:
        raise argparse.ArgumentTypeError(
            f"expected a folder name (no '/', not '.' or '..'), got {text!r}"
        )
    return text


folder_name.bad_examples = ["", "a/b", "..", "."]


class FlagError(Exception):
    """A flag that cannot work, or a file it names that cannot be used; the message says
    which and what to do."""


def read_pixel_shares(path: str | Path, num_classes: int) -> list[float]:
    """The `pixel_share` list of a `python -m seglab.explore histogram --out` file:
    `num_classes` finite, non-negative numbers, not all zero. FlagError says what is wrong
    with it."""
    import data  # here, not at the top: data.py imports torch (see add_data_arguments)

    prefix = f"--class-weights {path}"
    fix = "write it with `python -m seglab.explore histogram --out FILE`"
    try:
        content = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FlagError(f"{prefix}: no such file; {fix}") from None
    except IsADirectoryError:
        raise FlagError(f"{prefix} is a folder, not a file; {fix}") from None
    except OSError as error:
        raise FlagError(f"{prefix}: cannot read it ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FlagError(f"{prefix} is not JSON ({error}); {fix}") from None
    except RecursionError:
        raise FlagError(f"{prefix} is not a pixel share file: nested too deep; {fix}") from None
    if not isinstance(content, dict) or "pixel_share" not in content:
        raise FlagError(f'{prefix} has no "pixel_share" entry; {fix}')
    shares = content["pixel_share"]
    numbers = isinstance(shares, list) and all(
        isinstance(share, int | float) and not isinstance(share, bool) for share in shares
    )
    if not numbers or len(shares) != num_classes:
        raise FlagError(
            f'{prefix}: "pixel_share" must be a list of {num_classes} numbers, one per class; {fix}'
        )
    if not all(math.isfinite(share) and share >= 0 for share in shares) or sum(shares) <= 0:
        raise FlagError(f'{prefix}: "pixel_share" must hold finite shares >= 0, not all 0; {fix}')
    labelled = [share for index, share in enumerate(shares) if index != data.IGNORE_INDEX]
    if sum(labelled) <= 0:  # <UNK> is never trained on: no class would have a weight
        raise FlagError(
            f'{prefix}: "pixel_share" has pixels of {data.CLASSES[data.IGNORE_INDEX]} only, '
            f"which training ignores; {fix} on labelled frames"
        )
    return [float(share) for share in shares]


def pixel_shares_file(num_classes: int) -> Callable[[str], str]:
    """argparse type of --class-weights: the path of a readable `pixel_share` file."""

    def parse(text: str) -> str:
        try:
            read_pixel_shares(text, num_classes)
        except FlagError as error:
            # argparse already prefixes "argument --class-weights:"
            raise argparse.ArgumentTypeError(str(error).removeprefix("--class-weights ")) from None
        return text

    parse.bad_examples = ["/no/such/file.json"]
    return parse


def output_stems(paths: list[Path], out: Path, suffixes: tuple[str, ...]) -> list[str]:
    """The output name of each input, whose outputs are `out / (stem + suffix)`: its file
    stem, with "_" added until it is unique. FlagError when an output would replace one of
    the inputs (`--out` is an input folder holding a file named like an output)."""
    inputs = {path.resolve() for path in paths}
    stems: list[str] = []
    for path in paths:
        stem = path.stem
        while stem in stems:  # two inputs with one name must not overwrite each other
            stem += "_"
        stems.append(stem)
        for suffix in suffixes:
            if (out / f"{stem}{suffix}").resolve() in inputs:
                raise FlagError(
                    f"--out {out}: writing {out / (stem + suffix)} would replace that input; "
                    "choose another output folder"
                )
    return stems


def make_output_folder(out: Path) -> None:
    """Create the folder `out` (and its parents); FlagError when it cannot be."""
    if out.exists() and not out.is_dir():
        raise FlagError(f"--out {out} is a file, not a folder: name a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FlagError(f"--out {out}: cannot create it ({error.strerror})") from None


# ----------------------------------------------------------------------------------------
# Errors as one line


def existing_file(text: str) -> str:
    """argparse type of a file that must exist (e.g. predict's --depth)."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


existing_file.bad_examples = ["/no/such/file.png"]


class InputsAction(argparse.Action):
    """--inputs: words of `choices` (checked by argparse), rgb among them, each once; stored
    in the order of `choices` (["rgb", "depth"] for `--inputs depth rgb`)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if "rgb" not in values or len(set(values)) != len(values):
            raise argparse.ArgumentError(
                self, f"expected rgb, or rgb and more, each once, got {' '.join(values)!r}"
            )
        setattr(namespace, self.dest, [name for name in self.choices if name in values])


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--datadir and --areas, as every data command spells them."""
    import data  # here, not at the top: data.py imports torch, which not every program needs

    parser.add_argument(
        "--datadir",
        default=data.default_datadir(),
        help=f"2D-3D-S root or cache (default: ${data.DATADIR_VARIABLE}, else "
        f"{data.DEFAULT_DATADIR})",
    )
    parser.add_argument(
        "--areas", nargs="+", default=None, help='areas, e.g. 1 2 5a ("5" = 5a 5b); all'
    )


def error_message(error: Exception) -> str:
    """The message of `error`. An exception raised in a DataLoader worker reaches the main
    process re-created with the worker's traceback as its message, which ends with
    "module.ErrorClass: original message"; only the original message is for the user."""
    message = str(error)
    if "DataLoader worker" in message and "Original Traceback" in message:
        message = message.rsplit(f"{type(error).__name__}: ", 1)[-1]
    return message.strip()


def os_error_message(error: OSError) -> str:
    """One line for a failed file operation: the file, the reason, and what to do."""
    names = [str(name) for name in (error.filename, error.filename2) if name is not None]
    where = " -> ".join(names) or "a file"
    reason = error.strerror or error_message(error) or type(error).__name__
    advice = {
        errno.ENOSPC: "free some space",
        errno.EDQUOT: "free some space",
        errno.EACCES: "check its permissions or choose another folder",
        errno.EPERM: "check its permissions or choose another folder",
        errno.EROFS: "choose a folder on a writable disk",
    }.get(error.errno)
    return f"cannot use {where}: {reason}" + (f"; {advice}" if advice else "")


def cuda_oom_message(args: argparse.Namespace) -> str:
    """What to lower when CUDA ran out of memory, with the values of this run."""
    flags = [f"--batch-size {args.batch_size}"] if hasattr(args, "batch_size") else []
    if hasattr(args, "img_size"):
        flags.append(f"--img-size {args.img_size}")
    return f"CUDA ran out of memory with {' and '.join(flags) or 'this input'}: lower them"


# PyTorch's message for an operation that it has no kernel of on Apple's GPU (MPS).
MPS_MISSING_OPERATOR = re.compile(
    r"operator '(?P<name>[^']+)' is not currently implemented for the MPS device"
)


def mps_fallback_advice(operator: str) -> str:
    """What to do when this torch lacks `operator` on Apple's GPU. PyTorch reads
    PYTORCH_ENABLE_MPS_FALLBACK when it is imported, so the program cannot turn it on for
    itself: the command runs again with it, and such operations then run on the CPU."""
    return (
        f"this torch cannot run {operator} on Apple's GPU (MPS): run the command again with "
        "the environment variable PYTORCH_ENABLE_MPS_FALLBACK=1 (such operations then run on "
        "the CPU), or with --device cpu"
    )


def run(
    command: Callable[[argparse.Namespace], int],
    args: argparse.Namespace,
    user_errors: tuple[type[Exception], ...],
) -> int:
    """`command(args)`, with the exceptions of `user_errors` (and CUDA's out of memory, a
    file the system cannot read or write, and the stubs of the students' version of the
    lab) printed as one line, exit status 2; Ctrl-C prints one line, exit status 130."""
    default_thread_hook, default_unraisable_hook = threading.excepthook, sys.unraisablehook
    threading.excepthook = functools.partial(report_thread_error, default_thread_hook)
    interrupted = threading.Event()
    sys.unraisablehook = functools.partial(report_unraisable, default_unraisable_hook, interrupted)
    default_sigint = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, functools.partial(interrupt, interrupted))
    try:
        return command(args)
    except user_errors as error:
        print(f"error: {error_message(error)}", file=sys.stderr)
        return 2
    except OSError as error:
        # A full disk, a read-only folder, a file that vanished: the system's word for it.
        # The checkpoints already written are whole (see checkpoints.save_checkpoint).
        print(f"error: {os_error_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # A progress bar may hold the line: start a new one.
        print("\ninterrupted (Ctrl-C); files written so far are whole", file=sys.stderr)
        return INTERRUPTED_STATUS
    except NotImplementedError as error:
        # In the students' version of the lab, an unanswered question raises this with a
        # message that names it; so does PyTorch for an operation it lacks on Apple's GPU.
        # Any other NotImplementedError keeps its traceback.
        message = error_message(error)
        missing_on_mps = MPS_MISSING_OPERATOR.search(message)
        if missing_on_mps:
            print(f"error: {mps_fallback_advice(missing_on_mps['name'])}", file=sys.stderr)
            return 2
        if not LAB_STUB_MESSAGE.match(message):
            raise
        print(f"error: {message} (the program needs it)", file=sys.stderr)
        return 2
    except RuntimeError as error:
        # torch.cuda.OutOfMemoryError, known by its name: this module leaves torch unimported,
        # so that the teacher's tools start without it.
        if type(error).__name__ != "OutOfMemoryError":
            raise
        print(f"error: {cuda_oom_message(args)}", file=sys.stderr)
        return 2
    finally:
        threading.excepthook, sys.unraisablehook = default_thread_hook, default_unraisable_hook
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, default_sigint)


def interrupt(interrupted: threading.Event, signum: int, frame) -> None:
    """SIGINT (Ctrl-C) while a command runs: Python's KeyboardInterrupt, remembered.

    Raised inside a `__del__`, Python would swallow it (a `__del__` cannot raise): then the
    signal is delivered again a moment later, once the finalizer is done."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            threading.Timer(0.01, _thread.interrupt_main, (signal.SIGINT,)).start()
            return
        frame = frame.f_back
    interrupted.set()
    raise KeyboardInterrupt


def report_unraisable(default_hook, interrupted: threading.Event, unraisable) -> None:
    """sys.unraisablehook while a command runs. Ctrl-C can land while an object is being
    built (a progress bar, say); its `__del__` then fails on the half-built object, and
    Python prints that failure as a traceback of its own, after which the KeyboardInterrupt
    goes on to its one line. After Ctrl-C such failures are noise; before, they are not."""
    if interrupted.is_set():
        return
    default_hook(unraisable)


def report_thread_error(default_hook, hook_args) -> None:
    """threading.excepthook while a command runs. TensorBoard writes its events from a
    thread of its own; on a full disk or a read-only folder that thread ends with the
    OSError, which the main thread meets again at its next write and reports in one line.
    The thread's traceback would only repeat it."""
    if issubclass(hook_args.exc_type, OSError):
        return
    default_hook(hook_args)


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options written on the command line `argv` of `parser`
    (a subcommand's parser), told apart from those left at their defaults: parsed again
    with every default hidden."""
    saved = {action: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_known_args(argv)[0]))
    finally:
        for action, default in saved.items():
            action.default = default
