"""The import graph of ``wsi_ssl``: every module imports, no import cycles between its modules
(module-level imports; those under ``if TYPE_CHECKING:`` or inside functions do not count), no
module over ~500 lines without a reason in its docstring, and the lazy exports resolve."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import wsi_ssl
from wsi_ssl.lazy import exported_names

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 500
MAX_FUNCTION_LINES = 80
REASON = "Size:"
"""A module over ``MAX_LINES`` says why in its docstring, on a line starting with this."""

LAZY_PACKAGES = (
    "wsi_ssl.search",
    "wsi_ssl.mil",
    "wsi_ssl.mil.models",
    "wsi_ssl.ssl",
    "wsi_ssl.evaluation",
)


def _modules() -> dict[str, Path]:
    """Every module of wsi_ssl (storage/ and cli/ are mapped into it) -> its file."""
    found: dict[str, Path] = {"wsi_ssl": Path(wsi_ssl.__file__)}
    packages = [wsi_ssl]
    for extra in ("wsi_ssl.storage", "wsi_ssl.cli"):
        packages.append(importlib.import_module(extra))
    for package in packages:
        found[package.__name__] = Path(package.__file__ or "")
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            spec = importlib.util.find_spec(info.name)
            if spec is not None and spec.origin and spec.origin.endswith(".py"):
                found[info.name] = Path(spec.origin)
    return found


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports run when the module is imported: module body, and ``if``/``try`` blocks in it
    (not ``if TYPE_CHECKING:``)."""
    out: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                stack.extend(node.body)
            stack.extend(node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend([*node.body, *node.orelse, *node.finalbody])
            for handler in node.handlers:
                stack.extend(handler.body)
    return out


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The wsi_ssl modules an import statement loads (the named module, or the package's
    submodule for ``from package import submodule``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
        return {n for n in names if n in MODULES}
    base = node.module or ""
    if node.level:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    out = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in MODULES:
            out.add(sub)
        elif base in MODULES:
            out.add(base)
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        edges: set[str] = set()
        for node in _top_level_imports(tree):
            edges |= _targets(module, path, node)
        edges.discard(module)
        # a package importing its own submodules is how packages are built, not a cycle
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_no_import_cycles_inside_wsi_ssl() -> None:
    graph = _graph()
    for package in MODULES:  # a package's __init__ importing its submodules is not a cycle
        if MODULES[package].name == "__init__.py":
            for child in list(graph[package]):
                if child.startswith(f"{package}.") and package in graph.get(child, set()):
                    raise AssertionError(f"{child} imports its own package {package} back")
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_module_over_the_size_limit_without_a_reason() -> None:
    over = {}
    for module, path in MODULES.items():
        text = path.read_text()
        n = len(text.splitlines())
        if n <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not any(line.strip().startswith(REASON) for line in doc.splitlines()):
            over[module] = n
    assert not over, (
        f"modules over {MAX_LINES} lines without a '{REASON}' line in their docstring: {over}"
    )


def test_no_function_over_the_size_limit_without_a_reason() -> None:
    over = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            doc = ast.get_docstring(node) or ""
            if n > MAX_FUNCTION_LINES and not any(
                line.strip().startswith(REASON) for line in doc.splitlines()
            ):
                over[f"{module}.{node.name}"] = n
    assert not over, (
        f"functions over {MAX_FUNCTION_LINES} lines without a '{REASON}' line in their "
        f"docstring: {over}"
    )


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_exports_resolve_and_match_all(package: str) -> None:
    module = importlib.import_module(package)
    names = exported_names(package)
    assert names and set(names) <= set(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is not None


def test_mil_config_and_search_config_load_no_torch_or_faiss() -> None:
    code = (
        "import sys\n"
        "from wsi_ssl.mil import MILConfig\n"
        "from wsi_ssl.search import IndexConfig\n"
        "MILConfig(); MILConfig(model='retrieval'); MILConfig(model='transmil')\n"
        "IndexConfig(kind='hnsw')\n"
        "print('torch' in sys.modules, 'faiss' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_a_wheel_holds_every_module_and_page_file(tmp_path: Path) -> None:
    """A non-editable install gets every package: the wheel built from a copy of the source
    holds each module and each file of the web page (three subpackages were left out of
    pyproject's list, so `tile` and `pretrain` failed outside an editable install)."""
    import shutil
    import zipfile

    source = tmp_path / "src"
    for name in ("wsi_ssl", "storage", "cli"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    built = subprocess.run(
        [*pip, "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("wsi_ssl-*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for folder, package in (
        ("wsi_ssl", "wsi_ssl"),
        ("storage", "wsi_ssl/storage"),
        ("cli", "wsi_ssl/cli"),
    ):
        for path in (source / folder).rglob("*"):
            if path.is_file() and (path.suffix == ".py" or "static" in path.parts):
                expected.add(f"{package}/{path.relative_to(source / folder).as_posix()}")
    assert sorted(expected - held) == []
