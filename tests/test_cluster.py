"""Cluster scale on a CPU: stop requests in the middle of an epoch (SIGTERM, SIGUSR1),
the relaunched command continuing (--resume auto), two processes and two "nodes" with
gloo, one process failing, --compile, float16 with loss scaling, the host waiting for the
device only at checks, the job scripts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_main import run_cli, train_args

import losses
import main
from seglab import checkpoints, preemption

PYTHON_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# main.py train with one fault at the N-th loss of one process, set by the environment:
# FAULT=signal:TERM|signal:USR1 (the process signals itself), stall (it waits 5 s after
# creating FAULT_MARKER, for the test to signal torchrun), error (a DataError).
FAULTY_TRAINER = """
import os, signal, sys, time
from pathlib import Path

sys.path.insert(0, os.getcwd())
import main
from seglab import bench
from seglab import preemption

fault, at = os.environ["FAULT"], int(os.environ["FAULT_AT"])
on_this_rank = os.environ.get("RANK", "0") == os.environ.get("FAULT_RANK", "0")
real_build_loss = main.losses.build_loss


def build_loss(*args, **kwargs):
    loss_fn = real_build_loss(*args, **kwargs)
    calls = 0

    def faulty(logits, targets):
        nonlocal calls
        calls += 1
        if calls == at and on_this_rank:
            if fault.startswith("signal:"):
                os.kill(os.getpid(), getattr(signal, "SIG" + fault.split(":")[1]))
            elif fault == "stall":
                Path(os.environ["FAULT_MARKER"]).touch()
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    time.sleep(0.05)
            elif fault == "error":
                raise main.data.DataError("frame 7: injected failure")
        return loss_fn(logits, targets)

    return faulty


main.losses.build_loss = build_loss
sys.exit(main.main(sys.argv[1:]))
"""


def cluster_args(root: Path, logdir: Path, name: str, *extra: str) -> list[str]:
    """Two epochs of 3 steps in one process (6 in two), with a loader worker."""
    return train_args(root, logdir, name, 2, "--workers", "1", *extra)


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    resumed = torch.load(run_dir / "last.pt", weights_only=True)
    expected = torch.load(reference / "last.pt", weights_only=True)
    assert resumed["epoch"] == expected["epoch"] == 2 and "position" not in resumed
    assert resumed["step"] == expected["step"]
    for key, value in expected["model_state"].items():
        assert torch.equal(resumed["model_state"][key], value), key
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    expected_lines = [json.loads(line) for line in (reference / "metrics.jsonl").open()]
    assert [line["epoch"] for line in lines] == [1, 2]
    for line, expected_line in zip(lines, expected_lines, strict=True):
        assert line["val"]["miou"] == expected_line["val"]["miou"]
        assert line["train_loss"] == pytest.approx(expected_line["train_loss"], rel=1e-6)


def run_faulty(args: list[str], tmp_path: Path, launcher: list[str], **fault) -> subprocess.Popen:
    script = tmp_path / "faulty_trainer.py"
    script.write_text(FAULTY_TRAINER)
    env = {**PYTHON_ENV, **{key.upper(): str(value) for key, value in fault.items()}}
    return subprocess.Popen(
        [*launcher, str(script), *args], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference_run(synthetic_root, tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("reference")
    assert main.main(cluster_args(synthetic_root, logdir, "reference")) == 0
    return logdir / "reference"


# ----------------------------------------------------------------------------------------
# One process: a signal mid-epoch, then the same command again


def signal_at_step(monkeypatch, step: int, number: int) -> None:
    """The training process receives signal `number` during its `step`-th step."""
    real_build_loss = losses.build_loss

    def build_loss(*args, **kwargs):
        loss_fn = real_build_loss(*args, **kwargs)
        calls = 0

        def loss_then_signal(logits, targets):
            nonlocal calls
            calls += 1
            if calls == step:
                os.kill(os.getpid(), number)
            return loss_fn(logits, targets)

        return loss_then_signal

    monkeypatch.setattr(losses, "build_loss", build_loss)


@pytest.mark.parametrize(
    ("number", "step", "workers_after"),
    [(signal.SIGTERM, 2, "0"), (signal.SIGUSR1, 5, "2")],
    ids=["sigterm-epoch-1", "sigusr1-epoch-2"],
)
def test_stop_request_mid_epoch_then_the_same_command_finishes_the_run_exactly(
    synthetic_root, reference_run, tmp_path, monkeypatch, capsys, number, step, workers_after
):
    command = cluster_args(synthetic_root, tmp_path, "stopped", "--resume", "auto")
    signal_at_step(monkeypatch, step, number)
    assert main.main(command) == preemption.EXIT_RESUMABLE
    out = capsys.readouterr().out
    assert f"stopped (received {signal.Signals(number).name})" in out and "resumable" in out
    saved = torch.load(tmp_path / "stopped/last.pt", weights_only=True)
    assert saved["step"] == step and saved["epoch"] == (step - 1) // 3
    assert saved["position"]["batches_done"] == (step - 1) % 3 + 1
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers put back

    # The job relaunched: the same command (another worker count changes nothing).
    assert main.main([*command, "--workers", workers_after]) == 0
    assert_same_weights(tmp_path / "stopped", reference_run)
    assert main.main(command) == 0
    assert "the run is finished" in capsys.readouterr().out


def test_checkpoint_minutes_saves_mid_epoch_and_keeps_the_run_exact(
    synthetic_root, reference_run, tmp_path, monkeypatch
):
    saved = []
    real_save = checkpoints.save_checkpoint

    def recording_save(state, path):
        saved.append((path.name, state["step"], "position" in state))
        real_save(state, path)

    monkeypatch.setattr(checkpoints, "save_checkpoint", recording_save)
    # A tiny interval: a checkpoint after every step.
    args = cluster_args(synthetic_root, tmp_path, "timed", "--checkpoint-minutes", "1e-9")
    assert main.main(args) == 0
    mid_epoch = [(name, step) for name, step, position in saved if position]
    assert mid_epoch == [("last.pt", step) for step in range(1, 7)]
    assert_same_weights(tmp_path / "timed", reference_run)


# ----------------------------------------------------------------------------------------
# Several processes and nodes (gloo)


@pytest.fixture(scope="module")
def two_node_run(synthetic_root, tmp_path_factory) -> Path:
    """Two epochs on two "nodes" of one process each: two torchrun invocations joined by
    the c10d rendezvous on localhost."""
    logdir = tmp_path_factory.mktemp("nodes")
    port = 29400 + os.getpid() % 500
    launches = [
        subprocess.Popen(
            [
                *TORCHRUN,
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"localhost:{port}",
                "--rdzv-id",
                "two-nodes",
                "--rdzv-conf",
                f"is_host={str(is_host).lower()}",
                str(ROOT / "main.py"),
                *cluster_args(synthetic_root, logdir, "nodes", "--batch-size", "2"),
            ],
            cwd=ROOT,
            env=PYTHON_ENV,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for is_host in (True, False)
    ]
    for launch in launches:
        out, err = launch.communicate(timeout=600)
        assert launch.returncode == 0, err[-3000:]
    return logdir / "nodes"


def test_two_nodes_validate_exactly_like_one_process(two_node_run, synthetic_root, tmp_path):
    last = torch.load(two_node_run / "last.pt", weights_only=True)
    assert last["step"] == 2 * 3  # 12 frames, 2 processes of batch 2: 3 steps per epoch
    validated = [json.loads(line) for line in (two_node_run / "metrics.jsonl").open()][-1]
    result = run_cli(
        "test", "--model", str(two_node_run / "last.pt"), "--datadir", str(synthetic_root),
        "--areas", "5a", "--at-train-size", "--workers", "0", "--device", "cpu",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    tested = json.loads((tmp_path / "metrics.json").read_text())
    assert tested["miou"] == validated["val"]["miou"]
    assert tested["iou"] == validated["val"]["iou"]


def test_two_processes_stopped_mid_epoch_resume_exactly(two_node_run, synthetic_root, tmp_path):
    """SIGTERM to torchrun (what SLURM does) while rank 0 is in its second step: every
    process stops at the same step, rank 0 saves, both exit resumable; the same command
    then finishes the run with the weights of the run never stopped."""
    command = [
        *cluster_args(synthetic_root, tmp_path, "nodes", "--batch-size", "2"),
        "--resume", "auto", "--log-every", "1",
    ]  # fmt: skip
    launcher = [*TORCHRUN, "--standalone", "--nproc-per-node", "2"]
    marker = tmp_path / "stalled"
    launch = run_faulty(command, tmp_path, launcher, fault="stall", fault_at=2, fault_marker=marker)
    deadline = time.monotonic() + 300
    while not marker.exists() and launch.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    launch.send_signal(signal.SIGTERM)
    out, err = launch.communicate(timeout=300)
    assert "stopped (received SIGTERM) at epoch 1, batch 2: resumable" in out, err[-3000:]
    saved = torch.load(tmp_path / "nodes/last.pt", weights_only=True)
    assert saved["step"] == 2 and saved["position"]["batches_done"] == 2

    result = subprocess.run(
        [*launcher, str(ROOT / "main.py"), *command],
        cwd=ROOT, env=PYTHON_ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(tmp_path / "nodes", two_node_run)


def test_one_process_failing_ends_every_process_with_one_line(synthetic_root, tmp_path):
    launcher = [*TORCHRUN, "--standalone", "--nproc-per-node", "2"]
    start = time.monotonic()
    launch = run_faulty(
        cluster_args(synthetic_root, tmp_path, "failing", "--batch-size", "2"), tmp_path,
        launcher, fault="error", fault_at=2, fault_rank=1,
    )  # fmt: skip
    out, err = launch.communicate(timeout=300)
    assert launch.returncode != 0
    assert time.monotonic() - start < 120, "the other process waited for a timeout"
    assert err.count("error: frame 7: injected failure") == 1
    assert err.count("error: process 0 stopped: another process ended") == 1
    assert "[rank0]" not in err and "[rank1]" not in err, "a process printed a traceback"


def test_sync_bn_on_cpu_processes_is_refused_by_every_process(synthetic_root, tmp_path):
    result = subprocess.run(
        [*TORCHRUN, "--standalone", "--nproc-per-node", "2", str(ROOT / "main.py"),
         *cluster_args(synthetic_root, tmp_path, "syncbn", "--batch-size", "2", "--sync-bn")],
        cwd=ROOT, env=PYTHON_ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.count("error: --sync-bn needs GPUs") == 2
    assert "[rank" not in result.stderr


# ----------------------------------------------------------------------------------------
# The training step


def test_compiled_training_matches_eager_and_saves_plain_weights(
    synthetic_root, tmp_path, monkeypatch
):
    """--compile through torch.compile's whole front end (graph capture, the backward by
    AOTAutograd); the backend is aot_eager, which runs the captured graphs without
    generating code: inductor's code generation takes minutes on 2 cores (bench.py times
    it)."""
    one_epoch = ["--epochs", "1", "--subset", "4", "--log-every", "1", "--workers", "0"]
    assert main.main([*train_args(synthetic_root, tmp_path, "eager"), *one_epoch]) == 0
    compiled_models = []
    real_compile = torch.compile

    def compile_without_codegen(model, **kwargs):
        compiled_models.append(model)
        return real_compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_without_codegen)
    compiled = [*train_args(synthetic_root, tmp_path, "compiled"), *one_epoch, "--compile"]
    assert main.main(compiled) == 0
    assert len(compiled_models) == 1
    eager = torch.load(tmp_path / "eager/last.pt", weights_only=True)["model_state"]
    state = torch.load(tmp_path / "compiled/last.pt", weights_only=True)["model_state"]
    assert state.keys() == eager.keys()  # no "_orig_mod." prefixes
    for key, value in eager.items():
        torch.testing.assert_close(state[key], value, rtol=1e-3, atol=1e-4)


def count_host_waits(monkeypatch) -> list[tuple[str, str]]:
    """Record every call that makes the host wait for a tensor's value on the device, with
    the function calling it; the sampler's and the DataLoader's own calls are left out:
    they read tensors that never leave the CPU."""
    calls: list[tuple[str, str]] = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_code
            on_cpu_only = "torch/utils/data" in caller.co_filename or caller.co_qualname in (
                "ResumableSampler.__iter__",
            )
            if not on_cpu_only:
                calls.append((_name, caller.co_qualname))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_the_step_waits_for_the_device_only_every_log_every_steps(
    synthetic_root, tmp_path, monkeypatch
):
    waits: list[list[tuple[str, str]]] = []
    real_train_one_epoch = main.train_one_epoch

    def counting_train_one_epoch(*args, **kwargs):
        with monkeypatch.context() as patch:
            calls = count_host_waits(patch)
            result = real_train_one_epoch(*args, **kwargs)
        waits.append(calls)
        return result

    monkeypatch.setattr(main, "train_one_epoch", counting_train_one_epoch)
    args = train_args(synthetic_root, tmp_path, "syncs", 1, "--workers", "1")  # loads apart
    # 12 frames in batches of 2: 6 steps, checked at step 4 and at the end of the epoch.
    assert main.main([*args, "--batch-size", "2", "--log-every", "4"]) == 0
    assert waits == [[("tolist", "TrainingHealth.check")] * 2]


def test_float16_with_loss_scaling_skips_a_non_finite_step(
    synthetic_root, tmp_path, monkeypatch, capsys
):
    """The CUDA recipe (float16 autocast, GradScaler) run on the CPU, with one NaN step:
    the scaler skips it on the device and halves its scale."""
    from test_reliability import make_training_outputs_nan

    make_training_outputs_nan(monkeypatch, {1})
    args = train_args(synthetic_root, tmp_path, "fp16", 1, "--amp", "--amp-dtype", "float16")
    assert main.main(args) == 0
    assert "1 step(s) skipped for non-finite gradients" in capsys.readouterr().out
    checkpoint = torch.load(tmp_path / "fp16/last.pt", weights_only=True)
    assert checkpoint["args"]["amp_dtype"] == "float16"
    assert checkpoint["scaler_state"]["scale"] == 2.0**16 / 2  # backed off once
    adam_steps = {int(s["step"]) for s in checkpoint["optimizer_state"]["state"].values()}
    assert adam_steps == {3 - 1} and checkpoint["step"] == 3


# ----------------------------------------------------------------------------------------
# SLURM


@pytest.mark.parametrize("script", sorted((ROOT / "slurm").glob("*.sbatch")), ids=str)
def test_slurm_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    assert "--resume auto" in text and "#SBATCH --requeue" in text and "--signal=" in text


def test_there_are_slurm_scripts():
    names = {path.name for path in (ROOT / "slurm").glob("*.sbatch")}
    assert names == {"one_node.sbatch", "several_nodes.sbatch"}
