"""Continuous batching for a transformers causal LM: what `duet serve` streams through.

`model.generate()` runs a fixed batch to the end of its longest row: a row that finished
idles, and a request that arrives waits for the whole batch. Here one background thread
per device (or, in `process`, the main thread of a process of the engine's own)
steps every active row of every engine once per iteration: new requests are
prefilled and join between steps, finished or cancelled rows leave at once, and each new
token is handed to its request as text as soon as it is decoded. (transformers' own
continuous-batching manager was measured first: on the embedded pair on a CPU it ran a
32-request batch in 12.9 s against 1.3 s for `generate()`, its paged attention being built
for GPUs.)

The batch's KV cache (`row_cache.RowCache`) holds rows left-padded to a common length: joining
rows are prefilled together and written right-aligned into free row slots (the batch is
widened on the left when they are longer); positions come from each row's own length, so
padding never shifts a token's rotary position. Decode steps of Llama, Qwen2 and Qwen3 models
run the engine's own step (`decode_step`: the same arithmetic without the forward's
per-module overhead); other models step through their forward. Every row samples with its own
`torch.Generator`: a seeded request gives the same tokens whatever shares its batch, and
an unseeded one draws a fresh seed.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from duetlm.backends.base import ContextGuard, FinishReason, GenerationResult, SamplingParams
from duetlm.backends.hf.decode_step import DecodeStep, check_choice, why_not
from duetlm.backends.hf.row_cache import RowCache
from duetlm.backends.hf.sampling import sample

logger = logging.getLogger(__name__)

Listener = Callable[[str | GenerationResult], None]
"""Called from the engine thread with each text delta, then once with the final result."""


class Detokenizer:
    """Incremental decoding: the text each new token adds, held back while a multi-byte
    character or a possible stop string is still incomplete."""

    def __init__(self, tokenizer, stops: tuple[str, ...]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.prefix, self.read = 0, 0
        self.text = ""  # all text decoded so far
        self.sent = 0  # characters of `text` already handed out

    def add(self, token: int) -> None:
        self.tokens.append(token)
        self._decode(final=False)

    def flush(self) -> None:
        """At the end: whatever the held tokens decode to, incomplete characters included."""
        self._decode(final=True)

    def _decode(self, final: bool) -> None:
        before = self.tokenizer.decode(self.tokens[self.prefix : self.read], skip_special_tokens=False)
        after = self.tokenizer.decode(self.tokens[self.prefix :], skip_special_tokens=False)
        # a UTF-8 character spans at most 4 byte tokens: past that, a replacement character is real
        complete = not after.endswith("\ufffd") or len(self.tokens) - self.read >= 4
        if len(after) > len(before) and (complete or final):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.tokens)

    def stop_hit(self) -> str | None:
        """The stop string that now occurs in the text (the text is then cut before it)."""
        best = None
        for stop in self.stops:
            index = self.text.find(stop, max(0, self.sent - len(stop)))
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        return best[1]

    def ready(self, final: bool = False) -> str:
        """Text that can be handed out: all of it at the end, else all but a tail that might
        still become a stop string."""
        hold = 0 if final else max((len(s) - 1 for s in self.stops), default=0)
        end = max(self.sent, len(self.text) - hold)
        delta, self.sent = self.text[self.sent : end], end
        return delta


@dataclass(eq=False)
class Row:
    prompt: list[int]
    sampling: SamplingParams
    budget: int
    listener: Listener
    detok: Detokenizer
    generator: torch.Generator
    started: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    clamped: bool = False
    stop_string: str | None = None
    finished: bool = False  # its result was handed out


class Handle:
    """What a caller holds for a submitted request: it can cancel it."""

    def __init__(self, row: Row, engine: StepEngine) -> None:
        self._row, self._engine = row, engine

    def cancel(self) -> None:
        self._row.cancelled.set()
        if not self._row.finished:  # a finished row needs no step (nor a thread woken for it)
            self._engine.loop.wake()


class EngineLoop:
    """One thread stepping every engine of a device in turn (they share its compute).

    The thread ends once it has been idle for `idle_exit_s` and starts again with the next
    request. A live thread that has run torch's parallel CPU kernels slows every other
    thread's (each thread keeps its own OpenMP team): while an idle engine thread lived, a
    32-question `solve_batch` of the embedded pair took 2.0-2.8 s instead of 1.2-1.7 s."""

    def __init__(self, idle_exit_s: float = 1.0) -> None:
        self.engines: list[StepEngine] = []
        self.idle_exit_s = idle_exit_s
        self._event = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._stop_at_exit = False

    def register(self, engine: StepEngine) -> None:
        with self._lock:
            self.engines.append(engine)

    @property
    def running(self) -> bool:
        return self._thread is not None

    def wake(self) -> None:
        """Work has come (or a row was cancelled): the thread runs, started again if it ended."""
        with self._lock:
            self._event.set()
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name="duetlm-engine", daemon=True)
                self._thread.start()
                if not self._stop_at_exit:
                    atexit.register(self.stop)
                    self._stop_at_exit = True

    def stop(self) -> None:
        """End the thread between steps. At interpreter exit this must happen before torch's
        own teardown: a thread still inside torch then aborts the process."""
        with self._lock:
            self._stopping = True
            self._event.set()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    def _run(self) -> None:
        idle_since = None
        while not self._stopping:
            busy = False
            for engine in list(self.engines):
                try:
                    busy |= engine.step()
                except Exception as exc:  # a failed step fails its requests, never the loop
                    logger.exception("engine step failed")
                    engine.fail_all(exc)
            if busy:
                idle_since = None
                continue
            now = time.perf_counter()
            idle_since = idle_since if idle_since is not None else now
            if now - idle_since >= self.idle_exit_s:
                with self._lock:  # wake() sets the event under this lock: no request is missed
                    if not self._event.is_set():
                        self._thread = None
                        return
            self._event.wait(timeout=min(0.5, self.idle_exit_s))
            self._event.clear()
        with self._lock:
            self._thread = None


_LOOPS: dict[str, EngineLoop] = {}


def loop_for(device: torch.device) -> EngineLoop:
    return _LOOPS.setdefault(str(device), EngineLoop())


class StepEngine:
    """Continuous batching over one model (see the module docstring)."""

    def __init__(
        self,
        model,
        tokenizer,
        eos_ids: list[int],
        context: ContextGuard,
        max_rows: int = 64,
        admit_wait_s: float = 0.025,
        admit_batch: int = 8,
        decode_step: str = "auto",
        loop: EngineLoop | None = None,
    ) -> None:
        """`loop` steps the engine; by default the shared thread of its device (an engine
        process passes its own, stepped from its main thread)."""
        self.model, self.tokenizer, self.eos_ids, self.context = model, tokenizer, set(eos_ids), context
        self.max_rows, self.admit_wait_s, self.admit_batch = max_rows, admit_wait_s, admit_batch
        self.waiting: list[Row] = []  # submitted, gathering for a joint prefill
        self.joining: list[Row] = []
        self.device = next(model.parameters()).device
        self.pending: queue.SimpleQueue[Row] = queue.SimpleQueue()
        self.rows: list[Row] = []
        self.cache: RowCache | None = None  # the active rows' keys and values, left-padded
        self.mask: torch.Tensor | None = None  # (B, T) 1 where the cache holds a real token
        # a prefill needs the next-token logits of the last position only: over a 152k vocabulary
        # those of every position would take gigabytes (32 prompts of 100 tokens: 1.9 GB in fp32)
        accepted = inspect.signature(model.forward).parameters
        self.last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
        self.fast_step = self._pick_decode_step(model, decode_step)
        self.loop = loop if loop is not None else loop_for(self.device)
        self.loop.register(self)

    @staticmethod
    def _pick_decode_step(model, choice: str) -> DecodeStep | None:
        """See `decode_step.CHOICES`; a model the own step does not cover is logged with why."""
        reason = why_not(model) if check_choice(choice) == "auto" else "asked for"
        if reason is not None:
            logger.info("engine decode step: the model's forward (%s)", reason)
            return None
        return DecodeStep(model)

    def close(self) -> None:
        """Nothing of its own to release: its loop thread ends by itself once idle (an engine
        process's handle, `EngineProcess`, ends its process here)."""

    @property
    def has_work(self) -> bool:
        """Rows decoding, gathering, or submitted and not yet seen by a step."""
        return bool(self.rows or self.waiting or not self.pending.empty())

    def submit(self, prompt: list[int], sampling: SamplingParams, listener: Listener) -> Handle:
        budget = self.context.fit(len(prompt), sampling.max_tokens)
        seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little")
        generator = torch.Generator(device="cpu").manual_seed(seed % 2**64)
        row = Row(prompt, sampling, budget, listener, Detokenizer(self.tokenizer, sampling.stop), generator)
        row.clamped = budget < sampling.max_tokens
        if budget == 0:
            _notify(row, ContextGuard.overflow_result(len(prompt)))
        else:
            self.pending.put(row)
            self.loop.wake()
        return Handle(row, self)

    # --- one iteration -------------------------------------------------------------------

    def step(self) -> bool:
        """Decode one token for every active row, then admit the waiting rows (prefilled
        together; they get their first token from it), retiring rows as they end. Returns
        whether there was work."""
        self._retire([r for r in self.rows if r.cancelled.is_set()], "cancelled")
        busy = bool(self.rows)
        if self.rows:
            self._decode()
        joining = self._admit()
        if joining:
            self.joining = joining  # neither waiting nor active while their prefill runs
            self._join(joining)
            self.joining = []
        return busy or bool(joining) or bool(self.waiting)

    def _admit(self) -> list[Row]:
        """The waiting rows to prefill now. An idle engine takes them at once; a busy one lets
        them gather for up to `admit_wait_s` (or until `admit_batch` wait), since a prefill of
        one row costs nearly what a prefill of several does."""
        while True:
            try:
                self.waiting.append(self.pending.get_nowait())
            except queue.Empty:
                break
        for row in self.waiting:
            if row.cancelled.is_set():  # cancelled before its prefill: it still gets its end, so
                _notify(row, self._result(row, "cancelled"))  # whoever counts requests sees it go
        self.waiting = [r for r in self.waiting if not r.cancelled.is_set()]
        if not self.waiting:
            return []
        due = time.perf_counter() - self.waiting[0].started >= self.admit_wait_s
        if self.rows and not due and len(self.waiting) < self.admit_batch:
            return []
        room = self.max_rows - len(self.rows)
        joining, self.waiting = self.waiting[:room], self.waiting[room:]
        return joining

    @torch.inference_mode()
    def _join(self, rows: list[Row]) -> None:
        """Prefill the new rows together, sample their first token, merge their cache in."""
        from transformers import DynamicCache

        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt) :] = torch.tensor(row.prompt)
            mask[i, width - len(row.prompt) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=cache,
            use_cache=True,
            **self.last_logits_only,
        )
        self._merge(cache, mask, rows)
        self._advance(rows, out.logits[:, -1, :])

    @torch.inference_mode()
    def _decode(self) -> None:
        last = torch.tensor([r.tokens[-1] for r in self.rows], device=self.device)  # (B,)
        positions = self.mask.sum(dim=1).to(self.device)  # (B,) each row's own next position
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)
        mask = self.mask.to(self.device)
        if self.fast_step is not None:
            logits = self.fast_step(last, positions, self.cache, mask)
        else:
            logits = self.model(
                input_ids=last[:, None],
                attention_mask=mask,
                position_ids=positions[:, None],
                past_key_values=self.cache,
                use_cache=True,
            ).logits[:, -1, :]
        self._advance(list(self.rows), logits)

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Sample each row's next token, hand out its text, and retire the rows that ended."""
        tokens = sample(logits.float(), [r.sampling for r in rows], [r.generator for r in rows])
        ended: dict[str, list[Row]] = {}
        for row, token in zip(rows, tokens):
            row.tokens.append(token)
            reason = self._finished(row, token)
            if reason is not None and reason != "stop":
                row.detok.flush()
            delta = row.detok.ready(final=reason is not None)
            if delta:
                _notify(row, delta)
            if reason is not None:
                ended.setdefault(reason, []).append(row)
        for reason, group in ended.items():
            self._retire(group, reason)

    def _finished(self, row: Row, token: int) -> FinishReason | None:
        if token in self.eos_ids:
            return "eos"
        row.detok.add(token)
        row.stop_string = row.detok.stop_hit()
        if row.stop_string is not None:
            return "stop"
        return "length" if len(row.tokens) >= row.budget else None

    # --- the shared cache ----------------------------------------------------------------

    def _merge(self, prefill, new_mask: torch.Tensor, rows: list[Row]) -> None:
        if not self.rows:
            self.cache, self.mask = RowCache(prefill), new_mask
        else:
            width = max(self.mask.shape[1], new_mask.shape[1])
            self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(new_mask, width)], dim=0)
        self.cache.append(prefill)
        self.rows += rows

    def _retire(self, rows: list[Row], reason: str) -> None:
        if not rows:
            return
        leaving = {id(r) for r in rows}
        gone = [i for i, r in enumerate(self.rows) if id(r) in leaving]
        for i in gone:
            _notify(self.rows[i], self._result(self.rows[i], reason))
        order = self.cache.remove(gone) if gone else list(range(len(self.rows)))
        self.rows = [self.rows[i] for i in order]
        if not self.rows:
            self.cache, self.mask = None, None
            return
        self.mask = self.mask[torch.tensor(order)]
        # all-padding columns on the left: dropped once they are worth a copy of the cache
        unused = int((self.mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())
        if unused >= max(16, self.mask.shape[1] // 4):
            self.cache.drop_left(unused)
            self.mask = self.mask[:, unused:]

    def _result(self, row: Row, reason: str) -> GenerationResult:
        n_output = len(row.tokens)
        return GenerationResult(
            text=row.detok.text,
            prompt_tokens=len(row.prompt),
            output_tokens=n_output,
            finish_reason=reason,  # type: ignore[arg-type]
            wall_s=time.perf_counter() - row.started,
            stop_string=row.stop_string,
            token_ids=list(row.tokens),
            budget_clamped=row.clamped,
        )

    def fail_all(self, exc: Exception) -> None:
        """A step failed: every request in the engine, active or waiting, ends with the error
        (none is left waiting forever)."""
        while True:
            try:
                self.waiting.append(self.pending.get_nowait())
            except queue.Empty:
                break
        for row in [*self.rows, *self.joining, *self.waiting]:
            _notify(row, GenerationResult("", len(row.prompt), 0, "length", extra={"failure": repr(exc)}))
        self.rows, self.joining, self.waiting, self.cache, self.mask = [], [], [], None, None


def _notify(row: Row, event: str | GenerationResult) -> None:
    """Hand an event to the row's listener; a listener that fails (its event loop is gone)
    means nobody waits for the row any more: it is cancelled."""
    row.finished = row.finished or isinstance(event, GenerationResult)
    try:
        row.listener(event)
    except Exception:
        row.cancelled.set()


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the sequence dimension (dim 2 of a cache tensor, dim 1 of a mask) on the left."""
    dim = 2 if tensor.dim() == 4 else 1
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
