"""`duet probe`: how much of M's thinking a given m needs, measured before any training.

Per question, M thinks once (as M-alone, with M-alone's budget), and m answers greedily
from prefixes of that thinking cut at line boundaries and closed with the think tag, as a
DUET hand-over would. The shortest prefix with which m is right is the **oracle cut**: what
handing over earlier could save without changing how M writes. No cut-off baseline
(duet@B, M@B, an adaptive cut) beats it; training can, since it also changes what M writes.

The search per question is a generator that yields the cuts it wants m to try and receives
m's verdicts, so every question's next cuts go to m in one batch per round:

- `binary`: the empty signal and the full thinking first; then a binary search for the
  shortest working cut, which assumes that more lines never hurt; since that is not always
  so, the `check_below` lines just under the point found are tried too, and the point moves
  down while one of them works.
- `linear`: cuts 0, stride, 2 stride, ... up to the full thinking, stopping at the first
  that works, then the lines below it as above. Exact with stride 1, and slower.
- `stable`: from the full thinking down, `stride` cuts a round, to the shortest cut from
  which m is right at *every* longer cut. The first two find the shortest cut that works,
  which includes cuts where m's guess happens to be right (an m that answers a 10-way
  question at random is right at one cut in ten, so with dozens of cuts some early one
  works). The stable cut is what a stopping rule that never sees the gold could hope for.

Rows go to a results store like `duet eval`'s (method `probe`), a batch at a time, so a
killed probe resumes without losing or repeating a question.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from duetlm.backends import Backend, BackendOptions, load_backend
from duetlm.backends.base import counts_tokens
from duetlm.config import DuetConfig
from duetlm.errors import ConfigError
from duetlm.evaluate.runner import weights_fingerprint
from duetlm.evaluate.store import ResultStore
from duetlm.protocol import Duet, SolveResult
from duetlm.results import from_row
from duetlm.signals import style_of
from duetlm.tasks import Example, TaskExamples, grade, load_task

logger = logging.getLogger(__name__)

METHOD = "probe"
Search = Generator[list[int], dict[int, bool], int | None]


class ProbeConfig(BaseModel):
    """One probe run. The models, the protocol settings and the search decide the rows and
    make up the config hash; `limit` only chooses how many exist, so a run can be extended."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="Task name (see duetlm.tasks), e.g. builtin, math500, jsonl:PATH.")
    capable: str = Field("tiny-M", description="M's model spec.")
    light: str = Field("tiny-m", description="m's model spec.")
    limit: int | None = Field(None, ge=1, description="First N questions of the task; None = all.")
    data: str | None = Field(None, description="A local data file for the task.")
    split: str | None = Field(
        None, description="Another split of the task (builtin: train, for a warm start of `duet train`)."
    )
    fields: dict[str, str] = Field(
        default_factory=dict, description="Field mapping (see duetlm.tasks.fields)."
    )
    search: Literal["binary", "linear", "stable"] = Field(
        "binary",
        description="How the cut is sought: the shortest working one (binary, linear) or the shortest "
        "from which every longer cut works (stable).",
    )
    stride: int = Field(
        1, ge=1, description="linear: lines between two tried cuts; stable: cuts tried a round."
    )
    check_below: int = Field(
        2, ge=0, description="Lines under the point found that are tried too (m's need is not monotone)."
    )
    batch_size: int = Field(32, ge=1, description="Questions per batch (each search round is one m call).")
    reuse: str | None = Field(
        None,
        description="An eval run folder whose M-alone and m-alone rows (same models, same DuetConfig, "
        "greedy) stand for the probe's own, so M does not answer every question a second time; "
        "questions it lacks are run. None: the probe runs both itself.",
    )
    duet: DuetConfig = Field(default_factory=DuetConfig)

    @model_validator(mode="before")
    @classmethod
    def _embedded_budgets(cls, data):
        """Without a DuetConfig, an all-embedded probe gets budgets that fit its models."""
        from duetlm.models import with_model_defaults

        return with_model_defaults(data)

    def load_task(self) -> TaskExamples:
        return load_task(self.task, self.data, fields=self.fields or None, split=self.split)

    def config_hash(self) -> str:
        key = {
            "probe": [self.search, self.stride, self.check_below],
            "capable": self.capable,
            "light": self.light,
            "duet": self.duet.identity(),
            "weights": [weights_fingerprint(self.capable), weights_fingerprint(self.light)],
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# --- cuts and the search ----------------------------------------------------------------------


def line_ends(thinking: str) -> list[int]:
    """Character offsets where each non-blank line of the thinking ends: cut k keeps the
    thinking up to the end of its k-th non-blank line (blank lines between stay)."""
    return [match.end() for match in re.finditer(r"[^\n]*\S[^\n]*", thinking)]


def cut_text(thinking: str, ends: Sequence[int], cut: int) -> str:
    return thinking[: ends[cut - 1]].strip() if cut > 0 else ""


def settle_below(known: dict[int, bool], point: int, window: int) -> Search:
    """Move a working cut down while one of the `window` cuts under it works too."""
    while window > 0:
        below = range(max(point - window, 1), point)
        asked = [cut for cut in below if cut not in known]
        if asked:
            known |= yield asked
        working = [cut for cut in below if known[cut]]
        if not working:
            break
        point = min(working)
    return point


def binary_search(lines: int, check_below: int) -> Search:
    known: dict[int, bool] = {}
    known |= yield sorted({0, lines})
    if known[0]:
        return 0
    if not known[lines]:
        return None
    failing, working = 0, lines
    while working - failing > 1:
        middle = (failing + working) // 2
        known |= yield [middle]
        failing, working = (failing, middle) if known[middle] else (middle, working)
    return (yield from settle_below(known, working, check_below))


def linear_search(lines: int, stride: int, check_below: int) -> Search:
    known: dict[int, bool] = {}
    grid = list(range(0, lines + 1, stride))
    if grid[-1] != lines:
        grid.append(lines)
    for cut in grid:
        known |= yield [cut]
        if known[cut]:
            return cut if cut == 0 else (yield from settle_below(known, cut, max(check_below, stride - 1)))
    return None


def stable_search(lines: int, stride: int) -> Search:
    """Down from the full thinking while every cut works; `stride` cuts are asked a round (m
    answers them in one batch), so a few may be asked past the first that fails."""
    known: dict[int, bool] = {}
    known |= yield [lines]
    if not known[lines]:
        return None
    point = lines
    while point > 0:
        below = list(range(point - 1, max(point - 1 - stride, -1), -1))
        known |= yield below
        for cut in below:
            if not known[cut]:
                return point
            point = cut
    return 0


# --- token counts -----------------------------------------------------------------------------


class SignalTokens:
    """M output tokens a cut costs: the tokens of the cut as M writes it up to the hand-over
    (`<think>\\n{cut}\\n</think>` in the think style, the reasoning itself in the answer style)
    in M's own tokenizer (local, or llama.cpp's server's), 0 for the empty cut (M is not asked
    at all). Without one (an OpenAI-compatible M given no --capable-tokenizer) counts are
    estimated from M's own output, tokens per character, and rows say so."""

    def __init__(self, backend: Backend, config: DuetConfig) -> None:
        self.backend = backend if counts_tokens(backend) else None
        self.style = style_of(config)

    def closed(self, capable: SolveResult) -> bool:
        """Whether M-alone's answer reached the hand-over point (its close tag, an answer marker)."""
        if self.style.name == "answer":
            return self.style.reasoning_in(capable.capable_text or "") is not None
        return capable.signal is not None

    @property
    def exact(self) -> bool:
        return self.backend is not None

    def count(self, cut: str, capable: SolveResult) -> int:
        if not cut:
            return 0
        text = self.style.as_written(cut)
        if self.backend is not None:
            return self.backend.count_tokens(text)
        written = capable.capable_text or ""
        rate = capable.usage.capable.output_tokens / max(len(written), 1)
        return max(round(len(text) * rate), 1)


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Probed:
    """One question in flight: M-alone's result, its thinking and cuts, the search."""

    example: Example
    capable: SolveResult
    light_alone: SolveResult
    thinking: str
    ends: list[int]
    search: Search
    asked: list[int]
    known: dict[int, bool]
    answers: dict[int, str | None]
    oracle: int | None = None
    done: bool = False


def thinking_of(result: SolveResult, config: DuetConfig) -> str:
    """M's reasoning in an M-alone result, up to where its signal style hands over (the close
    tag, the first answer marker); an unclosed thinking (cut by the budget) counts as far as
    it goes, and a model that answered without think tags, or without a marker, handed nothing
    over."""
    style = style_of(config)
    if style.name == "think" and result.signal is not None:
        return result.signal
    text = result.capable_text or ""
    found = style.reasoning_in(text)
    if found is not None:
        return found
    prompts = config.prompts
    if style.name == "think" and prompts.think_open in text:
        return text.partition(prompts.think_open)[2].strip()  # cut by the budget: as far as it goes
    return ""


@dataclass
class AloneRows:
    """M-alone and m-alone results read back from an eval run (`ProbeConfig.reuse`), by
    (method, question id)."""

    rows: dict[tuple[str, str], dict]

    @classmethod
    def load(cls, folder: str | Path, config: ProbeConfig) -> AloneRows:
        """The run's greedy alone rows for the probe's task, once its models and DuetConfig are
        shown to be the probe's (else its rows would answer another question)."""
        from duetlm.evaluate.report import results_rows

        folder = Path(folder)
        try:
            run = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--reuse {folder}: not an eval run folder ({exc})") from None
        same = {
            "capable": run.get("capable") == config.capable,
            "light": run.get("light") == config.light,
            "DuetConfig": DuetConfig.model_validate(run.get("duet") or {}) == config.duet,
            "greedy": config.duet.temperature == 0,
        }
        differ = [name for name, ok in same.items() if not ok]
        if differ:
            raise ConfigError(f"--reuse {folder}: its run differs from the probe's in {', '.join(differ)}")
        rows = {
            (r["method"], str(r["id"])): r
            for r in results_rows(folder)
            if r["task"] == config.task and r["method"] in ("M-alone", "m-alone") and r["sample"] == 0
        }
        return cls(rows)

    def solve(self, duet: Duet, examples: Sequence[Example], method: str) -> list[SolveResult]:
        """Each example's result: the stored row's, else a fresh one (in one batch)."""
        missing = [e for e in examples if (method, e.id) not in self.rows]
        fresh = dict(zip([e.id for e in missing], duet.solve_batch([e.problem for e in missing], method)))
        return [fresh[e.id] if e.id in fresh else from_row(self.rows[(method, e.id)]) for e in examples]


def start_search(config: ProbeConfig, lines: int) -> Search:
    if config.search == "linear":
        return linear_search(lines, config.stride, config.check_below)
    if config.search == "stable":
        return stable_search(lines, config.stride)
    return binary_search(lines, config.check_below)


def probe_batch(
    duet: Duet, config: ProbeConfig, examples: Sequence[Example], reused: AloneRows | None = None
) -> list[Probed]:
    """M-alone and m-alone on a batch (or their rows from an eval run), then search rounds
    until every question has its cut."""
    reused = reused or AloneRows({})
    capable = reused.solve(duet, examples, "M-alone")
    light_alone = reused.solve(duet, examples, "m-alone")
    probed = []
    for example, mine, alone in zip(examples, capable, light_alone, strict=True):
        thinking = thinking_of(mine, duet.config)
        ends = line_ends(thinking)
        search = start_search(config, len(ends))
        probed.append(Probed(example, mine, alone, thinking, ends, search, next(search), {}, {}))
    greedy = Duet(duet.capable, duet.light, duet.config.model_copy(update={"temperature": 0.0}))
    while active := [p for p in probed if not p.done]:
        jobs = [(p, cut) for p in active for cut in p.asked]
        outputs = greedy.finish(
            [p.example.problem for p, _ in jobs], [cut_text(p.thinking, p.ends, cut) for p, cut in jobs]
        )
        verdicts: dict[int, dict[int, bool]] = {id(p): {} for p in active}
        for (p, cut), output in zip(jobs, outputs, strict=True):
            verdict = grade(output.text, p.example)
            verdicts[id(p)][cut] = verdict.correct
            p.answers[cut] = verdict.answer
        for p in active:
            p.known |= verdicts[id(p)]
            try:
                p.asked = p.search.send(verdicts[id(p)])
            except StopIteration as stop:
                p.oracle, p.done = stop.value, True
    return probed


def probe_row(
    task: str, p: Probed, counter: SignalTokens, config_hash: str, wall_s: float, search: str = "binary"
) -> dict:
    capable_verdict = grade(p.capable.text, p.example) if p.capable.answer is not None else None
    light_verdict = grade(p.light_alone.text, p.example) if p.light_alone.answer is not None else None
    oracle_signal = cut_text(p.thinking, p.ends, p.oracle) if p.oracle is not None else None
    return {
        "task": task,
        "method": METHOD,
        "id": p.example.id,
        "sample": 0,
        "gold": p.example.gold,
        "golds": list(p.example.golds),
        "question": p.example.question,
        "meta": p.example.meta,
        "capable_correct": bool(capable_verdict and capable_verdict.correct),
        "capable_answer": capable_verdict.answer if capable_verdict else None,
        "capable_output_tokens": p.capable.usage.capable.output_tokens,
        "capable_finish": p.capable.capable_finish,
        "thinking_closed": counter.closed(p.capable),
        "thinking": p.thinking,
        "thinking_lines": len(p.ends),
        "thinking_tokens": counter.count(p.thinking.strip(), p.capable),
        "light_alone_correct": bool(light_verdict and light_verdict.correct),
        "light_alone_output_tokens": p.light_alone.usage.light.output_tokens,
        "search": search,
        "oracle_lines": p.oracle,
        "oracle_tokens": counter.count(oracle_signal, p.capable) if oracle_signal is not None else None,
        "oracle_signal": oracle_signal,
        "oracle_answer": p.answers.get(p.oracle) if p.oracle is not None else None,
        "light_calls": len(p.known),
        "cuts": sorted([cut, ok] for cut, ok in p.known.items()),
        "tokens_estimated": not counter.exact,
        "capable_text": p.capable.capable_text,
        "wall_s": wall_s,
        "config_hash": config_hash,
    }


def run_probe(
    config: ProbeConfig,
    out: str | Path,
    force: bool = False,
    duet: Duet | None = None,
    backend_options: BackendOptions | None = None,
    light_options: BackendOptions | None = None,
    progress: bool = True,
) -> Path:
    """Run (or resume) a probe into `out`; returns the results file. `light_options`, when
    given, are m's backend options (an OpenAI-compatible m's tokenizer), else `backend_options`."""
    examples, task = config.load_task(), config.task
    chosen = list(examples)[: config.limit] if config.limit else list(examples)
    config_hash = config.config_hash()
    store = ResultStore(out, config.model_dump() | {"kind": METHOD}, config_hash, force=force)
    store.check_same_questions(task, chosen)
    pending = [e for e in chosen if (task, METHOD, e.id, 0) not in store.done]
    if not pending:
        return store.results_path
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
        return _probe_pending(config, duet, store, task, pending, config_hash, progress)
    finally:
        if owned:
            duet.close()


def _probe_pending(config, duet, store, task, pending, config_hash, progress) -> Path:
    reused = AloneRows.load(config.reuse, config) if config.reuse else None
    counter = SignalTokens(duet.capable, duet.config)
    if not counter.exact:
        logger.warning(
            "%s has no local tokenizer: signal tokens are estimated from its output (pass --capable-tokenizer "
            "for exact counts)",
            config.capable,
        )
    bar = tqdm(total=len(pending), desc=f"probe {task}", disable=not progress, unit="q")
    found = calls = probed_so_far = 0
    for start in range(0, len(pending), config.batch_size):
        batch = pending[start : start + config.batch_size]
        started = time.perf_counter()
        probed = probe_batch(duet, config, batch, reused)
        share = (time.perf_counter() - started) / len(batch)
        rows = [probe_row(task, p, counter, config_hash, share, config.search) for p in probed]
        store.append(rows)
        found += sum(r["oracle_lines"] is not None for r in rows)
        calls += sum(r["light_calls"] for r in rows)
        probed_so_far += len(rows)
        bar.update(len(rows))
        bar.set_postfix(oracle=f"{found / probed_so_far:.3f}", m_calls=f"{calls / probed_so_far:.1f}")
    bar.close()
    return store.results_path
