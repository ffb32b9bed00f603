"""The code's shape, as the README's code map promises it: imports read top-down, each layer keeps to itself, and
every module is short enough to read in one sitting.

- No import circle among the project's modules (module-level and function-level imports alike: a lazy import
  inside a function is still a dependency a reader has to follow).
- `inference/` knows nothing of HTTP or UIs; `webapp/` knows nothing of torch or transformers.
- No source file in `inference/` or `webapp/` over 500 lines, no class over 300, no function over 120.
- The folder tree is the architecture diagram: no folder holds more than 12 modules directly (a role that grows
  gets its own folder).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("inference", "webapp")
MAX_FILE_LINES = 500
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 120
MAX_MODULES_PER_FOLDER = 12
HTTP_AND_UI = ("webapp", "fastapi", "starlette", "gradio", "gradio_client", "uvicorn", "sse_starlette", "httpx")
TENSOR_LIBRARIES = ("torch", "transformers", "accelerate", "bitsandbytes", "safetensors", "gguf")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    found = {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}
    found["app"] = ROOT / "app.py"
    return found


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name `path` imports, anywhere in the file; relative imports resolved."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def project_graph() -> dict[str, set[str]]:
    modules = sources()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = {name for name in imported_names(path, module) if name in modules and name != module}
        # `import inference.x` runs inference/__init__.py first: a package is a dependency of its submodules' users,
        # but a package's own __init__ importing its submodules is not a cycle with them.
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if state.get(target) is None and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle() -> None:
    cycle = find_cycle(project_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    ("package", "forbidden"), [("inference", HTTP_AND_UI), ("webapp", TENSOR_LIBRARIES)], ids=["inference", "webapp"]
)
def test_each_layer_keeps_to_itself(package: str, forbidden: tuple[str, ...]) -> None:
    offenders = []
    for module, path in sources().items():
        if module.split(".")[0] != package:
            continue
        for name in imported_names(path, module):
            if name.split(".")[0] in forbidden:
                offenders.append(f"{module} imports {name}")
    assert not offenders, "; ".join(sorted(set(offenders)))


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_and_classes_are_short(package: str) -> None:
    too_long = []
    for path in sorted((ROOT / package).rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines (at most {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_CLASS_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}: class {node.name} is {length} lines")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}: function {node.name} is {length} lines")
    assert not too_long, "; ".join(too_long)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_folder_is_a_heap(package: str) -> None:
    crowded = []
    for folder in sorted(p for p in [ROOT / package, *(ROOT / package).rglob("*")] if p.is_dir()):
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        if modules and not (folder / "__init__.py").exists():
            crowded.append(f"{folder.relative_to(ROOT)} has modules but no __init__.py")
        if len(modules) > MAX_MODULES_PER_FOLDER:
            crowded.append(f"{folder.relative_to(ROOT)}: {len(modules)} modules (at most {MAX_MODULES_PER_FOLDER})")
    assert not crowded, "; ".join(crowded)
