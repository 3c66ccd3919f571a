"""The job scripts of slurm/ under a real SLURM on this machine: slurm/local_cluster.sh
starts one from Debian's packages (installing them when they are absent), with two nodes;
the scripts, unchanged, train a tiny model on the CPU (TRAIN_FLAGS); the test stops them
in the middle of an epoch with the time-limit warning and with a preemption, and checks
that every training process saved and exited resumable, that the job went back to the
queue and finished, and that its weights are those of a run never stopped.

The daemons need root: elsewhere the test is skipped with the reason. `pytest -m slurm`
runs only it, `pytest -m "not slurm"` everything else (docs/slurm.md)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import ROOT

pytestmark = pytest.mark.slurm

SYNTHETIC = ["-m", "seglab.synthetic"]  # what python runs to write a synthetic data set
CLUSTER = ROOT / "slurm" / "local_cluster.sh"
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "munged")
# 64-pixel crops: steps slow enough (about 50 ms on a CPU core) that a signal sent a few
# batches into an epoch arrives long before its end.
TINY_MODEL = ["--img-size", "64", "--num-blocks", "2", "--base-chan", "8", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the reference runs and the jobs alike
TIMEOUT = 300  # seconds for any one thing the test waits for
# The states of a job not yet finished (REQUEUED, COMPLETING: between two starts).
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED"}

# A sitecustomize.py on the jobs' PYTHONPATH: every training process that torchrun starts
# (those have RANK set) appends its rank and exit status to $EXIT_LOG when it exits. A
# process killed before it exits writes nothing.
EXIT_RECORDER = """
import os
import sys

if "RANK" in os.environ and "EXIT_LOG" in os.environ:
    real_exit = sys.exit

    def recording_exit(status=None):
        with open(os.environ["EXIT_LOG"], "a") as log:
            log.write(f"{os.environ['RANK']} {status}\\n")
        real_exit(status)

    sys.exit = recording_exit
"""


def why_slurm_cannot_run() -> str | None:
    """None when SLURM's programs are here (installed now if need be), else why not."""
    if os.geteuid() != 0:
        return "slurmctld and slurmd must run as root, and this is not root"
    if all(shutil.which(program) for program in PROGRAMS):
        return None
    if shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install it"
    result = subprocess.run(
        ["bash", str(CLUSTER), "install"], capture_output=True, text=True, timeout=900
    )
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        return f"Debian's SLURM packages could not be installed: {last_line}"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """A two-node SLURM on this machine for the module's tests: the environment that
    sbatch, scontrol and scancel need. Stopped afterwards, its jobs cancelled."""
    reason = why_slurm_cannot_run()
    if reason is not None:
        pytest.skip(f"no SLURM here: {reason}")
    folder = tmp_path_factory.mktemp("slurm")
    try:
        started = subprocess.run(
            ["bash", str(CLUSTER), "start", str(folder), "2"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        logs = "".join(log.read_text()[-2000:] for log in sorted(folder.glob("*.log")))
        assert started.returncode == 0, started.stderr + logs
        yield {**ENV, "SLURM_CONF": str(folder / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(folder)], timeout=120)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """96 frames of area 1, 64 pixels square: a fifth of its rooms validate."""
    root = tmp_path_factory.mktemp("synthetic")
    subprocess.run(
        [sys.executable, *SYNTHETIC, "--out", str(root), "--areas", "1",
         "--images-per-area", "96", "--size", "64"],
        cwd=ROOT, check=True, capture_output=True, timeout=TIMEOUT,
    )  # fmt: skip
    return root


def tiny_run(data_root: Path, epochs: int, batch_size: int, workers: int) -> list[str]:
    """The training flags of a job and of its reference run (--logdir and --name apart).
    A check at every step: under torchrun, training stops at the first check after a
    signal, and the test wants it in the middle of the epoch."""
    return [
        "--datadir", str(data_root), "--areas", "1", "--epochs", str(epochs),
        "--batch-size", str(batch_size), "--workers", str(workers), "--log-every", "1",
        *TINY_MODEL,
    ]  # fmt: skip


@pytest.fixture
def start_reference(tmp_path):
    """Starts the same training never stopped, by torchrun on this machine without SLURM,
    to run while the job does; the function returned waits for it and gives its run
    folder. Still running when the test ends (it failed), it is stopped."""
    launches = []

    def start(flags: list[str], processes: int) -> Callable[[], Path]:
        folder = tmp_path / "reference"
        folder.mkdir()
        log = folder / "reference.log"
        with log.open("w") as output:
            launch = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(processes), "main.py", "train", *flags,
                 "--logdir", str(folder), "--name", "reference"],
                cwd=ROOT, env=ENV, stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
        launches.append(launch)

        def finished() -> Path:
            assert launch.wait(timeout=TIMEOUT) == 0, log.read_text()[-3000:]
            return folder / "reference"

        return finished

    yield start
    for launch in launches:
        if launch.poll() is None:
            launch.terminate()  # torchrun stops its processes
            launch.wait(timeout=60)


class Job:
    """One of the project's job scripts, submitted with a tiny CPU run in place of its
    training flags; its output (every start appends to it) and its processes' exits."""

    def __init__(self, script: str, slurm: dict, flags: list[str], folder: Path):
        self.output = folder / "job.out"
        self.exits = folder / "exits.txt"
        self.run_dir = folder / "runs" / "tryout"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sitecustomize.py").write_text(EXIT_RECORDER)
        self.env = {
            **slurm,
            "TRAIN_FLAGS": " ".join([*flags, "--logdir", str(folder / "runs")]),
            "NAME": "tryout",
            "PROCS_PER_NODE": "1",
            "PYTHON": sys.executable,
            "PYTHONPATH": str(folder),
            "EXIT_LOG": str(self.exits),
        }
        # The script's #SBATCH lines ask for GPUs and 32 CPUs: options override them.
        submitted = self.slurm_command(
            "sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1",
            f"--output={self.output}", str(ROOT / "slurm" / script),
        )  # fmt: skip
        self.id = submitted.split(";")[0]

    def slurm_command(self, *command: str) -> str:
        result = subprocess.run(
            command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
        return result.stdout.strip()

    def text(self) -> str:
        # Read while being written: the last character may be cut in the middle.
        return self.output.read_bytes().decode(errors="replace") if self.output.exists() else ""

    def state(self) -> dict[str, str]:
        fields = self.slurm_command("scontrol", "show", "job", "--oneliner", self.id).split()
        return dict(field.split("=", 1) for field in fields if "=" in field)

    def wait_for_batch(self, epoch: int, batches: int) -> None:
        """Until the progress bar of `epoch` shows `batches` done in this start."""
        bar = re.compile(rf"epoch {epoch}/\d+:[^\r\n|]*\|[^|]*\| *(\d+)/")
        deadline = time.monotonic() + TIMEOUT
        while max(map(int, bar.findall(self.text())), default=0) < batches:
            state = self.state()["JobState"]
            assert state in ACTIVE, f"job {state}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"epoch {epoch} not reached:\n{self.text()}"
            time.sleep(0.1)

    def wait_until_finished(self) -> dict[str, str]:
        deadline = time.monotonic() + TIMEOUT
        while (state := self.state())["JobState"] in ACTIVE:
            assert time.monotonic() < deadline, f"job still {state['JobState']}:\n{self.text()}"
            time.sleep(0.2)
        return state

    def time_limit_warning(self) -> None:
        """What `#SBATCH --signal=B:USR1@300` sends five minutes before the time limit:
        SIGUSR1 to the batch script alone."""
        self.slurm_command("scancel", "--batch", "--signal=USR1", self.id)

    def preempt(self) -> None:
        """What a preemption with PreemptMode=REQUEUE does: SIGTERM to every process of
        the job (SIGKILL after KillWait), and the job back in the queue."""
        self.slurm_command("scontrol", "requeue", self.id)

    def exit_statuses(self) -> list[str]:
        return self.exits.read_text().split("\n")[:-1] if self.exits.exists() else []


def training_frames(text: str) -> int:
    found = re.search(r"(\d+) training frames", text)
    assert found, text
    return int(found[1])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stops_and_resumes(text: str, run_dir: Path) -> tuple[list[tuple[int, int]], list[str]]:
    """The (epoch, batch) of each resumable stop, and the resuming lines."""
    stops = re.findall(r"stopped \(received SIGTERM\) at epoch (\d+), batch (\d+): resumable", text)
    resumes = re.findall(rf"resuming {re.escape(str(run_dir))} at epoch \d+, batch \d+", text)
    return [(int(epoch), int(batch)) for epoch, batch in stops], resumes


def assert_same_run(run_dir: Path, reference: Path, epochs: int) -> None:
    """The finished run equals the reference: weights, steps, each epoch's metrics once."""
    finished = torch.load(run_dir / "last.pt", weights_only=True)
    expected = torch.load(reference / "last.pt", weights_only=True)
    assert finished["epoch"] == expected["epoch"] == epochs and "position" not in finished
    assert finished["step"] == expected["step"]
    for key, value in expected["model_state"].items():
        assert torch.equal(finished["model_state"][key], value), key
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    expected_lines = [json.loads(line) for line in (reference / "metrics.jsonl").open()]
    assert [line["epoch"] for line in lines] == list(range(1, epochs + 1))
    for line, expected_line in zip(lines, expected_lines, strict=True):
        assert line["val"]["miou"] == expected_line["val"]["miou"]


def test_one_node_job_stops_at_the_time_limit_and_when_preempted_then_finishes_exactly(
    slurm, tiny_data, start_reference, tmp_path
):
    """slurm/one_node.sbatch, one training process with a loader worker (SLURM signals
    every process of the job: the worker must not die of it), three epochs."""
    flags = tiny_run(tiny_data, epochs=3, batch_size=2, workers=1)
    wait_for_reference = start_reference(flags, processes=1)  # meanwhile, on the idle core
    job = Job("one_node.sbatch", slurm, flags, tmp_path / "job")
    job.wait_for_batch(epoch=2, batches=2)
    job.time_limit_warning()  # the script stops training and requeues the job
    job.wait_for_batch(epoch=3, batches=2)  # in the job's second start
    job.preempt()
    state = job.wait_until_finished()

    text = job.text()
    assert (state["JobState"], state["Restarts"]) == ("COMPLETED", "2"), text
    assert "time limit near: training saves where it is and stops" in text
    assert "SIGTERM (preempted or cancelled)" in text
    stops, resumes = stops_and_resumes(text, job.run_dir)
    assert [epoch for epoch, _ in stops] == [2, 3], text
    steps_per_epoch = training_frames(text) // 2
    assert all(0 < batch < steps_per_epoch for _, batch in stops), stops
    assert resumes == [
        f"resuming {job.run_dir} at epoch {epoch}, batch {batch + 1}" for epoch, batch in stops
    ]
    # Killed, a process would have recorded nothing: each start's process exited by itself.
    assert job.exit_statuses() == ["0 75", "0 75", "0 0"]
    assert_same_run(job.run_dir, wait_for_reference(), epochs=3)


def test_two_node_job_stops_at_the_time_limit_then_finishes_exactly(
    slurm, tiny_data, start_reference, tmp_path
):
    """slurm/several_nodes.sbatch on two nodes, one training process on each (gloo),
    joined by torchrun's rendezvous on the first; two epochs."""
    flags = tiny_run(tiny_data, epochs=2, batch_size=1, workers=0)
    wait_for_reference = start_reference(flags, processes=2)
    rendezvous = {"RDZV_PORT": str(free_port())}  # both "nodes" are this machine
    job = Job("several_nodes.sbatch", {**slurm, **rendezvous}, flags, tmp_path / "job")
    job.wait_for_batch(epoch=1, batches=2)
    job.time_limit_warning()
    state = job.wait_until_finished()

    text = job.text()
    assert (state["JobState"], state["Restarts"]) == ("COMPLETED", "1"), text
    assert state["NodeList"] == "n[1-2]"
    stops, resumes = stops_and_resumes(text, job.run_dir)
    steps_per_epoch = training_frames(text) // 2  # each process's batches
    assert [epoch for epoch, _ in stops] == [1] and 0 < stops[0][1] < steps_per_epoch, text
    assert resumes == [f"resuming {job.run_dir} at epoch 1, batch {stops[0][1] + 1}"]
    exits = job.exit_statuses()
    assert sorted(exits[:2]) == ["0 75", "1 75"] and sorted(exits[2:]) == ["0 0", "1 0"]
    assert_same_run(job.run_dir, wait_for_reference(), epochs=2)
