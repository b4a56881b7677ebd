"""Hugging Face transformers backend: any causal LM, batched, KV cache, stop strings.

Requests are grouped by sampling settings, sorted by prompt length (less padding), run in
left-padded batches through `model.generate` (KV cache, stop strings handled by the
library), and returned in the caller's order with exact token counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence

import torch

from duetlm.backends.base import (
    BaseBackend,
    Capabilities,
    ContextGuard,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    cut_at_stop,
    prompt_token_ids,
    render_chat,
)
from duetlm.backends.handoff import Inbox
from duetlm.backends.hf.decode_step import check_choice
from duetlm.backends.hf.loading import (
    end_ids,
    eos_ids,
    load_configs,
    load_tokenizer,
    load_weights,
    pick_device,
    resolve_model_location,
)
from duetlm.backends.hf.sampling import RowSampler
from duetlm.errors import BackendError

logger = logging.getLogger(__name__)

_NEUTRAL = {  # every knob of generate() that reshapes the distribution, set to "off"
    "top_h": None,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": None,
    "guidance_scale": None,
    "renormalize_logits": False,
}


def exact_generation_config(
    sampling: SamplingParams, eos_ids: list[int], pad_id: int, scores: bool | None = None
):
    """A GenerationConfig that samples exactly `sampling`'s distribution: temperature, top-p
    and top-k as given (0: off), every other processor off, so that log-probs computed at the
    same temperature are those of the sampled tokens (the trainer relies on it). `scores`
    (default: whether `sampling` asks for log-probs) keeps each step's processed scores."""
    from transformers import GenerationConfig

    greedy = sampling.temperature <= 0  # warpers unused: left to the library's defaults
    return GenerationConfig(
        max_new_tokens=sampling.max_tokens,
        do_sample=not greedy,
        temperature=None if greedy else sampling.temperature,
        top_p=None if greedy else sampling.top_p,
        top_k=None if greedy else sampling.top_k,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        stop_strings=list(sampling.stop) or None,
        output_scores=sampling.logprobs if scores is None else scores,
        return_dict_in_generate=sampling.logprobs if scores is None else scores,
        **_NEUTRAL,
    )


def row_budgets(prompt_width: int, budgets: list[int]):
    """Stopping criteria that end each row of a left-padded batch at its own budget (the
    batch runs to the largest; a row past its budget is padded, and cut off afterwards)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    limits = torch.tensor(budgets)

    class RowBudgets(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            return (input_ids.shape[1] - prompt_width) >= limits.to(input_ids.device)

    return StoppingCriteriaList([RowBudgets()])


@contextlib.contextmanager
def own_generation_defaults(model):
    """Run generate() with the model's own generation_config set aside. transformers fills
    every setting left unset from it (Qwen3's says top_k 20, top_p 0.95), so a request would
    otherwise sample from another distribution than the one it asked for."""
    from transformers import GenerationConfig

    target = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    saved = target.generation_config
    target.generation_config = GenerationConfig(
        eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id, bos_token_id=saved.bos_token_id
    )
    try:
        yield
    finally:
        target.generation_config = saved


def sampled_logprobs(scores: tuple[torch.Tensor, ...], tokens: torch.Tensor) -> torch.Tensor:
    """log p of each sampled token under the processed scores it was drawn from.
    scores: T tensors (B, V); tokens: (B, T) -> (B, T), on the CPU."""
    out = torch.stack(
        [
            torch.log_softmax(step.float(), dim=-1).gather(1, tokens[:, t : t + 1].to(step.device)).squeeze(1)
            for t, step in enumerate(scores)
        ],
        dim=1,
    )
    return out.cpu()


ENGINES = ("thread", "process")
"""Where the streaming engine runs: `thread`, a thread of this process; `process`, a process
of its own per model (`process`: no GIL shared with the caller, its own torch threads)."""


class HFBackend(BaseBackend):
    """A transformers causal LM loaded once and reused for every call.

    Pass `model` and `tokenizer` to wrap objects already in memory (the trainer does, so
    rollouts use the weights being trained). With `engine="process"` the streaming engine
    loads the weights in its own process, and this process loads them only if `generate`
    is called (a server streaming through the engine never holds two copies)."""

    def __init__(
        self,
        path_or_id: str | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 32,
        batch_tokens: int | None = None,
        trust_remote_code: bool = False,
        decode_step: str = "auto",
        engine: str = "thread",
        engine_threads: int | None = 1,
        model=None,
        tokenizer=None,
        spec: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise BackendError(f"batch_size must be >= 1, got {batch_size}")
        check_choice(decode_step)  # now, before any weights load: the engine starts with the first stream
        if engine not in ENGINES:
            raise BackendError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
        if engine_threads is not None and engine_threads < 1:
            raise BackendError(
                f"engine_threads must be >= 1 (or None: torch's default), got {engine_threads}"
            )
        if engine == "process" and model is not None:
            raise BackendError(
                "engine='process' loads the model from its folder; it cannot wrap one in memory"
            )
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.engine_kind, self.engine_threads = engine, engine_threads
        self._load_args = (device, dtype, trust_remote_code)
        self._model, self.location, self._closed = None, None, False
        if model is not None and tokenizer is not None:
            self._model, self.tokenizer = model, tokenizer
            self.device = next(model.parameters()).device
            config, generation_config = model.config, model.generation_config
        else:
            if path_or_id is None:
                raise BackendError("HFBackend needs a model path or hub id, or a model and tokenizer")
            self.location, self._local = resolve_model_location(path_or_id)
            self.device = pick_device(device)
            self.tokenizer = load_tokenizer(self.location, self._local, trust_remote_code)
            if engine == "process":
                config, generation_config = load_configs(self.location, self._local, trust_remote_code)
            else:
                self._model = load_weights(self.location, self._local, dtype, self.device, trust_remote_code)
                config, generation_config = self._model.config, self._model.generation_config
        self.spec = spec or f"hf:{path_or_id}"
        self.tokenizer.padding_side = "left"  # a tokenizer handed in is set up as a loaded one is
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.eos_token_ids = eos_ids(generation_config, self.tokenizer, self.spec)
        self.context = ContextGuard(self.spec, getattr(config, "max_position_embeddings", None))
        self._engine = None
        self._stop_matchers: dict[tuple[str, ...], object] = {}  # see _stopping
        self.decode_step = decode_step
        self._end_ids = torch.tensor(end_ids(self.eos_token_ids, self.tokenizer))
        self._prompt_ids: dict[str, list[int]] = {}  # rendered prompt -> ids, the latest few
        self._prompt_ids_lock = threading.Lock()

    @property
    def model(self):
        """The weights in this process (loaded now if the engine process holds the only copy)."""
        if self._model is None and self.location is not None and not self._closed:
            _, dtype, trust_remote_code = self._load_args
            logger.info("%s: loading the weights in this process too (generate() was called)", self.spec)
            self._model = load_weights(self.location, self._local, dtype, self.device, trust_remote_code)
        return self._model

    @model.setter
    def model(self, value) -> None:
        self._model = value

    @property
    def context_length(self) -> int | None:
        return self.context.context_length

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            tokenizer=True,
            logprobs=True,
            token_ids=True,
            streaming=True,
            prompt_tokens=True,
            context_length=self.context_length,
        )

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The rendered prompt as token ids, as the streaming engine reads it. The latest few
        are kept: a server counts a prompt's tokens before it streams the same prompt."""
        if request.continue_ids:
            return prompt_token_ids(self.tokenizer, request)
        text = render_chat(self.tokenizer, request)
        ids = self._prompt_ids.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            with self._prompt_ids_lock:
                if len(self._prompt_ids) >= 256:
                    self._prompt_ids.pop(next(iter(self._prompt_ids)))
                self._prompt_ids[text] = ids
        return list(ids)

    def prompt_tokens(self, request: GenerationRequest) -> int:
        """Tokens of the rendered prompt (prefill included), as generation will count them."""
        return len(self.prompt_ids(request))

    async def astream(self, request: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
        """Text deltas as the model writes them, then the result with exact counts. Runs on
        the continuous-batching engine (`engine`): requests join and leave between decode
        steps. Deltas that pile up while the consumer is busy are handed over joined, so a
        slow reader costs fewer, larger chunks rather than lag. Closing the iterator (a client
        that left) cancels the request."""
        inbox = Inbox(asyncio.get_running_loop())
        handle = self.engine.submit(self.prompt_ids(request), request.sampling, inbox.post)
        try:
            while True:
                for item in await inbox.take():
                    failure = isinstance(item, GenerationResult) and item.extra.get("failure")
                    if failure:
                        raise BackendError(f"{self.spec}: generation failed ({failure})")
                    yield item
                    if isinstance(item, GenerationResult):
                        return
        finally:
            handle.cancel()

    @property
    def engine(self):
        """The streaming engine, started with the first stream (`start_engine` starts it now)."""
        if self._engine is None:
            if self.engine_kind == "process":
                from duetlm.backends.hf.process import EngineProcess, EngineSpec

                _, dtype, trust_remote_code = self._load_args
                self._engine = EngineProcess(
                    EngineSpec(
                        location=self.location,
                        spec=self.spec,
                        device=str(self.device),
                        dtype=dtype,
                        trust_remote_code=trust_remote_code,
                        decode_step=self.decode_step,
                        threads=self.engine_threads,
                    )
                )
            else:
                self._engine = self.new_engine()
        return self._engine

    def start(self) -> None:
        """Start the streaming engine now (a server loads its engine processes side by side
        before the first request, not at it)."""
        self.start_engine()

    def start_engine(self) -> None:
        """Start the streaming engine now (an engine process loads its model), not with the
        first request."""
        _ = self.engine

    def new_engine(self, loop=None, **options):
        """A continuous-batching engine over this process's weights (`engine.StepEngine`)."""
        from duetlm.backends.hf.engine import StepEngine

        return StepEngine(
            self.model,
            self.tokenizer,
            sorted(self._end_ids.tolist()),
            self.context,
            decode_step=self.decode_step,
            loop=loop,
            **options,
        )

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Requests that sample alike are batched together whatever their budgets: each row
        stops at its own (a budget cut to fit the context differs with every prompt length,
        and grouping by budget split 32 questions of the embedded pair into 8 generate()
        calls, each as long as its longest row)."""
        if not requests:
            return []
        results: list[GenerationResult | None] = [None] * len(requests)
        prompts = self.tokenizer(
            [render_chat(self.tokenizer, r) for r in requests], add_special_tokens=False
        )["input_ids"]
        for index, request in enumerate(requests):
            if request.continue_ids:
                prompts[index] = prompt_token_ids(self.tokenizer, request)
        budgets = [self.context.fit(len(p), r.sampling.max_tokens) for p, r in zip(prompts, requests)]
        groups: dict[SamplingParams, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            if budgets[index] == 0:
                results[index] = ContextGuard.overflow_result(len(prompts[index]))
            else:
                groups[dataclasses.replace(request.sampling, max_tokens=0, seed=None)].append(index)
        lengths = [len(p) for p in prompts]
        for sampling, indices in groups.items():
            indices.sort(key=lambda i: lengths[i])
            for chunk in self._chunks(indices, lengths, budgets):
                batch = self._generate_batch(
                    [prompts[i] for i in chunk],
                    sampling,
                    [budgets[i] for i in chunk],
                    [requests[i].sampling.seed for i in chunk],
                )
                for index, result in zip(chunk, batch):
                    result.budget_clamped = budgets[index] < requests[index].sampling.max_tokens
                    results[index] = result
        return results  # type: ignore[return-value]

    def _chunks(self, indices: list[int], lengths: list[int], budgets: list[int]) -> list[list[int]]:
        """Consecutive rows (sorted by prompt length) per generate() call: at most batch_size,
        and with `batch_tokens`, rows x (longest prompt + longest budget) within it (the KV
        cache)."""
        chunks: list[list[int]] = [[]]
        longest_budget = 0  # of the chunk being filled
        for index in indices:
            rows = len(chunks[-1]) + 1
            budget = max(longest_budget, budgets[index])
            too_many = rows > self.batch_size
            too_big = self.batch_tokens is not None and rows * (lengths[index] + budget) > self.batch_tokens
            if chunks[-1] and (too_many or too_big):
                chunks.append([])
                budget = budgets[index]
            chunks[-1].append(index)
            longest_budget = budget
        return [c for c in chunks if c]

    def _generate_batch(
        self, prompts: list[list[int]], sampling: SamplingParams, budgets: list[int], seeds: list[int | None]
    ) -> list[GenerationResult]:
        """One generate() call. Sampled rows draw through `RowSampler`, each with its own
        generator (its request's seed), so a row's tokens do not depend on its batch."""
        from transformers import LogitsProcessorList

        started = time.perf_counter()
        encoded = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
        encoded = encoded.to(self.device)
        sampler = None
        if sampling.temperature > 0:
            settings = [dataclasses.replace(sampling, seed=seed) for seed in seeds]
            sampler = RowSampler(settings, self.device, sampling.logprobs)
        config = exact_generation_config(
            dataclasses.replace(
                sampling,
                max_tokens=max(budgets),
                temperature=0.0 if sampler else sampling.temperature,
                stop=(),  # matched by the criteria below, built once per stop set
            ),
            self.eos_token_ids,
            self.tokenizer.pad_token_id,
            scores=sampling.logprobs and sampler is None,
        )
        width = encoded["input_ids"].shape[1]
        with torch.inference_mode(), own_generation_defaults(self.model):
            output = self.model.generate(
                **encoded,
                generation_config=config,
                logits_processor=LogitsProcessorList([sampler]) if sampler else None,
                stopping_criteria=self._stopping(width, budgets, sampling.stop),
            )
        output_ids = output.sequences if config.return_dict_in_generate else output
        generated = output_ids[:, width:].cpu()  # (B, T)
        step_logprobs = None
        if sampler is not None and sampling.logprobs:
            step_logprobs = sampler.logprobs
        elif sampling.logprobs:
            step_logprobs = sampled_logprobs(output.scores, output_ids[:, -len(output.scores) :])
        prompt_tokens = encoded["attention_mask"].sum(dim=1).tolist()
        share = (time.perf_counter() - started) / len(prompts)
        results = [
            self._finish(row[:budget], n_prompt, sampling, share)
            for row, n_prompt, budget in zip(generated, prompt_tokens, budgets)
        ]
        if step_logprobs is not None:
            for result, row in zip(results, step_logprobs):
                result.logprobs = row[: result.output_tokens].tolist()
        return results

    def _stopping(self, width: int, budgets: list[int], stops: tuple[str, ...]):
        """Each row's own budget and the stop strings as generate()'s stopping criteria.

        transformers builds a stop-string matcher from the whole vocabulary on every call
        (about 3 s for Qwen3's 151,669 tokens on a laptop core) and its cache misses, since
        its key is the vocabulary in `get_vocab()`'s unordered iteration; the settle modes call
        generate() at every line. The matcher holds no state between calls, so one per stop
        set serves them all."""
        from transformers import StoppingCriteriaList, StopStringCriteria

        criteria = list(row_budgets(width, budgets)) if min(budgets) < max(budgets) else []
        if stops:
            if stops not in self._stop_matchers:
                self._stop_matchers[stops] = StopStringCriteria(self.tokenizer, list(stops))
            criteria.append(self._stop_matchers[stops])
        return StoppingCriteriaList(criteria) if criteria else None

    def _finish(
        self, row: torch.Tensor, prompt_tokens: int, sampling: SamplingParams, wall_s: float
    ) -> GenerationResult:
        """Where this row really ended, and why; tokens after the end are batch padding."""
        is_end = torch.isin(row, self._end_ids)  # (T,)
        first_end = int(is_end.int().argmax()) if bool(is_end.any()) else len(row)
        text = self.tokenizer.decode(row[:first_end], skip_special_tokens=False)
        text, stop_string = cut_at_stop(text, sampling.stop)
        reason: FinishReason
        if stop_string is not None:
            reason, n_output = "stop", first_end
        elif first_end < len(row):
            hit_eos = int(row[first_end]) in self.eos_token_ids
            reason, n_output = "eos", first_end + int(hit_eos)
        else:
            reason, n_output = "length", len(row)
        return GenerationResult(
            text=text,
            prompt_tokens=int(prompt_tokens),
            output_tokens=n_output,
            finish_reason=reason,
            wall_s=wall_s,
            stop_string=stop_string,
            token_ids=row[:n_output].tolist(),
        )

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self._engine = None
        self._model, self._closed = None, True
