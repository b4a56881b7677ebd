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
