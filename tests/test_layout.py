"""The tree's shape, read from the source (no imports run): the dependency direction is one way
(no cycle between ftcore modules, at import time or inside functions, except the one lazy import
of Transformer.from_pretrained), the estimator never reaches up into the training loop, and no
module grows past the size one reads in a sitting."""
from __future__ import annotations

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 440  # ~400: past this a module is doing two jobs
# nanoGPT's GPT.from_pretrained does the same: the model class offers the loader, which needs the model
ALLOWED = {("ftcore.model", "ftcore.weights")}


def _modules() -> dict[str, Path]:
    """{module name: file}; kernels/*.py are importable as ftcore.kernels.NAME (their front door)."""
    mods = {}
    for p in sorted((ROOT / "ftcore").rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    for p in sorted((ROOT / "kernels").glob("*.py")):
        mods["ftcore.kernels." + p.stem] = p
    return mods


def _targets(name: str, path: Path, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
            for _ in range(node.level - 1):
                pkg = pkg.rsplit(".", 1)[0]
            base = pkg + ("." + base if base else "")
        return [f"{base}.{a.name}" for a in node.names] + [base]
    if isinstance(node, ast.Call):  # importlib.import_module("ftcore.x"), registries given module names
        return [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return []


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {module it imports: first line}} over every import statement, top level or not."""
    mods = _modules()
    graph: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for t in _targets(name, path, node):
                if not t.startswith("ftcore"):
                    continue
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name and not name.startswith(t + "."):  # a package's own __init__
                    graph[name].setdefault(t, node.lineno)
    return graph


def _cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(v):
        state[v] = 1
        path.append(v)
        for w in graph.get(v, {}):
            if (v, w) in ALLOWED:
                continue
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        path.pop()
        state[v] = 2
        return None

    for v in list(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_cycle_but_the_documented_one():
    graph = import_graph()
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)
    # the exception is the lazy import inside Transformer.from_pretrained, and only that
    model = (ROOT / "ftcore" / "model.py").read_text()
    line = graph["ftcore.model"]["ftcore.weights"]
    fn = next(n for n in ast.walk(ast.parse(model)) if isinstance(n, ast.FunctionDef) and n.name == "from_pretrained")
    assert fn.lineno <= line <= fn.end_lineno


def test_the_checker_sees_lazy_imports():
    graph = import_graph()
    assert "ftcore.weights" in graph["ftcore.model"]  # inside a function
    assert _cycle({"a": {"b": 1}, "b": {"a": 2}}) == ["a", "b", "a"]


def test_the_estimator_never_depends_on_the_loop():
    graph = import_graph()
    allowed = {"ftcore.config", "ftcore.model", "ftcore.hardware", "ftcore.optim", "ftcore.parallel", "ftcore.source"}
    for name, deps in graph.items():
        if name.startswith("ftcore.estimate"):
            extra = {d for d in deps if not d.startswith(("ftcore.estimate", "ftcore.kernels"))} - allowed
            assert not extra, f"{name} imports {sorted(extra)}"
    assert not any(d.startswith("ftcore.estimate") for d in graph["ftcore.memory"])  # measures, does not predict


def test_no_module_is_too_long():
    files = [*(ROOT / "ftcore").rglob("*.py"), *(ROOT / "kernels").glob("*.py"), *(ROOT / "bench").glob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
