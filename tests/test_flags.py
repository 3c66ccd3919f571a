"""Every flag of every command, given a bad value: exit status 2, one `error:` line, no
traceback, nothing written.

The flags are read from the parsers themselves (main.py, data.py, cache.py, check.py,
synthetic.py), so a flag added later is walked too. What counts as a bad value:

- a flag with `choices`: a value outside them;
- a flag with a `type`: the values its type lists in `bad_examples` (the types of cli.py
  list theirs), else "abc", and "nan" too for a plain float;
- a flag of free text (a path, an area, a model): a path below a regular file, which no
  folder, file or area can be; these are checked when the command runs, so the command is
  run (in this process, on tiny data).

Parse-time cases run in this process; a representative few run as real processes, so that
exit status and stderr are those a user sees.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest
from conftest import ROOT

import main
from seglab import cache, check, explore, synthetic

FREE_TEXT = "free text"  # the kind of a flag without type or choices


class ParserCaught(Exception):
    """Raised instead of parsing: the parser a program built has been caught."""


def parser_of(program_main: Callable[[list[str]], int]) -> argparse.ArgumentParser:
    """The parser that a program's main() builds, caught when main() calls parse_args (for
    the programs whose parser is not built by a function of its own)."""
    caught: list[argparse.ArgumentParser] = []

    def catch(self, *args, **kwargs):
        caught.append(self)
        raise ParserCaught

    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", catch),
        pytest.raises(ParserCaught),
    ):
        program_main([])
    return caught[0]


def programs() -> dict[str, argparse.ArgumentParser]:
    """Each command-line program and its parser."""
    return {
        "main.py": main.build_parser(),
        "seglab.explore": explore.build_parser(),
        "seglab.cache": cache.build_parser(),
        "seglab.check": parser_of(check.main),
        "seglab.synthetic": parser_of(synthetic.main),
    }


def commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(words that select the command, its parser) for the parser and its subcommands."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        yield prefix, parser
    for action in subcommands:
        for name, subparser in action.choices.items():
            yield from commands(subparser, (*prefix, name))


def flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The actions of a parser that take a value (help and switches take none)."""
    return [
        action
        for action in parser._actions
        if action.nargs != 0 and not isinstance(action, argparse._SubParsersAction)
    ]


def required_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """A filler for every required argument: enough to reach the flag under test."""
    filler: list[str] = []
    for action in flags(parser):
        if not action.option_strings:
            filler.append("input.png")
        elif action.required:
            filler += [action.option_strings[0], "x"]
    return filler


def bad_values(action: argparse.Action) -> tuple[str, list[str]]:
    """(kind, values that must be refused) of a flag, as the module docstring says."""
    if action.choices is not None:
        return "choices", ["not-a-choice"]
    if action.type is not None:
        values = list(getattr(action.type, "bad_examples", ["abc"]))
        if action.type is float:
            values.append("nan")
        return "type", values
    return FREE_TEXT, []


def parse_time_cases() -> list:
    cases = []
    for program, parser in programs().items():
        for words, command in commands(parser):
            for action in flags(command):
                kind, values = bad_values(action)
                name = action.option_strings[0] if action.option_strings else action.dest
                for value in values:
                    argv = [*words, *required_arguments(command), name, value]
                    if not action.option_strings:
                        argv = [*words, value, *required_arguments(command)[1:]]
                    label = f"{program} {' '.join(words)} {name} {value!r}".replace("  ", " ")
                    cases.append(pytest.param(program, argv, name, id=label))
    return cases


def assert_one_error_line(stderr: str) -> str:
    """The one `error:` line of stderr; no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    return errors[0]


def test_every_command_has_flags_to_walk():
    walked = {program: len(list(commands(parser))) for program, parser in programs().items()}
    assert walked["main.py"] >= 4 and walked["seglab.explore"] == 2
    assert len(parse_time_cases()) > 60


@pytest.mark.parametrize(("program", "argv", "flag"), parse_time_cases())
def test_a_bad_value_is_refused_where_it_is_parsed(
    program, argv, flag, tmp_path, capsys, monkeypatch
):
    parser = programs()[program]
    monkeypatch.chdir(tmp_path)  # nothing may be written, here or anywhere
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    line = assert_one_error_line(capsys.readouterr().err)
    assert flag in line or f"argument {flag}" in line
    assert list(tmp_path.iterdir()) == []


def test_the_fillers_alone_parse():
    """The walk reaches each flag: the required arguments filled in, every command parses."""
    for parser in programs().values():
        for words, command in commands(parser):
            parser.parse_args([*words, *required_arguments(command)])


@pytest.mark.parametrize(
    "bad",
    [
        ["--batch-size", "0"], ["--batch-size", "-2"], ["--lr", "-0.01"], ["--lr", "nan"],
        ["--img-size", "0"], ["--img-size", "-5"], ["--img-size", "100000"],
        ["--workers", "-1"], ["--subset", "0"], ["--subset", "-4"], ["--num-blocks", "0"],
        ["--num-blocks", "12"], ["--epochs", "0"], ["--epochs", "-3"],
    ],
    ids=" ".join,
)  # fmt: skip
def test_the_values_once_met_with_a_traceback_are_refused_as_parsed(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.build_parser().parse_args(["train", *bad])
    assert exit_info.value.code == 2
    assert f"argument {bad[0]}:" in assert_one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------
# Real processes, for exit status and stderr as a user sees them


def run_program(program: str, argv: list[str], cwd: Path) -> subprocess.Popen:
    """`python main.py ARGV` or `python -m seglab.MODULE ARGV`, run in `cwd`."""
    script = [str(ROOT / program)] if program.endswith(".py") else ["-m", program]
    return subprocess.Popen(
        [sys.executable, *script, *argv],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


REPRESENTATIVE = [
    ("main.py", ["train", "--batch-size", "0"], "--batch-size"),
    ("main.py", ["train", "--num-blocks", "6", "--base-chan", "256"], "M parameters"),
    ("seglab.explore", ["show", "--index", "abc"], "--index"),
    ("seglab.cache", ["write", "--out", "c", "--size", "0"], "--size"),
    ("seglab.check", ["--areas"], "--areas"),
    ("seglab.synthetic", ["--out", "s", "--size", "5"], "--size"),
]


def test_representative_bad_flags_in_real_processes(tmp_path):
    folders = [tmp_path / str(i) for i in range(len(REPRESENTATIVE))]
    processes = []
    for folder, (program, argv, _) in zip(folders, REPRESENTATIVE, strict=True):
        folder.mkdir()
        processes.append(run_program(program, argv, folder))  # all at once: a few seconds
    for folder, process, (program, argv, flag) in zip(
        folders, processes, REPRESENTATIVE, strict=True
    ):
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, (program, argv, stderr)
        assert flag in assert_one_error_line(stderr), (program, argv, stderr)
        assert list(folder.iterdir()) == [], (program, argv)


# ----------------------------------------------------------------------------------------
# Free text, checked when the command runs


# How each program runs in this process, and arguments with which each of its commands
# runs fast and well on the tiny data set (the walk then spoils one of them).
RUNNERS: dict[str, Callable[[list[str]], int]] = {
    "main.py": main.main,
    "seglab.explore": explore.main,
    "seglab.cache": cache.main,
    "seglab.check": check.main,
    "seglab.synthetic": synthetic.main,
}


def valid_arguments(
    program: str, words: tuple[str, ...], root: Path, model: Path, work: Path
) -> list[str]:
    first_rgb = next((root / "area_5a" / "data" / "rgb").iterdir())
    known = {
        ("main.py", "train"): [
            "--datadir", str(root), "--areas", "1", "--val-areas", "5a", "--epochs", "1",
            "--batch-size", "2", "--subset", "2", "--workers", "0", "--device", "cpu",
            "--logdir", str(work / "runs"), "--num-blocks", "2", "--base-chan", "4",
            "--img-size", "32", "--name", "run",
        ],
        ("main.py", "test"): [
            "--model", str(model), "--datadir", str(root), "--areas", "5a", "--subset", "2",
            "--workers", "0", "--device", "cpu", "--out", str(work / "test"),
        ],
        ("main.py", "predict"): [
            str(first_rgb), "--model", str(model), "--out", str(work / "predictions"),
            "--device", "cpu",
        ],
        ("main.py", "export"): ["--model", str(model), "--out", str(work / "model.pt2")],
        ("seglab.explore", "show"): [
            "--datadir", str(root), "--areas", "5a", "--out", str(work / "show.png"),
        ],
        ("seglab.explore", "histogram"): [
            "--datadir", str(root), "--areas", "5a", "--out", str(work / "hist.json"),
        ],
        ("seglab.cache", "write"): [
            "--datadir", str(root), "--areas", "5a", "--out", str(work / "cache"), "--size", "16",
        ],
        ("seglab.check",): ["--datadir", str(root), "--areas", "5a"],
        ("seglab.synthetic",): [
            "--out", str(work / "synthetic"), "--areas", "1", "--images-per-area", "1",
            "--size", "16",
        ],
    }  # fmt: skip
    if (program, *words) not in known:
        pytest.fail(f"{program} {' '.join(words)} is new: give it arguments in valid_arguments")
    return known[(program, *words)]


def free_text_cases() -> list:
    cases = []
    for program, parser in programs().items():
        for words, command in commands(parser):
            for action in flags(command):
                if bad_values(action)[0] != FREE_TEXT:
                    continue
                flag = action.option_strings[0] if action.option_strings else None
                label = f"{program} {' '.join(words)} {flag or action.dest}".replace("  ", " ")
                cases.append(pytest.param(program, words, flag, id=label))
    return cases


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize(("program", "words", "flag"), free_text_cases())
def test_a_bad_path_or_name_is_refused_in_one_line_when_the_command_runs(
    program, words, flag, synthetic_root, tiny_model, tmp_path, capsys
):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    bad = str(blocker / "x")  # below a regular file: no folder, file or area is there
    work = tmp_path / "work"
    work.mkdir()
    arguments = valid_arguments(program, words, synthetic_root, tiny_model, work)
    if flag is None:  # predict's images: this one input cannot be read
        arguments = [bad, *arguments[1:]]
    else:
        arguments += [flag, bad]
    data_before = files_under(synthetic_root)
    status = RUNNERS[program]([*words, *arguments])
    err = capsys.readouterr().err
    assert status == (1 if flag is None else 2), err
    assert "a-file" in assert_one_error_line(err)
    assert files_under(work) == set() and files_under(synthetic_root) == data_before
