"""Where the lab stands: one line per question, from its self-checks.

    python progress.py                          # Q1 done, Q2 not started, Q5 failing: ...
    python progress.py --json progress.json     # the same as JSON, for the teacher
    python progress.py --setup                  # before the session: is this machine ready?

Runs every self-check of tests/test_lab.py once (about half a minute on a laptop) and
reports each question as:

- done: all its checks pass (and for Q3 and Q13, the commands to run, your own outputs are
  there: sample.png and hist.json; a run under runs/ with best.pt and TensorBoard events);
  an optional part left as a stub (Q14's ONNX function) is named in its message;
- to run: the checks of Q3 or Q13 pass, your outputs are missing;
- not started: its stub is still there;
- waiting: it needs an earlier question first;
- failing, with the first message of its checks.

The exit status is 0 when every question is done, 1 when one is not, 2 when the checks
could not run.

With --json, the file also records when the checks ran and which questions came solved
with the bundle (the file GIVEN of the bundle, written by the teacher's make_lab.py), for
the teacher's class view.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass
from pathlib import Path

from seglab import cli, setup_check

LAB_FOLDER = Path(__file__).resolve().parent
CHECK_NAME = re.compile(r"^test_q(?P<number>\d\d)_")
OPTIONAL_CHECK = "_optional_"  # in the name of a check of an optional part of a question
# The questions given solved with the bundle, one "Qn" a line (written by make_lab.py).
GIVEN_FILE = "GIVEN"
# The whole run of the checks; each check has its own, shorter deadline (tests/test_lab.py).
RUN_DEADLINE_S = 20 * 60


@dataclass
class Status:
    """The state of one question: "done", "not started", "waiting" or "failing"."""

    question: int
    status: str
    message: str = ""

    def line(self) -> str:
        text = f"Q{self.question:<3} {self.status}"
        return f"{text}: {self.message}" if self.message else text


def check_results(junit_file: Path) -> dict[str, tuple[bool, str]]:
    """{check name: (passed, first line of its failure message)} of a pytest junit file."""
    results = {}
    for case in ElementTree.parse(junit_file).getroot().iter("testcase"):
        passed, message = True, ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                passed = False
                text = (child.get("message") or child.text or child.tag).strip()
                # pytest writes a failed check's message as "Failed: MESSAGE".
                message = (text.splitlines() or [child.tag])[0].removeprefix("Failed: ")
        results[case.get("name", "")] = (passed, message)
    return results


def missing_outputs(question: int, folder: Path) -> str:
    """For the questions that are commands to run (Q3, Q13): what of the student's own
    outputs is not in the lab folder yet, as a sentence; "" when all is there."""
    if question == 3:
        missing = [name for name in ("sample.png", "hist.json") if not (folder / name).is_file()]
        if missing:
            return (
                f"{' and '.join(missing)} not in the lab folder yet: run the commands of Q3 "
                "in LAB.md (their checks pass)"
            )
    if question == 13:
        runs = [best.parent for best in sorted(folder.glob("runs/*/best.pt"))]
        if not any(any(run.glob("events.out.tfevents.*")) for run in runs):
            return (
                "no run of yours with best.pt and TensorBoard events under runs/ yet: run "
                "the training of Q13 in LAB.md (its checks pass)"
            )
    return ""


def with_own_outputs(statuses: list[Status], folder: Path) -> list[Status]:
    """`statuses` where Q3 and Q13 count as done only once the student's own outputs exist."""
    checked = []
    for status in statuses:
        missing = missing_outputs(status.question, folder)
        if status.status == "done" and missing:
            status = Status(status.question, "to run", missing)
        checked.append(status)
    return checked


def question_statuses(results: dict[str, tuple[bool, str]]) -> list[Status]:
    """One Status per question that has checks in `results`, in question order."""
    by_question: dict[int, dict[str, tuple[bool, str]]] = {}
    for name, result in results.items():
        match = CHECK_NAME.match(name)
        if match:
            by_question.setdefault(int(match["number"]), {})[name] = result
    return [question_status(q, checks) for q, checks in sorted(by_question.items())]


def question_status(question: int, checks: dict[str, tuple[bool, str]]) -> Status:
    """The Status of `question` from {check name: (passed, message)} of its checks.

    A check named test_qNN_optional_... belongs to an optional part of the question (Q14's
    ONNX function): while that part is a stub, the question is done when the rest is.
    """
    stub = f"Q{question} is not implemented yet"
    optional_left = {
        name
        for name, (passed, message) in checks.items()
        if OPTIONAL_CHECK in name and not passed and stub in message
    }
    messages = [
        message
        for name, (passed, message) in checks.items()
        if not passed and name not in optional_left
    ]
    needs = [m for m in messages if re.match(rf"Q{question} needs Q\d+ first", m)]
    if not messages:
        if optional_left and len(optional_left) < len(checks):
            left = checks[min(optional_left)][1]
            return Status(question, "done", f"its optional part is not started: {left}")
        if not optional_left:
            return Status(question, "done")
        return Status(question, "not started")
    if any(stub in m for m in messages):
        return Status(question, "not started")
    if len(needs) == len(messages):
        waiting_for = sorted({re.match(r"Q\d+ needs (Q\d+)", m)[1] for m in needs})
        return Status(question, f"waiting for {', '.join(waiting_for)}")
    # The whole message: its end is the hint that names the likely mistake.
    return Status(question, "failing", next(m for m in messages if m not in needs))


def run_self_checks(folder: Path) -> dict[str, tuple[bool, str]]:
    """Run tests/test_lab.py of `folder` once; the result of every check.

    RuntimeError, in one line, when the checks did not run, did not finish, or stopped
    early (pytest's exit status 2: an answer that raises KeyboardInterrupt, say).
    """
    with tempfile.TemporaryDirectory() as scratch:
        junit_file = Path(scratch) / "checks.xml"
        command = [sys.executable, "-m", "pytest", "tests/test_lab.py", "-q"]
        command += ["-p", "no:cacheprovider", f"--junitxml={junit_file}"]
        try:
            completed = subprocess.run(
                command,
                cwd=folder,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                timeout=RUN_DEADLINE_S,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"the self-checks did not finish in {RUN_DEADLINE_S // 60} minutes"
            ) from None
        lines = (completed.stdout + completed.stderr).strip().splitlines()
        last_line = lines[-1] if lines else "no output"
        if not junit_file.is_file():
            raise RuntimeError(f"the self-checks did not run: {last_line}")
        results = check_results(junit_file)
        if completed.returncode not in (0, 1) or not results:
            raise RuntimeError(
                f"the self-checks stopped before the end ({last_line}); run "
                "`python -m pytest tests/test_lab.py` to see where"
            )
        return results


def check_json_path(path: Path) -> None:
    """RuntimeError, in one line, unless `path` can be written: checked before the checks
    run, so that a wrong --json fails at once, not after them."""
    if path.is_dir():
        raise RuntimeError(f"--json {path} is a folder; give a file name, e.g. {path / 'me.json'}")
    if not path.parent.is_dir():
        raise RuntimeError(f"--json {path}: the folder {path.parent} does not exist")
    existed = path.exists()
    try:
        with path.open("a"):
            pass
    except OSError as error:
        raise RuntimeError(f"--json {path} cannot be written: {error.strerror or error}") from None
    if not existed:
        path.unlink()


def given_questions(folder: Path) -> list[int]:
    """The questions that came solved with the bundle (its GIVEN file), in order."""
    given_file = folder / GIVEN_FILE
    if not given_file.is_file():
        return []
    return sorted(int(n) for n in re.findall(r"^Q(\d+)\s*$", given_file.read_text(), re.M))


def json_report(name: str, statuses: list[Status], folder: Path) -> dict:
    """What --json writes: who, when, which questions were given, and each status."""
    return {
        "name": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "given": given_questions(folder),
        "done": sum(status.status == "done" for status in statuses),
        "questions": [asdict(status) for status in statuses],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the statuses to FILE")
    parser.add_argument("--name", default="", help="your name, written into the JSON file")
    parser.add_argument(
        "--setup",
        nargs="?",
        type=float,
        const=setup_check.DEFAULT_SECONDS,
        metavar="SECONDS",
        help="instead, check this machine before the session: versions, device, PNG, "
        "TensorBoard, and Q13's training time, measured for about SECONDS (default 20)",
    )
    args = parser.parse_args(argv)
    if args.setup is not None:
        return setup_check.main(args.setup)
    return cli.run(report_progress, args, (RuntimeError,))


def report_progress(args: argparse.Namespace) -> int:
    """Run the self-checks, print one line per question (and write --json); exit status 0
    when every question is done."""
    if args.json:
        check_json_path(Path(args.json))
    statuses = with_own_outputs(question_statuses(run_self_checks(LAB_FOLDER)), LAB_FOLDER)
    for status in statuses:
        print(status.line())
    done = sum(status.status == "done" for status in statuses)
    print(f"{done} of {len(statuses)} questions done")
    if args.json:
        report = json_report(args.name, statuses, LAB_FOLDER)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if done == len(statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
