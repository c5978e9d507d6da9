"""The house's shape: components/ by life-cycle stage, each depending only on the stages below it, imports where a
reader sees them, and the README's Layout naming every module there is."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The rooms of components/, lowest first: a room imports only rooms before it (the engine never imports flows/).
LAYERS = [
    {"errors", "faults"},
    {"security", "checkpoint"},
    {"config"},
    {"data"},
    {"models"},
    {"rl"},
    {"evaluation"},
    {"reward"},
    {"tracking"},
    {"demo"},
]
RANK = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}

# Where a project import may wait inside a function, and why.
DEFERRED = {
    "flows.cli": "`alignflow --help`, `config show` and a bad flag answer at once: a command imports the stage it runs "
                 "(torch, transformers, MLflow, Prefect) when it runs it",
}

def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py"))


def _name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, made at module level) for each project import of `path`."""
    tree = ast.parse(path.read_text())
    top_level = set()
    for node in tree.body:
        top_level.update(ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in ("components", "flows"):
                found += [(f"{node.module}.{alias.name}", node in top_level) for alias in node.names]
            else:
                found.append((node.module, node in top_level))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node in top_level) for alias in node.names]
    return [(module, top) for module, top in found if module.split(".")[0] in ("components", "flows")]


def test_every_room_of_components_has_a_layer():
    rooms = {p.name for p in (ROOT / "components").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    rooms |= {p.stem for p in (ROOT / "components").glob("*.py") if p.stem != "__init__"}
    assert rooms == set(RANK), f"rooms without a layer: {rooms - set(RANK)}; layers without a room: {set(RANK) - rooms}"


def test_components_import_only_the_rooms_below_them_and_never_flows():
    upward = []
    for path in _modules("components"):
        source = _name(path)
        for module, _ in _imports(path):
            assert not module.startswith("flows"), f"{source} imports {module}: the engine never imports the flows"
            if RANK[_room(module)] > RANK[_room(source)]:
                upward.append(f"{source} -> {module}")
    assert not upward, "upward imports: " + ", ".join(upward)


def test_project_modules_import_at_the_top():
    deferred = [f"{_name(path)}: {module}" for package in ("components", "flows") for path in _modules(package)
                for module, top in _imports(path)
                if not top and not any(_name(path).startswith(place) for place in DEFERRED)]
    assert not deferred, "project imports inside functions (hide the import graph): " + ", ".join(deferred)


def _layout_block() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^## Layout\n.*?^```\n(.*?)^```", readme, re.S | re.M)
    assert match, "README has no Layout block"
    return match.group(1)


@pytest.mark.parametrize("package", ["components", "flows"])
def test_the_readme_layout_names_every_module(package):
    block = _layout_block()
    missing = []
    for path in _modules(package):
        if path.name == "__init__.py":
            folder = path.parent.relative_to(ROOT / package)
            if str(folder) != "." and f"{folder.name}/" not in block:
                missing.append(f"{package}/{folder}/")
        elif not re.search(rf"(?<![\w/]){re.escape(path.name)}", block):
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, "the README's Layout does not name: " + ", ".join(missing)
