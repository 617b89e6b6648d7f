"""The package layout holds: no import cycles, the worker apart, one job per module."""

from __future__ import annotations

import ast
from pathlib import Path

import ranksearch

ROOT = Path(ranksearch.__file__).parent
PACKAGES = ("config", "data", "search", "worker", "tracking", "answer", "cli")


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = ["ranksearch", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The ranksearch modules `path` imports when it runs (in functions too, not under
    `if TYPE_CHECKING:`)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("ranksearch"):
                for alias in child.names:
                    sub = f"{child.module}.{alias.name}"
                    found.add(sub if sub in modules else child.module)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("ranksearch"))
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) & set(modules) - {m} for m, p in modules.items()}


def test_no_module_imports_itself_back_through_others():
    graph = _graph()
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for dep in sorted(graph[module]):
            walk(dep, [*path, module])
        done.add(module)

    for module in sorted(graph):
        walk(module, [])


def test_the_worker_package_imports_nothing_of_ranksearch_outside_itself():
    for module, deps in _graph().items():
        if module.startswith("ranksearch.worker"):
            outside = {d for d in deps if not d.startswith("ranksearch.worker")}
            assert not outside, f"{module} imports {sorted(outside)}"


def test_every_package_says_its_job_in_its_docstring():
    for name in PACKAGES:
        doc = ast.get_docstring(ast.parse((ROOT / name / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()[0]) > 20, f"ranksearch.{name} has no one-line job"
