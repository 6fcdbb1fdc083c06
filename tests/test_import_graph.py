"""The package's import graph: no circles between modules, no loose group-level modules."""
import ast
from pathlib import Path

import networkx

PACKAGE = Path(__file__).resolve().parents[1] / "grazbids"
# modules allowed directly in grazbids/ (everything else lives in a subpackage with one job)
TOP_LEVEL = {"__init__", "__main__", "boutiques", "config", "exitcodes", "templates"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> networkx.DiGraph:
    """Edges module -> imported grazbids module, for imports anywhere in a file (late
    imports inside functions included: they close circles too)."""
    modules = _modules()
    graph = networkx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # `from . import x` may name a submodule
                    sub = f"{target}.{alias.name}"
                    graph.add_edge(name, sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    graph.add_edge(name, alias.name)
    return graph.subgraph([n for n in graph if n in modules]).copy()


def test_no_import_circles():
    graph = import_graph()
    # a package's __init__ re-exporting its own submodules is not a circle of design
    graph.remove_edges_from([(a, b) for a, b in list(graph.edges) if b.startswith(a + ".")])
    circles = [c for c in networkx.simple_cycles(graph) if len(c) > 1]
    assert not circles, f"import circles: {circles[:5]}"


def test_no_loose_modules_beside_the_subpackages():
    loose = {p.stem for p in PACKAGE.glob("*.py")} - TOP_LEVEL
    assert not loose, f"modules directly in grazbids/: {sorted(loose)}; move them into a subpackage"


def test_the_import_graph_sees_known_edges():
    """Guards the test itself: a parser that finds no edges would find no circles."""
    graph = import_graph()
    assert graph.has_edge("grazbids.group.training", "grazbids.group.cohort")
    assert graph.has_edge("grazbids.cli.parser", "grazbids.boutiques")
    assert graph.has_edge("grazbids.engine.losses", "grazbids.engine.modes")
