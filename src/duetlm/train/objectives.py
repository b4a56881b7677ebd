"""What one training step computes (docs/design.md section 2), for each objective.

`JointObjective` is DUET's, in the reference order:
    M rollout -> standalone m (once per question) -> guided m -> rewards -> λ update
    -> update m -> update M
`SingleModelObjective` is the length-penalty GRPO baseline: M alone, reward acc − λL/B − βKL.

Both read their rollouts through `RolloutBatch` indices and reduce every number they log
over all processes, so N processes log what one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duetlm.train.batch import StepQuestions
from duetlm.train.config import TrainConfig
from duetlm.train.distributed import Runtime
from duetlm.train.grpo import group_advantages
from duetlm.train.policy import Policy
from duetlm.train.reward import score_joint, single_model_rewards, update_lambda
from duetlm.train.rollout import Rollouts
from duetlm.train.sequences import credit_only_tail
from duetlm.train.update import PolicyPasses


@dataclass
class StepParts:
    """What an objective works with: the run's settings, its processes, the two models, their
    rollouts and forward passes."""

    cfg: TrainConfig
    runtime: Runtime
    capable: Policy
    light: Policy
    rollouts: Rollouts
    passes: PolicyPasses

    def mean(self, values: torch.Tensor) -> float:
        values = values.detach().float()
        return self.runtime.sum(values.sum()) / max(self.runtime.sum(values.numel()), 1.0)

    def masked_mean(self, values: torch.Tensor, weights: torch.Tensor) -> float:
        """Mean of the values with weight 1 over all processes (of all values if none has)."""
        count = self.runtime.sum(weights.sum())
        if count == 0:
            return self.mean(values)
        return self.runtime.sum((values * weights).sum()) / count

    def sleep_engines(self) -> None:
        for policy in (self.capable, self.light):
            policy.engine.sleep()


class JointObjective:
    def __init__(self, parts: StepParts) -> None:
        self.parts = parts

    def step(self, questions: StepQuestions, lam: float) -> tuple[dict, float]:
        """(metrics, λ for the next step)."""
        parts, cfg = self.parts, self.parts.cfg
        objective = cfg.objective
        capable = parts.rollouts.capable_signals(questions)  # n_M signals per question
        alone = parts.rollouts.light_alone(questions)  # (Q, A)
        light_batch, pair_correct = parts.rollouts.light_guided(questions, capable.signals)  # (Q, S, A)
        parts.sleep_engines()
        batch = capable.batch
        old = parts.passes.logps(parts.capable, batch)  # the sampling policy's log-probs
        lengths, forced = capable.lengths, capable.forced  # (Q, S)
        kl = batch.grid(parts.passes.kl(parts.capable, batch, old), tuple(lengths.shape))  # (Q, S)
        scores = score_joint(
            pair_correct,
            alone,
            lengths,
            kl,
            lam,
            objective.length_bound,
            objective.kl_beta,
            objective.use_marginal_utility,
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
            "r_light": parts.mean(scores.r_light),
            "signal_tokens": mean_length,
            "signal_tokens_with_cuts": parts.mean(lengths),
            "pair_accuracy": parts.mean(pair_correct),
            "kl": parts.mean(kl),
            "forced_stops": parts.mean(forced),
        }
        light_old = None
        if cfg.rollout.check_rollout_logprobs:
            metrics["rollout_logprob_gap"] = parts.runtime.max(batch.logprob_gap(old))
            if cfg.trains_light:  # m's sampling policy, scored by the trainer (a diagnostic's pass)
                light_old = parts.passes.logps(parts.light, light_batch)
                metrics["rollout_logprob_gap_light"] = parts.runtime.max(light_batch.logprob_gap(light_old))
        if cfg.trains_light:
            scored = light_batch.with_scores(light_batch.per_row(scores.light_advantages), light_old)
            metrics |= parts.passes.update(parts.light, scored, questions.step)
        trained = batch
        if cfg.rollout.forced_stop_credit == "stop":  # a cut's advantage trains only the inserted close tag
            cut_rows = [row for row in range(len(batch)) if capable.signal_of_row(row).forced]
            trained = batch.with_seqs(credit_only_tail(batch.seqs, cut_rows, len(parts.rollouts.close_ids)))
        scored = trained.with_scores(batch.per_row(scores.capable_advantages), old)
        metrics |= parts.passes.update(parts.capable, scored, questions.step)
        return metrics, next_lam


class SingleModelObjective:
    def __init__(self, parts: StepParts) -> None:
        self.parts = parts

    def step(self, questions: StepQuestions, lam: float) -> tuple[dict, float]:
        parts, objective = self.parts, self.parts.cfg.objective
        batch, correct, lengths = parts.rollouts.capable_alone(questions)  # (Q, S) each
        parts.sleep_engines()
        old = parts.passes.logps(parts.capable, batch)
        kl = batch.grid(parts.passes.kl(parts.capable, batch, old), tuple(lengths.shape))
        reward = single_model_rewards(correct, lengths, lam, objective.length_bound) - objective.kl_beta * kl
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
        if parts.cfg.rollout.check_rollout_logprobs:
            metrics["rollout_logprob_gap"] = parts.runtime.max(batch.logprob_gap(old))
        scored = batch.with_scores(batch.per_row(group_advantages(reward)), old)
        metrics |= parts.passes.update(parts.capable, scored, questions.step)
        return metrics, next_lam
