"""The rollouts of a training step (docs/design.md section 2): M's signals and m's answers to
them (and, for the single-model baseline, M's whole answers).

They go through the same backends and the same protocol functions as inference, so the
signal m reads in training is exactly the one it reads when serving (`protocol.signal_of`:
up to the close tag, never the end-of-turn token). Each rollout returns what the step
scores (correctness, lengths) and the sequences the update trains on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from duetlm.backends.base import GenerationRequest, GenerationResult, SamplingParams, render_chat
from duetlm.requests import capable_request, light_request, signal_of, user_prompt
from duetlm.signals import split_thinking, style_of
from duetlm.tasks import Example, grade
from duetlm.train.config import TrainConfig
from duetlm.train.modeling.policy import Policy, autocast
from duetlm.train.rollouts.batch import RolloutBatch, StepQuestions, sample_seed
from duetlm.train.rollouts.sequences import Sequences, force_early_stop, pack


@dataclass
class Signal:
    ids: list[int]  # what M sampled (and, after a forced stop, the inserted close tag)
    text: str  # what m reads
    forced: bool  # cut at a line boundary and closed by the trainer
    sampled_logprobs: list[float] | None = None  # from the engine, when asked for


@dataclass
class CapableRollout:
    signals: list[list[Signal]]  # (Q, S)
    batch: RolloutBatch  # one row per signal

    @property
    def lengths(self) -> torch.Tensor:  # (Q, S) L(y) in tokens
        return torch.tensor([[float(len(s.ids)) for s in group] for group in self.signals])

    @property
    def forced(self) -> torch.Tensor:  # (Q, S) 1 where the trainer cut the signal
        return torch.tensor([[float(s.forced) for s in group] for group in self.signals])

    def signal_of_row(self, row: int) -> Signal:
        return self.signals[int(self.batch.question[row])][int(self.batch.signal[row])]


class Rollouts:
    """The step's three rollouts. Every request is seeded from what it is (`sample_seed`:
    the run's seed, the step, the role, the question's place in the step's batch, the signal
    and answer index), so the samples do not depend on how the batch is sharded or grouped."""

    def __init__(self, cfg: TrainConfig, capable: Policy, light: Policy | None, device: torch.device) -> None:
        self.cfg, self.capable, self.light, self.device = cfg, capable, light, device
        self.duet_config = cfg.duet.model_copy(
            update={"seed": None, "answer_max_tokens": cfg.rollout.answer_max_tokens}
        )
        # what a forced early stop appends: the tokens that end a signal in M's signal style (the
        # close tag; the first answer marker in the answer style)
        self.style = style_of(cfg.duet)
        ends = self.style.stops()
        self.close_ids = capable.tokenizer(ends[0], add_special_tokens=False)["input_ids"] if ends else []

    def _sampling(self, temperature: float):
        return self.duet_config.model_copy(update={"temperature": temperature, "top_p": 1.0, "top_k": 0})

    def _seeded(self, request: GenerationRequest, seed: int, role: str) -> GenerationRequest:
        """The request with its own seed, asking for the engine's log-probs when the step uses
        them (the rollout correction, or the gap diagnostic)."""
        wants = self.cfg.rollout.check_rollout_logprobs or self.cfg.correction_for(role) != "none"
        return replace(request, sampling=replace(request.sampling, seed=seed, logprobs=wants))

    def _generate(self, policy: Policy, requests: list[GenerationRequest]) -> list[GenerationResult]:
        with autocast(self.device, self.cfg.parallel.precision):
            return policy.engine.generate(requests)

    def _seed(self, questions: StepQuestions, role: str, key: tuple[int, int, int]) -> int:
        question, signal, answer = key
        return sample_seed(self.cfg.seed, questions.step, role, questions.positions[question], signal, answer)

    def capable_signals(self, questions: StepQuestions) -> CapableRollout:
        """n_M signals per question, some cut short by forced early stops (exploration)."""
        cfg, tokenizer = self.cfg, self.capable.tokenizer
        config = self._sampling(cfg.capable.temperature)
        keys = [(q, s, 0) for q in range(len(questions)) for s in range(cfg.objective.n_capable)]
        requests = [
            self._seeded(
                capable_request(questions.examples[q].problem, config, cfg.rollout.signal_max_tokens),
                self._seed(questions, "capable", (q, s, a)),
                "capable",
            )
            for q, s, a in keys
        ]
        results = self._generate(self.capable, requests)
        signals: list[list[Signal]] = [[] for _ in range(len(questions))]
        for (q, s, _), result in zip(keys, results, strict=True):
            signal = Signal(list(result.token_ids or []), signal_of(result, config), False, result.logprobs)
            rng = random.Random(f"{cfg.seed}:{questions.step}:{questions.positions[q]}:{s}")
            if (
                self.close_ids
                and cfg.rollout.forced_stop_prob > 0
                and rng.random() < cfg.rollout.forced_stop_prob
            ):
                cut = force_early_stop(signal.ids, tokenizer, self.close_ids, rng)
                if cut is not None:
                    kept = len(cut) - len(self.close_ids)  # the engine sampled these; not the close tag
                    body = tokenizer.decode(cut[:kept], skip_special_tokens=False)
                    engine = signal.sampled_logprobs[:kept] if signal.sampled_logprobs else None
                    closed = GenerationResult(body, 0, kept, "stop", stop_string=self.style.stops()[0])
                    signal = Signal(cut, self.style.signal(closed), True, engine)
            signals[q].append(signal)
        seqs = pack(
            prompt_ids(tokenizer, requests),
            [signals[q][s].ids for q, s, _ in keys],
            tokenizer.pad_token_id,
        )
        sampled = [signals[q][s].sampled_logprobs for q, s, _ in keys]
        return CapableRollout(signals, RolloutBatch.of(seqs, keys, sampled))

    def light_guided(
        self, questions: StepQuestions, signals: list[list[Signal]]
    ) -> tuple[RolloutBatch, torch.Tensor]:
        """n_m answers of m for every signal: m's rows and their correctness (Q, S, A)."""
        cfg = self.cfg
        config = self._sampling(cfg.light.temperature)
        keys = [
            (q, s, a)
            for q in range(len(questions))
            for s in range(cfg.objective.n_capable)
            for a in range(cfg.objective.n_light)
        ]
        requests = [
            self._seeded(
                light_request(
                    questions.examples[q].problem, signals[q][s].text, config, config.light_template_kwargs
                ),
                self._seed(questions, "light", (q, s, a)),
                "light",
            )
            for q, s, a in keys
        ]
        results = self._generate(self.light, requests)
        correct = torch.zeros(len(questions), cfg.objective.n_capable, cfg.objective.n_light)
        for (q, s, a), result in zip(keys, results, strict=True):
            correct[q, s, a] = float(grade(result.text, questions.examples[q]).correct)
        batch = RolloutBatch.of(
            self._sequences(self.light, requests, results), keys, [r.logprobs for r in results]
        )
        return batch, correct

    def capable_alone(self, questions: StepQuestions) -> tuple[RolloutBatch, torch.Tensor, torch.Tensor]:
        """The single-model baseline: n_M whole answers of M per question; (rows, correct (Q, S),
        output tokens (Q, S))."""
        cfg = self.cfg
        keys = [(q, s, 0) for q in range(len(questions)) for s in range(cfg.objective.n_capable)]
        budget = cfg.rollout.signal_max_tokens + cfg.rollout.answer_max_tokens
        requests = self._alone_requests(
            questions, "capable-alone", keys, cfg.capable.temperature, budget, capable=True
        )
        results = self._generate(self.capable, requests)
        correct = torch.zeros(len(questions), cfg.objective.n_capable)
        lengths = torch.zeros(len(questions), cfg.objective.n_capable)
        for (q, s, _), result in zip(keys, results, strict=True):
            correct[q, s] = _final_correct(result.text, questions.examples[q], cfg, must_think=True)
            lengths[q, s] = float(result.output_tokens)
        batch = RolloutBatch.of(
            self._sequences(self.capable, requests, results), keys, [r.logprobs for r in results]
        )
        return batch, correct, lengths

    def _alone_requests(
        self,
        questions: StepQuestions,
        role: str,
        keys: list[tuple[int, int, int]],
        temperature: float,
        budget: int,
        capable: bool = False,
    ) -> list[GenerationRequest]:
        """One request per key for a model answering alone (the question, no prefill)."""
        config = self._sampling(temperature)
        kwargs = config.capable_template_kwargs if capable else config.light_template_kwargs
        sampling = SamplingParams(budget, temperature, 1.0, None, ())
        requests = []
        for key in keys:
            problem = questions.examples[key[0]].problem
            chat = GenerationRequest.chat(user_prompt(problem, config), sampling, chat_template_kwargs=kwargs)
            requests.append(
                self._seeded(chat, self._seed(questions, role, key), "capable" if capable else "light")
            )
        return requests

    @staticmethod
    def _sequences(policy: Policy, requests, results) -> Sequences:
        tokenizer = policy.tokenizer
        completions = [r.token_ids or [] for r in results]
        return pack(prompt_ids(tokenizer, requests), completions, tokenizer.pad_token_id)


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
