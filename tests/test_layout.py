"""The package layout (ARCHITECTURE.md): an import graph of relay/ drawn from the code's own
import statements has no cycle, counting imports inside functions and under TYPE_CHECKING.
The direction between stages is checked by `lint-imports` (pyproject's layers contract)."""

from __future__ import annotations

import ast
from pathlib import Path

RELAY = Path(__file__).resolve().parent.parent / "relay"


def module_name(path: Path) -> str:
    parts = path.relative_to(RELAY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the relay modules it imports. ``from relay.a import b`` counts as an import of
    relay.a.b when that is a module, else of relay.a. A package's own __init__ that a submodule
    implicitly runs is not an edge: those are docstrings (sandbox re-exports its parts)."""
    modules = {module_name(p): p for p in RELAY.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, set())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules
                           else base for alias in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_the_imports() -> None:
    graph = import_graph()
    # An import at the top, one inside a function, one under TYPE_CHECKING.
    assert "relay.ingress.session" in graph["relay.ingress.listener"]
    assert "relay.service.lifecycle" in graph["relay.cli"]
    assert "relay.http.view" in graph["relay.http.metrics"]


def test_relay_has_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_a_cycle_would_be_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_message_model_does_no_io() -> None:
    # Senders read a stored message through the reader its store hands over (relay.message).
    tree = ast.parse((RELAY / "message.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "collections.abc", "dataclasses", "typing"}


# --- sizes: a file a newcomer reads in one sitting, functions that fit on a screen ---------------

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

# Declarative tables may be longer: their rows are data, read one at a time.
TABLES = {
    "relay/diagnosis/smtp.py": "the SMTP reply rules and their advice rows: one row per code",
    "relay/config/records.py": ("the config schema: one spec() line per key of the YAML; "
                                "reading and checking it is config/loading.py"),
}

# Over the limit when issue 11 closed and not split yet; each may shrink, none may grow, and
# nothing may join. Remove an entry when its file or function is split.
NOT_YET_SPLIT = {
    "relay/delivery/scheduler.py": 448,
    # Cluster mode: the looking half is in pglooking.py, the commands in pgcommands.py.
    "relay/spool/postgres.py": 443,
}


def sizes(root: Path = RELAY) -> dict[str, int]:
    """Lines of every module over MAX_MODULE_LINES and every function over MAX_FUNCTION_LINES,
    measured from the AST (a function from its ``def`` to its last line)."""
    found: dict[str, int] = {}
    for path in sorted(root.rglob("*.py")):
        name = path.relative_to(root.parent).as_posix()
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            found[name] = lines
        for node in ast.walk(ast.parse(text, name)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found[f"{name}:{node.name}"] = length
    return found


def test_modules_and_functions_stay_small() -> None:
    found = sizes()
    allowed = {name: lines for name, lines in found.items() if name in TABLES}
    grown = {name: lines for name, lines in found.items()
             if name not in TABLES and lines > NOT_YET_SPLIT.get(name, 0)}
    assert grown == {}, "split these (or, for a declarative table, add it to TABLES with why)"
    assert set(allowed) <= set(TABLES)
    # An entry whose file was split must leave the list, so the list only ever shrinks.
    assert {n for n in NOT_YET_SPLIT if n not in found} == set()


def test_the_size_check_would_see_a_long_module_and_function(tmp_path: Path) -> None:
    (tmp_path / "relay").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "relay" / "short.py").write_text(f"def short():\n{body[:40]}\n")
    (tmp_path / "relay" / "long.py").write_text(f"async def long():\n{body}\n"
                                                + "\n" * MAX_MODULE_LINES)
    assert sizes(tmp_path / "relay") == {"relay/long.py": MAX_MODULE_LINES + 61,
                                         "relay/long.py:long": 61}
