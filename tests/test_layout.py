"""The layout's rules (docs/design.md, section 3), read from the source's imports."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "duetlm"


def imports(path: Path) -> set[str]:
    """Every duetlm module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("duetlm"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("duetlm")}
    return found


def test_the_engine_process_never_imports_the_backend_that_starts_it():
    hf = SRC / "backends" / "hf"
    for name in ("process.py", "engine.py", "loading.py", "row_cache.py", "decode_step.py"):
        assert not {"duetlm.backends.hf", "duetlm.backends.hf.backend"} & imports(hf / name), name


def test_the_protocol_knows_no_backend_class():
    for name in ("protocol.py", "streaming.py"):
        backends = {m for m in imports(SRC / name) if m.startswith("duetlm.backends")}
        assert backends <= {"duetlm.backends.base"}, name


def test_backends_know_no_task_and_the_protocol_no_server():
    for path in (SRC / "backends").rglob("*.py"):
        assert not any(
            m.startswith(("duetlm.tasks", "duetlm.evaluate", "duetlm.train")) for m in imports(path)
        ), path
    for name in ("protocol.py", "streaming.py"):
        assert not any(m.startswith(("duetlm.serve", "duetlm.cli")) for m in imports(SRC / name)), name


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The duetlm modules a file imports when it runs (at the top or in a function; not under
    `if TYPE_CHECKING:`), a name imported from a package counted as its submodule."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for statement in node.body
        for inner in ast.walk(statement)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("duetlm"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found & modules


def import_circles() -> list[set[str]]:
    """The strongly connected groups of more than one module in duetlm's import graph."""
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    graph = {name: runtime_imports(path, set(files)) for name, path in files.items()}
    reach = {name: set() for name in graph}
    for start in graph:  # small graph: a search from every module
        stack = list(graph[start])
        while stack:
            node = stack.pop()
            if node not in reach[start]:
                reach[start].add(node)
                stack.extend(graph[node])
    circles = []
    for name in graph:
        group = {other for other in reach[name] if name in reach[other]} | {name}
        if len(group) > 1 and group not in circles:
            circles.append(group)
    return circles


def test_no_import_circle_but_the_task_registry():
    """The task registry imports its task modules, which register themselves with it (by
    design); any other circle is a layout bug (docs/design.md, section 3)."""
    circles = import_circles()
    assert all(all(m.startswith("duetlm.tasks") for m in group) for group in circles), circles
