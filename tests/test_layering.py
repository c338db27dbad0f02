"""The package's import structure: nothing imports the CLI but the entry point, and no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path, module: str) -> set[str]:
    """Absolute names of the soda_backdoor modules ``path`` imports (relative imports resolved)."""
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
                out.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module and node.module.startswith("soda_backdoor"):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("soda_backdoor"))
    return out


def _graph() -> dict[str, set[str]]:
    """Subpackage -> the subpackages it imports (``soda_backdoor.X``)."""
    top = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    graph: dict[str, set[str]] = {}
    for path in (SRC / "soda_backdoor").rglob("*.py"):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        for dep in _imports(path, module):
            if top(dep) != top(module):
                graph.setdefault(top(module), set()).add(top(dep))
    return graph


def test_only_the_entry_point_imports_the_cli() -> None:
    users = {pkg for pkg, deps in _graph().items() if "soda_backdoor.cli" in deps}
    assert users == {"soda_backdoor.__main__"}
    for script in [*ROOT.glob("*.py"), *(ROOT / "research").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        assert not any(m.startswith("soda_backdoor.cli") for m in _imports(script, "script")), script


def test_no_import_cycle_between_subpackages() -> None:
    graph = _graph()

    def reaches(a: str, b: str, seen: set[str]) -> bool:
        for n in graph.get(a, ()):
            if n == b or (n not in seen and (seen.add(n) or reaches(n, b, seen))):
                return True
        return False

    cycles = sorted((a, b) for a in graph for b in graph[a] if reaches(b, a, set()))
    assert not cycles
