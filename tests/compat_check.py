"""What differs between Python versions, run without torch under any interpreter.

    python tests/compat_check.py        (with src/ on the path; pydantic, PyYAML, fastapi, and
                                         tomli below 3.11, installed)

Checks the parts that touch version-specific APIs: TOML, YAML and JSON config loading (tomllib
is new in 3.11), the serve batcher's wait for more requests (`asyncio.wait_for` raises
`asyncio.TimeoutError`, not the builtin `TimeoutError`, before 3.11), JSONL reading and the
grader's extraction. The batcher runs a real `Duet` over a small pure-Python backend that
answers by echoing (no model can load without torch), and must batch concurrent requests.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from duetlm.backends.base import GenerationResult
from duetlm.config import DuetConfig
from duetlm.grading import extract
from duetlm.jsonl import read_jsonl
from duetlm.protocol import Duet, Problem
from duetlm.serve.batcher import Batcher, BatchKey


class EchoBackend:
    """Answers every request at once: a signal for stage 1, a boxed answer for stage 2."""

    spec = "echo"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def generate(self, requests):
        self.batches.append(len(requests))
        return [
            GenerationResult(
                "\\boxed{4}" if r.prefill else "<think>\n2+2=4\n", 10, 3, "eos" if r.prefill else "stop"
            )
            for r in requests
        ]

    def close(self) -> None:
        pass


def check_config_files(folder: Path) -> None:
    texts = {
        "c.toml": "signal_max_tokens = 77\n[prompts]\nthink_close = '</think>'\n",
        "c.yaml": "signal_max_tokens: 77\n",
        "c.json": '{"signal_max_tokens": 77}',
    }
    for name, text in texts.items():
        (folder / name).write_text(text)
        assert DuetConfig.load(folder / name).signal_max_tokens == 77, name


async def check_batcher() -> None:
    capable, light = EchoBackend(), EchoBackend()
    batcher = Batcher(Duet(capable, light), window_s=0.05, max_batch=8)
    batcher.start()
    key = BatchKey("duet", ())
    results = await asyncio.gather(*(batcher.submit(key, Problem(f"q{i}")) for i in range(5)))
    assert [r.answer for r in results] == ["4"] * 5
    assert capable.batches == [5], capable.batches  # the window's wait timed out, then one batch
    await batcher.stop()


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        check_config_files(Path(folder))
        path = Path(folder) / "rows.jsonl"
        path.write_text('{"q": "a\u2028b"}\n{"q": "c"}\n', encoding="utf-8")
        assert [row["q"] for _, row in read_jsonl(path)] == ["a\u2028b", "c"]
    assert extract("**Answer:** (B)", "ABCD").answer == "B"
    asyncio.run(check_batcher())
    print(f"Python {sys.version.split()[0]}: config files, JSONL, extraction and the serve batcher work")


if __name__ == "__main__":
    main()
