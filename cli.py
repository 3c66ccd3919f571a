"""Command-line plumbing of main.py: help texts, argument types, and errors as one line.

A user's mistake (a missing file, a wrong flag, a broken checkpoint) ends the program with
`error: ...` on one line and exit status 2, never a traceback; a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

import torch

from data import LAB_STUB_MESSAGE  # the message of an unanswered question of the lab


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless it has none or its help already explains it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


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


def error_message(error: Exception) -> str:
    """The message of `error`. An exception raised in a DataLoader worker reaches the main
    process re-created with the worker's traceback as its message, which ends with
    "module.ErrorClass: original message"; only the original message is for the user."""
    message = str(error)
    if "DataLoader worker" in message and "Original Traceback" in message:
        message = message.rsplit(f"{type(error).__name__}: ", 1)[-1]
    return message.strip()


def cuda_oom_message(args: argparse.Namespace) -> str:
    """What to lower when CUDA ran out of memory, with the values of this run."""
    flags = [f"--batch-size {args.batch_size}"] if hasattr(args, "batch_size") else []
    if hasattr(args, "img_size"):
        flags.append(f"--img-size {args.img_size}")
    return f"CUDA ran out of memory with {' and '.join(flags) or 'this input'}: lower them"


def run(
    command: Callable[[argparse.Namespace], int],
    args: argparse.Namespace,
    user_errors: tuple[type[Exception], ...],
) -> int:
    """`command(args)`, with the exceptions of `user_errors` (and CUDA's out of memory, and
    the stubs of the students' version of the lab) printed as one line, exit status 2."""
    try:
        return command(args)
    except user_errors as error:
        print(f"error: {error_message(error)}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print(f"error: {cuda_oom_message(args)}", file=sys.stderr)
        return 2
    except NotImplementedError as error:
        # In the students' version of the lab, an unanswered question raises this with a
        # message that names it; any other NotImplementedError keeps its traceback.
        message = error_message(error)
        if not LAB_STUB_MESSAGE.match(message):
            raise
        print(f"error: {message} (the program needs it)", file=sys.stderr)
        return 2
