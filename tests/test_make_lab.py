"""make_lab.py and LAB.md, on the teacher's side (this file is not part of the student bundle).

The student and solution bundles are generated once per module; the self-checks run in both,
in two pytest processes at the same time, each inside its bundle.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import make_lab
import numpy as np
import pytest
import torch
from conftest import ROOT

import models
import progress

LAB_TEXT = (ROOT / "LAB.md").read_text()
QUESTION_HEADING = re.compile(r"^### Q(\d+)\b.*$", re.MULTILINE)


@dataclass
class Bundles:
    student: Path
    solution: Path
    student_results: dict[str, tuple[str, str]]  # test name -> (outcome, message)
    solution_results: dict[str, tuple[str, str]]
    student_report: Path  # the junit file of the student bundle's self-checks


def junit_results(report: Path) -> dict[str, tuple[str, str]]:
    """{test name: ("passed" | "failed" | "error" | "skipped", message)} of a junit file."""
    results = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = child.get("message", "")
        results[case.get("name")] = (outcome, message)
    return results


def start_self_checks(bundle: Path, report: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "pytest", "tests/test_lab.py", "-q", "-p", "no:cacheprovider"]
    return subprocess.Popen(
        [*command, f"--junitxml={report}"],
        cwd=bundle,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    base = tmp_path_factory.mktemp("bundles")
    student, solution = base / "student", base / "solution"
    assert make_lab.main(["--out", str(student)]) == 0
    assert make_lab.main(["--out", str(solution), "--solution"]) == 0
    runs = {
        name: (start_self_checks(folder, base / f"{name}.xml"), base / f"{name}.xml")
        for name, folder in [("student", student), ("solution", solution)]
    }
    results = {}
    for name, (process, report) in runs.items():
        output, _ = process.communicate(timeout=300)
        assert report.is_file(), f"the self-checks of the {name} bundle did not run:\n{output}"
        results[name] = junit_results(report)
    return Bundles(student, solution, results["student"], results["solution"], base / "student.xml")


def bundle_files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """{relative path: (bytes, mode)} of every file under folder, caches left out."""
    return {
        path.relative_to(folder).as_posix(): (path.read_bytes(), path.stat().st_mode & 0o777)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def lab_questions() -> dict[int, str]:
    """{n: the text of section "### Qn ..." of LAB.md, up to the next heading}."""
    headings = list(QUESTION_HEADING.finditer(LAB_TEXT))
    sections = {}
    for heading in headings:
        rest = LAB_TEXT[heading.end() :]
        following = re.search(r"^#{1,3} ", rest, re.MULTILINE)
        sections[int(heading[1])] = heading[0] + rest[: following.start() if following else None]
    return sections


def enclosing_names(source: str, line: int) -> list[str]:
    """Names of the classes and functions around `line`, outermost first."""
    names: list[str] = []
    body = ast.parse(source).body
    while True:
        around = [
            node
            for node in body
            if isinstance(node, ast.ClassDef | ast.FunctionDef)
            and node.lineno <= line <= node.end_lineno
        ]
        if not around:
            return names
        names.append(around[0].name)
        body = around[0].body


def function_node(source: str, names: list[str]) -> ast.FunctionDef | ast.ClassDef:
    """The node of the function at the path `names` (e.g. ["UNet", "forward"])."""
    body = ast.parse(source).body
    for name in names:
        node = next(
            n for n in body if isinstance(n, ast.ClassDef | ast.FunctionDef) and n.name == name
        )
        body = node.body
    return node


REGIONS = make_lab.all_regions(ROOT)
STUB_QUESTIONS = {region.question for region in REGIONS if not region.optional}


# ----------------------------------------------------------------------------------------
# The bundles


def test_the_bundles_hold_exactly_the_listed_files(bundles):
    expected = {
        name for name in make_lab.SOLUTION_FILES + make_lab.COPIED_FILES if (ROOT / name).is_file()
    }
    assert "README.md" in expected and "tests/test_lab.py" in expected
    assert "progress.py" in expected
    assert set(bundle_files(bundles.student)) == expected
    assert set(bundle_files(bundles.solution)) == expected | {"teacher/TEACHER.md"}
    for teacher_side in ("make_lab.py", "lab_timing.py", "figures.py", "TEACHER.md"):
        assert (ROOT / "teacher" / teacher_side).is_file()
        assert not (bundles.student / "teacher").exists(), teacher_side
    assert not (bundles.student / "tests" / "test_make_lab.py").exists()
    assert not (bundles.student / "tests" / "lab_mistakes.py").exists()


def test_the_teachers_guide_answers_every_question_and_stays_out_of_student_bundles(
    bundles, tmp_path
):
    guide = (ROOT / "teacher" / "TEACHER.md").read_text()
    assert (bundles.solution / "teacher" / "TEACHER.md").read_text() == guide
    for question in lab_questions():
        assert re.search(rf"^### Q{question}\b", guide, re.MULTILINE), question
    topics = ("--give Q4", "progress.py --json", "sha256sum", "lab_mistakes.py", "--time")
    for topic in (*topics, "figures.py"):
        assert topic in guide, topic
    assert make_lab.main(["--out", str(tmp_path / "given"), "--give", "Q4"]) == 0
    assert not (tmp_path / "given" / "teacher").exists()


def test_the_figures_of_the_handout_ship_in_the_bundle(bundles):
    figures = re.findall(r"!\[[^\]]*\]\((docs/lab/[\w.-]+\.png)\)", LAB_TEXT)
    assert sorted(figures) == sorted(f"docs/lab/{name}.png" for name in make_lab.LAB_FIGURES)
    for figure in figures:
        content = (bundles.student / figure).read_bytes()
        assert content.startswith(b"\x89PNG") and len(content) < 150_000, figure
        assert content == (ROOT / figure).read_bytes()
    assert "docs/lab" in (ROOT / "teacher" / "figures.py").read_text()


def test_the_students_readme_names_only_files_of_their_bundle(bundles):
    readme = (bundles.student / "README.md").read_text()
    assert "make_lab.py" in (ROOT / "README.md").read_text()
    assert "make_lab.py" not in readme and "TEACHER.md" not in readme
    assert make_lab.TEACHER_LINE not in readme
    for name in re.findall(r"`(\w+\.py)`", readme):
        assert (bundles.student / name).is_file(), name


def test_give_ships_the_chosen_answers_solved(tmp_path, capsys):
    out = tmp_path / "given"
    assert make_lab.main(["--out", str(out), "--give", "Q4", "q9", "12"]) == 0
    assert "Q4, Q9, Q12 given solved" in capsys.readouterr().out
    given = {4, 9, 12}
    for region in REGIONS:
        text = (out / region.path).read_text()
        solution_lines = (ROOT / region.path).read_text().splitlines()
        answer = [line for line in solution_lines[region.open_line : region.close_line - 1]]
        if region.question in given:
            assert "\n".join(answer) in text, region
            assert f"Q{region.question}: {region.task}" not in text
        else:
            assert f"Q{region.question}: {region.task}" in text, region
    for name in make_lab.SOLUTION_FILES:
        for line in (out / name).read_text().splitlines():
            assert not make_lab.MARKER_LIKE.match(line), (name, line)
    for wrong in (["--give", "Q3"], ["--give", "Q99"], ["--give", "four"]):
        assert make_lab.main(["--out", str(tmp_path / "other"), *wrong]) == 2
        assert "not a question with code to give" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_progress_reads_the_state_of_each_question(bundles):
    statuses = progress.question_statuses(progress.check_results(bundles.student_report))
    student = {status.question: status for status in statuses}
    assert sorted(student) == sorted(lab_questions())
    for question in STUB_QUESTIONS - {14}:
        assert student[question].status == "not started", student[question]
    # Q14's own stub is its optional ONNX part: the core of Q14 waits for the UNet.
    assert student[14].status.startswith("waiting for Q"), student[14]
    assert student[3].status in ("waiting for Q1", "waiting for Q1, Q2")
    assert student[13].status.startswith("waiting for Q")
    solution = {
        name: (outcome == "passed", m) for name, (outcome, m) in bundles.solution_results.items()
    }
    assert [s.status for s in progress.question_statuses(solution)] == ["done"] * len(student)


def test_the_student_bundle_passes_the_linter_and_its_test_script_runs_the_self_checks(
    bundles,
):
    assert "ruff" not in (bundles.student / "test.sh").read_text()
    for command in (["check", "--no-cache", "."], ["format", "--check", "--no-cache", "."]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *command],
            cwd=bundles.student, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
    test_script = (bundles.student / "test.sh").read_text()
    assert "setup.sh dev" in test_script and "pytest" in test_script
    assert (bundles.student / "tests" / "test_lab.py").is_file()
    readme = (bundles.student / "README.md").read_text()
    for linked in re.findall(r"\]\(([\w./-]+)\)", readme):
        assert (bundles.student / linked).exists(), f"README links to {linked}"


def test_the_setup_script_finds_its_files_in_the_bundle(bundles):
    setup = (bundles.student / "setup.sh").read_text()
    for name in ("requirements.txt", "requirements-dev.txt", "constraints.txt"):
        assert name in setup
        assert (bundles.student / name).is_file()


def test_every_python_file_of_the_bundles_parses(bundles):
    for folder in (bundles.student, bundles.solution):
        for path in folder.rglob("*.py"):
            ast.parse(path.read_text(), filename=str(path))


def test_the_student_command_lines_start(bundles):
    # main.py imports every script of the lab: no stub may run at import.
    for script in (["main.py"], ["-m", "seglab.explore"], ["-m", "seglab.cache"],
                   ["-m", "seglab.check"]):  # fmt: skip
        result = subprocess.run(
            [sys.executable, *script, "--help"],
            cwd=bundles.student,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage:")


def test_training_in_the_student_bundle_names_the_first_unanswered_question(
    bundles, synthetic_root, tmp_path
):
    result = subprocess.run(
        [sys.executable, "main.py", "train", "--datadir", str(synthetic_root), "--areas", "1",
         "--val-areas", "5a", "--epochs", "1", "--workers", "1", "--device", "cpu",
         "--logdir", str(tmp_path)],
        cwd=bundles.student, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert re.fullmatch(r"error: Q\d+: .+ in \w+\.py, see LAB\.md \(the program needs it\)", line)


def test_every_student_command_names_an_unanswered_question_in_one_line(
    bundles, synthetic_root, tmp_path
):
    data_flags = ["--datadir", str(synthetic_root), "--areas", "1"]
    commands = [
        ["-m", "seglab.explore", "show", *data_flags, "--out", str(tmp_path / "sample.png")],
        ["-m", "seglab.explore", "histogram", *data_flags],
        [
            "-m",
            "seglab.cache",
            "write",
            *data_flags,
            "--out",
            str(tmp_path / "cache"),
            "--size",
            "32",
        ],
        ["models.py"],
    ]
    for command in commands:
        result = subprocess.run(
            [sys.executable, *command], cwd=bundles.student, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, (command, result.stderr)
        last_line = result.stderr.strip().splitlines()[-1]  # after a progress bar, if any
        pattern = r"error: Q\d+: .+ in \w+\.py, see LAB\.md \(the program needs it\)"
        assert re.fullmatch(pattern, last_line), (command, last_line)


def test_the_command_questions_say_which_question_they_wait_for(bundles):
    for name, (_, message) in bundles.student_results.items():
        if name.startswith(("test_q03_", "test_q13_")):
            assert re.search(r"Q(3|13) needs Q\d+ first\. Q\d+ is not implemented yet", message), (
                name,
                message,
            )


def test_each_stub_raises_not_implemented_naming_its_question(bundles):
    for region in REGIONS:
        names = enclosing_names((ROOT / region.path).read_text(), region.open_line)
        node = function_node((bundles.student / region.path).read_text(), names)
        text = ast.unparse(node)
        if region.optional:
            assert (
                f"# TODO (Q{region.question}): {region.task}"
                in (bundles.student / region.path).read_text()
            )
        else:
            assert f"raise NotImplementedError('Q{region.question}: {region.task}" in text, names
    # And at run time: each stubbed question's checks report its own stub.
    for question in STUB_QUESTIONS:
        messages = [
            message
            for name, (_, message) in bundles.student_results.items()
            if name.startswith(f"test_q{question:02d}_")
        ]
        assert any(f"Q{question} is not implemented yet" in m for m in messages), messages


def test_each_question_fails_on_the_student_bundle_and_passes_on_the_solution(bundles):
    assert set(bundles.student_results) == set(bundles.solution_results)
    for question in lab_questions():
        checks = [
            name for name in bundles.student_results if name.startswith(f"test_q{question:02d}_")
        ]
        assert checks, f"Q{question} has no self-check"
        failing = [n for n in checks if bundles.student_results[n][0] in ("failed", "error")]
        assert failing, f"every check of Q{question} passes on the student bundle"
        for name in set(checks) - set(failing):
            # Checks of given code (Q4's color jitter), or that a stub passes by design (Q9's
            # alignment: without padding, nothing is shifted).
            assert "jitter" in name or name == "test_q09_logits_stay_aligned_with_the_pixels"
        for name in checks:
            assert bundles.solution_results[name][0] == "passed", bundles.solution_results[name]


def test_no_line_of_a_marked_region_leaks_into_the_student_bundle(bundles):
    for name in make_lab.SOLUTION_FILES:
        solution_lines = (ROOT / name).read_text().splitlines()
        regions = [region for region in REGIONS if region.path == name]
        inside = {
            number
            for region in regions
            for number in range(region.open_line, region.close_line + 1)
        }
        outside_lines = {line for n, line in enumerate(solution_lines, 1) if n not in inside}
        stub_lines = {line for region in regions for line in region.stub().splitlines()}
        student_lines = (bundles.student / name).read_text().splitlines()
        extra = [line for line in student_lines if line not in outside_lines | stub_lines]
        assert not extra, f"{name}: lines of the solution leaked: {extra}"
        for region in regions:
            for line in solution_lines[region.open_line : region.close_line - 1]:
                if line.strip() and line not in outside_lines:
                    assert line not in student_lines, f"{name}: {line!r} leaked"


def code_line(line: str) -> str:
    """A line of code without its comment, spaces and `data.` prefixes: the same statement
    written in data.py or in another module compares equal."""
    return re.sub(r"\s+|\bdata\.", "", line.split("#")[0])


def test_no_answer_is_repeated_in_a_file_that_the_student_bundle_copies():
    # Two or more lines of one answer in another file of the bundle give the answer away
    # (one line alone may be ordinary code, e.g. `except RuntimeError as error:`).
    copied = [name for name in make_lab.COPIED_FILES if name.endswith(".py")]
    for region in REGIONS:
        if region.optional:
            continue
        lines = (ROOT / region.path).read_text().splitlines()
        answer = {code_line(line) for line in lines[region.open_line : region.close_line - 1]}
        answer = {line for line in answer if len(line) >= 25}
        for name in copied:
            found = answer & {code_line(line) for line in (ROOT / name).read_text().splitlines()}
            assert len(found) < 2, f"{name} repeats the answer of Q{region.question}: {found}"
    assert "65536" not in (ROOT / "seglab" / "bench.py").read_text()


def test_no_marker_reaches_any_bundle(bundles):
    for folder in (bundles.student, bundles.solution):
        for relative, (content, _) in bundle_files(folder).items():
            if relative in make_lab.BINARY_FILES:
                continue
            for line in content.decode().splitlines():
                assert not make_lab.MARKER_LIKE.match(line), f"{relative}: {line}"


def test_the_solution_bundle_is_the_project_without_its_markers(bundles):
    for name in make_lab.SOLUTION_FILES:
        source = (ROOT / name).read_text().splitlines(keepends=True)
        kept = [line for line in source if not make_lab.MARKER_LIKE.match(line)]
        assert (bundles.solution / name).read_text() == "".join(kept)
    for name in make_lab.COPIED_FILES:
        assert (bundles.solution / name).read_bytes() == (ROOT / name).read_bytes()
        if name != "README.md":
            assert (bundles.student / name).read_bytes() == (ROOT / name).read_bytes()
    readme = (ROOT / "README.md").read_text()
    assert (bundles.student / "README.md").read_text() == make_lab.without_teacher_lines(
        readme, "README.md"
    )


def test_two_runs_write_identical_trees_and_leave_other_files_alone(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert make_lab.main(["--out", str(first)]) == 0
    written = bundle_files(first)
    (first / "runs").mkdir()
    (first / "runs" / "mine.txt").write_text("a student's file")
    (first / "models.py").write_text("a student's file that does not parse, left as it is")
    assert make_lab.main(["--out", str(first)]) == 0
    assert make_lab.main(["--out", str(second)]) == 0
    assert bundle_files(second) == written
    assert (first / "runs" / "mine.txt").read_text() == "a student's file"
    after = bundle_files(first)
    del after["runs/mine.txt"]
    assert after.pop("models.py")[0] == b"a student's file that does not parse, left as it is"
    assert after.pop("models.py.new") == written.pop("models.py")
    assert after == written
    assert written["setup.sh"][1] == 0o755 and written["data.py"][1] == 0o644


STUDENT_Q1 = """    labels = semantic_rgb.long()
    index = (labels[0] * 65536 + labels[1] * 256 + labels[2]).clamp(max=len(label_table) - 1)
    return label_table[index]
"""


def test_updating_a_bundle_keeps_every_answer_the_student_wrote(tmp_path, capsys):
    out = tmp_path / "student"
    assert make_lab.main(["--out", str(out), "--give", "Q4"]) == 0
    assert (out / make_lab.GIVEN_FILE).read_text() == "Q4\n"
    data_py = (out / "data.py").read_text()
    stub = '    raise NotImplementedError("Q1: decode the label colors into class ids in data.py, '
    assert stub in data_py
    start = data_py.index(stub)
    answered = data_py[:start] + STUDENT_Q1 + data_py[data_py.index("\n", start) + 1 :]
    (out / "data.py").write_text(answered)
    models_py = (out / "models.py").read_text()
    capsys.readouterr()
    # Q1 answered by the student, Q5 not: --give Q1 Q5 keeps the student's Q1, gives Q5.
    assert make_lab.main(["--out", str(out), "--give", "Q1", "Q5"]) == 0
    assert "kept the answers already written in" in capsys.readouterr().out
    assert (out / "data.py").read_text() == answered  # Q4 given before, Q1 the student's
    assert (out / "models.py").read_text() != models_py
    assert "Q5: implement UNetConvBlock.__init__" not in (out / "models.py").read_text()
    assert (out / make_lab.GIVEN_FILE).read_text() == "Q4\nQ5\n"
    # The same run again changes nothing.
    before = bundle_files(out)
    assert make_lab.main(["--out", str(out), "--give", "Q1", "Q5"]) == 0
    assert bundle_files(out) == before


def test_a_script_changed_outside_its_answers_is_left_as_it_is(tmp_path, capsys):
    out = tmp_path / "student"
    assert make_lab.main(["--out", str(out)]) == 0
    changed = "import numpy as np  # the student's own import\n" + (out / "data.py").read_text()
    (out / "data.py").write_text(changed)
    capsys.readouterr()
    assert make_lab.main(["--out", str(out), "--give", "Q1"]) == 0
    assert "data.py was changed outside its answers" in capsys.readouterr().out
    assert (out / "data.py").read_text() == changed
    assert "def decode_semantic" in (out / "data.py.new").read_text()


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (lambda tmp: ["--out", str(tmp / "a-file" / "lab")], "lies below"),
        (lambda tmp: ["--out", "/sys/kernel/lab-bundle"], "cannot be written"),
        (lambda tmp: ["--out", str(tmp / "lab"), "--source", str(tmp / "none")], "no such folder"),
        (
            lambda tmp: ["--out", str(tmp / "lab"), "--source", str(tmp)],
            "is not the lab's solution",
        ),
    ],
)
def test_bad_folders_are_refused_in_one_line(flags, error, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    assert make_lab.main(flags(tmp_path)) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and error in message and message.count("\n") == 1
    assert not (tmp_path / "lab").exists()


def test_refuses_to_write_into_the_project(capsys):
    for out in (ROOT, ROOT / "student"):
        assert make_lab.main(["--out", str(out)]) == 2
        assert "inside the project" in capsys.readouterr().err
    assert not (ROOT / "student").exists()


# ----------------------------------------------------------------------------------------
# Markers


def body(*lines: str) -> str:
    """A small module: line 1 is the def, then the given lines, then a closing return."""
    return "\n".join(["def f(x):", *lines, "    return x", ""])


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (body("    # >>> Q3: do it", "    y = x"), 2, "never closed"),
        (body("    y = x", "    # <<< Q3"), 3, "closes no open region"),
        (body("    # >>> Q3: do it", "    y = x", "    # <<< Q4"), 4, "closes the region of Q3"),
        (body("    # >>> Q3: a", "    # >>> Q4: b", "    # <<< Q4"), 3, "inside the region"),
        (body("    # >>> Q3 do it", "    y = x", "    # <<< Q3"), 2, "malformed marker"),
        (body("    # >>> Q3: do it", "    # <<< Q3"), 2, "is empty"),
        (body("    # >>> Q3: do it", "    y = x", "  # <<< Q3"), 4, "not indented like"),
        (body("    if x:", "        # >>> Q3: do it", "    y = x", "        # <<< Q3"), 4, "less"),
        ("# >>> Q3: do it\nx = 1\n# <<< Q3\n", 1, "module level"),
        (body("    # >>> Q3: " + "long " * 20, "    y = x", "    # <<< Q3"), 2, "shorten it"),
        (
            "def f(x):\n    # >>> Q3 (optional): do it\n    return x\n    # <<< Q3\n",
            2,
            "does not parse",
        ),
        (  # the line is that of the solution, after a region of several lines
            body("    # >>> Q1: a", "    y = x", "    z = y", "    # <<< Q1")
            + "\n\ndef g(x):\n    # >>> Q3 (optional): do it\n    return x\n    # <<< Q3\n",
            10,
            "does not parse",
        ),
    ],
)
def test_broken_markers_are_errors_with_file_and_line(text, line, message):
    with pytest.raises(make_lab.MarkerError) as error:
        make_lab.student_version(text, "models.py")
    assert str(error.value).startswith(f"models.py:{line}: ")
    assert message in str(error.value)


def test_a_broken_marker_stops_the_command_before_writing(tmp_path):
    source, out = tmp_path / "project", tmp_path / "bundle"
    for name in make_lab.SOLUTION_FILES + make_lab.COPIED_FILES:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, source / name)
    lines = (source / "models.py").read_text().splitlines(keepends=True)
    close = next(n for n, line in enumerate(lines) if line.strip() == "# <<< Q5")
    del lines[close]
    (source / "models.py").write_text("".join(lines))
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "teacher" / "make_lab.py"),
            "--source",
            str(source),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert re.match(r"error: models\.py:\d+: ", result.stderr), result.stderr
    assert not out.exists()


def test_a_marker_in_a_copied_file_is_refused():
    with pytest.raises(make_lab.MarkerError, match=r"^synthetic\.py:2: "):
        make_lab.check_no_markers("x = 1\n    # >>> Q2: not here\n", "synthetic.py")


# ----------------------------------------------------------------------------------------
# LAB.md


def test_every_question_of_the_handout_has_a_stub_or_a_command_and_a_self_check():
    sections = lab_questions()
    assert sorted(sections) == list(range(1, len(sections) + 1))
    assert {region.question for region in REGIONS} <= set(sections)
    tests = (ROOT / "tests" / "test_lab.py").read_text()
    check_numbers = {int(n) for n in re.findall(r"^def test_q(\d\d)_", tests, re.MULTILINE)}
    assert check_numbers == set(sections)
    for question, text in sections.items():
        command = f"**Self-check:** `python -m pytest tests/test_lab.py -k q{question:02d}`"
        assert command in text, f"Q{question} does not name its self-check"
        regions = [region for region in REGIONS if region.question == question]
        if not regions:
            run = r"^\*\*Run:\*\* `python (-m \S+|\S+\.py)"
            assert re.search(run, text, re.MULTILINE), question
            continue
        edit = re.search(r"^\*\*Edit:\*\* (.*)$", text, re.MULTILINE)
        assert edit, f"Q{question} does not say which file to edit"
        for region in regions:
            names = enclosing_names((ROOT / region.path).read_text(), region.open_line)
            assert f"`{region.path}`" in edit[1] and names[0] in edit[1], (question, names)


def test_every_self_check_is_a_decorated_test_q_nn():
    tree = ast.parse((ROOT / "tests" / "test_lab.py").read_text())
    tests = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    tests = [node for node in tests if node.name.startswith("test_")]
    assert len(tests) >= len(lab_questions())
    for node in tests:
        assert re.match(r"test_q\d\d_", node.name), node.name
        decorators = [ast.unparse(d) for d in node.decorator_list]
        assert decorators[-1:] == ["self_check"], node.name
        assert all(d.startswith("takes_up_to(") for d in decorators[:-1]), node.name
    assert "make_lab" not in (ROOT / "tests" / "test_lab.py").read_text()


def test_the_handout_covers_every_section():
    headings = [
        "Objectives",
        "The data set",
        "Setup",
        "Data exploration",
        "Data pipeline and augmentation",
        "The UNet",
        "Evaluation metrics",
        "Losses",
        "Training on a small subset",
        "Inference",
        "Going further",
        "A possible solution",
        "References",
    ]
    found = re.findall(r"^## (.+)$", LAB_TEXT, re.MULTILINE)
    assert [h for h in found if h in headings] == headings
    facts = [
        "10,327", "15,714", "3,704", "13,268", "17,593", "9,890", "70,496", "#0D0D0D",
        "33.67 %", "0.33 %", "venv", "conda", "seglab.synthetic", "python -m seglab.explore show",
        "TensorBoard", "torchrun", "deeplabv3_resnet50", "lraspp_mobilenet_v3_large",
        "--pretrained", "torch.export", "ONNX", "focal", "Dice", "frames/s",
    ]  # fmt: skip
    for fact in facts:
        assert fact in LAB_TEXT, fact
    for author in ("Ronneberger", "Armeni", "Lin", "Cui", "Milletari", "Long", "Chen", "Howard"):
        assert re.search(rf"^- .*\b{author}\b", LAB_TEXT, re.MULTILINE), author


def test_the_handout_stands_alone():
    assert "shared/" not in LAB_TEXT and "](../" not in LAB_TEXT
    links = re.findall(r"\]\((?!https?://)([^)]+)\)", LAB_TEXT)
    assert all((ROOT / link).exists() for link in links), links


def test_the_handout_numbers_are_those_of_the_code():
    with torch.device("meta"):
        default_unet = models.build_unet(14)
        small_unet = models.build_unet(14, num_blocks=3, base_chan=16)
    for model in (default_unet, small_unet):
        assert f"{models.count_parameters(model):,}" in LAB_TEXT


# ----------------------------------------------------------------------------------------
# A student's bundle half done: test.sh and progress.py in it


@pytest.fixture(scope="module")
def half_done(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A student bundle with Q1, Q2 and Q10 answered: Q1 correct but unformatted, Q10 with
    its rows and columns swapped."""
    out = tmp_path_factory.mktemp("half-done")
    assert make_lab.main(["--out", str(out), "--give", "Q1", "Q2", "Q10"]) == 0
    data_py = (out / "data.py").read_text()
    old = "channels = semantic_rgb.to(torch.int32)"
    assert old in data_py
    (out / "data.py").write_text(data_py.replace(old, "channels=semantic_rgb.to( torch.int32 )"))
    metrics_py = (out / "metrics.py").read_text()
    old = "targets.reshape(-1).long() * num_classes + preds.reshape(-1).long()"
    assert old in metrics_py
    new = "preds.reshape(-1).long() * num_classes + targets.reshape(-1).long()"
    (out / "metrics.py").write_text(metrics_py.replace(old, new))
    return out


def test_the_student_test_command_runs_the_self_checks_of_unformatted_answers(half_done):
    unformatted = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "data.py"],
        cwd=half_done, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert unformatted.returncode == 1, unformatted.stdout
    result = subprocess.run(
        ["bash", "test.sh", "tests/test_lab.py", "-k", "q01", "-q", "-p", "no:cacheprovider"],
        cwd=half_done, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHON": sys.executable, "PYTHONDONTWRITEBYTECODE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b2 passed\b", result.stdout), result.stdout


def test_progress_prints_one_line_per_question_and_writes_json(half_done):
    report = half_done / "progress.json"
    result = subprocess.run(
        [sys.executable, "progress.py", "--json", str(report), "--name", "Ada"],
        cwd=half_done, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr  # not every question is done
    lines = result.stdout.splitlines()
    by_question = {int(m[1]): m[2] for m in map(re.compile(r"^Q(\d+) +(.*)$").match, lines) if m}
    assert sorted(by_question) == sorted(lab_questions())
    assert by_question[1] == by_question[2] == "done"
    assert by_question[3].startswith("to run: sample.png and hist.json not in the lab folder")
    assert by_question[4] == "not started" and by_question[11] == "not started"
    assert by_question[10].startswith("failing: Q10: ") and "swapped" in by_question[10]
    assert by_question[13] == "waiting for Q4"
    saved = json.loads(report.read_text())
    assert saved["name"] == "Ada" and saved["done"] == 2
    assert saved["given"] == [1, 2, 10] and saved["time"]
    statuses = {entry["question"]: entry for entry in saved["questions"]}
    assert statuses[10]["status"] == "failing" and "swapped" in statuses[10]["message"]
    assert statuses[5] == {"question": 5, "status": "not started", "message": ""}


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("a\nb <!-- teacher -->\nc\n", "a\nc\n"),
        ("a\n<!-- teacher -->\nb\nc\n<!-- /teacher -->\nd\n", "a\nd\n"),
        (
            "| x | y |\n| `make_lab.py` | z <!-- teacher --> |\n| w | v |\n",
            "| x | y |\n| w | v |\n",
        ),
    ],
)
def test_teacher_lines_leave_the_students_readme(text, kept):
    assert make_lab.without_teacher_lines(text, "README.md") == kept


def test_a_teacher_block_left_open_is_an_error():
    with pytest.raises(make_lab.MarkerError, match=r"^README\.md:2: "):
        make_lab.without_teacher_lines("a\n<!-- teacher -->\nb\n", "README.md")
    with pytest.raises(make_lab.MarkerError, match=r"^README\.md:1: "):
        make_lab.without_teacher_lines("<!-- /teacher -->\n", "README.md")


KINDS = ("core", "optional", "homework")


def test_the_handout_has_a_time_plan_whose_core_fits_three_hours():
    plan = LAB_TEXT[LAB_TEXT.index("### Time plan") : LAB_TEXT.index("## Objectives")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in plan.splitlines()]
    rows = [row for row in cells if len(row) == 4 and row[3].startswith(KINDS)]
    core_minutes = 0
    for _, _, duration, kind in rows:
        minutes = re.fullmatch(r"(\d+) min", duration)
        if kind == "core":
            assert minutes, duration
            core_minutes += int(minutes[1])
    assert 150 <= core_minutes <= 180, core_minutes
    total = re.search(r"^\| \*\*Core\*\* \| \| \*\*(\d) h (\d+) min\*\* \|", plan, re.M)
    assert total and int(total[1]) * 60 + int(total[2]) == core_minutes
    core_questions = " ".join(row[1] for row in rows if row[3] == "core")
    for question in (1, 2, 3, 4, 5, 8, 10, 11, 13, 14):
        assert f"Q{question}" in core_questions, question
    assert {"Q9", "Q12"} <= set(re.findall(r"Q\d+", " ".join(r[1] for r in rows if r[3] != "core")))


def test_the_time_plan_holds_the_measured_time_of_every_core_command():
    import lab_timing

    measured = dict(re.findall(r"^\| .+? \| `(.+?)` \| (\d+) s \|$", LAB_TEXT, re.MULTILINE))
    commands = lab_timing.CORE_COMMANDS + lab_timing.OPTIONAL_COMMANDS
    assert set(measured) == {lab_timing.shown(command) for _, command in commands}
    assert "python teacher/make_lab.py --time" in LAB_TEXT


def test_the_legend_of_the_handouts_sample_figure_shows_the_exact_class_colors():
    from PIL import Image

    import data

    with Image.open(ROOT / "docs" / "lab" / "sample.png") as picture:
        pixels = np.asarray(picture.convert("RGB"))
    legend = pixels[:, pixels.shape[1] * 4 // 5 :]  # the legend sits at the right
    for name, color in data.CLASS_COLORS.items():
        swatch = (legend == np.array(color, dtype=np.uint8)).all(axis=-1)
        assert swatch.sum() >= 20, f"the legend has no swatch of {name}'s color {color}"


def test_the_handout_sends_to_the_tensorboard_tabs_where_the_run_logs():
    logged = (ROOT / "seglab" / "tensorboard_log.py").read_text()
    # add_image and add_figure both land in TensorBoard's Images tab.
    assert 'add_figure("val/confusion_matrix"' in logged
    assert "*Figures*" not in LAB_TEXT
    images = LAB_TEXT[LAB_TEXT.index("In TensorBoard, look at:") :]
    images = images[: images.index("\n\n", images.index("*Images*"))]
    assert "`val/confusion_matrix`" in images


def test_q14_compares_the_two_masks_with_the_command_it_gives(tmp_path):
    from PIL import Image

    q14 = lab_questions()[14]
    assert "demo.sh" not in q14 and "MODEL=runs/unet-small/best.pt" in q14
    assert "almost every pixel, not on all" not in q14
    [command] = [line[2:] for line in q14.splitlines() if "pixels differ" in line]
    for folder in ("predictions", "predictions-onnx"):
        (tmp_path / folder).mkdir()
    ids = np.arange(12, dtype=np.uint8).reshape(3, 4)
    Image.fromarray(ids).save(tmp_path / "predictions" / "photo_mask.png")
    ids[1, 2] = 0
    Image.fromarray(ids).save(tmp_path / "predictions-onnx" / "photo_mask.png")
    result = subprocess.run(
        command.replace("python ", f"{sys.executable} ", 1),
        shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.stdout == "1 of 12 pixels differ\n", result.stdout + result.stderr


def test_the_teachers_rubric_adds_up():
    guide = (ROOT / "teacher" / "TEACHER.md").read_text()
    rubric = guide[guide.index("## Grading the report") :]
    rows = re.findall(r"^\| (.+?) \| (?:\*\*)?(\d+)(?:\*\*)? \| .*\|$", rubric, re.MULTILINE)
    core = [int(points) for name, points in rows[: rows.index(("**Core**", "40"))]]
    homework_rows = rows[rows.index(("**Core**", "40")) + 1 : -1]
    assert sum(core) == 40 and rows[-1] == ("**Homework**", "20")
    assert sum(int(points) for _, points in homework_rows) == 20
    for question in (1, 2, 3, 4, 5, 7, 8, 9, 11, 12, 13, 14):
        assert any(name.startswith(f"Q{question},") or name == f"Q{question}" for name, _ in rows)


def test_the_question_times_add_up_to_the_time_plan():
    table = LAB_TEXT[: LAB_TEXT.index("### Time plan")]
    times = dict(
        re.findall(r"^\| (Q\d+)(?: \(\w+\))? \|.*\| (\d+) min(?: \+ .*)? \|$", table, re.M)
    )
    assert sorted(times, key=lambda q: int(q[1:])) == [f"Q{n}" for n in range(1, 15)]
    core = (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 14)
    setup = 15  # setup and reading, the first row of the plan
    total = re.search(r"\*\*(\d) h (\d+) min\*\*", LAB_TEXT)
    assert sum(int(times[f"Q{n}"]) for n in core) + setup == int(total[1]) * 60 + int(total[2])


def test_the_dummy_tensor_of_q8_prints_the_shapes_of_the_encoder():
    [command] = [
        line.strip()[2:] for line in lab_questions()[8].splitlines() if "torch.zeros" in line
    ]
    result = subprocess.run(
        command.replace("python ", f"{sys.executable} ", 1),
        shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    expected = "(1, 128, 16, 16) [(1, 16, 128, 128), (1, 32, 64, 64), (1, 64, 32, 32)]\n"
    assert result.stdout == expected, result.stdout + result.stderr
