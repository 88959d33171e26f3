"""No import cycles inside the package, counting imports made inside functions too (a lazy import that only
hides a cycle still couples the two modules both ways). `__init__` files are left out: the package's own
lazy table (and `store/__init__`'s) name everything by design.

And the layout of issue 15: no runtime module (`__init__` files included) imports the tooling subpackage
`vlcache_hf.tools`, again counting imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vlcache_hf"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    base = current.split(".") if is_package else current.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    names = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
    return [n for n in names if n.startswith("vlcache_hf")]


def import_graph(packages: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports (`packages=True`: `__init__` files too, both ways)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        if is_package and not packages:
            continue
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(name, is_package, node)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("vlcache_hf")]
            else:
                continue
            kept = {t for t in targets if t in files and t != name}
            edges |= kept if packages else {t for t in kept if files[t].name != "__init__.py"}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    graph = import_graph()
    assert "vlcache_hf.cache" in graph and "vlcache_hf.hook" in graph["vlcache_hf.cache"]  # the graph is real
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


#: the tooling subpackage (toy models, synthetic data, pretrained loader, demo, bench, bound, CLI)
TOOLING = "vlcache_hf.tools"
#: the one module outside it that may import it: the lmms-eval model (tooling glue: it loads the embedded
#: model for `pretrained=default`), not loaded by `import vlcache_hf` or by a request
#: (`tests/test_import_purity.py`). The calibration pass is runtime and imports none of it: it measures with
#: `vlcache_hf.probe`, and `vlcache calibrate`'s loading lives in `tools/calibrate_cli.py`.
MAY_IMPORT_TOOLING = {"vlcache_hf.integrations.lmms_eval"}


def _is_tooling(name: str) -> bool:
    return name == TOOLING or name.startswith(TOOLING + ".")


def runtime_imports_of_tooling(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted(
        (name, target)
        for name, targets in graph.items()
        if not _is_tooling(name) and name not in MAY_IMPORT_TOOLING
        for target in targets
        if _is_tooling(target)
    )


def test_the_checker_finds_runtime_imports_of_tooling():
    graph = {
        "vlcache_hf.cache": {"vlcache_hf.hook", "vlcache_hf.tools.toy"},
        "vlcache_hf.models": {"vlcache_hf.tools"},
        "vlcache_hf.tools.demo": {"vlcache_hf.cache", "vlcache_hf.tools.toy"},
        "vlcache_hf.toolsy": {"vlcache_hf.cache"},
    }
    assert runtime_imports_of_tooling(graph) == [
        ("vlcache_hf.cache", "vlcache_hf.tools.toy"),
        ("vlcache_hf.models", "vlcache_hf.tools"),
    ]


def test_runtime_imports_no_tooling():
    graph = import_graph(packages=True)
    assert "vlcache_hf.cache" in graph["vlcache_hf.tools.demo"]  # the graph is real, tooling included
    assert "vlcache_hf.probe" in graph["vlcache_hf.calibration"]  # and the runtime's own imports
    assert "vlcache_hf.tools.pretrained" in graph["vlcache_hf.integrations.lmms_eval"]  # and the allowed one
    assert runtime_imports_of_tooling(graph) == []
