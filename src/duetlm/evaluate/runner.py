"""`duet eval`: every method on the same questions of every task, K samples each.

Methods run batch by batch through `Duet.solve_batch`; each finished batch is graded and
appended to the store, so the run resumes where it stopped. Sample k uses seed `seed + k`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm.auto import tqdm

from duetlm.backends import BackendOptions, load_backend, parse_spec
from duetlm.config import DuetConfig
from duetlm.errors import DuetError
from duetlm.evaluate.store import ResultStore
from duetlm.grading import Grade
from duetlm.protocol import Duet, parse_mode
from duetlm.tasks import Example, TaskExamples, grade, load_task

logger = logging.getLogger(__name__)


class EvalConfig(BaseModel):
    """One evaluation run. `capable`, `light`, `duet` and `seed` determine the results and
    make up the config hash; tasks, methods, samples and limit only choose which rows exist,
    so a run can be extended with more of them."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(min_length=1, description="Task names (see duetlm.tasks).")
    methods: list[str] = Field(
        default_factory=lambda: ["M-alone", "duet", "m-alone"], min_length=1, description="Modes to compare."
    )
    capable: str = Field("tiny-M", description="M's model spec.")
    light: str = Field("tiny-m", description="m's model spec.")
    samples: int = Field(1, ge=1, description="Samples per question (AIME needs >= 8 with temperature > 0).")
    seed: int = Field(0, description="Sample k uses seed + k.")
    limit: int | None = Field(None, ge=1, description="First N questions of each task; None = all.")
    data: dict[str, str] = Field(default_factory=dict, description="Task name -> local data file.")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Field mapping for every task read from rows (see duetlm.tasks.fields), e.g. "
        "{'question': '{Body} {Question}', 'answer': 'Answer'}; empty = each task's own fields.",
    )
    batch_size: int = Field(32, ge=1, description="Questions per protocol call.")
    duet: DuetConfig = Field(default_factory=DuetConfig)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        for method in methods:
            parse_mode(method)
        return methods

    @model_validator(mode="before")
    @classmethod
    def _embedded_budgets(cls, data):
        """Without a DuetConfig, an all-embedded run gets budgets that fit its models."""
        from duetlm.models import with_model_defaults

        return with_model_defaults(data)

    @model_validator(mode="after")
    def _data_names_a_task(self) -> EvalConfig:
        stray = sorted(set(self.data) - set(self.tasks))
        if stray:
            raise ValueError(f"--data names {', '.join(stray)}, which is not among the tasks {self.tasks}")
        return self

    def load_tasks(self) -> dict[str, TaskExamples]:
        return {
            name: load_task(name, self.data.get(name), fields=self.fields if name != "builtin" else None)
            for name in self.tasks
        }

    def config_hash(self) -> str:
        key = {
            "capable": self.capable,
            "light": self.light,
            "seed": self.seed,
            "duet": self.duet.identity(),
            "weights": [weights_fingerprint(self.capable), weights_fingerprint(self.light)],
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def weights_fingerprint(spec: str) -> str | None:
    """A digest of a local model's weight files (their sizes, first 4 MB and last 1 MB), so a
    model retrained under the same name or path never resumes the old model's rows. Cheap for
    any size, and unchanged by copying. None for remote models and hub ids."""
    try:
        parsed = parse_spec(spec)
    except DuetError:
        return None
    folder = Path(parsed.model).expanduser()
    if parsed.kind not in ("hf", "vllm") or not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")]):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(4 << 20))
            handle.seek(max(size - (1 << 20), 0))
            digest.update(handle.read())
    return digest.hexdigest()[:16]


def result_row(task: str, method: str, sample: int, example: Example, result, config_hash: str) -> dict:
    """One stored row. The verdict is `duetlm.grading.grade`'s on the final write-up; a
    response whose thinking never closed (the protocol's `answer is None`) is no answer.
    `wall_s` is this row's equal share of its batch's wall time (a batch runs as one)."""
    verdict = grade(result.text, example) if result.answer is not None else Grade(False, None, None)
    return {
        "task": task,
        "method": method,
        "id": example.id,
        "sample": sample,
        "gold": example.gold,
        "golds": list(example.golds),
        "answer": verdict.answer,
        "answer_rule": verdict.rule,
        "correct": verdict.correct,
        "no_answer": verdict.answer is None,
        "grading_timed_out": verdict.timed_out,
        "truncated": result.truncated,
        "empty_signal": result.empty_signal,
        "open_signal": result.open_signal,
        "signal_tokens": result.signal_tokens,
        "capable_finish": result.capable_finish,
        "light_finish": result.light_finish,
        "usage": result.usage.to_dict(),
        "wall_s": result.usage.wall_s,
        "question": example.question,
        "meta": example.meta,
        "signal": result.signal,
        "text": result.text,
        "capable_text": result.capable_text,
        "retries": result.retries,
        "handover": result.handover,
        "config_hash": config_hash,
    }


def run_eval(
    config: EvalConfig,
    out: str | Path,
    force: bool = False,
    duet: Duet | None = None,
    backend_options: BackendOptions | None = None,
    progress: bool = True,
    light_options: BackendOptions | None = None,
) -> Path:
    """Run (or resume) an evaluation into `out`; returns the results file. `light_options`,
    when given, are m's backend options (its tokenizer for an OpenAI-compatible m), else
    `backend_options` serve both models. Backends this call loads are closed when it ends."""
    tasks = config.load_tasks()
    config_hash = config.config_hash()
    store = ResultStore(out, config.model_dump(), config_hash, force=force)
    for name, examples in tasks.items():
        store.check_same_questions(name, examples)
    if config.samples > 1 and config.duet.temperature == 0:
        logger.warning("samples > 1 with temperature 0: every sample will be the same greedy answer")
    owned = duet is None
    if duet is None:
        options = backend_options or BackendOptions()
        capable = load_backend(config.capable, options)
        try:
            light = load_backend(config.light, light_options or options)
        except BaseException:
            capable.close()
            raise
        duet = Duet(capable, light, config.duet)
    try:
        for task_name, examples in tasks.items():
            chosen = list(examples)[: config.limit] if config.limit else list(examples)
            for method in config.methods:
                _run_method(duet, config, store, task_name, method, chosen, config_hash, progress)
    finally:
        if owned:
            duet.close()
    return store.results_path


def _run_method(duet, config, store, task_name, method, examples: Sequence[Example], config_hash, progress):
    jobs = [
        (k, e)
        for k in range(config.samples)
        for e in examples
        if (task_name, method, e.id, k) not in store.done
    ]
    if not jobs:
        return
    bar = tqdm(total=len(jobs), desc=f"{task_name} {method}", disable=not progress, unit="q")
    correct = total = capable_tokens = 0
    for sample in range(config.samples):
        pending = [e for k, e in jobs if k == sample]
        sample_duet = Duet(
            duet.capable, duet.light, duet.config.model_copy(update={"seed": config.seed + sample})
        )
        for start in range(0, len(pending), config.batch_size):
            batch = pending[start : start + config.batch_size]
            started = time.perf_counter()
            results = sample_duet.solve_batch([e.problem for e in batch], method)
            rows = [
                result_row(task_name, method, sample, e, r, config_hash)
                for e, r in zip(batch, results, strict=True)
            ]
            store.append(rows)
            correct += sum(r["correct"] for r in rows)
            total += len(rows)
            capable_tokens += sum(r["usage"]["capable"]["output_tokens"] for r in rows)
            bar.update(len(rows))
            bar.set_postfix(
                acc=f"{correct / total:.3f}",
                M_tok=f"{capable_tokens / total:.0f}",
                batch_s=f"{time.perf_counter() - started:.1f}",
            )
    bar.close()
