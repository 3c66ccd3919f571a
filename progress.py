"""Where the lab stands: one line per question, from its self-checks.

    python progress.py                          # Q1 done, Q2 not started, Q5 failing: ...
    python progress.py --json progress.json     # the same as JSON, for the teacher
    python progress.py --setup                  # before the session: is this machine ready?

Runs every self-check of tests/test_lab.py once (about half a minute on a laptop) and
reports each question as done (all its checks pass), not started (its stub is still
there), waiting (it needs an earlier question first) or failing, with the first message
of its checks. The exit status is 0 when every question is done.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass
from pathlib import Path

import setup_check

LAB_FOLDER = Path(__file__).resolve().parent
CHECK_NAME = re.compile(r"^test_q(?P<number>\d\d)_")


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


def question_statuses(results: dict[str, tuple[bool, str]]) -> list[Status]:
    """One Status per question that has checks in `results`, in question order."""
    by_question: dict[int, list[tuple[bool, str]]] = {}
    for name, result in results.items():
        match = CHECK_NAME.match(name)
        if match:
            by_question.setdefault(int(match["number"]), []).append(result)
    statuses = []
    for question, checks in sorted(by_question.items()):
        messages = [message for passed, message in checks if not passed]
        needs = [m for m in messages if re.match(rf"Q{question} needs Q\d+ first", m)]
        if not messages:
            statuses.append(Status(question, "done"))
        elif any(f"Q{question} is not implemented yet" in m for m in messages):
            statuses.append(Status(question, "not started"))
        elif len(needs) == len(messages):
            waiting_for = sorted({re.match(r"Q\d+ needs (Q\d+)", m)[1] for m in needs})
            statuses.append(Status(question, f"waiting for {', '.join(waiting_for)}"))
        else:
            first = next(m for m in messages if m not in needs)
            statuses.append(Status(question, "failing", first[:240]))
    return statuses


def run_self_checks(folder: Path) -> dict[str, tuple[bool, str]]:
    """Run tests/test_lab.py of `folder` once; the result of every check."""
    with tempfile.TemporaryDirectory() as scratch:
        junit_file = Path(scratch) / "checks.xml"
        command = [sys.executable, "-m", "pytest", "tests/test_lab.py", "-q"]
        command += ["-p", "no:cacheprovider", f"--junitxml={junit_file}"]
        completed = subprocess.run(
            command,
            cwd=folder,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        if not junit_file.is_file():
            lines = (completed.stdout + completed.stderr).strip().splitlines()
            raise RuntimeError(
                "the self-checks did not run: " + (lines[-1] if lines else "no output")
            )
        return check_results(junit_file)


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
    try:
        statuses = question_statuses(run_self_checks(LAB_FOLDER))
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for status in statuses:
        print(status.line())
    done = sum(status.status == "done" for status in statuses)
    print(f"{done} of {len(statuses)} questions done")
    if args.json:
        report = {
            "name": args.name,
            "done": done,
            "questions": [asdict(status) for status in statuses],
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if done == len(statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
