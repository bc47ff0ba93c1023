"""Layers only point down: the imports of ``src/polyquant`` (read with ``ast``, every import
statement, lazy ones inside functions included) form no cycle and none runs up the layer order of
``docs/architecture.md``."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "polyquant"

#: the layer of each top-level part of the package (docs/architecture.md, "Layers"); an import may
#: only go to the same or a lower layer, and parts of the same layer may not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("version", "qtypes", "data", "progress", "plugins", "cache", "registry"),
    ("tensor",),
    ("activations",),
    ("kernels",),
    ("nn",),
    ("calibration",),
    ("methods",),
    ("models",),
    ("formats",),
    ("eval", "convert", "export", "finetune"),
    ("report",),
    ("",),  # polyquant/__init__.py: the public API (its lazy attributes reach the layers below)
    ("cli",),
    ("__main__",),
]
RANK = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """``(imported polyquant module, line)`` for every import statement of one file."""
    out = []
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "polyquant"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "polyquant":
                continue
            for a in node.names:  # `from pkg import submodule` imports the submodule
                full = f"{target}.{a.name}"
                out.append((full if full in modules else target, node.lineno))
    return [(t, ln) for t, ln in out if t in modules or t == "polyquant"]


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, list[tuple[str, int]]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(m) for m in _modules()}
    assert parts <= set(RANK), f"parts without a layer in LAYERS (and docs/architecture.md): {sorted(parts - set(RANK))}"


def test_no_import_runs_up_the_layers():
    bad = []
    for src, targets in _graph().items():
        for dst, line in targets:
            a, b = _part(src), _part(dst)
            if a != b and RANK[b] >= RANK[a]:
                bad.append(f"{src}:{line} -> {dst} ({a or 'polyquant'} layer {RANK[a]} -> {b or 'polyquant'} layer {RANK[b]})")
    assert not bad, "imports that run up (or across) the layers:\n" + "\n".join(bad)


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), and self-imports."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
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
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph = {m: sorted({t for t, _ in ts}) for m, ts in _graph().items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import():
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    modules = _modules()
    src = "polyquant.kernels.base"
    fake = ROOT / "kernels" / "base.py"
    found = _imports(src, fake, modules)
    assert all(_part(t) in ("kernels", "tensor", "activations", "registry") for t, _ in found), found
