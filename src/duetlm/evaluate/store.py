"""The results store of an evaluation run: `run.json` + `results.jsonl`, append-only.

One JSON line per (task, method, question id, sample), written and fsync'ed as each batch
finishes, so a killed run loses at most the batch in flight. Re-opening the store reads the
keys already present (they are skipped), drops a last line cut off by a kill, and refuses a
run whose result-determining settings changed unless asked to start over.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from duetlm.errors import ConfigError, InputError
from duetlm.jsonl import append_jsonl, read_jsonl

logger = logging.getLogger(__name__)

RowKey = tuple[str, str, str, int]


def row_key(row: dict) -> RowKey:
    return (row["task"], row["method"], str(row["id"]), int(row["sample"]))


def read_rows(path: Path, repair: bool = False) -> list[dict]:
    """Rows of a results file. A cut-off last line is dropped (and, with `repair`, cut from
    the file); a malformed line elsewhere is an error naming the line."""
    if not path.is_file():
        return []
    rows = []
    for number, row in read_jsonl(path, on_cut_tail="repair" if repair else "drop"):
        if not isinstance(row, dict):
            raise InputError(f"{path}:{number}: expected a JSON object; the results file is damaged")
        rows.append(row)
    return rows


class ResultStore:
    def __init__(self, directory: str | Path, run_info: dict, config_hash: str, force: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.results_path = self.directory / "results.jsonl"
        run_path = self.directory / "run.json"
        if run_path.is_file():
            try:
                previous = json.loads(run_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InputError(f"{run_path} is damaged ({exc}); restore it or use another --out") from None
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
        rows = read_rows(self.results_path, repair=True)
        self.done: set[RowKey] = {row_key(r) for r in rows}
        self._asked = {(r["task"], str(r["id"])): (r.get("question"), r.get("gold")) for r in rows}

    def check_same_questions(self, task: str, examples) -> None:
        """Refuse to extend rows written for other questions under the same ids (a task now
        read from another file or with another field mapping): they would mix two datasets."""
        for example in examples:
            stored = self._asked.get((task, example.id))
            if stored is not None and stored != (example.question, example.gold):
                raise ConfigError(
                    f"{self.directory}: task {task} question {example.id!r} differs from the one its "
                    "stored results answer (other data or field mapping); use another --out, or --force"
                )

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        append_jsonl(self.results_path, rows)
        self.done.update(row_key(r) for r in rows)
