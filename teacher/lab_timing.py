"""The machine time of the lab: every command of its core, timed in a student bundle with
every answer given (`python teacher/make_lab.py --time`).

The commands are those of LAB.md, in its order, run one after the other in a temporary
folder with the interpreter running this script; the table printed at the end (Markdown) is
the source of the times in LAB.md's time plan. Run it on an idle machine: anything else
running slows every row.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

DATA = "data/synthetic"
RUN = "runs/unet-small/best.pt"
# (part of LAB.md, command). "CHECK n" is the self-check of question n.
CORE_COMMANDS: list[tuple[str, str]] = [
    ("Setup", f"-m seglab.synthetic --out {DATA} --images-per-area 40 --size 160"),
    ("Data exploration", "CHECK 1"),
    ("Data exploration", "CHECK 2"),
    (
        "Data exploration",
        f"-m seglab.explore show --datadir {DATA} --areas 3 --index 0 --out sample.png",
    ),
    (
        "Data exploration",
        f"-m seglab.explore histogram --datadir {DATA} --areas 1 2 --out hist.json",
    ),
    ("Data exploration", "CHECK 3"),
    ("Data pipeline and augmentation", "CHECK 4"),
    ("The UNet", "CHECK 5"),
    ("The UNet", "CHECK 6"),
    ("The UNet", "CHECK 7"),
    ("The UNet", "CHECK 8"),
    ("The UNet", "models.py"),
    ("The UNet", "models.py --num-blocks 3 --base-chan 16 --img-size 128"),
    ("Evaluation metrics", "CHECK 10"),
    ("Evaluation metrics", "CHECK 11"),
    (
        "Training on a small subset",
        f"main.py train --datadir {DATA} --areas 1 2 3 4 6 --val-areas 5a --model unet "
        "--num-blocks 3 --base-chan 16 --img-size 128 --epochs 10 --batch-size 8 --lr 3e-3 "
        "--warmup-steps 50 --name unet-small",
    ),
    ("Training on a small subset", "CHECK 13"),
    ("Inference", f"main.py test --model {RUN} --datadir {DATA} --areas 5b"),
    ("Inference", f"main.py predict --model {RUN} PHOTOS --out predictions"),
    ("Inference", "CHECK 14"),
]
# Optional parts and homework, timed too, after the core.
OPTIONAL_COMMANDS: list[tuple[str, str]] = [
    ("Q9 (optional)", "CHECK 9"),
    ("Q12 (homework)", "CHECK 12"),
    ("Q14, ONNX (optional)", f"main.py export --model {RUN} --out model.onnx"),
    ("Q14, ONNX (optional)", "main.py predict --model model.onnx PHOTOS --out predictions-onnx"),
    ("progress", "progress.py"),
]


def command_line(command: str, bundle: Path) -> list[str]:
    """The argv of a command of the table, run with this interpreter inside `bundle`."""
    if command.startswith("CHECK "):
        question = int(command.split()[1])
        return [sys.executable, "-m", "pytest", "tests/test_lab.py", "-q", "-p",
                "no:cacheprovider", "-k", f"q{question:02d}"]  # fmt: skip
    photos = sorted((bundle / DATA / "area_5b" / "data" / "rgb").glob("*.png"))[:3]
    words = []
    for word in command.split():
        words += [str(photo) for photo in photos] if word == "PHOTOS" else [word]
    return [sys.executable, *words]


def shown(command: str) -> str:
    if command.startswith("CHECK "):
        return f"python -m pytest tests/test_lab.py -k q{int(command.split()[1]):02d}"
    return f"python {command.replace('PHOTOS', 'three 160 px frames')}"


def time_commands(commands: list[tuple[str, str]], bundle: Path) -> list[tuple[str, str, float]]:
    """Run each command in `bundle`; (part, command, seconds). Stops at the first failure."""
    rows = []
    environment = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONWARNINGS": "ignore"}
    for part, command in commands:
        start = time.perf_counter()
        result = subprocess.run(
            command_line(command, bundle), cwd=bundle, capture_output=True, text=True,
            env=environment,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip().splitlines()[-5:]
            raise RuntimeError(f"{shown(command)} failed:\n" + "\n".join(output))
        print(f"{seconds:8.1f} s  {shown(command)}", flush=True)
        rows.append((part, shown(command), seconds))
    return rows


def table(rows: list[tuple[str, str, float]]) -> str:
    lines = ["| part | command | wall time |", "| --- | --- | ---: |"]
    lines += [f"| {part} | `{command}` | {seconds:.0f} s |" for part, command, seconds in rows]
    return "\n".join(lines)


def main(bundle: Path) -> int:
    """Time the commands in `bundle`, a student bundle with every answer given (written by
    make_lab.py), and print the two tables."""
    load = os.getloadavg()[0]
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}, load average {load:.1f}"
    )
    if load > 0.5:
        print("warning: the machine is busy; the times below include waiting for it")
    try:
        core = time_commands(CORE_COMMANDS, bundle)
        optional = time_commands(OPTIONAL_COMMANDS, bundle)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\nCore of the lab:\n")
    print(table(core))
    print(f"\nmachine time of the core: {sum(row[2] for row in core) / 60:.1f} min")
    print("\nOptional parts and homework:\n")
    print(table(optional))
    return 0
