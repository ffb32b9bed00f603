"""The test suite's own layout: shared fixtures and helpers are written once (tests/conftest.py for fixtures,
tests/helpers.py for plain functions and constants), and no test module imports another."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).parent


def _parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_fixture(decorator: ast.expr) -> bool:
    """`@pytest.fixture`, `@pytest.fixture(...)`, `@fixture` or `@fixture(...)`."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    if isinstance(target, ast.Attribute):
        return target.attr == "fixture"
    return isinstance(target, ast.Name) and target.id == "fixture"


def _imported_test_modules(tree: ast.Module) -> set[str]:
    """The tests.test_* modules a module imports, at its top or inside a function, absolutely or relatively."""
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = f"tests.{node.module or ''}".rstrip(".") if node.level else node.module or ""
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if len(parts) >= 2 and parts[0] == "tests" and parts[1].startswith("test_"):
                imported.add(f"tests.{parts[1]}")
    return imported


def test_no_test_module_imports_another() -> None:
    offenders = {}
    for path in sorted(TESTS.glob("test_*.py")):
        imported = _imported_test_modules(_parsed(path)) - {f"tests.{path.stem}"}
        if imported:
            offenders[path.name] = sorted(imported)
    # What several test modules share belongs in tests/helpers.py (or, for a fixture, tests/conftest.py).
    assert not offenders, f"test modules importing another test module: {offenders}"


def test_no_fixture_defined_twice() -> None:
    homes: dict[str, set[str]] = defaultdict(set)
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(_parsed(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
                _is_fixture(decorator) for decorator in node.decorator_list
            ):
                homes[node.name].add(path.name)
    repeated = {name: sorted(files) for name, files in sorted(homes.items()) if len(files) > 1}
    # One fixture shared by several modules belongs in conftest.py; different fixtures need different names.
    assert not repeated, f"fixtures defined in more than one file: {repeated}"
