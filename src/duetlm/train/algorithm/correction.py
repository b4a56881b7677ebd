"""Rollout correction: importance weights for tokens an engine sampled that the trainer scores
a little differently (`rollout_correction`).

The engine (vLLM in bf16, another kernel, another batch) samples from μ; the trainer's
sampling-time log-probs are π_old. PPO's ratio π/π_old assumes the samples came from π_old, so
each token's policy-gradient term is weighted by w = π_old / μ = exp(old − engine), computed
from the engine's own log-probs of what it sampled:

- `token_tis`: w per token, truncated above at the threshold (truncated importance sampling);
- `token_mis`: w per token, tokens with w outside [1/threshold, threshold] masked to 0;
- `sequence_tis` / `sequence_mis`: the same with one w per sequence, the product over its
  tokens (exp of the summed log-ratio), applied to each of its tokens.

Tokens the engine did not sample (a forced stop's inserted close tag) keep weight 1. The
weights are constants of the update (no gradient flows through them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duetlm.train.modeling.distributed import Runtime

MODES = ("none", "token_tis", "token_mis", "sequence_tis", "sequence_mis")


@dataclass
class CorrectionStats:
    """This process's sums, reduced over all processes by `metrics`."""

    tokens: float  # sampled tokens the engine scored
    log_ratio: float  # Σ (engine − old) over them: the rollout-vs-trainer KL estimate's sum
    k3: float  # Σ (w − 1 − log w) over them: the same KL's low-variance, never negative estimate
    weight: float  # Σ w over them
    weight_max: float
    weight_min: float
    units: float  # tokens (token_*) or sequences (sequence_*) weighed
    corrected: float  # of those, truncated or masked

    def metrics(self, runtime: Runtime, role: str) -> dict:
        """`rollout_kl_ROLE` (the engine-vs-trainer KL, mean over the engine's tokens of
        log μ − log π_old), `rollout_k3_ROLE` (the same KL's k3 estimate, whose terms are never
        negative, so a gap whose signs cancel in the mean still shows), `is_weight_{mean,max,min}_ROLE` (max and min before truncation or masking) and
        `is_corrected_fraction_ROLE` (the share of tokens or sequences truncated or masked).
        A collective: every process calls it, with or without tokens."""
        tokens = runtime.sum(self.tokens)
        units = runtime.sum(self.units)
        log_ratio, weight = runtime.sum(self.log_ratio), runtime.sum(self.weight)
        k3 = runtime.sum(self.k3)
        weight_max, weight_min = runtime.max(self.weight_max), -runtime.max(-self.weight_min)
        corrected = runtime.sum(self.corrected)
        if tokens == 0:
            return {}
        return {
            f"rollout_kl_{role}": log_ratio / tokens,
            f"rollout_k3_{role}": k3 / tokens,
            f"is_weight_mean_{role}": weight / tokens,
            f"is_weight_max_{role}": weight_max,
            f"is_weight_min_{role}": weight_min,
            f"is_corrected_fraction_{role}": corrected / max(units, 1.0),
        }


def importance_weights(
    old_logps: torch.Tensor,  # (B, T) the trainer's log-probs of the sampled tokens
    engine_logps: torch.Tensor,  # (B, T) the engine's, NaN where it gave none
    mask: torch.Tensor,  # (B, T) 1 on sampled tokens
    mode: str,
    threshold: float,
) -> tuple[torch.Tensor, CorrectionStats]:
    """(weights (B, T), statistics). Weight 1 wherever the engine gave no log-prob."""
    known = ~torch.isnan(engine_logps) & mask.bool()  # (B, T)
    log_ratio = torch.where(known, old_logps - engine_logps, torch.zeros_like(old_logps))  # log π_old/μ
    if mode.startswith("token"):
        raw = torch.exp(log_ratio)  # (B, T)
        units, unit_known = raw, known
    else:
        raw_rows = torch.exp(log_ratio.sum(dim=1))  # (B,) one weight per sequence
        raw = torch.where(known, raw_rows[:, None].expand_as(log_ratio), torch.ones_like(log_ratio))
        units, unit_known = raw_rows, known.any(dim=1)
    if mode.endswith("tis"):
        corrected = (units > threshold) & unit_known
        weights = raw.clamp(max=threshold)
    else:
        corrected = ((units > threshold) | (units < 1.0 / threshold)) & unit_known
        outside = (raw > threshold) | (raw < 1.0 / threshold)
        weights = torch.where(outside, torch.zeros_like(raw), raw)
    weights = torch.where(known, weights, torch.ones_like(weights)).detach()
    seen = raw[known]
    stats = CorrectionStats(
        tokens=float(known.sum()),
        log_ratio=float(-log_ratio[known].sum()),  # Σ (engine − old)
        k3=_k3_sum(log_ratio[known]),
        weight=float(weights[known].sum()),
        weight_max=float(seen.max()) if seen.numel() else 0.0,
        weight_min=float(seen.min()) if seen.numel() else float("inf"),
        units=float(unit_known.sum()),
        corrected=float(corrected.sum()),
    )
    return weights, stats


def _k3_sum(log_ratio: torch.Tensor) -> float:
    """Σ (w − 1 − log w) for w = exp(log_ratio): in float64 and through expm1, since each term is
    about log_ratio²/2, which fp32's w − 1 rounds below 0 when w is within 1e-4 of 1."""
    values = log_ratio.double()
    return float((torch.expm1(values) - values).clamp(min=0.0).sum())
