"""teacher/class_view.py: the class's progress from the students' JSON files (teacher side)."""

from __future__ import annotations

import json

import class_view
import numpy as np
from PIL import Image


def write_report(folder, file_name, name, statuses, given=()):
    questions = [
        {"question": q, "status": status, "message": message}
        for q, (status, message) in sorted(statuses.items())
    ]
    report = {"name": name, "time": "2026-12-04T10:00:00+0000", "given": list(given),
              "done": 0, "questions": questions}  # fmt: skip
    (folder / file_name).write_text(json.dumps(report))


def test_one_line_per_student_and_per_question_and_a_picture(tmp_path, capsys):
    reports = tmp_path / "reports"
    reports.mkdir()
    write_report(reports, "ada.json", "Ada", {1: ("done", ""), 4: ("done", ""), 5: ("done", "")})
    write_report(
        reports, "bob.json", "Bob",
        {1: ("done", ""), 4: ("failing", "Q4: upside down"), 5: ("waiting for Q4", "")},
        given=[1],
    )  # fmt: skip
    write_report(
        reports, "cy.json", "Cy", {1: ("not started", ""), 4: ("failing", "Q4: upside down"),
                                   5: ("failing", "Q5: order")},
    )  # fmt: skip
    (reports / "notes.json").write_text("[1, 2]")
    out = tmp_path / "class.png"
    assert class_view.main([str(reports), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "left out notes.json" in captured.err
    lines = captured.out.splitlines()
    assert lines[1].startswith("Ada") and lines[1].endswith(" D  D  D")
    assert lines[2].startswith("Bob") and lines[2].endswith(" G  F  W")
    assert lines[3].startswith("Cy") and lines[3].endswith(" N  F  F")
    q4 = next(line for line in lines if line.startswith("Q4 "))
    assert q4 == "Q4   1 done, 2 failing; most common failure (2): Q4: upside down"
    assert next(line for line in lines if line.startswith("Q1 ")) == (
        "Q1   1 done, 1 not started, 1 given"
    )
    with Image.open(out) as picture:
        pixels = np.asarray(picture.convert("RGB"))
    # Every status of the class has its color in the grid.
    for status in ("done", "failing", "waiting", "not started", "given"):
        color = class_view.STATUSES[status][1]
        rgb = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)
        assert (pixels == rgb).all(axis=-1).sum() > 50, status


def test_a_folder_without_reports_fails_in_one_line(tmp_path, capsys):
    assert class_view.main([str(tmp_path), "--out", str(tmp_path / "c.png")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path} holds no progress.py --json file\n"
    assert class_view.main([str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err
