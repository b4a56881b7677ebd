"""The results store of an evaluation run: `run.json` + `results.jsonl`, append-only.

One JSON line per (task, method, question id, sample), written and fsync'ed as each batch
finishes, so a killed run loses at most the batch in flight. Re-opening the store reads the
keys already present (they are skipped), drops a last line cut off by a kill, and refuses a
run whose result-determining settings changed unless asked to start over.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from duetlm.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

RowKey = tuple[str, str, str, int]


def row_key(row: dict) -> RowKey:
    return (row["task"], row["method"], str(row["id"]), int(row["sample"]))


def read_rows(path: Path, repair: bool = False) -> list[dict]:
    """Rows of a results file. A cut-off last line is dropped (and, with `repair`, cut from
    the file); a malformed line elsewhere is an error naming the line."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows, good_bytes = [], 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) or (number == len(lines) - 1 and not lines[-1]):
                logger.warning("%s: dropping a cut-off last line (an interrupted write)", path)
                if repair:
                    with path.open("r+b") as handle:
                        handle.truncate(good_bytes)
                break
            raise InputError(f"{path}:{number}: not valid JSON; the results file is damaged") from None
        good_bytes += len(line) + 1
    return rows


class ResultStore:
    def __init__(self, directory: str | Path, run_info: dict, config_hash: str, force: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.results_path = self.directory / "results.jsonl"
        run_path = self.directory / "run.json"
        if run_path.is_file():
            previous = json.loads(run_path.read_text())
            if previous.get("config_hash") != config_hash:
                if not force:
                    raise ConfigError(
                        f"{self.directory} holds results of a different configuration "
                        f"(hash {previous.get('config_hash')} vs {config_hash}); use another --out, "
                        "or --force to move the old results aside and start over"
                    )
                stamp = time.strftime("%Y%m%d-%H%M%S")
                for path in (self.results_path, run_path):
                    if path.exists():
                        path.rename(path.with_name(f"{path.stem}.{stamp}{path.suffix}"))
        run_path.write_text(json.dumps(run_info | {"config_hash": config_hash}, indent=2))
        self.done: set[RowKey] = {row_key(r) for r in read_rows(self.results_path, repair=True)}

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        with self.results_path.open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(row) + "\n" for row in rows))
            handle.flush()
            os.fsync(handle.fileno())
        self.done.update(row_key(r) for r in rows)
