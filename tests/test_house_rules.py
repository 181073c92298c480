"""The house rules a reader relies on, checked on the source itself: calls pass few positional
arguments, functions read in one sitting, checkpoints are unpacked only by the loaders, and
the report and the command line read records by attribute, never by string keys."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "mri_vqvae"

MAX_POSITIONAL = 5
MAX_LINES_IN_SRC = 60
MAX_LINES_ANYWHERE = 80
# Drawing routines may run longer in src/: one picture, stroke by stroke.
DRAWING_ROUTINES: dict[str, set[str]] = {}  # none is longer today
# The modules that may open a checkpoint file, and the functions only they call.
LOADERS = {"mri_vqvae/checkpoint.py", "mri_vqvae/trained.py"}
UNPACKING = {
    "load_checkpoint",
    "load_prior_checkpoint",
    "read_texture",
    "read_data_reference",
    "file_sha256",
    "build_model",
    "build_prior_model",
}
# Where summaries are read for people: only through their records' attributes.
READERS = ("mri_vqvae/report", "mri_vqvae/cli")


def python_files(*roots: Path) -> dict[str, str]:
    return {
        str(path.relative_to(ROOT)): path.read_text(encoding="utf-8")
        for root in roots
        for path in sorted(root.rglob("*.py"))
    }


def _called_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def crowded_calls(files: dict[str, str]) -> list[str]:
    """Calls passing more than MAX_POSITIONAL positional arguments (a starred one counts as
    one)."""
    found = []
    for name, source in files.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and len(node.args) > MAX_POSITIONAL:
                found.append(f"{name}:{node.lineno} {_called_name(node)}: {len(node.args)}")
    return found


def long_functions(files: dict[str, str], limit: int, allowed=None) -> list[str]:
    """Functions (methods included) longer than ``limit`` lines, but those ``allowed``."""
    allowed = allowed or {}
    found = []
    for name, source in files.items():
        short_name = name.removeprefix("src/")
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            if lines > limit and node.name not in allowed.get(short_name, ()):
                found.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    return found


def unpacking_outside_loaders(files: dict[str, str]) -> list[str]:
    found = []
    for name, source in files.items():
        if name.removeprefix("src/") in LOADERS:
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and _called_name(node) in UNPACKING:
                found.append(f"{name}:{node.lineno} {_called_name(node)}")
    return found


def string_key_reads(files: dict[str, str]) -> list[str]:
    """``value["key"]`` reads and ``value.get("key")`` calls (``sys.modules`` aside)."""
    found = []
    for name, source in files.items():
        for node in ast.walk(ast.parse(source)):
            if (
                isinstance(node, ast.Subscript)
                and isinstance(node.ctx, ast.Load)
                and isinstance(node.slice, ast.Constant)
                and isinstance(node.slice.value, str)
            ) or (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and ast.unparse(node.func.value) != "sys.modules"
            ):
                found.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    return found


def fail_listing(found: list[str], rule: str) -> None:
    if found:
        pytest.fail(f"{len(found)} place(s) break the rule {rule}:\n  " + "\n  ".join(found))


def test_no_call_in_src_passes_more_than_five_positional_arguments():
    files = python_files(SOURCE)
    assert len(files) > 40
    fail_listing(crowded_calls(files), f"of at most {MAX_POSITIONAL} positional arguments")


def test_functions_read_in_one_sitting():
    fail_listing(
        long_functions(python_files(SOURCE), MAX_LINES_IN_SRC, DRAWING_ROUTINES),
        f"of at most {MAX_LINES_IN_SRC} lines a function in src/ (drawing routines aside)",
    )
    everywhere = python_files(SOURCE, ROOT / "tests", ROOT / "benchmarks")
    fail_listing(
        long_functions(everywhere, MAX_LINES_ANYWHERE),
        f"of at most {MAX_LINES_ANYWHERE} lines a function anywhere",
    )


def test_checkpoints_are_unpacked_by_the_loaders_only():
    fail_listing(
        unpacking_outside_loaders(python_files(SOURCE)),
        f"that only {', '.join(sorted(LOADERS))} unpack a checkpoint file",
    )


def test_the_report_and_the_command_line_read_records_by_attribute():
    files = {
        name: source
        for name, source in python_files(SOURCE).items()
        if name.removeprefix("src/").startswith(READERS)
    }
    assert len(files) >= 5
    fail_listing(string_key_reads(files), "that summaries are read by attribute")


def test_the_checkers_find_what_they_look_for():
    """A checker that reads nothing would pass every test above."""
    bad = {
        "src/mri_vqvae/fake.py": (
            "def long():\n" + "    x = 1\n" * 80 + "\n"
            "f(1, 2, 3, 4, 5, 6)\n"
            "g(1, 2, 3, 4, 5)\n"
            "load_checkpoint(path)\n"
            "summary['ssim_mean']\n"
            "summary.get('ssim_mean')\n"
            "sys.modules.get('x')\n"
            "rows[0]\n"
        )
    }
    assert crowded_calls(bad) == ["src/mri_vqvae/fake.py:83 f: 6"]
    assert long_functions(bad, 60) == ["src/mri_vqvae/fake.py:1 long: 81 lines"]
    assert long_functions(bad, 60, {"mri_vqvae/fake.py": {"long"}}) == []
    assert unpacking_outside_loaders(bad) == ["src/mri_vqvae/fake.py:85 load_checkpoint"]
    reads = string_key_reads(bad)
    assert reads == [
        "src/mri_vqvae/fake.py:86 summary['ssim_mean']",
        "src/mri_vqvae/fake.py:87 summary.get('ssim_mean')",
    ]
