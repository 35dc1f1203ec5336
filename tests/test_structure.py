"""The shape of the code: no import cycle inside pipeline/, no private engine or stream state read from outside
pipeline/, product modules of a readable length. Read from the source with `ast` (nothing is imported)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 520  # "no product file over ~500 lines"
# Longer modules not yet split (none now): listed here so any other long one fails this test.
LONG_KNOWN: set[str] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((REPO / package).rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of `modules` that `path` imports anywhere (top level, in functions, under TYPE_CHECKING)."""
    own = _module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from a.b import c` imports a.b, and a.b.c when c is a module
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
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
        for nxt in sorted(graph[node]):
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


def test_no_import_cycle_inside_pipeline():
    modules = _modules("pipeline")
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    assert graph["pipeline.engine"] >= {"pipeline.sequence", "pipeline.admission"}  # the walk sees real imports
    assert "pipeline.decoder.core" in graph["pipeline.decoder.stream"]
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


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
    hits = [hit for package in ("actors", "serve", "jobs") for path in sorted((REPO / package).rglob("*.py"))
            for hit in _private_reads(path)]
    assert not hits, "private attributes of the engine / decoder streams read outside pipeline/:\n" + "\n".join(hits)


def test_private_read_finder(tmp_path):
    target = tmp_path / "mod.py"
    target.write_text("engine._paused\nself.engine._step()\nstream._plan_flow(True)\nself._x\nengine.__class__\n")
    hits = [hit.split(": ", 1)[1] for hit in _private_reads(target, tmp_path)]
    assert hits == ["engine._paused", "engine._step", "stream._plan_flow"]


def test_product_modules_are_short():
    long = {}
    for package in ("pipeline", "actors", "serve", "jobs"):
        for path in sorted((REPO / package).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            n = len(path.read_text().splitlines())
            if n > MAX_LINES and rel not in LONG_KNOWN:
                long[rel] = n
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_engine_tests_use_no_benchmark_code():
    """The engine's tests reach it through its public API and tests/ helpers, not through jobs/bench."""
    tree = ast.parse((REPO / "tests" / "test_generate.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name.startswith("jobs.bench")}


def test_decode_batch_uses_only_the_public_stream_protocol():
    tree = ast.parse((REPO / "pipeline" / "decoder" / "stream.py").read_text())
    (fn,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "decode_batch"]
    private = [node.attr for node in ast.walk(fn)
               if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")]
    called = {node.func.attr for node in ast.walk(fn) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert not private
    assert {"plan_flow", "apply_flow", "plan_vocoder", "apply_vocoder"} <= called
