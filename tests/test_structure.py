"""The shape of the code: stages import only earlier stages, short functions and classes, and no
architecture chosen by comparing strings outside the registry (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from saecache.sae.archs import ARCHS

PACKAGE = Path(__file__).resolve().parents[1] / "saecache"
STAGES = ("core", "storage", "harvest", "sae", "train", "evaluate", "report", "export", "demo", "cli")
"""The data's way through saecache: a module may import from its own stage and earlier ones."""
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 40, 150


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def stage_of(module: str) -> int:
    """Index in STAGES of ``saecache.train.loop`` (train); the package root is stage 0."""
    parts = module.split(".")
    if len(parts) == 1:  # saecache itself (its __version__)
        return 0
    name = "cli" if parts[1] in ("cli", "__main__") else parts[1]
    return STAGES.index(name)


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every saecache import in a file, at any depth (lazy ones too)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "saecache":
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "saecache"]
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_module_belongs_to_a_stage():
    for path in modules():
        stage_of(module_name(path))  # ValueError for a folder that is not a stage


def test_no_module_imports_from_a_later_stage():
    backwards = []
    for path in modules():
        here = stage_of(module_name(path))
        for line, module in imported(ast.parse(path.read_text())):
            if stage_of(module) > here:
                backwards.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}")
    assert not backwards, "\n".join(backwards)


def lengths(kind: type) -> list[tuple[str, int]]:
    out = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, kind):
                out.append((f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}",
                            node.end_lineno - node.lineno + 1))
    return out


@pytest.mark.parametrize("kind, limit", [((ast.FunctionDef, ast.AsyncFunctionDef), MAX_FUNCTION_LINES),
                                         (ast.ClassDef, MAX_CLASS_LINES)])
def test_functions_and_classes_are_short(kind, limit):
    found = lengths(kind)
    assert found, "found nothing to measure"
    too_long = [f"{where}: {n} lines" for where, n in found if n > limit]
    assert not too_long, "\n".join(too_long)


def test_architectures_are_asked_not_compared():
    """`arch == "topk"` belongs in sae/archs.py only: elsewhere the registry is asked."""
    compared = []
    for path in modules():
        if path == PACKAGE / "sae" / "archs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                names = [c.value for c in (node.left, *node.comparators) if isinstance(c, ast.Constant)]
                if any(name in ARCHS for name in names if isinstance(name, str)):
                    compared.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not compared, "\n".join(compared)


def test_the_checks_see_a_violation(tmp_path):
    """The checks above can fail: a backwards import, a long function and a string switch."""
    source = ("from saecache.export.export import push\n"
              "def f(arch):\n" + "    x = 1\n" * MAX_FUNCTION_LINES + "    return arch == 'topk'\n")
    tree = ast.parse(source)
    assert [stage_of(m) for _, m in imported(tree)] == [STAGES.index("export")]
    (fn,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    assert fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES
    assert any(isinstance(n, ast.Compare) and n.comparators[0].value in ARCHS for n in ast.walk(tree))
