"""The shape of the project: the folder shows the lab, the machinery lives in seglab/, and
the rules that keep it readable hold (no import cycles, short functions, one place for each
piece of machinery). Teacher-side: the student bundle does not ship this file."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

import main
from seglab import checkpoints

LAB_FILES = ("data.py", "models.py", "metrics.py", "losses.py", "main.py", "utils.py")
# The modules of the package that the lab's files may import: they import no lab file but
# data.py, so that no import goes in a circle and a student meets little machinery.
IMPORTED_BY_THE_LAB = {"seglab.cli", "seglab.pngfiles", "seglab.downloads"}
# Functions allowed past 100 lines: declarative tables.
LONG_TABLES = {("seglab/flags.py", "build_parser")}
# A checkpoint written by the release before the package existed (a 2-block UNet trained one
# epoch on synthetic data): the format must keep loading it.
OLD_CHECKPOINT = Path(__file__).parent / "fixtures" / "unet-tiny-before-seglab.pt"


def project_modules() -> dict[str, Path]:
    """Every Python module of the project outside tests/, by its import name."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in ("tests", ".venv", "demo", "runs", "data"):
            continue
        if relative.parts[0] == "teacher":  # run as scripts, with teacher/ on sys.path
            modules[path.stem] = path
        else:
            modules[".".join(relative.with_suffix("").parts).removesuffix(".__init__")] = path
    return modules


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules that `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in known and name != "seglab"}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def test_the_root_holds_the_lab_and_the_bundle_the_same_files(tmp_path):
    root_files = sorted(path.name for path in ROOT.glob("*.py"))
    assert len(root_files) <= 8, root_files
    assert set(LAB_FILES) <= set(root_files)
    bundle = tmp_path / "bundle"
    subprocess.run(
        [sys.executable, str(ROOT / "teacher" / "make_lab.py"), "--out", str(bundle)],
        check=True,
        capture_output=True,
    )
    assert sorted(path.name for path in bundle.glob("*.py")) == root_files
    package = sorted(path.name for path in (ROOT / "seglab").glob("*.py"))
    assert sorted(path.name for path in (bundle / "seglab").glob("*.py")) == package
    assert not (bundle / "teacher").exists()


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    state: dict[str, str] = {}  # "open" while its imports are walked, then "done"

    def walk(name: str, path: list[str]) -> None:
        state[name] = "open"
        for imported in sorted(graph[name]):
            if state.get(imported) == "open":
                cycle = path[path.index(imported) :] + [imported]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if imported not in state:
                walk(imported, [*path, imported])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])


def test_the_lab_files_import_only_the_small_modules_of_the_package():
    graph = import_graph()
    for name in ("data", "models", "metrics", "losses", "utils"):
        machinery = {module for module in graph[name] if module.startswith("seglab")}
        assert machinery <= IMPORTED_BY_THE_LAB, (name, machinery - IMPORTED_BY_THE_LAB)
    for module in IMPORTED_BY_THE_LAB:
        lab = {name for name in graph[module] if not name.startswith("seglab")}
        assert lab <= {"data"}, (module, lab)


def test_main_reads_in_one_sitting_and_functions_stay_short():
    assert len((ROOT / "main.py").read_text().splitlines()) <= 600
    long = []
    for path in project_modules().values():
        relative = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 100 and (relative, node.name) not in LONG_TABLES:
                    long.append(f"{relative}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_each_piece_of_machinery_lives_in_one_place():
    sources = {name: path.read_text() for name, path in project_modules().items()}
    # The hash check of downloaded files, the PNG checksums, the checkpoint's contents.
    assert [name for name, text in sources.items() if "HASH_REGEX" in text] == ["seglab.downloads"]
    assert [name for name, text in sources.items() if "crc32" in text] == ["seglab.pngfiles"]
    assert [name for name, text in sources.items() if '"optimizer_state":' in text] == [
        "seglab.checkpoints"
    ]
    # One way for a program to end a user's mistake in one line: cli.run.
    for name in ("main", "models", "seglab.explore", "seglab.cache", "seglab.check"):
        tree = ast.parse(sources[name])
        (main_function,) = [
            node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"
        ]
        assert "cli.run(" in ast.unparse(main_function), name
    assert "DataLoader(" not in sources["seglab.runstate"]  # data.make_loader builds them all


def test_a_checkpoint_written_before_the_package_still_loads_tests_and_predicts(
    synthetic_root, tmp_path
):
    model, checkpoint = checkpoints.load_model(OLD_CHECKPOINT, main.devices.pick_device("cpu"))
    assert checkpoint["model_config"]["num_blocks"] == 2 and not model.training
    out = tmp_path / "test"
    argv = ["test", "--model", str(OLD_CHECKPOINT), "--datadir", str(synthetic_root)]
    assert main.main([*argv, "--areas", "5a", "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "metrics.json").is_file()
    frame = next((synthetic_root / "area_5a" / "data" / "rgb").iterdir())
    predictions = tmp_path / "predictions"
    argv = ["predict", "--model", str(OLD_CHECKPOINT), str(frame), "--out", str(predictions)]
    assert main.main(argv) == 0
    assert len(list(predictions.glob("*_mask.png"))) == 1
