"""The shape of the code, read from the source with `ast` (nothing is imported): no import cycle anywhere (imports
inside functions count), no upward import between the rooms, no private name used across modules, tests never
import benchmarks, and no private engine or decoder-stream state read from outside `pipeline/`."""
from __future__ import annotations

import ast
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
ROOMS = ("pipeline", "actors", "serve", "jobs", "cli", "benchmarks")
# What each room may import besides itself (DESIGN.md: pipeline <- actors <- serve, jobs <- cli; benchmarks use all).
MAY_IMPORT = {
    "pipeline": set(),
    "actors": {"pipeline"},
    "jobs": {"pipeline", "actors"},
    "serve": {"pipeline", "actors", "jobs"},
    "cli": {"pipeline", "actors", "jobs", "serve"},
    "benchmarks": {"pipeline", "actors", "jobs", "serve", "cli"},
    "tests": {"pipeline", "actors", "jobs", "serve", "cli"},
}


def _module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path = REPO, rooms=ROOMS) -> dict[str, Path]:
    return {_module_name(p, root): p for room in rooms for p in sorted((root / room).rglob("*.py"))}


def _import_nodes(path: Path):
    """(node, imported module names, imported object names) for every import anywhere in `path`."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield node, [alias.name for alias in node.names], []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node, [node.module], [alias.name for alias in node.names]


def _imports(path: Path, modules: dict[str, Path], root: Path = REPO) -> set[str]:
    """Project modules that `path` imports anywhere (top level, in functions, under TYPE_CHECKING)."""
    own = _module_name(path, root)
    found = set()
    for _, bases, names in _import_nodes(path):
        targets = [f"{bases[0]}.{n}" if f"{bases[0]}.{n}" in modules else bases[0] for n in names] or bases
        for name in targets:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            # importing a.b.c first runs the __init__ of a and of a.b: edges too, except to the importer's own
            # packages (their __init__ already runs before the importer)
            while name:
                if name != own and not own.startswith(name + "."):
                    found.add(name)
                name = name.rpartition(".")[0]
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_anywhere():
    modules = _modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    assert {"pipeline.engine.sequence", "pipeline.engine.admission"} <= graph["pipeline.engine.decode_engine"]
    assert "pipeline.decoder.core" in graph["pipeline.decoder.stream"]  # the walk sees real imports
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _upward(root: Path = REPO, rooms=tuple(MAY_IMPORT)) -> list[str]:
    modules = _modules(root, ROOMS)
    hits = []
    for room in rooms:
        for path in sorted((root / room).rglob("*.py")):
            for target in _imports(path, modules, root):
                other = target.split(".")[0]
                if other != room and other not in MAY_IMPORT[room]:
                    hits.append(f"{path.relative_to(root)} imports {target}")
    return sorted(set(hits))


def test_no_upward_import_between_rooms_and_tests_never_import_benchmarks():
    hits = _upward()
    assert not hits, "imports against the dependency rule (DESIGN.md):\n" + "\n".join(hits)


def _private_names_across_modules(root: Path = REPO, rooms=ROOMS) -> list[str]:
    """`from project.module import _name` and `alias._name` on an imported project module, outside that module."""
    modules = _modules(root, rooms)
    hits = []
    for name, path in modules.items():
        aliases = {}
        for node, bases, names in _import_nodes(path):
            if isinstance(node, ast.ImportFrom) and bases[0].split(".")[0] in rooms:
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        hits.append(f"{path.relative_to(root)}:{node.lineno}: {bases[0]}.{alias.name}")
                    elif f"{bases[0]}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{bases[0]}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                hits.append(f"{path.relative_to(root)}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    return hits


def test_no_private_name_used_across_modules():
    hits = _private_names_across_modules()
    assert not hits, "private names used outside their module:\n" + "\n".join(hits)


PRIVATE_OWNERS = ("engine", "stream", "seq", "sequence", "decoder")


def _private_reads(path: Path, root: Path = REPO) -> list[str]:
    """`<x>._name` where <x> names an engine, a sequence, a decoder or a decoder stream (not `self._name`)."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        owner = node.value
        name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
        if name != "self" and any(word in name.lower() for word in PRIVATE_OWNERS):
            hits.append(f"{path.relative_to(root)}:{node.lineno}: {name}.{node.attr}")
    return hits


def test_no_private_engine_or_stream_state_read_outside_pipeline():
    hits = [hit for package in ("actors", "serve", "jobs", "cli") for path in sorted((REPO / package).rglob("*.py"))
            for hit in _private_reads(path)]
    assert not hits, "private attributes of the engine / decoder streams read outside pipeline/:\n" + "\n".join(hits)


def test_the_finders_find_what_they_look_for(tmp_path):
    for room, body in {"pipeline": "from actors.x import y\n", "actors": "def f():\n    from pipeline.m import _p\n",
                       "tests": "import benchmarks.b\n", "benchmarks": ""}.items():
        (tmp_path / room).mkdir()
        (tmp_path / room / "x.py").write_text(body)
    (tmp_path / "pipeline" / "m.py").write_text("_p = 1\n")
    (tmp_path / "benchmarks" / "b.py").write_text("")
    hits = _upward(tmp_path, ("pipeline", "tests"))
    assert "pipeline/x.py imports actors.x" in hits and "tests/x.py imports benchmarks.b" in hits
    assert not _upward(tmp_path, ("actors", "benchmarks"))
    assert _private_names_across_modules(tmp_path, ("pipeline", "actors")) == ["actors/x.py:2: pipeline.m._p"]
    target = tmp_path / "mod.py"
    target.write_text("engine._paused\nself.engine._step()\nstream._plan_flow(True)\nself._x\nengine.__class__\n")
    assert [h.split(": ", 1)[1] for h in _private_reads(target, tmp_path)] == ["engine._paused", "engine._step",
                                                                              "stream._plan_flow"]


def test_decode_batch_uses_only_the_public_stream_protocol():
    tree = ast.parse((REPO / "pipeline" / "decoder" / "stream.py").read_text())
    (fn,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "decode_batch"]
    private = [node.attr for node in ast.walk(fn)
               if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")]
    called = {node.func.attr for node in ast.walk(fn) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert not private
    assert {"plan_flow", "apply_flow", "plan_vocoder", "apply_vocoder"} <= called
