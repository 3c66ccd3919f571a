"""The check before the session: `python progress.py --setup` (seglab/setup_check.py)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import torch
from conftest import ROOT
from torch.utils.flop_counter import FlopCounterMode

import main
import models
from seglab import setup_check


def test_progress_setup_prints_each_check_and_the_time_of_q13():
    result = subprocess.run(
        [sys.executable, "progress.py", "--setup", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Checking this machine for the lab (about 1 s)"
    python, libraries, device, png, tensorboard, q13, verdict = lines[1:]
    assert python.startswith(f"Python       {sys.version.split()[0]} (")
    assert libraries == f"torch        {torch.__version__}, torchvision " + (
        __import__("torchvision").__version__
    )
    assert device.startswith("device       cpu: ")  # this machine has no GPU
    assert png.startswith("PNG          decoding works (")
    assert tensorboard == "TensorBoard  events written and read back"
    assert re.fullmatch(
        r"Q13          training will take about (\d+ min )?\d+ s here \(10 epochs at \d+ "
        r"frames/s; measured in \d+ s\)",
        q13,
    ), q13
    assert verdict == "ready for the lab"


def test_a_missing_library_is_one_line_and_not_ready(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` fails
    assert setup_check.main(1) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == (
        "torch        FAILED: cannot import torchvision: install the requirements as "
        "docs/install.md says"
    )
    assert lines[-1] == "not ready: see docs/install.md"


def training_flops(network: torch.nn.Module) -> int:
    """Floating-point operations of a forward and backward pass on a 128 px image."""
    with FlopCounterMode(display=False) as counter:
        network(torch.randn(1, 3, 128, 128)).sum().backward()
    return counter.get_total_flops()


def test_the_stand_in_costs_what_q13s_unet_costs():
    unet = models.build_model(
        "unet", num_classes=14, num_blocks=setup_check.Q13_RUN.num_blocks,
        base_chan=setup_check.Q13_RUN.base_chan,
    )  # fmt: skip
    stand_in = setup_check.stand_in_network()
    assert training_flops(stand_in) == training_flops(unet)
    parameters = [sum(p.numel() for p in net.parameters()) for net in (stand_in, unet)]
    assert parameters[0] == parameters[1]


def console_command(text: str, start: str) -> list[str]:
    """The words of the first `$ START...` command of the console blocks of `text`, its
    continued lines joined."""
    match = re.search(rf"^\$ ({re.escape(start)}.*?)$(?<!\\)", text, re.MULTILINE | re.DOTALL)
    assert match, start
    return shlex.split(match.group(1).replace("\\\n", " "))


def test_q13_run_is_the_command_of_the_handout():
    handout = (ROOT / "LAB.md").read_text()
    q13 = handout[handout.index("### Q13.") :]
    command = console_command(q13, "python main.py train")
    args = main.build_parser().parse_args(command[2:])
    synthetic = console_command(handout, "python -m seglab.synthetic")
    images_per_area = int(synthetic[synthetic.index("--images-per-area") + 1])
    run = setup_check.Q13_RUN
    assert run.train_frames == len(args.areas) * images_per_area
    assert run.val_frames == len(args.val_areas) * images_per_area
    assert run.frame_size == int(synthetic[synthetic.index("--size") + 1])
    assert args.workers is None and run.workers == 2  # main.py's default
    got = (args.img_size, args.epochs, args.batch_size, args.num_blocks, args.base_chan)
    assert got == (run.img_size, run.epochs, run.batch_size, run.num_blocks, run.base_chan)


def test_the_estimate_adds_up_q13s_parts():
    parts = setup_check.Q13Parts(
        imports=3.0, workers=0.5, train_step=0.4, val_batch=0.1, epoch_extra=0.3
    )
    # 25 steps, 5 validation batches and half a batch of preview frames, each epoch.
    assert setup_check.estimate_q13(parts) == 3.0 + 2 * 0.5 + 10 * (25 * 0.4 + 5.5 * 0.1 + 0.3)
    assert setup_check.format_duration(44.6) == "45 s"
    assert setup_check.format_duration(125) == "2 min 5 s"
    assert setup_check.format_duration(4260) == "1 h 11 min"
