"""The package's layers (DESIGN.md): every module imports only from its own layer or below, and the
imports form no cycle.  Read from the source with ``ast`` (imports inside functions count too)."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minidiff"

# lowest first; a name covers the module and, for a package, everything in it (the top-level
# package "minidiff", its __init__, only itself)
LAYERS = (
    ("pure NumPy / Pillow; the XLA flag set before JAX starts",
     ("minidiff", "minidiff.diffusion", "minidiff.vq", "minidiff.images", "minidiff.metrics", "minidiff.tokenizer",
      "minidiff.data", "minidiff.config", "minidiff.files", "minidiff.xla_cpu")),
    ("JAX's runtime: compile cache, processes", ("minidiff.compile_cache", "minidiff.distributed")),
    ("Flax networks", ("minidiff.nn",)),
    ("sampling", ("minidiff.sampling",)),
    ("Stable Diffusion stack", ("minidiff.sdconfig", "minidiff.tensorfiles", "minidiff.weights", "minidiff.convert",
                                "minidiff.pipeline", "minidiff.embeddings", "minidiff.lora")),
    ("training", ("minidiff.train",)),
    ("command line", ("minidiff.cli", "minidiff.demo")),
)
NUMPY_ONLY = ("minidiff.diffusion", "minidiff.vq", "minidiff.config", "minidiff.files")  # read (and imported) without JAX
FORBIDDEN_IN_NUMPY_ONLY = ("jax", "jaxlib", "flax", "optax")


def _ours(module: str) -> bool:
    return module == "minidiff" or module.startswith("minidiff.")


def _within(module: str, name: str) -> bool:
    return module == name or (name != "minidiff" and module.startswith(name + "."))


def layer_of(module: str) -> int:
    """The layer of a module: that of the longest name in LAYERS covering it."""
    best = None
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if _within(module, name) and (best is None or len(name) > len(best[1])):
                best = (i, name)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best[0]


def modules() -> dict[str, Path]:
    """{dotted name: file}; a package's __init__.py is the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(module: str, path: Path, known) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(minidiff modules ``module`` imports, other top-level packages it imports), each with its line.
    ``from X import a`` imports the module X.a where X.a is a module, else X."""
    is_package = path.name == "__init__.py"
    ours, others = [], []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = ours if _ours(alias.name) else others
                target.append((alias.name if target is ours else alias.name.split(".")[0], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            if not _ours(source):
                others.append((source.split(".")[0], node.lineno))
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                ours.append((sub if sub in known else source, node.lineno))
    return ours, others


def import_graph():
    known = modules()
    graph, lines, third_party = {}, {}, {}
    for module, path in known.items():
        ours, others = imports(module, path, known)
        graph[module] = sorted({m for m, _ in ours if m != module})
        for m, line in ours:
            lines.setdefault((module, m), line)
        third_party[module] = others
    return graph, lines, third_party


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """One cycle (a list of modules, first == last) for each strongly connected component of more
    than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)

    found = []
    for component in components:  # the shortest way from the first module back to itself (breadth first)
        start = min(component)
        parent, frontier = {}, [start]
        while start not in parent:
            following = []
            for v in frontier:
                for w in graph[v]:
                    if w in component and w not in parent:
                        parent[w] = v
                        following.append(w)
            frontier = following
        path, node = [start], parent[start]
        while node != start:
            path.append(node)
            node = parent[node]
        found.append([start] + path[::-1])
    return found


def upward_imports(graph, lines) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        for target in targets:
            if layer_of(target) > layer_of(module):
                bad.append(f"{module} (layer {layer_of(module)}: {LAYERS[layer_of(module)][0]}) imports {target} "
                           f"(layer {layer_of(target)}: {LAYERS[layer_of(target)][0]}) at line {lines[module, target]}")
    return bad


def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


def test_no_import_cycles():
    graph, _, _ = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_module_imports_a_layer_above_its_own():
    graph, lines, _ = import_graph()
    bad = upward_imports(graph, lines)
    assert not bad, "imports that go up a layer:\n" + "\n".join(bad)


def test_the_numpy_core_imports_no_jax():
    _, lines, third_party = import_graph()
    bad = [f"{module} imports {name} at line {line}" for module, others in sorted(third_party.items())
           if any(_within(module, n) for n in NUMPY_ONLY)
           for name, line in others if name in FORBIDDEN_IN_NUMPY_ONLY]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_cycles_and_upward_imports():
    graph = {"minidiff.nn.a": ["minidiff.nn.b"], "minidiff.nn.b": ["minidiff.nn.c"], "minidiff.nn.c": ["minidiff.nn.a"],
             "minidiff.pipeline": ["minidiff.train.x"], "minidiff.train.x": []}
    assert cycles(graph) == [["minidiff.nn.a", "minidiff.nn.b", "minidiff.nn.c", "minidiff.nn.a"]]
    assert upward_imports(graph, {("minidiff.pipeline", "minidiff.train.x"): 7}) == [
        "minidiff.pipeline (layer 4: Stable Diffusion stack) imports minidiff.train.x (layer 5: training) at line 7"]
    with pytest.raises(AssertionError, match="minidiff.unheard_of is in no layer"):  # "minidiff" covers only itself
        layer_of("minidiff.unheard_of")
    # relative imports, inside functions too, resolve to modules
    src = "from .. import vq\nfrom ..nn.clip import CLIPTextModel\ndef f():\n    from . import engine\n"
    tree_path = PACKAGE / "train" / "__probe__.py"
    known = {"minidiff.vq": None, "minidiff.nn.clip": None, "minidiff.train.engine": None}

    class FakePath(type(tree_path)):
        def read_text(self, encoding=None):
            return src

    ours, _ = imports("minidiff.train.__probe__", FakePath(tree_path), known)
    assert ours == [("minidiff.vq", 1), ("minidiff.nn.clip", 2), ("minidiff.train.engine", 4)]
