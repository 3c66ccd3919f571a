"""What a run needs to stop at any step and continue exactly: the data order, the random
numbers, and the health of the weights, kept on the device between checks.

- `training_loader`: the training frames in an order that depends only on (seed, epoch),
  each frame augmented with random numbers drawn from (seed, epoch, frame), so that the
  batches are the same whatever the number of loader workers, and a run can start in the
  middle of an epoch without replaying the batches before.
- `random_states` / `restore_random_states`: the generators of the training process (the
  color jitter and dropout draw from them).
- `TrainingHealth`: the running loss and the count of skipped steps, accumulated on the
  device; the host reads them (one synchronization) only at a check, every few steps.
"""

from __future__ import annotations

import atexit
import gc
import math
import multiprocessing
import signal

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

import data
from seglab import preemption


def frame_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of the augmentations of frame `index` in epoch `epoch`: a 63-bit mix of the
    three numbers, so that neighbouring frames and epochs get unrelated streams."""
    mixed = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index) % (1 << 64)
    mixed = (mixed ^ (mixed >> 31)) * 0x94D049BB133111EB % (1 << 64)
    return mixed >> 1


class ResumableSampler(Sampler):
    """The `(frame index, frame seed)` pairs of one epoch for this process, from a given
    batch on.

    The order is a permutation drawn from (seed, epoch); under torch.distributed process
    `rank` takes every `world_size`-th frame of it, and the frames that would not make a
    full batch on every process are left out (as DataLoader's drop_last does). The frame
    seed goes to `SeededFrames`, which augments the frame with it.
    """

    def __init__(self, num_frames: int, batch_size: int, seed: int, rank: int, world_size: int):
        self.num_frames, self.batch_size, self.seed = num_frames, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = num_frames // world_size // batch_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields epoch `epoch`, starting at its batch `start_batch`."""
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(frame_seed(self.seed, self.epoch, -1))
        order = torch.randperm(self.num_frames, generator=generator).tolist()
        mine = order[self.rank :: self.world_size]
        first = self.start_batch * self.batch_size
        for index in mine[first : self.batches_per_epoch * self.batch_size]:
            yield index, frame_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class SeededFrames(Dataset):
    """`frames[index]` drawn with the random numbers of `seed`, for `(index, seed)` keys:
    a frame's augmentation depends on its key alone, not on which loader worker reads it
    nor on what that worker read before."""

    def __init__(self, frames: Dataset) -> None:
        self.frames = frames

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        # fork_rng puts the generator back afterwards: with workers=0 this runs in the
        # training process, whose own random numbers must not depend on the frames read.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.frames[index]


def training_loader(
    frames: Dataset, batch_size: int, workers: int, pin_memory: bool, seed: int
) -> DataLoader:
    """A loader of the training frames whose batches depend only on (seed, epoch, batch):
    call `loader.sampler.set_epoch(epoch, start_batch)` before each epoch."""
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    sampler = ResumableSampler(len(frames), batch_size, seed, rank, world_size)
    # SeededFrames seeds each frame's augmentations itself: the workers' seeds are unused.
    return data.make_loader(
        SeededFrames(frames), batch_size, workers, pin_memory, ignore_stop_signals, sampler, seed
    )


def ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn of the loaders of a training process: its loader workers ignore the
    signals that ask training to stop. torchrun and SLURM send them to every process of a
    job; a worker that died of one would end the training process with an error, before
    it saves where it is. The training process stops its workers itself."""
    for number in preemption.STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def end_loader_workers() -> None:
    """At the training process's exit, before multiprocessing's own exit function (atexit
    runs the later registration first). That function sends SIGTERM to the loader workers
    still running, which ignore it (ignore_stop_signals), then waits for them: forever.
    Workers still run when their loader's iterator was never shut down, e.g. held by the
    traceback of the error that ended training. Collecting such cycles shuts the workers
    down as usual; any left are killed."""
    gc.collect()
    for child in multiprocessing.active_children():
        if child.daemon:  # the loader workers; multiprocessing would SIGTERM them anyway
            child.kill()


atexit.register(end_loader_workers)


def random_states() -> dict:
    """The generators of this process that training draws from: torch's CPU generator, and
    each GPU's. Every process draws the same numbers (they are seeded alike), so rank 0's
    states stand for all."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: dict) -> None:
    """Put back the generators saved by `random_states`."""
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


class NonFiniteWeights(Exception):
    """A weight or a normalization statistic became NaN or infinite."""


class TrainingHealth:
    """The running loss and the skipped steps of training, kept on the device.

    Every step adds to them without waiting for the device; `check` reads them once (the
    only host synchronization of the loop), every few steps and before every checkpoint.
    A step whose gradients are not finite is skipped by the loss scaler (on the device);
    it counts in `bad_in_a_row` until a good step resets it, and `most_in_a_row` keeps the
    longest such streak since the last check.
    """

    def __init__(self, device: torch.device) -> None:
        zero = torch.zeros((), device=device)
        self.loss_sum, self.good_steps = zero.clone(), zero.clone()  # since the last check
        self.bad_steps, self.bad_in_a_row = zero.clone(), zero.clone()
        self.most_in_a_row = zero.clone()

    def record(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Add one step: its loss (a 0-d tensor) and its gradient norm (non-finite when the
        scaler skipped the step)."""
        good = torch.isfinite(grad_norm) & torch.isfinite(loss.detach())
        self.loss_sum += torch.where(good, loss.detach().float(), 0.0)
        self.good_steps += good
        self.bad_steps += ~good
        self.bad_in_a_row = torch.where(good, 0.0, self.bad_in_a_row + 1)
        self.most_in_a_row = torch.maximum(self.most_in_a_row, self.bad_in_a_row)

    def check(self, model: nn.Module) -> tuple[float, int, int, int]:
        """(sum of the good steps' losses, good steps, skipped steps, the longest run of
        skipped steps in a row) since the last check, after checking every weight and
        buffer of `model`.

        Raises NonFiniteWeights when one is NaN or infinite (e.g. a normalization statistic
        that a NaN forward pass reached, or weights that a too-high learning rate blew up).
        """
        tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
        weights_finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
        values = torch.stack(
            [self.loss_sum, self.good_steps, self.bad_steps, self.most_in_a_row, weights_finite]
        ).tolist()  # the one synchronization
        loss_sum, good, bad, in_a_row, finite = values
        if not finite:
            raise NonFiniteWeights(non_finite_summary(model.state_dict()))
        self.loss_sum.zero_()
        self.good_steps.zero_()
        self.bad_steps.zero_()
        self.most_in_a_row.copy_(self.bad_in_a_row)  # a streak goes on across checks
        return loss_sum, int(good), int(bad), int(in_a_row)


def non_finite_summary(state: dict) -> str:
    """ "3 of 74 tensors (e.g. enc1.bn.running_var)" for the tensors holding NaN or inf."""
    bad = [
        key
        for key, t in state.items()
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()
    ]
    total = sum(1 for t in state.values() if torch.is_tensor(t) and t.is_floating_point())
    return f"{len(bad)} of {total} tensors (e.g. {bad[0]})" if bad else "none"


def mean_or_nan(total: float, count: int) -> float:
    return total / count if count else math.nan


def seed_epoch(loader: DataLoader, seed: int, epoch: int, run) -> None:
    """Data order and augmentations depend only on (seed, epoch), so that a resumed run
    sees the same batches as an uninterrupted one; a run stopped in the middle of the epoch
    continues at its batch, with its random states (`run` is main.Run)."""
    torch.manual_seed(seed)
    loader.sampler.set_epoch(epoch, run.batches_done)
    if run.random_states is not None:
        restore_random_states(run.random_states)
        run.random_states = None
