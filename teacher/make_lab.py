"""Write the students' version of the lab from this solution.

    python teacher/make_lab.py --out ../lab-student             # stubs in place of answers
    python teacher/make_lab.py --out ../lab-solution --solution   # the answers, markers removed
    python teacher/make_lab.py --out ../student --give Q4 Q9      # Q4 and Q9 given solved
    python teacher/make_lab.py --list                             # the marked regions
    python teacher/make_lab.py --time                             # time the core commands

The teacher edits only the solution (the project folder); the student version is generated, never
edited by hand. The lab's six scripts mark their exercises with two comment lines:

    def decode_semantic(semantic_rgb, label_table):
        (the docstring stays: it tells the student what to return)
        # >>> Q1: decode the label colors into class ids
        channels = semantic_rgb.to(torch.int32)
        ...
        # <<< Q1

- ``# >>> Qn: TASK`` opens a region and ``# <<< Qn`` closes it, with the same n and the same
  indentation. Every line of the region is indented at least as deep as its markers.
- In the student version the region becomes, at the markers' indentation,
  ``raise NotImplementedError("Qn: TASK in FILE, see LAB.md")``, wrapped as ruff format
  would when longer than 100 characters. Mark whole statements (a whole function body, or
  its end), so that the function still parses and raises only when called.
- ``# >>> Qn (optional): TASK`` marks code the program also runs without; the region becomes
  ``# TODO (Qn): TASK, see LAB.md``.
- Regions do not nest, are never empty, and never sit at module level (a stub there would
  raise at import). A broken marker stops the run with ``FILE:LINE: what is wrong``.
- Marker lines never reach the output: ``--solution`` writes the solution without them.

- ``--give Q4 Q9`` keeps the answers of the questions named (their markers removed), for a
  session too short for all of them.

The bundle holds the six scripts, progress.py, the package seglab/ (the machinery they
import, the synthetic data, the benchmark and the check before the session), LAB.md,
README.md, the setup files (requirements, constraints.txt, environment.yml, setup.sh,
demo.sh, test.sh, .gitignore), docs/ (the handout's figures and the set-up guide among
them), slurm/, pyproject.toml and the self-checks (tests/conftest.py, tests/test_lab.py):
the README's commands work in it, and its `bash test.sh` runs every self-check. The
teacher-side tests and teacher/ (this script, figures.py, lab_timing.py, class_view.py; the
teacher's guide TEACHER.md goes in the solution bundle only) are left out, and so are
the lines of README.md marked ``<!-- teacher -->`` (a line holding it, or a block between a
line ``<!-- teacher -->`` and a line ``<!-- /teacher -->``). With ``--give``, the bundle also
holds GIVEN, the questions given solved, one ``Qn`` a line (progress.py --json reports them).

``--out DIR`` may exist, e.g. a student's bundle to update: the files of the bundle are
replaced, everything else in DIR (a student's data/ or runs/, say) is left alone, and a
student's answer is never overwritten. In the six scripts, a function that holds a marked
region and no longer holds its stub is an answer: it is kept as the student wrote it, even
for a question given with ``--give``. A script that the student changed outside those
functions is left as it is, and its new version written beside it as NAME.new. DIR must lie
outside this folder. Two runs write identical trees.

``--time`` writes a bundle with every answer given to a temporary folder, runs there every
command of the core of the lab as a student would, one after the other, and prints the wall
time of each: the numbers of LAB.md's time plan.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # make_lab.py is in teacher/
sys.path.insert(0, str(PROJECT_ROOT))  # for seglab.cli, whatever the current folder

from seglab import cli  # noqa: E402 (after the project's folder is on the path)

# The scripts whose marked regions are replaced by stubs.
SOLUTION_FILES: tuple[str, ...] = (
    "data.py",
    "models.py",
    "metrics.py",
    "losses.py",
    "main.py",
    "utils.py",
)
# The pages of docs/ that README.md links to, docs/NAME.md.
DOC_PAGES: tuple[str, ...] = (
    "benchmark",
    "cluster",
    "data",
    "dependencies",
    "inference",
    "install",
    "limits",
    "slurm",
    "training",
)
# The figures of LAB.md, docs/lab/NAME.png, written by `python teacher/figures.py`.
LAB_FIGURES: tuple[str, ...] = ("sample", "unet", "curves", "predictions", "confusion")
# Files copied as they are; a marker in one of them is an error. The machinery modules come
# first: the lab's scripts import them, the handout never sends a student into them.
COPIED_FILES: tuple[str, ...] = (
    "progress.py",
    *(
        f"seglab/{name}.py"
        for name in (
            "__init__",
            "bench",
            "cache",
            "check",
            "checkpoints",
            "cli",
            "depth",
            "devices",
            "downloads",
            "evaluation",
            "explore",
            "export",
            "filesystem",
            "flags",
            "inference",
            "pngfiles",
            "preemption",
            "runfolder",
            "runstate",
            "setup_check",
            "synthetic",
            "tensorboard_log",
        )
    ),
    "LAB.md",
    "README.md",
    "requirements.txt",
    "requirements-dev.txt",
    "constraints.txt",
    "environment.yml",
    "setup.sh",
    "demo.sh",
    "test.sh",
    "slurm/one_node.sbatch",
    "slurm/several_nodes.sbatch",
    "slurm/local_cluster.sh",
    ".gitignore",
    *(f"docs/{name}.md" for name in DOC_PAGES),
    "docs/demo.png",
    *(f"docs/lab/{name}.png" for name in LAB_FIGURES),
    "pyproject.toml",
    "tests/conftest.py",
    "tests/test_lab.py",
)
# Copied as bytes, never searched for markers.
BINARY_FILES: frozenset[str] = frozenset(name for name in COPIED_FILES if name.endswith(".png"))
# Copied when present: the bundle is still complete without them.
OPTIONAL_FILES: frozenset[str] = frozenset({"README.md"})
# The teacher's guide: in the solution bundle, never in the students'.
TEACHER_FILES: tuple[str, ...] = ("teacher/TEACHER.md",)
# The questions given solved in a student bundle (progress.py reads it, same name there).
GIVEN_FILE = "GIVEN"
# Lines of README.md for the teacher only (see the top of this file).
TEACHER_LINE = "<!-- teacher -->"
TEACHER_BLOCK_END = "<!-- /teacher -->"

OPEN_MARKER = re.compile(
    r"^(?P<indent>[ \t]*)# >>> Q(?P<number>[1-9][0-9]*)(?P<optional> \(optional\))?: "
    r"(?P<task>\S.*?)\s*$"
)
CLOSE_MARKER = re.compile(r"^(?P<indent>[ \t]*)# <<< Q(?P<number>[1-9][0-9]*)\s*$")
LINE_LENGTH = 100  # of the project's ruff settings; stubs are wrapped to fit
# Anything that starts like a marker must be one: a typo would otherwise leak the solution.
MARKER_LIKE = re.compile(r"^[ \t]*# ?(>>>|<<<)")


class MarkerError(Exception):
    """A broken marker or bundle; str() is ``FILE:LINE: what is wrong`` where a line is known."""


@dataclass(frozen=True)
class Region:
    """A marked region of a solution file. Lines are 1-based and include both markers."""

    path: str
    question: int
    task: str
    optional: bool
    indent: str
    open_line: int
    close_line: int

    def stub(self) -> str:
        """The lines that replace the region in the student version, formatted as ruff
        format would (one line when it fits in LINE_LENGTH, else the message on its own)."""
        if self.optional:
            return f"{self.indent}# TODO (Q{self.question}): {self.task}, see LAB.md\n"
        message = f"Q{self.question}: {self.task} in {self.path}, see LAB.md"
        # A double-quoted literal, as ruff format writes them; json escapes quotes alike.
        literal = json.dumps(message, ensure_ascii=False)
        one_line = f"{self.indent}raise NotImplementedError({literal})"
        if len(one_line) <= LINE_LENGTH:
            return one_line + "\n"
        return (
            f"{self.indent}raise NotImplementedError(\n{self.indent}    {literal}\n{self.indent})\n"
        )


def find_regions(text: str, path: str) -> list[Region]:
    """The marked regions of one file, in order; MarkerError for any broken marker."""
    regions: list[Region] = []
    opened: re.Match | None = None
    open_line = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        opening, closing = OPEN_MARKER.match(line), CLOSE_MARKER.match(line)
        if opening:
            if opened:
                raise MarkerError(
                    f"{path}:{line_number}: Q{opening['number']} opens inside the region of "
                    f"Q{opened['number']} opened at line {open_line}; close it first (# <<< "
                    f"Q{opened['number']})"
                )
            if not opening["indent"]:
                raise MarkerError(
                    f"{path}:{line_number}: Q{opening['number']} is at module level, where its "
                    "stub would run at import; mark statements inside a function instead"
                )
            opened, open_line = opening, line_number
        elif closing:
            if not opened:
                raise MarkerError(
                    f"{path}:{line_number}: # <<< Q{closing['number']} closes no open region"
                )
            if closing["number"] != opened["number"]:
                raise MarkerError(
                    f"{path}:{line_number}: # <<< Q{closing['number']} closes the region of "
                    f"Q{opened['number']} opened at line {open_line}"
                )
            if closing["indent"] != opened["indent"]:
                raise MarkerError(
                    f"{path}:{line_number}: # <<< Q{closing['number']} is not indented like "
                    f"its opening marker at line {open_line}"
                )
            if line_number == open_line + 1:
                raise MarkerError(f"{path}:{open_line}: the region of Q{opened['number']} is empty")
            region = Region(
                path=path,
                question=int(opened["number"]),
                task=opened["task"],
                optional=bool(opened["optional"]),
                indent=opened["indent"],
                open_line=open_line,
                close_line=line_number,
            )
            if any(len(line) > LINE_LENGTH for line in region.stub().splitlines()):
                raise MarkerError(
                    f"{path}:{open_line}: the task of Q{region.question} makes a stub longer "
                    f"than {LINE_LENGTH} characters; shorten it"
                )
            regions.append(region)
            opened = None
        elif MARKER_LIKE.match(line):
            raise MarkerError(
                f"{path}:{line_number}: malformed marker {line.strip()!r}; the forms are "
                "'# >>> Qn: task', '# >>> Qn (optional): task' and '# <<< Qn'"
            )
        elif opened and line.strip() and not line.startswith(opened["indent"]):
            raise MarkerError(
                f"{path}:{line_number}: this line of the region of Q{opened['number']} is "
                f"indented less than its marker at line {open_line}"
            )
    if opened:
        raise MarkerError(
            f"{path}:{open_line}: the region of Q{opened['number']} is never closed "
            f"(# <<< Q{opened['number']})"
        )
    return regions


def student_version(text: str, path: str, give: frozenset[int] = frozenset()) -> str:
    """`text` with every marked region replaced by its stub, except those of the questions
    in `give`, which keep their answer without the markers; checked to still parse."""
    lines = text.splitlines(keepends=True)
    # source_lines[i]: the line of `text` that output line i + 1 comes from (a stub: its
    # opening marker), so that a syntax error is reported where the teacher can fix it.
    source_lines = list(range(1, len(lines) + 1))
    for region in reversed(find_regions(text, path)):
        if region.question in give:
            answer = slice(region.open_line, region.close_line - 1)
            lines[region.open_line - 1 : region.close_line] = lines[answer]
            source_lines[region.open_line - 1 : region.close_line] = source_lines[answer]
            continue
        stub = region.stub().splitlines(keepends=True)
        lines[region.open_line - 1 : region.close_line] = stub
        source_lines[region.open_line - 1 : region.close_line] = [region.open_line] * len(stub)
    result = "".join(lines)
    try:
        ast.parse(result, filename=path)
    except SyntaxError as error:
        output_line = min(max(error.lineno or 1, 1), len(source_lines))
        raise MarkerError(
            f"{path}:{source_lines[output_line - 1]}: the student version does not parse "
            f"({error.msg}); a region must hold whole statements, e.g. a whole function body"
        ) from None
    return result


def solution_version(text: str, path: str) -> str:
    """`text` without its marker lines, once the student version is known to be sound."""
    student_version(text, path)
    regions = find_regions(text, path)
    marker_lines = {r.open_line for r in regions} | {r.close_line for r in regions}
    lines = text.splitlines(keepends=True)
    return "".join(line for number, line in enumerate(lines, 1) if number not in marker_lines)


def check_no_markers(text: str, path: str) -> None:
    """MarkerError for a marker in a file that is copied as it is."""
    for line_number, line in enumerate(text.splitlines(), start=1):
        if MARKER_LIKE.match(line):
            raise MarkerError(
                f"{path}:{line_number}: solution markers belong only in "
                f"{', '.join(SOLUTION_FILES)}; this file is copied as it is"
            )


def without_teacher_lines(text: str, path: str) -> str:
    """`text` without its lines for the teacher: each line holding TEACHER_LINE, and
    each block from a line TEACHER_LINE to a line TEACHER_BLOCK_END, both included."""
    kept: list[str] = []
    block_start = 0
    for line_number, line in enumerate(text.splitlines(keepends=True), start=1):
        stripped = line.strip()
        if block_start:
            if stripped == TEACHER_BLOCK_END:
                block_start = 0
        elif stripped == TEACHER_LINE:
            block_start = line_number
        elif stripped == TEACHER_BLOCK_END:
            raise MarkerError(f"{path}:{line_number}: {TEACHER_BLOCK_END} closes no block")
        elif TEACHER_LINE not in line:
            kept.append(line)
    if block_start:
        raise MarkerError(f"{path}:{block_start}: {TEACHER_LINE} is never closed")
    return "".join(kept)


def build_bundle(
    source: Path, solution: bool = False, give: frozenset[int] = frozenset()
) -> dict[str, tuple[bytes, int]]:
    """Every file of the bundle as ``{relative path: (content, mode)}``, in a fixed order.

    solution: keep the answers (markers removed) instead of stubbing them, and add the
    teacher's guide. give: the questions whose answers the student version keeps.
    """
    bundle: dict[str, tuple[bytes, int]] = {}
    names = SOLUTION_FILES + COPIED_FILES + (TEACHER_FILES if solution else ())
    for name in names:
        path = source / name
        if not path.is_file():
            if name in OPTIONAL_FILES:
                continue
            raise MarkerError(f"{path}: missing; the bundle needs it")
        content = path.read_bytes()
        if name in SOLUTION_FILES:
            text = path.read_text()
            answers = (
                solution_version if solution else functools.partial(student_version, give=give)
            )
            text = answers(text, name)
            content = text.encode()
        elif name not in BINARY_FILES:
            check_no_markers(content.decode(), name)
            if name == "README.md" and not solution:
                content = without_teacher_lines(content.decode(), name).encode()
        # Only the executable bit is kept, so that the modes do not depend on the umask.
        mode = 0o755 if path.stat().st_mode & 0o100 else 0o644
        bundle[name] = (content, mode)
    if give and not solution:
        bundle[GIVEN_FILE] = ("".join(f"Q{n}\n" for n in sorted(give)).encode(), 0o644)
    return bundle


def all_regions(source: Path) -> list[Region]:
    """The marked regions of the solution files, file by file."""
    regions: list[Region] = []
    for name in SOLUTION_FILES:
        regions += find_regions((source / name).read_text(), name)
    return regions


def check_source(source: Path) -> None:
    """Refuse a --source that is not a solution folder, before anything reads it."""
    if not source.is_dir():
        raise MarkerError(f"--source {source}: no such folder")
    missing = [name for name in SOLUTION_FILES if not (source / name).is_file()]
    if missing:
        raise MarkerError(f"--source {source} is not the lab's solution: {missing[0]} is missing")


def check_out_dir(out: Path, source: Path) -> None:
    """Refuse to write into the project itself, inside it, over a file or below one, or
    where nothing can be written (a read-only disk, say), before writing any file."""
    out, source = out.resolve(), source.resolve()
    if out == source or source in out.parents:
        raise MarkerError(
            f"--out {out} is inside the project {source}: the bundle would overwrite or mix "
            "with the solution; write it elsewhere, e.g. --out ../segmentation-lab-student"
        )
    if out.exists() and not out.is_dir():
        raise MarkerError(f"--out {out} is a file, not a directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MarkerError(f"--out {out} lies below {parent}, which is a file")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as error:
        raise MarkerError(f"--out {out} cannot be written: {error.strerror or error}") from None


def write_bundle(bundle: dict[str, tuple[bytes, int]], out: Path) -> None:
    """Write the files of `bundle` under `out`, replacing those already there (see
    update_bundle for a folder that may hold a student's answers)."""
    for name, (content, mode) in bundle.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)


# ----------------------------------------------------------------------------------------
# Updating a student's bundle in place


def function_spans(text: str) -> dict[tuple[str, ...], tuple[int, int]]:
    """{qualified name, e.g. ("UNet", "forward"): (first line, decorators in; last line)}
    of every function of a module, methods and nested functions included (1-based)."""
    spans: dict[tuple[str, ...], tuple[int, int]] = {}

    def visit(body: list[ast.stmt], prefix: tuple[str, ...]) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = (*prefix, node.name)
                if not isinstance(node, ast.ClassDef):
                    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                    spans[name] = (first, node.end_lineno)
                visit(node.body, name)

    visit(ast.parse(text).body, ())
    return spans


def answer_functions(text: str, path: str) -> dict[tuple[str, ...], int]:
    """{qualified name: question} of the innermost function around each marked region of
    the solution file `text`."""
    spans = function_spans(text)
    functions = {}
    for region in find_regions(text, path):
        around = [n for n, (a, b) in spans.items() if a <= region.open_line <= b]
        functions[max(around, key=len)] = region.question
    return functions


def without_lines(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` without the lines of `spans` (1-based, inclusive)."""
    removed = {line for first, last in spans for line in range(first, last + 1)}
    lines = text.splitlines(keepends=True)
    return "".join(line for number, line in enumerate(lines, 1) if number not in removed)


def keep_answers(
    new: str, stubbed: str, student: str, functions: dict[tuple[str, ...], int]
) -> tuple[str | None, set[int]]:
    """The new version `new` of a script with the student's answers put back: (text, the
    questions whose answers were kept). `stubbed` is the version with every stub, `student`
    the file in the bundle, `functions` those that hold the answers (answer_functions).

    A function is answered when it no longer holds the stub of its question. The text is
    None when the student's file does not parse, lacks one of the functions, or differs
    from the stubbed version outside them: it is then to be left as it is.
    """
    try:
        student_spans = function_spans(student)
    except SyntaxError:
        return None, set()
    stubbed_spans, new_spans = function_spans(stubbed), function_spans(new)
    if any(name not in student_spans for name in functions):
        return None, set()
    outside_student = without_lines(student, [student_spans[name] for name in functions])
    outside_stubbed = without_lines(stubbed, [stubbed_spans[name] for name in functions])
    if outside_student != outside_stubbed:
        return None, set()
    student_lines = student.splitlines(keepends=True)
    merged = new.splitlines(keepends=True)
    kept = set()
    # From the bottom up, so that the line numbers above stay valid.
    for name in sorted(functions, key=lambda n: new_spans[n][0], reverse=True):
        first, last = student_spans[name]
        answer = "".join(student_lines[first - 1 : last])
        if re.search(rf'NotImplementedError\(\s*"Q{functions[name]}: ', answer):
            continue  # still the stub, at most reformatted
        stub_first, stub_last = stubbed_spans[name]
        if answer == "".join(stubbed.splitlines(keepends=True)[stub_first - 1 : stub_last]):
            continue
        new_first, new_last = new_spans[name]
        merged[new_first - 1 : new_last] = student_lines[first - 1 : last]
        kept.add(functions[name])
    return "".join(merged), kept


def given_questions(text: str) -> list[int]:
    """The question numbers of a GIVEN file's text ("Q4\nQ9\n" -> [4, 9])."""
    return [int(number) for number in re.findall(r"^Q(\d+)$", text, re.MULTILINE)]


def update_bundle(
    bundle: dict[str, tuple[bytes, int]], source: Path, out: Path
) -> tuple[set[int], list[str]]:
    """Write `bundle` into `out`, which may hold a student's answers: each script keeps
    them (keep_answers), a script changed elsewhere is left as it is and its new version
    written as NAME.new. Returns (the questions kept, the scripts left as they were)."""
    kept: set[int] = set()
    left_alone: list[str] = []
    for name in SOLUTION_FILES:
        existing = out / name
        if name not in bundle or not existing.is_file():
            continue
        text = (source / name).read_text()
        new = bundle[name][0].decode()
        try:
            student = existing.read_text()
        except UnicodeDecodeError:
            student = ""
        if student == new:
            continue
        merged, questions = keep_answers(
            new, student_version(text, name), student, answer_functions(text, name)
        )
        if merged is None:
            left_alone.append(name)
            bundle = {**bundle, f"{name}.new": bundle[name]}
            del bundle[name]
            continue
        kept |= questions
        bundle = {**bundle, name: (merged.encode(), bundle[name][1])}
    # GIVEN: the questions given before, and those given now that the student had not
    # answered already.
    given_now = set(given_questions(bundle.get(GIVEN_FILE, (b"", 0))[0].decode())) - kept
    given_file = out / GIVEN_FILE
    given = given_now | set(given_questions(given_file.read_text() if given_file.is_file() else ""))
    if given:
        numbers = "".join(f"Q{n}\n" for n in sorted(given))
        bundle = {**bundle, GIVEN_FILE: (numbers.encode(), 0o644)}
    write_bundle(bundle, out)
    return kept, left_alone


def question_numbers(names: list[str], regions: list[Region]) -> frozenset[int]:
    """ "Q4", "q4" or "4" -> 4, for questions that have an answer to give; MarkerError else."""
    answered = sorted({region.question for region in regions})
    numbers = set()
    for name in names:
        match = re.fullmatch(r"[Qq]?([1-9][0-9]*)", name.strip())
        if not match or int(match[1]) not in answered:
            raise MarkerError(
                f"--give {name}: not a question with code to give; those are "
                f"{' '.join(f'Q{n}' for n in answered)}"
            )
        numbers.add(int(match[1]))
    return frozenset(numbers)


def time_the_lab(source: Path) -> int:
    """`--time`: write a bundle with every answer given into a temporary folder and time
    the commands of the lab in it (lab_timing.py)."""
    import lab_timing  # teacher-side only, and it imports torch

    all_answers = frozenset(region.question for region in all_regions(source))
    with tempfile.TemporaryDirectory() as folder:
        bundle = Path(folder) / "lab"
        write_bundle(build_bundle(source, give=all_answers), bundle)
        return lab_timing.main(bundle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write the student (or solution) bundle of the lab from this solution.",
        epilog="The marker syntax is described at the top of teacher/make_lab.py.",
    )
    parser.add_argument("--out", help="directory to write the bundle to (outside this folder)")
    parser.add_argument(
        "--solution", action="store_true", help="keep the answers, drop only the marker lines"
    )
    parser.add_argument(
        "--give",
        nargs="+",
        default=[],
        metavar="QN",
        help="questions whose answers the student bundle keeps, e.g. --give Q4 Q9",
    )
    parser.add_argument("--list", action="store_true", help="print the marked regions and exit")
    parser.add_argument(
        "--time",
        action="store_true",
        help="time every core command of the lab in a bundle with all answers given, and exit",
    )
    parser.add_argument(
        "--source",
        default=str(PROJECT_ROOT),
        help="the solution folder (default: the project folder)",
    )
    args = parser.parse_args(argv)
    if not (args.list or args.time) and not args.out:
        parser.error("--out DIR is required (or --list, or --time)")
    if args.solution and args.give:
        parser.error("--give is for the student bundle; --solution already keeps every answer")
    return cli.run(run, args, (MarkerError,))


def run(args: argparse.Namespace) -> int:
    """List the regions, time the lab, or write (or update) the bundle, as `args` asks."""
    source = Path(args.source)
    check_source(source)
    if args.list:
        for region in all_regions(source):
            kind = "optional" if region.optional else "stub"
            where = f"{region.path}:{region.open_line}"
            print(f"Q{region.question:<3} {where:<16} {kind:<8} {region.task}")
        return 0
    if args.time:
        return time_the_lab(source)
    give = question_numbers(args.give, all_regions(source))
    out = Path(args.out)
    bundle = build_bundle(source, args.solution, give)
    check_out_dir(out, source)
    kept, left_alone = update_bundle(bundle, source, out)
    questions = sorted({region.question for region in all_regions(source)})
    kind = "solution" if args.solution else "student"
    given_now = sorted(give - kept)
    given = f" ({', '.join(f'Q{n}' for n in given_now)} given solved)" if given_now else ""
    print(
        f"wrote the {kind} bundle to {out}: {len(bundle)} files, questions "
        f"{', '.join(f'Q{n}' for n in questions)}{given}"
    )
    if kept:
        answers = ", ".join(f"Q{n}" for n in sorted(kept))
        print(f"kept the answers already written in {out}: {answers}")
    for name in left_alone:
        print(
            f"note: {out / name} was changed outside its answers: left as it is, the new "
            f"version written to {name}.new"
        )
    if "README.md" not in bundle:
        print("note: the project has no README.md, so neither has the bundle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
