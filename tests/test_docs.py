"""The documentation against the code, on the teacher's side (this file is not part of the
student bundle).

The pages are README.md, LAB.md, teacher/TEACHER.md and docs/*.md. From each, the commands
are read: the lines of console blocks (only the `$ ` lines when a block has prompts, with
their `\\` continuations), and the inline code that starts with `python`, `torchrun`,
`bash`, `sbatch`, a script (`main.py train ...`) or another tool (EXTERNAL_TOOLS, whose
flags are not checked). For each command of the project:

- the script or module it runs exists: `python main.py`, `python teacher/make_lab.py`,
  `python -m seglab.cache` (seglab/cache.py), `torchrun ... main.py`, `bash demo.sh`,
  `sbatch slurm/one_node.sbatch`, the test files of `python -m pytest`;
- it is a program, with a parser below, and the subcommand it names is one of the
  parser's;
- each `--flag` is one that this parser (or the subcommand's) accepts, spelled in full,
  and a flag with `choices` is given one of them.

A flag quoted alone in inline code (`--resume auto`) must belong to one of the programs, or
to a tool of EXTERNAL_FLAGS. Every relative link of the pages points to a file that exists,
and to a heading of it when it names one. README.md has at most 250 lines, and neither its
student version nor docs/ (copied as they are) names a teacher's tool. Every program's
`--help` runs, and so does every documented command that only asks for help.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import runpy
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import make_lab
import pytest
from conftest import ROOT
from test_flags import parser_of

PAGES = sorted(
    ["README.md", "LAB.md", "teacher/TEACHER.md"]
    + [path.relative_to(ROOT).as_posix() for path in (ROOT / "docs").glob("*.md")]
)
README_MAX_LINES = 250
# The programs of the project: the files that run as a command.
PROGRAMS = (
    "main.py",
    "models.py",
    "progress.py",
    "seglab/bench.py",
    "seglab/cache.py",
    "seglab/check.py",
    "seglab/explore.py",
    "seglab/synthetic.py",
    "teacher/make_lab.py",
    "teacher/figures.py",
    "teacher/class_view.py",
)

# Pages that the documentation links to and that are written separately: a link to one of
# them may point nowhere until it exists, and then its entry goes.
WRITTEN_SEPARATELY: frozenset[str] = frozenset()

# Words that start a command of another tool: its flags are that tool's, not checked here.
EXTERNAL_TOOLS = frozenset(
    {"conda", "cp", "cut", "pip", "ruff", "scontrol", "sha256sum", "squeue", "srun", "tensorboard"}
)
# Flags of other tools that a page may quote alone (torchrun's, and sbatch's for the job
# scripts), each with its tool.
EXTERNAL_FLAGS = {
    "--nproc_per_node": "torchrun",
    "--rdzv-id": "torchrun",
    "--shutdown-timeout": "torchrun",
    "--signal": "sbatch",
    "--requeue": "sbatch",
    "--kill-on-bad-exit": "srun",
    "--wait": "srun",
    "--batch": "scancel",
}
# The names a teacher's tool goes by; the student's README and docs/ name none of them.
TEACHER_TOOLS = ("teacher/", "make_lab", "TEACHER.md", "figures.py", "lab_timing", "lab_mistakes")

# Console blocks: a fence with one of these info strings.
SHELL_BLOCKS = frozenset({"console", "bash", "sh", "shell"})
FENCE = re.compile(r"^\s*(```|~~~)\s*(?P<info>\S*)")
INLINE_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
SHELL_OPERATORS = frozenset({"|", "||", "&&", ";", "&"})


# ----------------------------------------------------------------------------------------
# The programs


@functools.cache
def program_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every program of the project, by the path of its file, with its parser."""
    import class_view
    import figures

    import main
    import models
    import progress
    from seglab import bench, cache, check, explore, synthetic

    return {
        "main.py": main.build_parser(),
        "models.py": parser_of(models.main),
        "progress.py": parser_of(progress.main),
        "seglab/bench.py": bench.build_parser(),
        "seglab/cache.py": cache.build_parser(),
        "seglab/check.py": parser_of(check.main),
        "seglab/explore.py": explore.build_parser(),
        "seglab/synthetic.py": parser_of(synthetic.main),
        "teacher/make_lab.py": parser_of(make_lab.main),
        "teacher/figures.py": parser_of(figures.main_figures),
        "teacher/class_view.py": parser_of(class_view.main),
    }


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands of `parser` by name ({} for a program without any)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for subparser in subcommands(parser).values():
        yield from all_parsers(subparser)


@functools.cache
def project_flags() -> frozenset[str]:
    """Every flag of every program and subcommand."""
    return frozenset(
        option
        for parser in program_parsers().values()
        for each in all_parsers(parser)
        for option in each._option_string_actions
    )


def is_placeholder(word: str) -> bool:
    """A word that stands for a value the reader chooses: NAME, ROOT, $MODEL, ..."""
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*|\.\.\.|.*\$.*|.*[<>].*", word))


# ----------------------------------------------------------------------------------------
# Reading the pages


@dataclass(frozen=True)
class Snippet:
    """A command, or a piece of inline code, of a page."""

    page: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def split_fences(text: str) -> tuple[list[tuple[str, list[tuple[int, str]]]], str]:
    """The fenced blocks of a page as (info string, [(line number, line)]), and the page's
    prose: the page with the lines of its fenced blocks blanked, so that line numbers stay."""
    blocks: list[tuple[str, list[tuple[int, str]]]] = []
    prose: list[str] = []
    current: list[tuple[int, str]] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(line)
        if current is None and fence:
            current = []
            blocks.append((fence["info"].lower(), current))
        elif current is not None and fence:
            current = None
        elif current is not None:
            current.append((number, line))
        if current is None and not fence:
            prose.append(line)
        else:
            prose.append("")
    return blocks, "\n".join(prose)


def block_commands(page: str, info: str, lines: list[tuple[int, str]]) -> Iterator[Snippet]:
    """The commands of a fenced block: its `$ ` lines when it has any (the rest is output),
    else every line of a console block but comments; a line ending in a backslash goes on."""
    prompted = any(line.lstrip().startswith("$ ") for _, line in lines)
    if not prompted and info not in SHELL_BLOCKS:
        return
    command: list[str] = []
    start = 0
    for number, line in lines:
        stripped = line.strip()
        if not command:
            if stripped.startswith("#") or (prompted and not stripped.startswith("$ ")):
                continue
            start = number
            stripped = stripped.removeprefix("$ ")
        command.append(stripped.removesuffix("\\").strip())
        if not stripped.endswith("\\"):
            if command != [""]:
                yield Snippet(page, start, " ".join(command))
            command = []


def inline_code(page: str, prose: str) -> Iterator[Snippet]:
    """Each piece of inline code of the prose, on one line."""
    for match in INLINE_CODE.finditer(prose):
        line = prose.count("\n", 0, match.start()) + 1
        yield Snippet(page, line, " ".join(match[1].split()))


def is_python(word: str) -> bool:
    return word in ("python", "python3") or word.endswith("/python")


def is_inline_command(code: str) -> bool:
    """Whether inline code is a command: of the project, or of a tool of EXTERNAL_TOOLS."""
    words = code.split()
    if len(words) < 2:
        return False
    first = words[0]
    return (
        is_python(first)
        or first in {"torchrun", "bash", "sbatch"}
        or first.rsplit("/", 1)[-1] in EXTERNAL_TOOLS
        or (first.endswith(".py") and not words[1].startswith("("))
    )


@functools.cache
def page_snippets(page: str) -> tuple[list[Snippet], list[Snippet]]:
    """(the commands of a page, its other pieces of inline code)."""
    blocks, prose = split_fences((ROOT / page).read_text())
    commands = [command for info, lines in blocks for command in block_commands(page, info, lines)]
    others = []
    for code in inline_code(page, prose):
        (commands if is_inline_command(code.text) else others).append(code)
    return commands, others


# ----------------------------------------------------------------------------------------
# Checking a command


def simple_commands(snippet: Snippet) -> Iterator[list[str]]:
    """The words of each simple command of a snippet (split at |, &&, ...), without the
    variable assignments that lead them and without comments."""
    words = shlex.split(snippet.text, comments=True)
    command: list[str] = []
    for word in [*words, ";"]:
        if word in SHELL_OPERATORS:
            while command and re.fullmatch(r"\w+=.*", command[0]):
                command.pop(0)
            if command:
                yield command
            command = []
        else:
            command.append(word)


def program_and_arguments(words: list[str]) -> tuple[str | None, list[str], list[str]]:
    """(the project file a command runs, or None for another tool's; its arguments;
    what is wrong with the command)."""
    first = words[0]
    if is_python(first) and len(words) > 1:
        if words[1] == "-c":
            return None, [], []
        if words[1] == "-m" and len(words) > 2:
            module, arguments = words[2], words[3:]
            if module == "pytest":
                missing = [
                    f"{word}: no such test file"
                    for word in arguments
                    if word.startswith("tests/") and not (ROOT / word.split("::")[0]).exists()
                ]
                return None, [], missing
            if module.startswith("seglab."):
                return module.replace(".", "/") + ".py", arguments, []
            return None, [], []
        return words[1], words[2:], []
    if first == "torchrun":
        scripts = [index for index, word in enumerate(words) if word.endswith(".py")]
        if not scripts:
            return None, [], ["torchrun runs no script of the project"]
        return words[scripts[0]], words[scripts[0] + 1 :], []
    if first in ("bash", "sbatch"):
        files = [word for word in words[1:] if not word.startswith("-")]
        if files and not (ROOT / files[0]).is_file():
            return None, [], [f"{files[0]}: no such file"]
        return None, [], []
    if first.endswith(".py"):
        return first, words[1:], []
    return None, [], []


def flag_problems(parser: argparse.ArgumentParser, arguments: list[str], name: str) -> list[str]:
    """What `parser`, of the command `name`, would refuse among the flags of `arguments`: a
    subcommand it does not have, a flag it does not know (or knows only abbreviated), a
    value outside a flag's choices."""
    commands = subcommands(parser)
    positional = [word for word in arguments if not word.startswith("-")]
    if commands and positional and not arguments[0].startswith("-"):
        if positional[0] not in commands:
            return [f"no command {positional[0]!r} (the commands: {', '.join(commands)})"]
        command_at = arguments.index(positional[0])
        command = positional[0]
        return flag_problems(commands[command], arguments[command_at + 1 :], f"{name} {command}")
    problems = []
    for index, word in enumerate(arguments):
        if not word.startswith("--") or word == "--":
            continue
        flag, _, attached = word.partition("=")
        action = parser._option_string_actions.get(flag)
        if action is None:
            problems.append(f"{flag}: not a flag of {name}")
            continue
        if action.choices is None or action.nargs == 0:
            continue
        values = [attached] if attached else []
        for value in arguments[index + 1 :]:
            if attached or value.startswith("-") or (values and action.nargs in (None, "?")):
                break
            values.append(value)
        for value in values:
            if is_placeholder(value):
                continue
            try:
                converted = action.type(value) if callable(action.type) else value
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                converted = value
            if converted not in action.choices:
                problems.append(f"{flag} {value}: not one of {list(action.choices)}")
    return problems


def command_problems(snippet: Snippet) -> list[str]:
    """What is wrong with a command of a page; [] when nothing is."""
    problems = []
    for words in simple_commands(snippet):
        if words[0].rsplit("/", 1)[-1] in EXTERNAL_TOOLS:
            continue
        program, arguments, wrong = program_and_arguments(words)
        problems += wrong
        if program is None or is_placeholder(Path(program).stem):
            continue
        if not (ROOT / program).is_file():
            problems.append(f"{program}: no such file")
        elif program not in program_parsers():
            problems.append(f"{program}: not a program with a command line")
        else:
            problems += flag_problems(program_parsers()[program], arguments, program)
    return [f"{snippet}: {problem}" for problem in problems]


# ----------------------------------------------------------------------------------------
# Links


def heading_anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, as GitHub writes them."""
    _, prose = split_fences(page.read_text())
    anchors = set()
    for line in prose.splitlines():
        heading = HEADING.match(line)
        if heading:
            words = re.sub(r"[^\w\- ]", "", heading[1].lower())
            anchors.add(words.replace(" ", "-"))
    return anchors


def link_problems(page: str) -> list[str]:
    """Each relative link of a page that points to no file, or to no heading of it."""
    _, prose = split_fences((ROOT / page).read_text())
    problems = []
    for match in LINK.finditer(prose):
        target = match[1]
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        line = prose.count("\n", 0, match.start()) + 1
        path, _, anchor = target.partition("#")
        linked = (ROOT / page).parent / path if path else ROOT / page
        relative = Path(os.path.relpath(linked.resolve(), ROOT.resolve())).as_posix()
        if not linked.exists():
            if relative not in WRITTEN_SEPARATELY:
                problems.append(f"{page}:{line}: {target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            problems.append(f"{page}:{line}: {target}: no heading #{anchor} in {relative}")
    return problems


# ----------------------------------------------------------------------------------------
# The tests


def test_every_program_of_the_project_has_its_parser_here():
    files = [*ROOT.glob("*.py"), *ROOT.glob("seglab/*.py"), *ROOT.glob("teacher/*.py")]
    programs = {
        path.relative_to(ROOT).as_posix()
        for path in files
        if 'if __name__ == "__main__":' in path.read_text()
    }
    assert programs == set(PROGRAMS) == set(program_parsers())


def test_the_pages_show_commands():
    """The extraction finds what it should: a page whose commands all vanished would pass
    every other test."""
    for page in ("README.md", "LAB.md", "docs/training.md"):
        commands, _ = page_snippets(page)
        assert len(commands) >= 5, page
    texts = [command.text for command in page_snippets("LAB.md")[0]]
    assert any(text.startswith("python main.py train --datadir data/synthetic") for text in texts)
    assert any(text.startswith("torchrun") for text in texts)


@pytest.mark.parametrize("page", PAGES)
def test_every_command_runs_a_program_of_the_project_with_its_flags(page):
    commands, _ = page_snippets(page)
    problems = [problem for command in commands for problem in command_problems(command)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES)
def test_every_flag_quoted_alone_belongs_to_a_program(page):
    _, others = page_snippets(page)
    known = project_flags() | set(EXTERNAL_FLAGS)
    unknown = [f"{code}: {flag}" for code in others for flag in FLAG.findall(code.text)]
    unknown = [problem for problem in unknown if problem.rsplit(": ", 1)[1] not in known]
    assert not unknown, "\n".join(unknown)


@pytest.mark.parametrize("page", PAGES)
def test_every_link_points_to_a_file(page):
    problems = link_problems(page)
    assert not problems, "\n".join(problems)


def test_pages_written_separately_are_still_to_come():
    written = sorted(page for page in WRITTEN_SEPARATELY if (ROOT / page).exists())
    assert not written, f"{written} exist now: remove them from WRITTEN_SEPARATELY"


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_only_the_teacher_reads_about_the_teachers_tools():
    readme = (ROOT / "README.md").read_text()
    student_readme = make_lab.without_teacher_lines(readme, "README.md")
    assert "teacher/make_lab.py" in readme
    pages = {"README.md (student version)": student_readme}
    pages |= {path.name: path.read_text() for path in (ROOT / "docs").glob("*.md")}
    named = [
        f"{name}: {tool}" for name, text in pages.items() for tool in TEACHER_TOOLS if tool in text
    ]
    assert not named, "\n".join(named)


def documented_help_commands() -> list[str]:
    """The commands of the pages that only ask a program for its help, each once."""
    commands = {
        command.text
        for page in PAGES
        for command in page_snippets(page)[0]
        if {"--help", "-h"} & set(command.text.split())
    }
    return sorted(commands)


def module_name(program: str) -> str:
    return program.removesuffix(".py").replace("/", ".")


# runpy warns that the module it runs as __main__ was imported already (by the parsers).
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("program", PROGRAMS)
def test_every_program_prints_its_help(program, monkeypatch, capsys):
    """`python PROGRAM --help`, or `python -m seglab.NAME --help`, run in this process as
    Python runs them (a new process for each would import torch each time)."""
    monkeypatch.setattr(sys, "argv", [program, "--help"])
    with pytest.raises(SystemExit) as stopped:
        if program.startswith("seglab/"):
            runpy.run_module(module_name(program), run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(ROOT / program), run_name="__main__")
    assert stopped.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


@pytest.mark.parametrize("command", documented_help_commands())
def test_the_documented_help_commands_run(command):
    words = shlex.split(command)
    assert is_python(words[0]), command
    result = subprocess.run(
        [sys.executable, *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:"), result.stdout
