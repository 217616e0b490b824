"""The engine's rooms and import directions (docs/architecture.md).

Every module of ``lsnet`` belongs to one room; a module may import (at any depth: module level,
functions, methods) only modules of its own room or of rooms below it, and the module graph has no
cycle.  The checks read the source with ``ast``, so an import hidden inside a function counts as much
as one at the top of a file.  The checker functions themselves are tested on small made-up graphs,
so a broken checker cannot pass silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parent.parent / "LSNetSegmentation" / "lsnet"

# Bottom to top.  A room may import its own modules and any room listed before it.
ROOMS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("lsnet._version", "lsnet.errors")),
    ("data", ("lsnet.config", "lsnet.results")),
    ("io", ("lsnet.io",)),
    ("method", ("lsnet.method",)),
    ("seeds", ("lsnet.seeds",)),
    ("architectures", ("lsnet.architectures",)),
    ("pipeline", ("lsnet.pipeline",)),
    ("samples", ("lsnet.samples",)),
    ("api", ("lsnet.api",)),
    ("app", ("lsnet.app",)),
    ("facade", ("lsnet", "lsnet.__main__")),
]


def module_name(path: Path, root: Path = ENGINE) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def engine_modules(root: Path = ENGINE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Engine modules imported anywhere in ``path`` (module ``name``), relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    root_pkg = name.split(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        # the longest known module that ``target`` names (``lsnet.io.outputs.write_outputs`` -> ``lsnet.io.outputs``)
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == root_pkg:
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != root_pkg:
                continue
            for alias in node.names:
                full = f"{mod}.{alias.name}"
                add(full if full in known else mod)
    found.discard(name)
    return found


def import_graph(root: Path = ENGINE) -> dict[str, set[str]]:
    mods = engine_modules(root)
    known = set(mods)
    return {name: imports_of(path, name, known) for name, path in mods.items()}


def room_of(module: str, rooms=ROOMS) -> tuple[int, str]:
    best = None
    for rank, (room, prefixes) in enumerate(rooms):
        for prefix in prefixes:
            exact_only = "." not in prefix  # the root package's __init__, not everything below it
            if module == prefix or (not exact_only and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[2]:
                    best = (rank, room, len(prefix))
    if best is None:
        raise KeyError(module)
    return best[0], best[1]


def upward_imports(graph: dict[str, set[str]], rooms=ROOMS) -> list[str]:
    bad = []
    for src, targets in sorted(graph.items()):
        rs, room_s = room_of(src, rooms)
        for dst in sorted(targets):
            rd, room_d = room_of(dst, rooms)
            if rd > rs or (rd == rs and room_d != room_s):
                bad.append(f"{src} ({room_s}) imports {dst} ({room_d})")
    return bad


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as ``[a, b, ..., a]``, or ``[]``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


# --------------------------------------------------------------------------------------------- the checks
def test_every_module_has_a_room():
    missing = []
    for name in engine_modules():
        try:
            room_of(name)
        except KeyError:
            missing.append(name)
    assert not missing, f"modules outside every room (add them to ROOMS and docs/architecture.md): {missing}"


def test_no_import_runs_up_the_rooms():
    bad = upward_imports(import_graph())
    assert not bad, "imports against the room order (docs/architecture.md):\n" + "\n".join(bad)


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_few_files_at_the_top_and_every_room_documented():
    top = sorted(p.name for p in ENGINE.glob("*.py"))
    assert len(top) <= 12, top
    for init in sorted(ENGINE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert "May import" in doc, f"{init.parent.name}/__init__.py must say what the room holds and may import"


def test_torch_free_modules_stay_torch_free():
    """The Slicer module imports these before PyTorch is installed: no torch at module level, nor
    through an engine module they import at module level."""
    mods = engine_modules()
    known = set(mods)

    def top_level_imports(name):
        tree = ast.parse(mods[name].read_text(encoding="utf-8"))
        out = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                out.add(node.module)
                out |= {f"{node.module}.{a.name}" for a in node.names}
        return out

    for start in ("lsnet", "lsnet.results", "lsnet.io.geometry", "lsnet.io.outputs", "lsnet.io.terminology",
                  "lsnet.io.weights"):
        seen, todo = set(), [start]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            imported = top_level_imports(name)
            assert not any(i == "torch" or i.startswith("torch.") for i in imported), f"{name} imports torch at module level"
            todo += [i for i in imported if i in known]


# --------------------------------------------------------------------------------------------- the checker
TOY_ROOMS = [("low", ("p.low",)), ("high", ("p.high",)), ("top", ("p",))]


def test_checker_sees_an_upward_import_inside_a_function(tmp_path):
    pkg = tmp_path / "p"
    (pkg / "low").mkdir(parents=True)
    (pkg / "high").mkdir()
    for d in (pkg, pkg / "low", pkg / "high"):
        (d / "__init__.py").write_text('"""May import nothing."""\n')
    (pkg / "high" / "a.py").write_text("from p.low import b\n")
    (pkg / "low" / "b.py").write_text("def f():\n    from ..high import a\n    return a\n")
    mods = engine_modules(pkg)
    known = set(mods)
    graph = {n: imports_of(p, n, known) for n, p in mods.items()}
    assert graph["p.low.b"] == {"p.high.a"}
    assert graph["p.high.a"] == {"p.low.b"}
    assert upward_imports(graph, TOY_ROOMS) == ["p.low.b (low) imports p.high.a (high)"]
    assert find_cycle(graph) in (["p.high.a", "p.low.b", "p.high.a"], ["p.low.b", "p.high.a", "p.low.b"])


@pytest.mark.parametrize("graph,cyclic", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ({"a": {"a2"}, "a2": set(), "b": {"b"}}, True),
])
def test_cycle_finder(graph, cyclic):
    assert bool(find_cycle(graph)) == cyclic
