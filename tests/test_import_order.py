"""Imports point down: every module's imports (lazy ones inside functions included) follow the
layer order written once in docs/architecture.md ("Import order")."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".ci", "docs", "runs", "__pycache__"}


def read_layers(architecture_md: str) -> list[list[str]]:
    """The fenced block under "## Import order": one layer per line, lowest first."""
    section = architecture_md.split("## Import order", 1)[1]
    block = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    return [line.split() for line in block.splitlines() if line.strip()]


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted name → file of every project .py file (``tests/test_x.py`` → ``tests.test_x``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]) or rel.parts[0].startswith("."):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_names(source: str) -> list[tuple[int, str]]:
    """(line, dotted module) of every absolute import anywhere in ``source``, functions included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from engine import distributed`` imports engine.distributed: check the deeper name.
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def layer_entry(module: str, layers: list[list[str]]) -> tuple[int, str] | None:
    """(layer index, entry) of the longest layer entry that is ``module`` or a package of it."""
    best = None
    for i, layer in enumerate(layers):
        for entry in layer:
            if (module == entry or module.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (i, entry)
    return best


def resolve(name: str, importer: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name refers to, or None for third-party/stdlib names."""
    candidates = [name]
    if importer.startswith("tests."):
        candidates.append("tests." + name)   # pytest puts tests/ on sys.path: ``from test_predict import``
    for candidate in candidates:
        parts = candidate.split(".")
        for n in range(len(parts), 0, -1):     # ``from x import name`` may name a function, not a module
            if ".".join(parts[:n]) in modules:
                return ".".join(parts[:n])
    return None


def violations(layers: list[list[str]], modules: dict[str, Path], sources: dict[str, str]) -> list[str]:
    problems = []
    for module, source in sorted(sources.items()):
        own = layer_entry(module, layers)
        if own is None:
            problems.append(f"{module}: in no layer of the import order")
            continue
        for line, name in imported_names(source):
            target = resolve(name, module, modules)
            if target is None:
                continue
            theirs = layer_entry(target, layers)
            if theirs is None:
                problems.append(f"{module}:{line} imports {target}, which is in no layer")
            elif theirs[1] != own[1] and theirs[0] >= own[0]:
                where = "sideways" if theirs[0] == own[0] else "up"
                problems.append(f"{module}:{line} imports {target} ({where}: {own[1]} is layer {own[0]}, "
                                f"{theirs[1]} layer {theirs[0]})")
    return problems


def test_every_import_points_down():
    layers = read_layers((ROOT / "docs" / "architecture.md").read_text())
    modules = project_modules(ROOT)
    sources = {m: p.read_text() for m, p in modules.items()}
    assert {"utils.box_masks", "engine.trainer", "train", "tests.fixtures.workload"} <= set(modules)
    assert violations(layers, modules, sources) == []


def test_checker_catches_an_upward_lazy_import_and_a_sideways_one():
    layers = [["utils"], ["transforms", "metrics"], ["datasets"], ["tests.fixtures"], ["tests"]]
    modules = {m: Path(m) for m in ("utils.io", "transforms.core", "metrics.coco", "datasets.coco",
                                    "tests.fixtures.w", "tests.test_a", "tests.test_b")}
    sources = {
        "utils.io": "def f():\n    from datasets.coco import load\n",      # up, lazily
        "transforms.core": "import metrics.coco\n",                          # sideways
        "metrics.coco": "from utils import io\nimport numpy\n",              # down: fine
        "datasets.coco": "from utils.io import x\n",
        "tests.fixtures.w": "from tests.test_a import helper\n",             # fixtures above tests: up
        "tests.test_a": "from tests.fixtures.w import make\n",
        "tests.test_b": "from test_a import helper\n",                       # own package: fine
    }
    found = violations(layers, modules, sources)
    assert len(found) == 3
    assert found[0].startswith("tests.fixtures.w:1 imports tests.test_a (up")
    assert found[1].startswith("transforms.core:1 imports metrics.coco (sideways")
    assert found[2].startswith("utils.io:2 imports datasets.coco (up")
