"""progress.py: the statuses it reads from the checks, and how it fails (teacher side)."""

from __future__ import annotations

import json

import pytest

import progress

STUB = "Q14 is not implemented yet: run the exported model with onnxruntime in main.py, see LAB.md"


def test_a_question_whose_optional_part_is_left_is_done_and_says_so():
    checks = {"test_q14_test": (True, ""), "test_q14_predict": (True, ""),
              "test_q14_optional_onnx": (False, STUB)}  # fmt: skip
    status = progress.question_status(14, checks)
    assert status.status == "done"
    assert status.message == f"its optional part is not started: {STUB}"
    every_stub = {name: (False, STUB) for name in checks}
    assert progress.question_status(14, every_stub).status == "not started"
    waiting = {**checks, "test_q14_test": (False, "Q14 needs Q5 first. Q5 is not ...")}
    assert progress.question_status(14, waiting).status == "waiting for Q5"


def test_a_question_with_given_code_and_a_stub_is_not_started():
    stub = "Q4 is not implemented yet: build the geometric training augmentations"
    checks = {"test_q04_jitter": (True, ""), "test_q04_crops": (False, stub)}
    assert progress.question_status(4, checks).status == "not started"


def test_a_long_failure_keeps_its_hint():
    message = "Q4: " + "x" * 300 + "; the likely mistake"
    status = progress.question_status(4, {"test_q04_a": (True, ""), "test_q04_b": (False, message)})
    assert status.status == "failing" and status.message == message


@pytest.mark.parametrize(
    ("where", "said"),
    [
        (lambda tmp: tmp, "is a folder"),
        (lambda tmp: tmp / "missing" / "me.json", "does not exist"),
        (lambda tmp: "/sys/kernel/me.json", "cannot be written"),
    ],
)
def test_a_json_path_that_cannot_be_written_fails_before_the_checks(
    where, said, tmp_path, monkeypatch, capsys
):
    def never(folder):
        raise AssertionError("the checks ran")

    monkeypatch.setattr(progress, "run_self_checks", never)
    assert progress.main(["--json", str(where(tmp_path))]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --json ") and said in error and error.count("\n") == 1
    assert not (tmp_path / "me.json").exists()


def test_ctrl_c_prints_one_line(monkeypatch, capsys):
    def interrupted(folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(progress, "run_self_checks", interrupted)
    assert progress.main([]) == 130
    assert capsys.readouterr().err.strip() == "interrupted (Ctrl-C); files written so far are whole"


def test_checks_that_stop_early_are_an_error_not_zero_questions(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_lab.py").write_text(
        "def test_q01_a():\n    pass\n\n\ndef test_q02_b():\n    raise KeyboardInterrupt\n"
    )
    with pytest.raises(RuntimeError, match="stopped before the end"):
        progress.run_self_checks(tmp_path)


def test_the_json_file_records_the_time_and_the_given_questions(tmp_path):
    (tmp_path / progress.GIVEN_FILE).write_text("Q4\nQ12\n")
    statuses = [progress.Status(1, "done"), progress.Status(2, "not started")]
    report = progress.json_report("Ada", statuses, tmp_path)
    assert report["given"] == [4, 12] and report["done"] == 1 and report["name"] == "Ada"
    assert report["time"][:2] == "20" and "T" in report["time"]
    assert json.loads(json.dumps(report)) == report
    assert progress.json_report("Ada", statuses, tmp_path / "elsewhere")["given"] == []


def test_q3_and_q13_are_done_only_with_the_students_own_outputs(tmp_path):
    passing = [progress.Status(3, "done"), progress.Status(13, "done"), progress.Status(5, "done")]
    statuses = progress.with_own_outputs(passing, tmp_path)
    assert [s.status for s in statuses] == ["to run", "to run", "done"]
    assert "sample.png and hist.json" in statuses[0].message
    assert "runs/" in statuses[1].message
    (tmp_path / "sample.png").write_bytes(b"png")
    (tmp_path / "hist.json").write_text("{}")
    run = tmp_path / "runs" / "unet-small"
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(b"pt")
    assert progress.with_own_outputs(passing, tmp_path)[1].status == "to run"  # no events
    (run / "events.out.tfevents.1.host").write_bytes(b"")
    assert [s.status for s in progress.with_own_outputs(passing, tmp_path)] == ["done"] * 3
    failing = [progress.Status(3, "failing", "Q3: ...")]
    assert progress.with_own_outputs(failing, tmp_path / "none") == failing
