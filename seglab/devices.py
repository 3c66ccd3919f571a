"""Where the code runs: a CPU or a GPU, one process or several (torchrun), in which precision.

The training loop of main.py calls these few helpers and is otherwise the same everywhere.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn


class UsageError(Exception):
    """A flag that cannot work on this machine or with these inputs."""


def setup_distributed() -> tuple[int, int, int]:
    """Join the process group that torchrun describes in the environment.

    Returns (rank, world size, local rank); (0, 1, 0) when not started by torchrun.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), world_size, local_rank


def world_size() -> int:
    """The number of training processes (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def lost_a_peer(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another process ended (it failed on
    its own, and said why); this process then only has to stop."""
    if not dist.is_initialized() or not isinstance(error, RuntimeError):
        return False
    message = str(error)
    return isinstance(error, dist.DistError) or any(
        text in message
        for text in ("Connection closed by peer", "Connection reset by peer", "remote worker")
    )


def is_main_process() -> bool:
    """True in the one process that prints, logs and saves (rank 0, or the only one)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def distribute(model: nn.Module, device: torch.device) -> nn.Module:
    """The model wrapped in DistributedDataParallel under torchrun (gradients are averaged
    over the processes in backward), else the model itself."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def training_model(
    model: nn.Module, device: torch.device, sync_bn: bool = False, compile: bool = False
) -> nn.Module:
    """The model as the training step calls it: with SyncBatchNorm (`sync_bn`, batch
    statistics over all processes instead of each process's few frames), wrapped in
    DistributedDataParallel under torchrun, and compiled by torch.compile (`compile`).

    `model` itself keeps its parameters (SyncBatchNorm is converted in place and has the
    same state_dict), so checkpoints and evaluation use it unwrapped and uncompiled.
    """
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if sync_bn and distributed:
        if device.type != "cuda":
            raise UsageError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm runs on CUDA only")
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_model = distribute(model, device)
    if compile:
        # Compiled once per input shape: the training crops all have one shape, and the
        # last incomplete batch is dropped, so this compiles once (about a minute on 2 CPU cores).
        train_model = torch.compile(train_model)
    return train_model


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """ "auto" is the GPU of this process when there is one: an NVIDIA GPU (CUDA), else
    the GPU of a Mac with Apple silicon (MPS) in a single process; else the CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    if requested == "mps":
        check_mps()
        return torch.device("mps")
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        # Every training batch has the same shape: let cuDNN time its algorithms once and
        # keep the fastest (results may differ in the last bits from run to run).
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda", local_rank)
    if torch.backends.mps.is_available() and world_size() == 1:
        return torch.device("mps")
    return torch.device("cpu")


def check_mps() -> None:
    """UsageError unless Apple's GPU can train here: a Mac with Apple silicon (macOS 12.3 or
    newer, a torch for macOS), one process."""
    if not torch.backends.mps.is_available():
        raise UsageError(
            "--device mps: Apple's GPU (MPS) is not available here; it needs a Mac with Apple "
            "silicon and macOS 12.3 or newer. Use --device cpu"
        )
    if world_size() > 1:
        raise UsageError(
            "--device mps trains in one process: PyTorch's process groups (gloo, NCCL) do not "
            "exchange tensors of Apple's GPU. Drop torchrun, or use --device cpu"
        )


def has_kernels(device_type: str, *operators: str) -> bool:
    """Whether this torch has kernels of its own for `operators` (e.g.
    "aten::_amp_update_scale_") on devices of `device_type` ("mps")."""
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(name, device_type.upper())
        for name in operators
    )


def can_scale_loss(device: torch.device) -> bool:
    """Whether torch.amp.GradScaler works on `device`: on CPUs and CUDA it always does; on
    Apple's GPU where this torch has the scaler's kernels for it (it came after MPS itself)."""
    if device.type != "mps":
        return True
    return has_kernels(
        "mps", "aten::_amp_foreach_non_finite_check_and_unscale_", "aten::_amp_update_scale_"
    )


def amp_dtypes(device: torch.device) -> dict[str, str]:
    """The dtypes of mixed precision (--amp) on `device`, the default first: {dtype: ""
    when `device` can use it, else why not}.

    CUDA: float16 (with loss scaling; bfloat16 where supported is no faster on most GPUs
    and float16 runs everywhere), bfloat16. A CPU: bfloat16, float16. Apple's GPU (MPS):
    float16 only where the loss scaler runs on it, bfloat16 from macOS 14 on, neither
    where this torch has no autocast for MPS.
    """
    if device.type == "cuda":
        return {"float16": "", "bfloat16": ""}
    if device.type != "mps":
        return {"bfloat16": "", "float16": ""}
    if not torch.amp.is_autocast_available("mps"):
        reason = "this torch has no mixed precision (autocast) on Apple's GPU"
        return {"float16": reason, "bfloat16": reason}
    return {
        "float16": "" if can_scale_loss(device) else (
            "float16 needs loss scaling, which this torch cannot do on Apple's GPU"
        ),
        "bfloat16": "" if torch.backends.mps.is_macos_or_newer(14, 0) else (
            "Apple's GPU computes in bfloat16 from macOS 14 on"
        ),
    }  # fmt: skip


def precision(device: torch.device, amp: bool | None, amp_dtype: str | None) -> tuple[bool, str]:
    """(mixed precision on, its dtype) from --amp and --amp-dtype (None: not given).

    Mixed precision is on by default on CUDA only. On a CPU bfloat16 is 2x faster than
    float32 on some (AVX-512 BF16) and 18x slower on others: opt in with --amp after
    `python bench.py` says it pays. On Apple's GPU float32 is the default as well: the
    operations it has, it has in float32, not all of them in float16 or bfloat16.
    UsageError for an --amp that `device` cannot do."""
    reasons = amp_dtypes(device)
    usable = [name for name, why_not in reasons.items() if not why_not]
    amp = device.type == "cuda" if amp is None else amp
    # The first usable dtype, or the first of all when none is (mixed precision is off).
    amp_dtype = amp_dtype or (usable or list(reasons))[0]
    if amp and reasons[amp_dtype]:
        instead = f"use --amp-dtype {usable[0]}, or drop --amp" if usable else "drop --amp"
        raise UsageError(
            f"--amp with {amp_dtype} on {device.type}: {reasons[amp_dtype]}; {instead}"
        )
    return amp, amp_dtype


def autocast(device: torch.device, enabled: bool = True, dtype: torch.dtype | None = None):
    """Mixed precision for a forward pass, or nothing when not `enabled`; the default dtype
    is the first usable one of `amp_dtypes` (float16 on CUDA, bfloat16 on a CPU)."""
    if not enabled:
        return nullcontext()
    if dtype is None:
        dtype = getattr(torch, precision(device, True, None)[1])
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's random generators (numpy's is not used)."""
    random.seed(seed)
    torch.manual_seed(seed)


def loss_scaler(device: torch.device, float16: bool) -> torch.amp.GradScaler:
    """The loss scaler: with float16 it keeps small gradients from vanishing (a dynamic
    scale); in every precision it skips, on the device, a step whose gradients are not
    finite, so that the step never waits for the host to decide."""
    if not can_scale_loss(device):
        # A torch without the scaler's kernels for Apple's GPU: no scaler (and no float16,
        # precision() refuses it). A non-finite step then reaches the weights, and the
        # check that follows stops training with the last good checkpoint kept.
        return torch.amp.GradScaler(device.type, enabled=False)
    if float16:
        return torch.amp.GradScaler(device.type)
    # A fixed scale of 1: a backoff factor that rounds to 1 in float32, no growth.
    return torch.amp.GradScaler(
        device.type, init_scale=1.0, backoff_factor=1 - 1e-9, growth_interval=2**31 - 1
    )


def run_with_peers(run_command: Callable[[], int]) -> int:
    """`run_command()`, its exit status; under torchrun, a collective that fails because
    another process ended ends this one with one line, and the process group is closed."""
    try:
        return run_command()
    except RuntimeError as error:
        if not lost_a_peer(error):
            raise
        # One line, not a traceback per process: the process that failed printed why.
        print(
            f"error: process {dist.get_rank()} stopped: another process ended (see its message)",
            file=sys.stderr,
        )
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
