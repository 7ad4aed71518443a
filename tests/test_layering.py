"""The import structure: ``opsdl_core`` is the bottom layer and its subpackages are layered, with
no import loops (lazy and type-checking imports included: a loop hidden in a function is still
a loop). Parsed from the source, nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("opsdl_core", "assets", "pipelines", "evals")
# opsdl_core's subpackages bottom-up: a module may import its own subpackage and the ones below it
LAYERS = [("config_schema", "config", "config_reference", "wheels", "grading", "run_dir"), ("models",), ("data",), ("lineage",), ("evaluation",), ("train",),
          ("experiment",), ("cli",)]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
# what each top-level package may import (besides itself)
ALLOWED = {"opsdl_core": set(), "evals": {"opsdl_core"}, "assets": {"opsdl_core"},
           "pipelines": {"opsdl_core", "assets"}}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every project module ``path`` imports: ``from a.b import c`` counts as a.b.c when that is a
    module, else as a.b; relative imports resolved."""
    mod = _module(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out |= {f"{target}.{a.name}" if _exists(f"{target}.{a.name}") else target for a in node.names}
    return {m for m in out if m.split(".")[0] in TOP and _exists(m)}


def _exists(mod: str) -> bool:
    p = ROOT / mod.replace(".", "/")
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    files = [p for top in TOP for p in (ROOT / top).rglob("*.py")]
    return {_module(p): _imports(p) - {_module(p)} for p in files}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _subpackage(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_checker_sees_a_loop_and_a_wrong_direction():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    graph = _graph()
    assert "opsdl_core.data.prepare" in graph["opsdl_core.train.recipe"]  # a relative import two levels up
    assert "opsdl_core.train.recipe" in graph["opsdl_core.train.job"]  # a lazy import inside a function


def test_no_import_loops():
    assert _cycles(_graph()) == []


def test_packages_import_only_downwards():
    wrong = []
    for mod, deps in _graph().items():
        top = mod.split(".")[0]
        for d in deps:
            dtop = d.split(".")[0]
            if dtop != top and dtop not in ALLOWED[top]:
                wrong.append(f"{mod} imports {d}")
            elif top == dtop == "opsdl_core" and _subpackage(mod) != _subpackage(d):
                a, b = _subpackage(mod), _subpackage(d)
                assert a in LAYER and b in LAYER, f"{mod} or {d}: a subpackage missing from LAYERS"
                if LAYER[b] > LAYER[a]:
                    wrong.append(f"{mod} imports {d} (layer {b} above {a})")
    assert wrong == []


def test_every_subpackage_is_layered_and_opsdl_core_has_no_dagster():
    subs = {_subpackage(m) for m in _graph() if m.startswith("opsdl_core.")}
    assert subs <= set(LAYER), subs - set(LAYER)
    for p in (ROOT / "opsdl_core").rglob("*.py"):
        assert "dagster" not in {m.split(".")[0] for m in _all_imports(p)}, p


def _all_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module)
    return out
