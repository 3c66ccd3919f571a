"""Students' laptops: Windows (no fcntl, no SIGUSR1, loader workers spawned), Apple's GPU
(MPS, with PyTorch's checks replaced: this machine has none) and the CPU-only install."""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_main import run_cli, train_args

import main
from seglab import cache, checkpoints, cli, devices, filesystem, runfolder

LIKE_WINDOWS = ROOT / "tests" / "like_windows"


def like_windows(log: Path) -> dict[str, str]:
    """The environment of a process (and of its loader workers) that runs as on Windows:
    tests/like_windows/sitecustomize.py, workers started with spawn, each process logged."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(LIKE_WINDOWS), str(ROOT)]),
        "SEGLAB_START_METHOD": "spawn",
        "LIKE_WINDOWS_LOG": str(log),
        "OMP_NUM_THREADS": "1",
    }


def run_like_windows(log: Path, *args: str) -> subprocess.CompletedProcess:
    """`python main.py ARGS` as on Windows."""
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        capture_output=True, text=True, cwd=ROOT, env=like_windows(log), timeout=300,
    )  # fmt: skip


def spawned_processes(log: Path) -> int:
    """How many spawned processes (loader workers) ran as on Windows, by their lines in
    `log` (multiprocessing's resource tracker, also a Python process, is not one)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return sum(line.endswith(" spawned") for line in lines)


def test_train_test_and_predict_run_as_on_windows(synthetic_root, tmp_path):
    log = tmp_path / "processes.txt"
    args = train_args(synthetic_root, tmp_path, "windows", 1, "--workers", "1")
    result = run_like_windows(log, *args)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "windows"
    assert {"best.pt", "last.pt", "metrics.jsonl"} <= {p.name for p in run_dir.iterdir()}
    # The lock went through msvcrt (no warning of a run without one), and was released.
    assert "no file locks" not in result.stderr
    holder_pid, on, _host = (run_dir / ".lock").read_text().split()
    assert holder_pid.isdigit() and on == "on"
    with runfolder.RunFolderLock(run_dir) as lock:
        lock.acquire()
    # The workers of the two loaders (training and validation): spawned interpreters that
    # ran under the same conditions.
    assert spawned_processes(log) == 2

    out = tmp_path / "test"
    test_args = ["test", "--model", str(run_dir / "best.pt"), "--out", str(out), "--workers", "1"]
    result = run_like_windows(log, *test_args)
    assert result.returncode == 0, result.stderr
    assert (out / "metrics.json").is_file()
    assert spawned_processes(log) == 3  # and test's loader worker

    frame = next((synthetic_root / "area_5a" / "data" / "rgb").glob("*.png"))
    predictions = tmp_path / "predictions"
    result = run_like_windows(
        log, "predict", "--model", str(run_dir / "best.pt"), str(frame), "--out", str(predictions)
    )
    assert result.returncode == 0, result.stderr
    assert (predictions / f"{frame.stem}_mask.png").is_file()


def test_a_cache_written_by_loader_workers_is_the_one_written_without(synthetic_root, tmp_path):
    """cache.py write's workers (started by spawn in CI's second pass) write the same bytes."""
    alone, workers = tmp_path / "alone", tmp_path / "workers"
    cache.write_cache(synthetic_root, alone, 32, areas=["1", "5a"], progress=False)
    cache.write_cache(synthetic_root, workers, 32, areas=["1", "5a"], workers=2, progress=False)
    files = sorted(path.relative_to(alone) for path in alone.rglob("*") if path.is_file())
    assert files == sorted(p.relative_to(workers) for p in workers.rglob("*") if p.is_file())
    for name in files:
        assert (alone / name).read_bytes() == (workers / name).read_bytes(), name


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from seglab import runfolder
with runfolder.RunFolderLock(Path(sys.argv[1])) as lock:
    lock.acquire()
    print("locked", flush=True)
    time.sleep(600)
"""
LOCK_CONTENDER = """
import sys
from pathlib import Path
from seglab import checkpoints, runfolder
try:
    runfolder.RunFolderLock(Path(sys.argv[1])).acquire()
except checkpoints.CheckpointError as error:
    sys.exit(str(error))
"""


def test_the_run_folder_lock_works_without_fcntl(tmp_path):
    """msvcrt's lock, as on Windows: a second process is refused with the holder's line,
    and the lock goes with its process."""
    run_dir = tmp_path / "run"
    environment = like_windows(tmp_path / "processes.txt")
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(run_dir)],
        stdout=subprocess.PIPE, text=True, env=environment,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = subprocess.run(
            [sys.executable, "-c", LOCK_CONTENDER, str(run_dir)],
            capture_output=True, text=True, env=environment, timeout=120,
        )  # fmt: skip
        assert refused.returncode == 1
        assert f"is in use by process {holder.pid} on" in refused.stderr
    finally:
        holder.kill()
        holder.wait(timeout=60)
    taken = subprocess.run(
        [sys.executable, "-c", LOCK_CONTENDER, str(run_dir)],
        capture_output=True, text=True, env=environment, timeout=120,
    )  # fmt: skip
    assert taken.returncode == 0, taken.stderr


def test_without_any_file_lock_a_run_goes_on_with_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(filesystem, "fcntl", None)
    monkeypatch.setattr(filesystem, "msvcrt", None)
    with runfolder.RunFolderLock(tmp_path / "run") as lock:
        lock.acquire()
        assert f"no file locks: nothing stops a second training in {tmp_path / 'run'}" in (
            capsys.readouterr().err
        )
        runfolder.RunFolderLock(tmp_path / "run").acquire()  # not refused
    assert (tmp_path / "run" / ".lock").read_text().startswith(f"{os.getpid()} on ")


def test_a_checkpoint_is_saved_where_a_folder_cannot_be_opened(tmp_path, monkeypatch):
    real_open = os.open

    def open_files_only(path, flags, *args, **kwargs):
        if Path(path).is_dir():
            raise PermissionError(13, "Permission denied", str(path))  # as on Windows
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_files_only)
    checkpoints.save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
    assert checkpoints.torch.load(tmp_path / "last.pt", weights_only=True) == {"epoch": 1}


# What one platform lacks: modules of POSIX or of Windows, imported only in a `try`, and
# attributes (`module.name`) that Windows lacks, not used at all (preemption.py takes
# SIGUSR1 by name where it exists).
PLATFORM_MODULES = {"fcntl", "msvcrt", "pwd", "grp", "resource", "termios", "winreg"}
POSIX_ONLY = {
    ("os", "uname"), ("os", "fork"), ("os", "getuid"), ("os", "killpg"), ("os", "setsid"),
    ("os", "sched_getaffinity"), ("signal", "SIGUSR1"), ("signal", "SIGUSR2"),
    ("signal", "SIGKILL"), ("signal", "SIGHUP"), ("signal", "SIGALRM"), ("signal", "alarm"),
}  # fmt: skip


def platform_dependencies(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, what) for each platform module imported outside a `try` and each use of an
    attribute of POSIX_ONLY in a module's syntax tree."""
    guarded = {
        id(node)
        for statement in ast.walk(tree)
        if isinstance(statement, ast.Try)
        for node in statement.body
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and id(node) not in guarded:
            found += [(node.lineno, a.name) for a in node.names if a.name in PLATFORM_MODULES]
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and (node.value.id, node.attr) in POSIX_ONLY
        ):
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return found


def test_the_project_imports_and_uses_nothing_that_windows_lacks():
    found = [
        f"{path.name}:{line} {what}"
        for path in sorted([*ROOT.glob("*.py"), *ROOT.glob("seglab/*.py")])
        for line, what in platform_dependencies(ast.parse(path.read_text()))
    ]
    assert found == []
    # The check itself finds them.
    sample = "import fcntl\ntry:\n    import msvcrt\nexcept ImportError:\n    pass\nos.uname()\n"
    assert platform_dependencies(ast.parse(sample)) == [(1, "fcntl"), (6, "os.uname")]


# ----------------------------------------------------------------------------------------
# The install: setup.sh cpu, and the same commands without bash (docs/install.md)


def setup_commands(*arguments: str) -> list[str]:
    """The pip commands that `bash setup.sh ARGUMENTS` runs, as --dry-run prints them."""
    result = subprocess.run(
        ["bash", "setup.sh", "--dry-run", *arguments],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if " -m pip install " in line]


PIP = ".venv/bin/python -m pip install --quiet"


def test_setup_cpu_takes_torch_from_pytorchs_cpu_index_and_the_rest_from_pypi():
    assert setup_commands("dev") == [
        f"{PIP} --upgrade pip",
        f"{PIP} -r requirements-dev.txt -c constraints.txt",
    ]
    assert setup_commands("cpu", "dev") == [
        f"{PIP} --upgrade pip",
        f"{PIP} torch torchvision -c constraints.txt --index-url https://download.pytorch.org/whl/cpu",
        f"{PIP} -r requirements-dev.txt -c constraints.txt",
    ]
    assert setup_commands("cpu")[-1] == f"{PIP} -r requirements.txt -c constraints.txt"
    refused = subprocess.run(
        ["bash", "setup.sh", "--dry-run", "gpu"], capture_output=True, text=True, cwd=ROOT
    )
    assert refused.returncode == 2
    assert "unknown argument 'gpu'" in refused.stderr


def test_the_install_guide_gives_setup_shs_commands_without_bash():
    guide = (ROOT / "docs" / "install.md").read_text()
    for command in setup_commands("cpu", "dev"):
        arguments = command.removeprefix(".venv/bin/python ").replace(" --quiet", "")
        assert f"$ .venv/bin/python {arguments}\n" in guide  # Linux and macOS
        if "--index-url" not in arguments:  # PyPI's torch has no CUDA on Windows
            assert f"\n.venv\\Scripts\\python {arguments}\n" in guide
    assert "\npy -m venv .venv\n" in guide


# ----------------------------------------------------------------------------------------
# Apple's GPU (MPS), with PyTorch's checks replaced: this machine has no Mac


@pytest.fixture
def fake_mac(monkeypatch):
    """A Mac with Apple silicon, without CUDA, as PyTorch's checks see it. Returns the
    settings to change: its macOS version and whether torch has the loss scaler's MPS
    kernels."""
    mac = {"macos": (14, 4), "scaler_kernels": True}
    real_has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key

    def has_kernel(operator: str, key: str) -> bool:
        if key == "MPS":
            return mac["scaler_kernels"] and operator.startswith("aten::_amp_")
        return real_has_kernel(operator, key)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.backends.mps, "is_macos_or_newer", lambda major, minor: mac["macos"] >= (major, minor)
    )
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", has_kernel)
    return mac


MPS = torch.device("mps")


def test_auto_picks_apples_gpu_on_a_mac_in_one_process(fake_mac, monkeypatch):
    assert devices.pick_device("auto") == MPS
    assert devices.pick_device("mps") == MPS
    assert devices.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(devices, "world_size", lambda: 2)  # under torchrun: the CPU
    assert devices.pick_device("auto") == torch.device("cpu")
    with pytest.raises(devices.UsageError, match="--device mps trains in one process"):
        devices.pick_device("mps")


def test_auto_prefers_cuda_and_mps_is_refused_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert devices.pick_device("auto") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(devices.UsageError, match=r"Apple's GPU \(MPS\) is not available here"):
        devices.pick_device("mps")


def test_every_command_takes_device_mps_and_says_when_there_is_none(synthetic_root, tmp_path):
    parser = main.build_parser()
    for command in (["train"], ["test", "--model", "m.pt"], ["predict", "--model", "m.pt", "x"]):
        assert parser.parse_args([*command, "--device", "mps"]).device == "mps"
    if torch.backends.mps.is_available():
        return  # a Mac: the message below is for machines without Apple's GPU
    result = run_cli(*train_args(synthetic_root, tmp_path, "mps", 1), "--device", "mps")
    assert result.returncode == 2
    assert result.stderr.startswith("error: --device mps: Apple's GPU (MPS) is not available")
    assert not (tmp_path / "mps").exists()


def test_mps_trains_in_float32_unless_asked_and_amp_picks_what_it_supports(fake_mac):
    assert devices.precision(MPS, None, None) == (False, "float16")  # float32 by default
    assert devices.precision(MPS, True, None) == (True, "float16")
    assert devices.precision(MPS, True, "bfloat16") == (True, "bfloat16")
    assert devices.can_scale_loss(MPS)
    # A torch without the loss scaler's MPS kernels: no float16, bfloat16 instead.
    fake_mac["scaler_kernels"] = False
    assert not devices.can_scale_loss(MPS)
    assert devices.precision(MPS, True, None) == (True, "bfloat16")
    with pytest.raises(devices.UsageError) as refused:
        devices.precision(MPS, True, "float16")
    assert str(refused.value) == (
        "--amp with float16 on mps: float16 needs loss scaling, which this torch cannot do on "
        "Apple's GPU; use --amp-dtype bfloat16, or drop --amp"
    )
    # ... and macOS 13, without bfloat16 on the GPU: float32 only.
    fake_mac["macos"] = (13, 6)
    assert devices.precision(MPS, None, None) == (False, "float16")
    with pytest.raises(devices.UsageError, match="from macOS 14 on; drop --amp$"):
        devices.precision(MPS, True, "bfloat16")


def test_mps_without_autocast_refuses_amp(fake_mac, monkeypatch):
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    assert devices.precision(MPS, False, None) == (False, "float16")
    with pytest.raises(devices.UsageError, match=r"no mixed precision \(autocast\) on Apple"):
        devices.precision(MPS, True, None)


def test_cpu_and_cuda_precision_are_unchanged():
    assert devices.precision(torch.device("cpu"), None, None) == (False, "bfloat16")
    assert devices.precision(torch.device("cpu"), True, "float16") == (True, "float16")
    assert devices.precision(torch.device("cuda", 0), None, None) == (True, "float16")
    assert devices.precision(torch.device("cuda", 0), False, "bfloat16") == (False, "bfloat16")


def test_without_the_scalers_mps_kernels_training_runs_without_a_scaler(fake_mac):
    assert devices.loss_scaler(MPS, float16=False).is_enabled()
    fake_mac["scaler_kernels"] = False
    scaler = devices.loss_scaler(MPS, float16=False)
    assert not scaler.is_enabled()
    loss = torch.tensor(2.0)
    assert scaler.scale(loss) is loss  # the step runs as if there were no scaler


MPS_MISSING = (
    "The operator 'aten::upsample_bicubic2d.out' is not currently implemented for the MPS "
    "device. If you want this op to be added in priority during the prototype phase of this "
    "feature, please comment on https://github.com/pytorch/pytorch/issues/77764. As a "
    "temporary fix, you can set the environment variable `PYTORCH_ENABLE_MPS_FALLBACK=1` to "
    "use the CPU as a fallback for this op. WARNING: this will be slower than running "
    "natively on MPS."
)


def test_an_operation_missing_on_mps_ends_with_what_to_do(capsys):
    def command(args):
        raise NotImplementedError(MPS_MISSING)

    assert cli.run(command, argparse.Namespace(), ()) == 2
    assert capsys.readouterr().err == (
        "error: this torch cannot run aten::upsample_bicubic2d.out on Apple's GPU (MPS): run "
        "the command again with the environment variable PYTORCH_ENABLE_MPS_FALLBACK=1 (such "
        "operations then run on the CPU), or with --device cpu\n"
    )

    def unrelated(args):
        raise NotImplementedError("something else")

    with pytest.raises(NotImplementedError, match="something else"):
        cli.run(unrelated, argparse.Namespace(), ())
