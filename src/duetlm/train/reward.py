"""Rewards and the length-penalty weight λ (docs/design.md section 2).

    r(M,m)(y) = mean correctness of m's n_m answers given (x, signal y)
    r(m)(x)   = mean correctness of m answering x alone (drawn once per question)
    R_M(y)    = r(M,m)(y) − r(m)(x) − λ_t · L(y) / B          (marginal utility on)
    λ_{t+1}   = clip(λ_t + η · (mean_batch L / B − 1), 0, 1)   (adaptive: dual ascent on E[L] ≤ B)

Pure tensor functions; shapes in comments: Q questions, S = n_M signals, A = n_m answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


def capable_rewards(
    pair_correct: torch.Tensor,  # (Q, S, A) 0/1: m's answers given each signal
    light_alone_correct: torch.Tensor,  # (Q, A) 0/1: m's standalone answers
    signal_tokens: torch.Tensor,  # (Q, S) L(y)
    lam: float,
    length_bound: float,
    marginal_utility: bool = True,
) -> dict[str, torch.Tensor]:
    """R_M for every signal, with its parts for logging."""
    r_pair = pair_correct.float().mean(dim=-1)  # (Q, S)
    r_light = light_alone_correct.float().mean(dim=-1)  # (Q,)
    penalty = lam * signal_tokens.float() / length_bound  # (Q, S)
    reward = r_pair - penalty
    if marginal_utility:
        reward = reward - r_light[:, None]
    return {"reward": reward, "r_pair": r_pair, "r_light": r_light, "penalty": penalty}


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


@dataclass
class JointScores:
    """Everything a joint step computes from its rollouts before updating (shapes: Q questions,
    S = n_M signals, A = n_m answers)."""

    reward: torch.Tensor  # (Q, S) R_M, KL included
    r_pair: torch.Tensor  # (Q, S)
    r_light: torch.Tensor  # (Q,)
    capable_advantages: torch.Tensor  # (Q, S) normalized within each question's signals
    light_advantages: torch.Tensor  # (Q, S, A) normalized over each question's S*A guided answers


def score_joint(
    pair_correct: torch.Tensor,  # (Q, S, A)
    light_alone_correct: torch.Tensor,  # (Q, A)
    signal_tokens: torch.Tensor,  # (Q, S)
    kl: torch.Tensor,  # (Q, S) summed log-ratio of each signal to the initial M
    lam: float,
    length_bound: float,
    kl_beta: float,
    marginal_utility: bool = True,
) -> JointScores:
    """R_M = r(M,m) − r(m) − λ·L/B − β·KL, and both models' GRPO advantages (docs/design.md section 2)."""
    from duetlm.train.grpo import group_advantages, light_advantages

    parts = capable_rewards(
        pair_correct, light_alone_correct, signal_tokens, lam, length_bound, marginal_utility
    )
    reward = parts["reward"] - kl_beta * kl  # (Q, S)
    return JointScores(
        reward, parts["r_pair"], parts["r_light"], group_advantages(reward), light_advantages(pair_correct)
    )
