"""Rewards and the length-penalty weight λ (docs/design.md section 2).

    r(M,m)(y) = mean correctness of m's n_m answers given (x, signal y)
    R_M(y)    = r(M,m)(y) − λ_t · L(y) / B  [− β · KL(y) with kl_placement = "reward"]
    λ_{t+1}   = clip(λ_t + η · (mean_batch L / B − 1), 0, 1)   (adaptive: dual ascent on E[L] ≤ B)

The paper's R_M also subtracts r(m)(x), m's accuracy on x alone. It is one number per
question, so it cancels exactly from every advantage once the group's mean is subtracted: the
step neither draws nor subtracts it (r(m) is measured on the evaluation schedule instead).
Pure tensor functions; shapes in comments: Q questions, S = n_M signals, A = n_m answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch


def capable_rewards(
    pair_correct: torch.Tensor,  # (Q, S, A) 0/1: m's answers given each signal
    signal_tokens: torch.Tensor,  # (Q, S) L(y)
    lam: float,
    length_bound: float,
) -> dict[str, torch.Tensor]:
    """R_M without its KL term for every signal, with its parts for logging."""
    r_pair = pair_correct.float().mean(dim=-1)  # (Q, S)
    penalty = lam * signal_tokens.float() / length_bound  # (Q, S)
    return {"reward": r_pair - penalty, "r_pair": r_pair, "penalty": penalty}


def single_model_rewards(
    correct: torch.Tensor,  # (Q, S) 0/1: M's own answers
    output_tokens: torch.Tensor,  # (Q, S)
    lam: float,
    length_bound: float,
) -> torch.Tensor:
    """The length-penalty GRPO baseline: M alone, reward = correct − λ·L/B."""
    return correct.float() - lam * output_tokens.float() / length_bound  # (Q, S)


def update_lambda(
    lam: float,
    mean_length: float,
    length_bound: float,
    eta: float,
    schedule: Literal["adaptive", "constant"] = "adaptive",
) -> float:
    """One dual-ascent step on the constraint E[L] ≤ B, once per batch after its rewards."""
    if schedule == "constant":
        return lam
    return float(min(1.0, max(0.0, lam + eta * (mean_length / length_bound - 1.0))))


BatchStd = Callable[[torch.Tensor], float]
"""The standard deviation of a tensor's values over the whole batch, every process's included."""


@dataclass
class JointScores:
    """Everything a joint step computes from its rollouts before updating (shapes: Q questions,
    S = n_M signals, A = n_m answers)."""

    reward: torch.Tensor  # (Q, S) R_M (its KL term included when kl_placement = "reward")
    r_pair: torch.Tensor  # (Q, S)
    capable_advantages: torch.Tensor  # (Q, S) centered within each question's signals, then scaled
    light_advantages: torch.Tensor  # (Q, S, A) centered over each question's S*A guided answers, then scaled


def score_joint(
    pair_correct: torch.Tensor,  # (Q, S, A)
    signal_tokens: torch.Tensor,  # (Q, S)
    kl: torch.Tensor | None,  # (Q, S) summed log-ratio to the initial M, when it goes in the reward
    lam: float,
    length_bound: float,
    kl_beta: float,
    scale_rewards: str = "group",
    batch_std: BatchStd | None = None,
) -> JointScores:
    """R_M = r(M,m) − λ·L/B (− β·KL), and both models' GRPO advantages (docs/design.md section 2)."""
    from duetlm.train.algorithm.grpo import group_advantages, light_advantages

    parts = capable_rewards(pair_correct, signal_tokens, lam, length_bound)
    reward = parts["reward"] if kl is None else parts["reward"] - kl_beta * kl  # (Q, S)
    std_of = batch_std or (lambda values: float(values.float().std()))
    capable_std = std_of(reward) if scale_rewards == "batch" else None
    light_std = std_of(pair_correct.float()) if scale_rewards == "batch" else None
    return JointScores(
        reward,
        parts["r_pair"],
        group_advantages(reward, scale=scale_rewards, batch_std=capable_std),
        light_advantages(pair_correct, scale=scale_rewards, batch_std=light_std),
    )
