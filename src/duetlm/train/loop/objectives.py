"""What one training step computes (docs/design.md section 2), for each objective.

`JointObjective` is DUET's, in the reference order less the standalone rollouts of m (r(m)
cancels exactly from every advantage, so the step does not draw them; the evaluation
schedule measures r(m) instead):
    M rollout -> guided m -> rewards -> λ update -> update m -> update M
`SingleModelObjective` is the length-penalty GRPO baseline: M alone, reward acc − λL/B (− βKL).

Both read their rollouts through `RolloutBatch` indices and reduce every number they log
over all processes, so N processes log what one would.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch

from duetlm.train.algorithm.correction import importance_weights
from duetlm.train.algorithm.grpo import group_advantages
from duetlm.train.algorithm.reward import score_joint, single_model_rewards, update_lambda
from duetlm.train.config import TrainConfig
from duetlm.train.loop.update import PolicyPasses
from duetlm.train.modeling.distributed import Runtime
from duetlm.train.modeling.policy import Policy
from duetlm.train.rollouts.batch import RolloutBatch, StepQuestions
from duetlm.train.rollouts.rollout import Rollouts
from duetlm.train.rollouts.sequences import credit_only_tail


@dataclass
class StepParts:
    """What an objective works with: the run's settings, its processes, the two models, their
    rollouts and forward passes."""

    cfg: TrainConfig
    runtime: Runtime
    capable: Policy
    light: Policy | None  # None in the single-model baseline, which loads M alone
    rollouts: Rollouts
    passes: PolicyPasses
    seconds: dict[str, float] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=dict)
    device_used: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time a phase of the step; its seconds (the slowest process's) go into the step's
        metrics as `time_NAME_s`, and on a GPU its peak of allocated memory as
        `peak_memory_NAME_gb` (this process's allocator) and the device's memory in use at its
        end as `device_used_NAME_gb` (every process's: the engines' too). Every process enters the same phases, so the reductions are collectives every
        process makes."""
        cuda = self.runtime.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.runtime.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
            if cuda:
                peak = torch.cuda.max_memory_allocated(self.runtime.device) / 2**30
                self.peaks[name] = max(self.peaks.get(name, 0.0), peak)
                free, total = torch.cuda.mem_get_info(self.runtime.device)
                used = (total - free) / 2**30  # every process's on this device, engines included
                self.device_used[name] = max(self.device_used.get(name, 0.0), used)

    def throughput(self, tokens: dict[str, torch.Tensor | float]) -> dict[str, float]:
        """Tokens per second of each role's rollout engine this step (all processes' tokens over
        the slowest process's rollout time)."""
        rates = {}
        for role, count in tokens.items():
            seconds = self.runtime.max(self.seconds.get(f"rollout_{role}", 0.0))
            total = self.runtime.sum(count)
            rates[f"rollout_tokens_per_s_{role}"] = total / seconds if seconds > 0 else 0.0
        return rates

    def phase_metrics(self) -> dict[str, float]:
        """The step's phase times (and peaks), reduced over processes, and the phases cleared."""
        timed = {f"time_{name}_s": self.runtime.max(seconds) for name, seconds in self.seconds.items()}
        timed |= {f"peak_memory_{name}_gb": self.runtime.max(peak) for name, peak in self.peaks.items()}
        timed |= {f"device_used_{name}_gb": self.runtime.max(used) for name, used in self.device_used.items()}
        self.seconds, self.peaks, self.device_used = {}, {}, {}
        return timed

    def mean(self, values: torch.Tensor) -> float:
        values = values.detach().float()
        return self.runtime.sum(values.sum()) / max(self.runtime.sum(values.numel()), 1.0)

    def masked_mean(self, values: torch.Tensor, weights: torch.Tensor) -> float:
        """Mean of the values with weight 1 over all processes (of all values if none has)."""
        count = self.runtime.sum(weights.sum())
        if count == 0:
            return self.mean(values)
        return self.runtime.sum((values * weights).sum()) / count

    def batch_std(self, values: torch.Tensor) -> float:
        """Sample standard deviation of the values over all processes (`scale_rewards = batch`)."""
        values = values.detach().double()
        n = self.runtime.sum(values.numel())
        total, squares = self.runtime.sum(values.sum()), self.runtime.sum((values**2).sum())
        if n < 2:
            return 0.0
        return math.sqrt(max(squares - total * total / n, 0.0) / (n - 1))

    def sleep_engines(self) -> None:
        """Engines give their memory to the update; one whose model is not trained (no push
        follows) keeps its weights to wake with."""
        for policy in (self.capable, self.light):
            if policy is not None:
                policy.engine.sleep(keep_weights=policy.optimizer is None)

    def corrected(
        self, role: str, batch: RolloutBatch, old: torch.Tensor
    ) -> tuple[torch.Tensor | None, dict]:
        """The rollout correction's weights of a role's rows against the engine's log-probs,
        and its metrics (None and {} without a correction)."""
        mode = self.cfg.correction_for(role)
        if mode == "none" or batch.engine_logps is None:
            return None, {}
        threshold = self.cfg.rollout.rollout_correction_threshold
        weights, stats = importance_weights(
            old, batch.engine_logps, batch.seqs.completion_mask, mode, threshold
        )
        return weights, stats.metrics(self.runtime, role)


class JointObjective:
    def __init__(self, parts: StepParts) -> None:
        self.parts = parts
        self.r_light: float | None = None  # m's accuracy alone, from the latest evaluation

    def step(self, questions: StepQuestions, lam: float) -> tuple[dict, float]:
        """(metrics, λ for the next step)."""
        parts, cfg = self.parts, self.parts.cfg
        objective, passes = cfg.objective, parts.passes
        with parts.phase("rollout_capable"):
            capable = parts.rollouts.capable_signals(questions)  # n_M signals per question
        with parts.phase("rollout_light"):
            light_batch, pair_correct = parts.rollouts.light_guided(questions, capable.signals)  # (Q, S, A)
        with parts.phase("sleep"):
            parts.sleep_engines()
        batch = capable.batch
        with parts.phase("logps"):
            old = passes.logps(parts.capable, batch)  # the sampling policy's log-probs
            ref = passes.reference_logps(parts.capable, batch)
        lengths, forced = capable.lengths, capable.forced  # (Q, S)
        kl = batch.grid(passes.kl(batch, old, ref), tuple(lengths.shape))  # (Q, S)
        scores = score_joint(
            pair_correct,
            lengths,
            kl if objective.kl_placement == "reward" else None,
            lam,
            objective.length_bound,
            objective.kl_beta,
            objective.scale_rewards,
            parts.batch_std,
        )
        # λ is the dual variable of the policy's constraint E[L] <= B, updated after the rewards:
        # forced cuts are not samples of the policy, so they stay out of the mean that drives it.
        mean_length = parts.masked_mean(lengths, 1.0 - forced)
        next_lam = update_lambda(
            lam, mean_length, objective.length_bound, objective.lambda_lr, objective.lambda_schedule
        )
        metrics = {
            "reward": parts.mean(scores.reward),
            "r_pair": parts.mean(scores.r_pair),
            "signal_tokens": mean_length,
            "signal_tokens_with_cuts": parts.mean(lengths),
            "pair_accuracy": parts.mean(pair_correct),
            "kl": parts.mean(kl),
            "forced_stops": parts.mean(forced),
        }
        if objective.use_marginal_utility and self.r_light is not None:
            metrics["marginal_reward"] = metrics["reward"] - self.r_light
        if cfg.trains_light:
            with parts.phase("update_light"):
                metrics |= self._update_light(light_batch, scores.light_advantages, questions.step)
        weights, correction = parts.corrected("capable", batch, old)
        metrics |= correction
        if cfg.rollout.check_rollout_logprobs:
            metrics["rollout_logprob_gap"] = parts.runtime.max(batch.logprob_gap(old))
        trained = batch
        if cfg.rollout.forced_stop_credit == "stop":  # a cut's advantage trains only the inserted close tag
            cut_rows = [row for row in range(len(batch)) if capable.signal_of_row(row).forced]
            trained = batch.with_seqs(credit_only_tail(batch.seqs, cut_rows, len(parts.rollouts.close_ids)))
        in_loss = ref if objective.kl_placement == "loss" else None
        scored = trained.with_scores(batch.per_row(scores.capable_advantages), old, in_loss, weights)
        with parts.phase("update_capable"):
            metrics |= passes.update(parts.capable, scored, questions.step)
        metrics |= rollout_metrics(parts, capable.lengths, capable.forced, cfg.rollout.signal_max_tokens)
        metrics |= parts.throughput(
            {"capable": capable.lengths.sum(), "light": light_batch.seqs.completion_mask.sum()}
        )
        return metrics | parts.phase_metrics(), next_lam

    def _update_light(self, batch: RolloutBatch, advantages: torch.Tensor, step: int) -> dict:
        parts, cfg = self.parts, self.parts.cfg
        metrics: dict = {}
        old, weights = None, None
        if cfg.rollout.check_rollout_logprobs or cfg.correction_for("light") != "none":
            old = parts.passes.logps(parts.light, batch)  # m's sampling policy, as the trainer scores it
            weights, metrics = parts.corrected("light", batch, old)
            if cfg.rollout.check_rollout_logprobs:
                metrics["rollout_logprob_gap_light"] = parts.runtime.max(batch.logprob_gap(old))
        scored = batch.with_scores(batch.per_row(advantages), old, None, weights)
        return metrics | parts.passes.update(parts.light, scored, step)


class SingleModelObjective:
    def __init__(self, parts: StepParts) -> None:
        self.parts = parts
        self.r_light: float | None = None

    def step(self, questions: StepQuestions, lam: float) -> tuple[dict, float]:
        parts, objective, passes = self.parts, self.parts.cfg.objective, self.parts.passes
        with parts.phase("rollout_capable"):
            batch, correct, lengths = parts.rollouts.capable_alone(questions)  # (Q, S) each
        with parts.phase("sleep"):
            parts.sleep_engines()
        with parts.phase("logps"):
            old = passes.logps(parts.capable, batch)
            ref = passes.reference_logps(parts.capable, batch)
        kl = batch.grid(passes.kl(batch, old, ref), tuple(lengths.shape))
        reward = single_model_rewards(correct, lengths, lam, objective.length_bound)
        if objective.kl_placement == "reward":
            reward = reward - objective.kl_beta * kl
        mean_length = parts.mean(lengths)
        next_lam = update_lambda(
            lam, mean_length, objective.length_bound, objective.lambda_lr, objective.lambda_schedule
        )
        metrics = {
            "reward": parts.mean(reward),
            "accuracy": parts.mean(correct),
            "output_tokens": mean_length,
            "kl": parts.mean(kl),
        }
        weights, correction = parts.corrected("capable", batch, old)
        metrics |= correction
        if parts.cfg.rollout.check_rollout_logprobs:
            metrics["rollout_logprob_gap"] = parts.runtime.max(batch.logprob_gap(old))
        std = parts.batch_std(reward) if objective.scale_rewards == "batch" else None
        advantages = group_advantages(reward, scale=objective.scale_rewards, batch_std=std)
        in_loss = ref if objective.kl_placement == "loss" else None
        scored = batch.with_scores(batch.per_row(advantages), old, in_loss, weights)
        with parts.phase("update_capable"):
            metrics |= passes.update(parts.capable, scored, questions.step)
        metrics |= parts.throughput({"capable": lengths.sum()})
        return metrics | parts.phase_metrics(), next_lam


def rollout_metrics(parts: StepParts, lengths: torch.Tensor, forced: torch.Tensor, budget: int) -> dict:
    """What a run's rollouts look like, over every process's signals: length percentiles
    (p50, p90, max) and the share cut by the budget (`truncation_rate`)."""
    every = [length for rank in parts.runtime.all_objects(lengths.flatten().tolist()) for length in rank]
    if not every:
        return {}
    ordered = sorted(every)

    def percentile(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    cut = parts.runtime.sum(((lengths >= budget) & (forced == 0)).float().sum())
    return {
        "signal_tokens_p50": percentile(0.5),
        "signal_tokens_p90": percentile(0.9),
        "signal_tokens_max": ordered[-1],
        "truncation_rate": cut / len(ordered),
    }
