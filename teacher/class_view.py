"""The progress of a whole class, from the students' `python progress.py --json` files.

    python teacher/class_view.py FOLDER --out class.png

FOLDER holds one JSON file per student (collected however you like: a shared folder, an
upload form, e-mail). The command prints one line per student (how many questions done,
when the file was written, which questions were given, and one letter per question) and
one line per question (how many students have done it, are failing it, have not started
it...), then writes a picture: students down, questions across, one colored cell each.

Letters and colors of the statuses of progress.py:
    D done, R to run (checks pass, own outputs missing), F failing,
    W waiting for an earlier question, N not started, G given with the bundle, . no record.

A file that is not a progress report is named and left out; the command fails in one line
when no file is usable.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

# The project's folder, for seglab.cli, whatever the current folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seglab import cli  # noqa: E402 (after the project's folder is on the path)

# status word of progress.py (its first word) -> (letter, color of the picture)
STATUSES: dict[str, tuple[str, str]] = {
    "done": ("D", "#2ca02c"),
    "to run": ("R", "#bcbd22"),
    "failing": ("F", "#d62728"),
    "waiting": ("W", "#ff9896"),
    "not started": ("N", "#c7c7c7"),
    "given": ("G", "#aec7e8"),
    "none": (".", "#ffffff"),
}


@dataclass
class Report:
    """One student's progress.json."""

    name: str
    time: str
    given: list[int]
    statuses: dict[int, str]  # question -> status key of STATUSES
    messages: dict[int, str]  # question -> message (failing, to run, ...)

    def status(self, question: int) -> str:
        if question in self.given:
            return "given"
        return self.statuses.get(question, "none")


def status_key(status: str) -> str:
    """progress.py's status text -> a key of STATUSES ("waiting for Q4" -> "waiting")."""
    for key in STATUSES:
        if status == key or status.startswith(key + " "):
            return key
    return "none"


def read_report(path: Path) -> Report:
    """One progress.json; ValueError, in one line, when it is not one."""
    try:
        content = json.loads(path.read_text())
        questions = content["questions"]
        statuses = {int(q["question"]): status_key(str(q["status"])) for q in questions}
        messages = {int(q["question"]): str(q.get("message", "")) for q in questions}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path.name}: not a progress.py --json file ({error})") from None
    name = str(content.get("name") or path.stem)
    given = [int(n) for n in content.get("given", [])]
    return Report(name, str(content.get("time", "")), given, statuses, messages)


def read_class(folder: Path) -> tuple[list[Report], list[str]]:
    """(the reports of every *.json file of `folder` sorted by name, the files left out)."""
    reports, skipped = [], []
    for path in sorted(folder.glob("*.json")):
        try:
            reports.append(read_report(path))
        except ValueError as error:
            skipped.append(str(error))
    return sorted(reports, key=lambda report: report.name.lower()), skipped


def all_questions(reports: list[Report]) -> list[int]:
    return sorted({q for report in reports for q in (*report.statuses, *report.given)})


def student_lines(reports: list[Report], questions: list[int]) -> list[str]:
    """One line per student: name, questions done, time of the report, a letter per question."""
    width = max(len(report.name) for report in reports)
    header = " " * (width + 2 + 5 + 2 + 16 + 2) + " ".join(f"{q:>2}" for q in questions)
    lines = [header]
    for report in reports:
        letters = " ".join(f"{STATUSES[report.status(q)][0]:>2}" for q in questions)
        done = sum(report.status(q) in ("done", "given") for q in questions)
        count = f"{done:>2}/{len(questions):<2}"
        lines.append(f"{report.name:<{width}}  {count}  {report.time[:16]:<16}  {letters}")
    return lines


def question_lines(reports: list[Report], questions: list[int]) -> list[str]:
    """One line per question: how many students are in each status, and the most common
    failure message (what to explain to the whole class)."""
    lines = []
    for question in questions:
        counts: dict[str, int] = {}
        for report in reports:
            key = report.status(question)
            counts[key] = counts.get(key, 0) + 1
        summary = ", ".join(f"{counts[key]} {key}" for key in STATUSES if counts.get(key))
        failures = [
            r.messages.get(question, "") for r in reports if r.status(question) == "failing"
        ]
        line = f"Q{question:<3} {summary}"
        if failures:
            common = max(set(failures), key=failures.count)
            line += f"; most common failure ({failures.count(common)}): {common}"
        lines.append(line)
    return lines


def draw(reports: list[Report], questions: list[int], out: Path) -> None:
    """The class as a grid: a row per student, a column per question, colored by status."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    keys = list(STATUSES)
    grid = [[keys.index(report.status(q)) for q in questions] for report in reports]
    height = 1.5 + 0.3 * len(reports)
    figure, axes = plt.subplots(figsize=(2.5 + 0.45 * len(questions), height))
    colors = ListedColormap([color for _, color in STATUSES.values()])
    axes.imshow(grid, cmap=colors, vmin=0, vmax=len(keys) - 1, aspect="auto")
    axes.set_xticks(range(len(questions)), [f"Q{q}" for q in questions])
    axes.set_yticks(range(len(reports)), [report.name for report in reports])
    axes.set_xticks([x - 0.5 for x in range(1, len(questions))], minor=True)
    axes.set_yticks([y - 0.5 for y in range(1, len(reports))], minor=True)
    axes.grid(which="minor", color="white", linewidth=1)
    axes.tick_params(which="minor", length=0)
    legend = [Patch(facecolor=color, edgecolor="gray", label=key) for key, (_, color) in
              STATUSES.items()]  # fmt: skip
    axes.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    axes.set_title(f"{len(reports)} students")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="folder of the students' progress.py --json files")
    parser.add_argument("--out", default="class.png", help="the picture to write (PNG)")
    return cli.run(show_class, parser.parse_args(argv), (cli.FlagError,))


def show_class(args: argparse.Namespace) -> int:
    """Print the class's lines and draw its picture; FlagError for unusable paths."""
    folder, out = Path(args.folder), Path(args.out)
    if not folder.is_dir():
        raise cli.FlagError(f"{folder}: no such folder")
    if not out.parent.is_dir() or out.is_dir():
        raise cli.FlagError(f"--out {out}: not a file in an existing folder")
    reports, skipped = read_class(folder)
    for message in skipped:
        print(f"warning: left out {message}", file=sys.stderr)
    if not reports:
        raise cli.FlagError(f"{folder} holds no progress.py --json file")
    questions = all_questions(reports)
    print("\n".join(student_lines(reports, questions)))
    print()
    print("\n".join(question_lines(reports, questions)))
    draw(reports, questions, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
