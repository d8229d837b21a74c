"""The package's imports only go down its layers, and no import cycle exists.

Every module of `src/specdec` is parsed; each import — at module level or inside a function — that
names a specdec module is an edge. The layers, lowest first:

    core → models → verify → drafting → methods → engine → tuning → bench | serving → cli

A module may import its own folder or a lower layer; `bench` and `serving` share a rank and must
not import each other. The root `specdec/__init__.py` is the public face (it loads names lazily)
and nothing inside the package imports it. Imports under `if TYPE_CHECKING:` are not edges.

One sanctioned way up: a module may name a module of a higher layer in a module-level constant
whose name ends in `_ENTRY` (a plugin entry, imported by name when first needed, as
`engine.pipeline.TUNER_ENTRY` names the tuner's module). Any other string that names a higher
module (`importlib.import_module("specdec.…")` hidden in a function) is an upward import too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "specdec"
RANK = {"core": 0, "models": 1, "verify": 2, "drafting": 3, "methods": 4, "engine": 5, "tuning": 6,
        "bench": 7, "serving": 7, "cli": 8}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def imported_modules(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(specdec module imported, line) for every import statement of the module."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            # `from a.b import c` imports a.b, and a.b.c when c is a module
            targets = [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
        for target in targets:
            if target == "specdec" or target.startswith("specdec."):
                while target not in known and "." in target:
                    target = target.rpartition(".")[0]
                out.append((target, node.lineno))
    return out


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def import_graph() -> dict[str, list[tuple[str, int]]]:
    mods = modules()
    known = set(mods)
    return {name: imported_modules(name, path, known) for name, path in mods.items()}


def test_every_module_belongs_to_a_layer():
    loose = [m for m in modules() if m != "specdec" and layer(m) is None]
    assert not loose, f"modules outside the layer folders: {loose}"


def test_imports_only_go_down_the_layers():
    bad = []
    for module, edges in import_graph().items():
        here = layer(module)
        if here is None:  # the root face may import anything (it does so lazily)
            continue
        for target, line in edges:
            there = layer(target)
            if target == "specdec":
                bad.append(f"{module}:{line} imports the package root")
            elif there != here and RANK[there] >= RANK[here]:
                bad.append(f"{module}:{line} ({here}) imports {target} ({there})")
    assert not bad, "imports that go up or sideways:\n" + "\n".join(bad)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
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
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = {m: {t for t, _ in edges if t != m} for m, edges in import_graph().items()}
    cycles = find_cycles(graph)
    assert not cycles, f"import cycles: {cycles}"


def upward_names(module: str, tree: ast.AST, known: set[str]) -> list[tuple[str, int]]:
    """(higher module, line) for every string of the module that names a specdec module of a higher
    layer ("specdec.x.y" or "specdec.x.y:attr"), except the values of module-level `*_ENTRY` constants."""
    here = layer(module)
    entries = {id(node.value) for node in getattr(tree, "body", [])
               if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.endswith("_ENTRY")
                                                      for t in node.targets)}
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in entries:
            continue
        name = node.value.partition(":")[0]
        if name in known and layer(name) is not None and here is not None and layer(name) != here \
                and RANK[layer(name)] >= RANK[here]:
            out.append((name, node.lineno))
    return out


def test_higher_modules_are_named_only_in_declared_entries():
    mods = modules()
    bad = [f"{m}:{line} names {target}" for m, path in mods.items()
           for target, line in upward_names(m, ast.parse(path.read_text()), set(mods))]
    assert not bad, "strings naming a higher layer's module outside an *_ENTRY constant:\n" + "\n".join(bad)


def test_the_check_fails_on_a_hidden_string_import():
    known = set(modules())
    hidden = ast.parse('def f():\n    import importlib\n    importlib.import_module("specdec.tuning.autotune")\n')
    assert upward_names("specdec.engine.x", hidden, known) == [("specdec.tuning.autotune", 3)]
    declared = ast.parse('TUNER_ENTRY = "specdec.tuning.autotune"\n')
    assert upward_names("specdec.engine.x", declared, known) == []


def test_no_private_names_cross_modules():
    bad = []
    mods = modules()
    for module, path in mods.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("specdec"):
                for alias in node.names:
                    if alias.name.startswith("_"):
                        bad.append(f"{module}:{node.lineno} imports {node.module}.{alias.name}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("needle", ["issue #", "issue 1", "issue 2", "issue 3", "issue 4", "issue 5", "issue 6",
                                    "issue 7", "issue 8", "issue 9", "shared/algorithms"])
def test_no_comment_cites_work_items_or_outside_files(needle):
    hits = [f"{p.relative_to(PKG.parent)}:{i}" for p in PKG.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if needle in line.lower()]
    assert not hits, f"{needle!r} in {hits}"


def test_the_check_fails_on_an_upward_import(tmp_path):
    """The parser sees function-local imports: a planted upward import inside a function is found."""
    src = "def f():\n    from specdec.cli.common import err\n"
    path = tmp_path / "x.py"
    path.write_text(src)
    edges = imported_modules("specdec.core.x", path, set(modules()))
    assert ("specdec.cli.common", 2) in edges
    assert RANK[layer(edges[0][0])] > RANK["core"]
