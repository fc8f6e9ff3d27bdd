"""The layering rule, checked on the source: imports only go down.

core (the flat modules of ``deit``) → ``deit.train`` / ``deit.deploy`` → tools (``deit.bench``)
→ ``deit.cli``. Every import statement counts, also those inside functions; the entry points
(``__main__`` modules) belong to the command line.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# What each layer must not import (prefixes of module names). deit.deploy may read training's
# datasets (quantize calibrates on them) but nothing else of deit.train.
FORBIDDEN = {
    "core": ("deit.train", "deit.deploy", "deit.bench", "deit.cli"),
    "train": ("deit.deploy", "deit.bench", "deit.cli"),
    "deploy": ("deit.bench", "deit.cli", "deit.train.loop", "deit.train.evaluate"),
    "tools": ("deit.cli",),
    "cli": (),
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(name: str) -> str:
    parts = name.split(".")
    if parts[-1] == "__main__" or name.startswith("deit.cli"):
        return "cli"
    if name.startswith("deit.train"):
        return "train"
    if name.startswith("deit.deploy"):
        return "deploy"
    if name == "deit.bench":
        return "tools"
    return "core"


def imports_of(path: Path, name: str) -> list[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names]
    return found


def violations(root: Path) -> list[str]:
    """``module imports target`` for every import that goes up or sideways."""
    out = []
    for path in sorted((root / "deit").rglob("*.py")):
        name = module_name(path, root)
        forbidden = FORBIDDEN[layer_of(name)]
        for target in imports_of(path, name):
            if target.startswith(forbidden) and target not in ("deit.train.data",):
                hit = next(f for f in forbidden if target.startswith(f))
                if target == hit or target.startswith(hit + "."):
                    out.append(f"{name} imports {target}")
    return sorted(set(out))


def test_imports_only_go_down() -> None:
    assert violations(SRC) == []


def test_the_check_fails_on_an_upward_import(tmp_path: Path) -> None:
    shutil.copytree(SRC / "deit", tmp_path / "deit")
    model = tmp_path / "deit" / "model.py"
    late = "\n\ndef _late() -> None:\n    from deit.cli import main\n"
    model.write_text(model.read_text() + late)
    (tmp_path / "deit" / "train" / "losses.py").write_text("from deit.deploy import export\n")
    assert violations(tmp_path) == [
        "deit.model imports deit.cli",
        "deit.model imports deit.cli.main",
        "deit.train.losses imports deit.deploy",
        "deit.train.losses imports deit.deploy.export",
    ]


def test_no_library_module_parses_arguments() -> None:
    library = [p for p in (SRC / "deit").rglob("*.py") if layer_of(module_name(p, SRC)) != "cli"]
    parsing = ("ArgumentParser(", ".add_argument(", "add_subparsers(")
    assert [p.name for p in library if any(s in p.read_text() for s in parsing)] == []
