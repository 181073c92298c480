"""The package's layers: every import of one mri_vqvae module by another points down.

Each module of src/mri_vqvae has a level (LAYERS). A module may import a module of a strictly
lower level, or one of its own sub-package (mri_vqvae.train.prior may import
mri_vqvae.train.vqvae). Every import statement counts, the ones inside functions too: a lazy
import still ties the two modules together. A module missing from LAYERS fails, so a new
top-level module has to be given its place here.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "mri_vqvae"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# Level -> (name, the modules and sub-packages at that level). A name covers itself and what
# lies under it (mri_vqvae.model covers mri_vqvae.model.vqvae); the longest one that matches
# wins. The package root "mri_vqvae" covers only its own __init__.
LAYERS: dict[int, tuple[str, tuple[str, ...]]] = {
    # Base: errors, configuration, the sample measures' protocols, device and file helpers, and
    # the typed records that cross levels; they know nothing of images or networks.
    0: (
        "base",
        (
            "mri_vqvae",
            "mri_vqvae.errors",
            "mri_vqvae.config",
            "mri_vqvae.protocol",
            "mri_vqvae.runtime",
            "mri_vqvae.files",
            "mri_vqvae.records",
        ),
    ),
    # Pure functions on tensors and arrays: measures and pictures.
    1: ("pure functions", ("mri_vqvae.metrics", "mri_vqvae.plots")),
    # The parts: reading slices, the networks, the losses. Data and model never meet here.
    2: ("parts", ("mri_vqvae.data", "mri_vqvae.model", "mri_vqvae.losses")),
    # What is saved and shared: checkpoints and process groups.
    3: ("persistence", ("mri_vqvae.checkpoint", "mri_vqvae.distributed")),
    # A trained model loaded once into a handle: the only door from a file to a model.
    4: ("trained models", ("mri_vqvae.trained",)),
    # Splits encoded to code maps by a trained VQ-VAE: the prior's data.
    5: ("code maps", ("mri_vqvae.code_maps",)),
    # Using a trained model: new slices, their measures and the report page.
    6: (
        "generation and measures",
        ("mri_vqvae.generate", "mri_vqvae.evaluate", "mri_vqvae.report"),
    ),
    # The training loops.
    7: ("loops", ("mri_vqvae.train",)),
    # Whole runs, each a sequence of the above, for the command line to call.
    8: ("workflows", ("mri_vqvae.workflows",)),
    # The command line, the top: nothing imports it but `python -m mri_vqvae`.
    9: ("command line", ("mri_vqvae.cli", "mri_vqvae.__main__")),
}

# Levels whose modules may import one another although neither is below the other.
SAME_LEVEL_ALLOWED: dict[int, str] = {
    # config and files raise errors.UserError and write the root's __version__; records are
    # written through files; the base is one layer of leaves that imports nothing above it.
    0: "the base modules are the leaves of the package",
    # __main__ is only `python -m mri_vqvae`, the command line's second door.
    9: "__main__ runs the command line",
}

# Rules named on their own, so a broken one says which and why (the levels cover them too).
COMMAND_LINE = ("mri_vqvae.cli", "mri_vqvae.__main__")


def named_rules(importer: str, imported: str) -> list[str]:
    broken = []
    if within(imported, "mri_vqvae.cli") and not any(within(importer, m) for m in COMMAND_LINE):
        broken.append("nothing outside mri_vqvae.cli and __main__ imports mri_vqvae.cli")
    if within(importer, "mri_vqvae.report") and within(imported, "mri_vqvae.model"):
        broken.append("mri_vqvae.report imports no mri_vqvae.model")
    return broken


def within(module: str, name: str) -> bool:
    return module == name or module.startswith(name + ".")


def level_of(module: str) -> int | None:
    """The level of the longest name in LAYERS that covers module; None if none does."""
    best: tuple[int, int] | None = None
    for level, (_, names) in LAYERS.items():
        for name in names:
            matches = module == name if name == PACKAGE else within(module, name)
            if matches and (best is None or len(name) > best[0]):
                best = (len(name), level)
    return None if best is None else best[1]


def sub_package(module: str) -> str:
    """mri_vqvae.train.prior -> mri_vqvae.train; a top-level module is its own."""
    return ".".join(module.split(".")[:2])


def module_name(path: Path, root: Path = SOURCE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path = SOURCE) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def imports_of(
    module: str, source: str, is_package: bool, known: set[str]
) -> list[tuple[int, str]]:
    """(line, module) for every import of a mri_vqvae module in source, nested ones too.

    ``from mri_vqvae import plots`` imports mri_vqvae.plots when that is a module;
    ``from mri_vqvae import __version__`` imports the package root. Relative imports are
    resolved against module's package.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.append((node.lineno, name if name in known else base))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            found.append((node.lineno, node.args[0].value))
    ours = [(line, name) for line, name in found if within(name, PACKAGE)]
    return sorted(set(ours))


@dataclass(frozen=True)
class Violation:
    file: str
    line: int
    importer: str
    imported: str
    why: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}  {self.importer} -> {self.imported} {self.why}"


def describe(level: int | None) -> str:
    return "not in LAYERS" if level is None else f"level {level}"


def check(modules: dict[str, tuple[str, str, bool]]) -> list[Violation]:
    """The imports that break the layers. modules: name -> (file shown, source, is package)."""
    known = set(modules)
    violations = []
    for importer, (file, source, is_package) in sorted(modules.items()):
        mine = level_of(importer)
        if mine is None:
            violations.append(Violation(file, 1, importer, importer, "(module not in LAYERS)"))
        for line, imported in imports_of(importer, source, is_package, known):
            if imported == importer:
                continue
            theirs = level_of(imported)
            rules = named_rules(importer, imported)
            allowed = (
                mine is not None
                and theirs is not None
                and (
                    theirs < mine
                    or sub_package(imported) == sub_package(importer)
                    or (theirs == mine and mine in SAME_LEVEL_ALLOWED)
                )
            )
            if allowed and not rules:
                continue
            why = f"({describe(mine)} -> {describe(theirs)})"
            if imported not in known and theirs is not None:
                why += " [no such module]"
            why += "".join(f" [{rule}]" for rule in rules)
            violations.append(Violation(file, line, importer, imported, why))
    return violations


def read_package(root: Path = SOURCE) -> dict[str, tuple[str, str, bool]]:
    return {
        name: (
            str(path.relative_to(root.parents[1])),
            path.read_text(encoding="utf-8"),
            path.name == "__init__.py",
        )
        for name, path in package_modules(root).items()
    }


def test_imports_follow_the_layers():
    modules = read_package()
    assert len(modules) > 20, f"found only {sorted(modules)} under {SOURCE}"
    violations = check(modules)
    if violations:
        pytest.fail(
            f"{len(violations)} import(s) against the layers (LAYERS in {Path(__file__).name}):\n"
            + "\n".join(f"  {violation}" for violation in violations),
            pytrace=False,
        )


def test_the_checker_reports_a_wrong_import():
    """A checker that finds nothing because it reads nothing would pass the test above."""
    modules = read_package()
    vqvae = modules["mri_vqvae.model.vqvae"]
    wrong_text = (
        vqvae[1] + "\n\ndef late():\n    from mri_vqvae.cli import main\n    from .. import train\n"
    )
    modules["mri_vqvae.model.vqvae"] = (vqvae[0], wrong_text, False)
    modules["mri_vqvae.report.fake"] = ("fake.py", "from mri_vqvae.model import VQVAE\n", False)
    modules["mri_vqvae.newcomer"] = ("newcomer.py", "import mri_vqvae.errors\n", False)
    found = {(v.importer, v.imported): v for v in check(modules)}

    wrong = found[("mri_vqvae.model.vqvae", "mri_vqvae.cli.main")]
    assert str(wrong).startswith(f"{vqvae[0]}:{wrong.line}  mri_vqvae.model.vqvae -> mri_vqvae.cli")
    assert "(level 2 -> level 9)" in str(wrong)
    assert "nothing outside mri_vqvae.cli" in str(wrong)
    assert wrong_text.splitlines()[wrong.line - 1].strip() == "from mri_vqvae.cli import main"
    assert ("mri_vqvae.model.vqvae", "mri_vqvae.train") in found
    assert "mri_vqvae.report imports no mri_vqvae.model" in str(
        found[("mri_vqvae.report.fake", "mri_vqvae.model")]
    )
    assert "not in LAYERS" in str(found[("mri_vqvae.newcomer", "mri_vqvae.newcomer")])
    # What the layers allow is not reported: down a level, within a sub-package.
    assert ("mri_vqvae.model.vqvae", "mri_vqvae.config") not in found
    assert ("mri_vqvae.model.vqvae", "mri_vqvae.model.layers") not in found


def test_imports_are_resolved_like_python_does():
    known = {"mri_vqvae", "mri_vqvae.plots", "mri_vqvae.train", "mri_vqvae.train.vqvae"}
    source = (
        "from __future__ import annotations\n"
        "import os\n"
        "from mri_vqvae import __version__, plots\n"
        "from . import vqvae\n"
        "from ..plots import save_grid\n"
        "import mri_vqvae.train.vqvae as loop\n"
        "def late():\n"
        "    import importlib\n"
        "    importlib.import_module('mri_vqvae.cli')\n"
    )
    assert imports_of("mri_vqvae.train.prior", source, False, known) == [
        (3, "mri_vqvae"),
        (3, "mri_vqvae.plots"),
        (4, "mri_vqvae.train.vqvae"),
        (5, "mri_vqvae.plots"),
        (6, "mri_vqvae.train.vqvae"),
        (9, "mri_vqvae.cli"),
    ]
    assert level_of("mri_vqvae") == 0
    assert level_of("mri_vqvae.modelling") is None
    assert level_of("mri_vqvae.model.prior") == 2
    assert level_of("mri_vqvae.__main__") == 9
