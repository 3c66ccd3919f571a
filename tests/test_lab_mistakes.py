"""The self-checks reject the typical mistakes of tests/lab_mistakes.py (teacher side).

Each mistake is applied to the solution in this process (the wrong definition replaces the
right one in its module), then every check of its question runs: at least one must fail,
each failure must be the one-line verdict of tests/test_lab.py (never an exception from
inside the check), and one of them must name the likely mistake when the list gives a hint.
"""

from __future__ import annotations
import __future__

import ast
import importlib
import inspect
from collections.abc import Callable

import lab_mistakes
import make_lab
import pytest
import test_lab
from conftest import ROOT
from lab_mistakes import MISTAKES, RIGHT_VARIANTS, Mistake
from test_lab import tiny_run  # noqa: F401 (the training run that Q13's and Q14's checks use)


def checks_of(question: int) -> list[Callable]:
    """The self-checks of `question`, in file order."""
    prefix = f"test_q{question:02d}_"
    return [check for name, check in vars(test_lab).items() if name.startswith(prefix)]


def definition_lines(source: str, name: str) -> tuple[int, int]:
    """(first, last) 1-based lines of the top-level function or class `name`, decorators in."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == name:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            return first, node.end_lineno
    raise LookupError(f"no top-level definition {name}")


def compile_definition(module, text: str, first_line: int, name: str) -> object:
    """Run the source `text` of the definition `name` of `module` (placed at its line, so
    that errors point at the file's lines) in the module's namespace, and return the new
    object; the module keeps its own. The new object sees the module's globals, and with
    them whatever a check monkeypatches there."""
    original = getattr(module, name)
    code = compile(
        "\n" * (first_line - 1) + text,
        module.__file__,
        "exec",
        flags=__future__.annotations.compiler_flag,
        dont_inherit=True,
    )
    try:
        exec(code, vars(module))
        return getattr(module, name)
    finally:
        setattr(module, name, original)


def wrong_definition(mistake: Mistake) -> tuple[object, object]:
    """(module, the definition `mistake.where` with the mistake made)."""
    module = importlib.import_module(mistake.file.removesuffix(".py"))
    lines = (ROOT / mistake.file).read_text().splitlines(keepends=True)
    first, last = definition_lines("".join(lines), mistake.where)
    text = "".join(lines[first - 1 : last])
    assert text.count(mistake.old) == 1, (
        f"{mistake.name}: {mistake.old!r} should occur once in {mistake.where} of "
        f"{mistake.file}; update the mistake to the solution"
    )
    start = text.index(mistake.old)
    indent = text[text.rfind("\n", 0, start) + 1 : start]
    indent = indent[: len(indent) - len(indent.lstrip())]
    wrong = text.replace(mistake.old, mistake.new.replace("\n", "\n" + indent))
    assert wrong != text
    return module, compile_definition(module, wrong, first, mistake.where)


def run_checks(question: int, request, tmp_path_factory) -> dict[str, str | None]:
    """{check name: None if it passed, else its failure message}. An exception other than
    the check's one-line failure is recorded as "RAW ..." for the caller to refuse."""
    results: dict[str, str | None] = {}
    for check in checks_of(question):
        monkeypatch = pytest.MonkeyPatch()
        kwargs = {}
        for name in inspect.signature(check).parameters:
            if name == "tmp_path":
                kwargs[name] = tmp_path_factory.mktemp(check.__name__[:20])
            elif name == "monkeypatch":
                kwargs[name] = monkeypatch
            else:
                kwargs[name] = request.getfixturevalue(name)
        try:
            check(**kwargs)
            results[check.__name__] = None
        except pytest.fail.Exception as failure:
            results[check.__name__] = str(failure.msg)
        except Exception as error:  # what a student must never see
            results[check.__name__] = f"RAW {type(error).__name__}: {error}"
        finally:
            monkeypatch.undo()
    return results


def prepare_fixtures(question: int, request) -> None:
    """Make the shared fixtures of `question`'s checks with the solution, before the mistake
    is made: the training run of Q13 and Q14 must not be trained with a wrong answer."""
    for check in checks_of(question):
        for name in inspect.signature(check).parameters:
            if name not in ("tmp_path", "monkeypatch", "capsys"):
                request.getfixturevalue(name)


CASES = [
    pytest.param(question, mistake, id=f"Q{question}-{mistake.name.replace(' ', '-')}")
    for question, mistakes in MISTAKES.items()
    for mistake in mistakes
]


@pytest.mark.parametrize(("question", "mistake"), CASES)
def test_each_typical_mistake_fails_its_self_check_with_one_line(
    question, mistake, request, monkeypatch, tmp_path_factory
):
    prepare_fixtures(question, request)
    module, wrong = wrong_definition(mistake)
    monkeypatch.setattr(module, mistake.where, wrong)
    results = run_checks(question, request, tmp_path_factory)
    failures = [message for message in results.values() if message is not None]
    assert failures, f"{mistake.name}: every check of Q{question} passed"
    for message in failures:
        assert not message.startswith("RAW "), f"{mistake.name}: {message}"
        assert message.startswith(f"Q{question}: "), message
        assert "Traceback" not in message, message
    if mistake.hint:
        assert any(mistake.hint in message for message in failures), (mistake.hint, failures)


def test_every_question_with_code_has_typical_mistakes():
    coded = {region.question for region in make_lab.all_regions(ROOT)}
    assert coded <= set(MISTAKES), sorted(coded - set(MISTAKES))
    assert all(len(MISTAKES[question]) >= 2 for question in coded)


@pytest.mark.parametrize("question", sorted(MISTAKES))
def test_the_solution_passes_every_check_run_this_way(question, request, tmp_path_factory):
    prepare_fixtures(question, request)
    results = run_checks(question, request, tmp_path_factory)
    assert results and all(message is None for message in results.values()), results


def test_q14_needs_no_answer_to_the_optional_q9(request, monkeypatch, tmp_path_factory):
    # The student version of UNet.forward: the padding of Q9 replaced by its TODO comment.
    import models

    [region] = [r for r in make_lab.all_regions(ROOT) if r.question == 9]
    lines = (ROOT / "models.py").read_text().splitlines(keepends=True)
    first, last = definition_lines("".join(lines), "UNet")
    without_q9 = make_lab.student_version("".join(lines[first - 1 : last]), "models.py")
    assert "# TODO (Q9)" in without_q9 and "pad(" not in without_q9
    prepare_fixtures(14, request)
    monkeypatch.setattr(models, "UNet", compile_definition(models, without_q9, first, "UNet"))
    assert run_checks(9, request, tmp_path_factory)["test_q09_unet_takes_any_image_size"]
    results = run_checks(14, request, tmp_path_factory)
    assert all(message is None for message in results.values()), results


def test_q13_and_q14_need_no_answer_to_the_homework_q12(
    request, monkeypatch, tmp_path_factory, synthetic_root
):
    import losses

    def q12_stub(*args, **kwargs):
        raise NotImplementedError("Q12: compute the class weights in losses.py, see LAB.md")

    monkeypatch.setattr(losses, "class_weights_from_frequencies", q12_stub)
    run = test_lab.train_tiny_run(synthetic_root, tmp_path_factory.mktemp("without-q12"))
    assert isinstance(run, type(ROOT)), run
    assert (run / "best.pt").is_file()


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        ("while True:\n    pass", "Q1: did not finish in 1 s; an endless loop"),
        ("raise KeyboardInterrupt", "Q1: your code raised KeyboardInterrupt"),
    ],
)
def test_an_answer_that_never_returns_or_raises_keyboard_interrupt_fails_its_check(
    answer, verdict, request, monkeypatch, tmp_path_factory
):
    endless = Mistake("endless", "data.py", "decode_semantic", lab_mistakes.CLAMP, answer)
    module, wrong = wrong_definition(endless)
    monkeypatch.setattr(module, "decode_semantic", wrong)
    monkeypatch.setattr(test_lab, "CHECK_DEADLINE_S", 1)
    monkeypatch.setattr(test_lab, "_out_of_time", set())
    results = run_checks(1, request, tmp_path_factory)
    assert results and all(message.startswith(verdict) for message in results.values()), results


@pytest.mark.parametrize(
    ("question", "variant"),
    [
        pytest.param(question, variant, id=f"Q{question}-{variant.name.replace(' ', '-')}")
        for question, variants in RIGHT_VARIANTS.items()
        for variant in variants
    ],
)
def test_each_right_answer_written_another_way_passes_its_checks(
    question, variant, request, monkeypatch, tmp_path_factory
):
    prepare_fixtures(question, request)
    module, other = wrong_definition(variant)
    monkeypatch.setattr(module, variant.where, other)
    results = run_checks(question, request, tmp_path_factory)
    assert results and all(message is None for message in results.values()), results
