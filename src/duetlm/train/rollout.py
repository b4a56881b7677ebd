"""The rollouts of a training step (docs/design.md section 2): M's signals, m alone, m guided.

They go through the same backends and the same protocol functions as inference, so the
signal m reads in training is exactly the one it reads when serving (`protocol.signal_of`:
up to the close tag, never the end-of-turn token). Each rollout returns what the step
scores (correctness, lengths) and the sequences the update trains on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from duetlm.backends.base import GenerationRequest, GenerationResult, SamplingParams, render_chat
from duetlm.protocol import (
    capable_request,
    light_request,
    signal_from_stage1,
    signal_of,
    split_thinking,
    user_prompt,
)
from duetlm.tasks import Example, grade
from duetlm.train.config import TrainConfig
from duetlm.train.policy import Policy, autocast
from duetlm.train.sequences import Sequences, force_early_stop, pack


@dataclass
class Signal:
    ids: list[int]  # what M sampled (and, after a forced stop, the inserted close tag)
    text: str  # what m reads
    forced: bool  # cut at a line boundary and closed by the trainer
    sampled_logprobs: list[float] | None = None  # from the engine, when asked for


@dataclass
class CapableRollout:
    signals: list[list[Signal]]  # (Q, S)
    seqs: Sequences  # Q*S rows, question-major

    @property
    def lengths(self) -> torch.Tensor:  # (Q, S) L(y) in tokens
        return torch.tensor([[float(len(s.ids)) for s in group] for group in self.signals])

    @property
    def forced(self) -> torch.Tensor:  # (Q, S) 1 where the trainer cut the signal
        return torch.tensor([[float(s.forced) for s in group] for group in self.signals])


class Rollouts:
    def __init__(self, cfg: TrainConfig, capable: Policy, light: Policy, device: torch.device) -> None:
        self.cfg, self.capable, self.light, self.device = cfg, capable, light, device
        self.duet_config = cfg.duet.model_copy(
            update={"seed": None, "answer_max_tokens": cfg.answer_max_tokens}
        )
        self.close_ids = capable.tokenizer(cfg.duet.prompts.think_close, add_special_tokens=False)[
            "input_ids"
        ]

    def _sampling(self, temperature: float):
        return self.duet_config.model_copy(update={"temperature": temperature, "top_p": 1.0, "top_k": 0})

    def _generate(self, policy: Policy, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if self.cfg.check_rollout_logprobs:
            requests = [
                GenerationRequest(r.messages, _with_logprobs(r.sampling), r.prefill, r.chat_template_kwargs)
                for r in requests
            ]
        with autocast(self.device, self.cfg.precision):
            return policy.engine.generate(requests)

    def capable_signals(self, questions: list[Example], step: int) -> CapableRollout:
        """n_M signals per question, some cut short by forced early stops (exploration)."""
        cfg, tokenizer = self.cfg, self.capable.tokenizer
        config = self._sampling(cfg.capable_temperature)
        requests = [
            capable_request(q.problem, config, cfg.signal_max_tokens)
            for q in questions
            for _ in range(cfg.n_capable)
        ]
        results = self._generate(self.capable, requests)
        groups = []
        for qi, question in enumerate(questions):
            group = []
            for si in range(cfg.n_capable):
                result = results[qi * cfg.n_capable + si]
                signal = Signal(
                    list(result.token_ids or []), signal_of(result, config), False, result.logprobs
                )
                rng = random.Random(f"{cfg.seed}:{step}:{question.id}:{si}")
                if cfg.forced_stop_prob > 0 and rng.random() < cfg.forced_stop_prob:
                    cut = force_early_stop(signal.ids, tokenizer, self.close_ids, rng)
                    if cut is not None:
                        body = tokenizer.decode(cut[: -len(self.close_ids)], skip_special_tokens=False)
                        signal = Signal(cut, signal_from_stage1(body, cfg.duet.prompts.think_open), True)
                group.append(signal)
            groups.append(group)
        seqs = pack(
            prompt_ids(tokenizer, requests), [s.ids for g in groups for s in g], tokenizer.pad_token_id
        )
        return CapableRollout(groups, seqs)

    def light_alone(self, questions: list[Example]) -> torch.Tensor:
        """r(m)(x): n_m standalone answers per question, drawn once per question. (Q, A)"""
        cfg = self.cfg
        requests = self._alone_requests(questions, cfg.light_temperature, cfg.answer_max_tokens, cfg.n_light)
        results = self._generate(self.light, requests)
        correct = [_final_correct(r.text, questions[i // cfg.n_light], cfg) for i, r in enumerate(results)]
        return torch.tensor(correct).reshape(len(questions), cfg.n_light)

    def light_guided(
        self, questions: list[Example], signals: list[list[Signal]]
    ) -> tuple[Sequences, torch.Tensor]:
        """n_m answers of m for every signal: m's sequences and their correctness (Q, S, A)."""
        cfg = self.cfg
        config = self._sampling(cfg.light_temperature)
        requests = [
            light_request(q.problem, s.text, config, config.light_template_kwargs)
            for q, group in zip(questions, signals, strict=True)
            for s in group
            for _ in range(cfg.n_light)
        ]
        results = self._generate(self.light, requests)
        per_question = cfg.n_capable * cfg.n_light
        correct = [float(grade(r.text, questions[i // per_question]).correct) for i, r in enumerate(results)]
        seqs = self._sequences(self.light, requests, results)
        return seqs, torch.tensor(correct).reshape(len(questions), cfg.n_capable, cfg.n_light)

    def capable_alone(self, questions: list[Example]) -> tuple[Sequences, torch.Tensor, torch.Tensor]:
        """The single-model baseline: n_M whole answers of M per question; (seqs, correct (Q, S),
        output tokens (Q, S))."""
        cfg = self.cfg
        budget = cfg.signal_max_tokens + cfg.answer_max_tokens
        requests = self._alone_requests(
            questions, cfg.capable_temperature, budget, cfg.n_capable, capable=True
        )
        results = self._generate(self.capable, requests)
        shape = (len(questions), cfg.n_capable)
        correct = [
            _final_correct(r.text, questions[i // cfg.n_capable], cfg, must_think=True)
            for i, r in enumerate(results)
        ]
        lengths = [float(r.output_tokens) for r in results]
        seqs = self._sequences(self.capable, requests, results)
        return seqs, torch.tensor(correct).reshape(shape), torch.tensor(lengths).reshape(shape)

    def _alone_requests(
        self, questions: list[Example], temperature: float, budget: int, n: int, capable: bool = False
    ) -> list[GenerationRequest]:
        """n requests per question for a model answering alone (the question, no prefill)."""
        config = self._sampling(temperature)
        kwargs = config.capable_template_kwargs if capable else config.light_template_kwargs
        sampling = SamplingParams(budget, temperature, 1.0, None, ())
        return [
            GenerationRequest.chat(user_prompt(q.problem, config), sampling, chat_template_kwargs=kwargs)
            for q in questions
            for _ in range(n)
        ]

    @staticmethod
    def _sequences(policy: Policy, requests, results) -> Sequences:
        tokenizer = policy.tokenizer
        completions = [r.token_ids or [] for r in results]
        return pack(prompt_ids(tokenizer, requests), completions, tokenizer.pad_token_id)


def _with_logprobs(sampling: SamplingParams) -> SamplingParams:
    from dataclasses import replace

    return replace(sampling, logprobs=True)


def _final_correct(text: str, example: Example, cfg: TrainConfig, must_think: bool = False) -> float:
    """A whole answer is graded on what follows its thinking; one whose thinking never closed
    is wrong (as in inference), and with `must_think` so is one that never thought."""
    prompts = cfg.duet.prompts
    thinking, final = split_thinking(text, prompts.think_open, prompts.think_close)
    if thinking is None and (must_think or prompts.think_open in text):
        return 0.0
    return float(grade(final if thinking is not None else text, example).correct)


def prompt_ids(tokenizer, requests: list[GenerationRequest]) -> list[list[int]]:
    return tokenizer([render_chat(tokenizer, r) for r in requests], add_special_tokens=False)["input_ids"]
