"""Stopping a run on request without losing work: the signals a cluster sends before it
stops a job, and a time budget between checkpoints.

SLURM sends SIGTERM before it preempts a job or ends it at its time limit (and, with
`#SBATCH --signal`, a chosen signal such as SIGUSR1 some minutes earlier); torchrun passes
SIGTERM on to its processes. After one of them, training finishes its current step, writes
a checkpoint of where it is in the epoch, and the program exits with EXIT_RESUMABLE;
`--resume` continues from there. Under torchrun the processes agree on the step at which
they stop (they must all stop at the same one), at the loop's checks.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from seglab import devices

# Exit status of a run that stopped on request after saving its checkpoint: resume it.
# (75 is EX_TEMPFAIL of sysexits.h, "temporary failure, try again later".)
EXIT_RESUMABLE = 75
# SIGUSR1 exists on POSIX systems only: on Windows, SIGTERM alone asks a run to stop.
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)
)


class StopRequests:
    """Whether training should save its state now, and whether it should also stop.

    Use as a context manager: inside it SIGTERM and SIGUSR1 no longer end the process but
    ask it to stop. `checkpoint_minutes` (0: never) asks for a checkpoint that often.
    """

    def __init__(self, checkpoint_minutes: float = 0.0) -> None:
        self.received: int | None = None  # the signal received, if any
        self.interval = checkpoint_minutes * 60 if checkpoint_minutes > 0 else math.inf
        self.next_save = time.monotonic() + self.interval
        self.previous_handlers: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        for number in STOP_SIGNALS:
            self.previous_handlers[number] = signal.signal(number, self.handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self.previous_handlers.items():
            signal.signal(number, handler)

    def handle(self, number: int, frame) -> None:
        self.received = number

    def poll(self, at_check: bool, device: torch.device) -> tuple[bool, bool]:
        """(save now, then stop). Under torchrun only at a check (`at_check`), where the
        processes take the decision together (any process's signal counts, rank 0's clock
        decides the timed checkpoints); in one process at every step, at no cost."""
        stop = self.received is not None
        save = stop or time.monotonic() >= self.next_save
        if dist.is_initialized():
            if not at_check:
                return False, False
            votes = torch.tensor([float(stop), float(save and dist.get_rank() == 0)])
            votes = votes.to(device)  # NCCL reduces tensors on the GPU
            dist.all_reduce(votes, op=dist.ReduceOp.MAX)
            stop_vote, save_vote = votes.tolist()
            stop, save = stop_vote > 0, stop_vote > 0 or save_vote > 0
        if save:
            self.next_save = time.monotonic() + self.interval
        return save, stop

    def describe(self) -> str:
        """Why the run stopped, for its last line."""
        if self.received is None:
            return "another process received a stop signal"
        return f"received {signal.Signals(self.received).name}"


def stopped_on_request(run, run_dir: Path, stop: StopRequests, writer) -> int:
    """The last words of a run stopped by a signal, its position saved: exit status
    EXIT_RESUMABLE (`run` is main.Run, `writer` its SummaryWriter or None)."""
    if writer is not None:
        writer.close()
    if devices.is_main_process():
        print(
            f"stopped ({stop.describe()}) at epoch {run.epoch + 1}, batch {run.batches_done}: "
            f"resumable, continue with --resume {run_dir / 'last.pt'} (exit status "
            f"{EXIT_RESUMABLE})"
        )
    return EXIT_RESUMABLE
