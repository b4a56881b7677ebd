"""GRPO pieces: group-normalized advantages, log-probs of sampled tokens, the PPO-clip loss
and the KL term (docs/design.md section 2). Pure functions over padded tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(R − mean) / (std + eps) within each row (a question's group). rewards: (Q, G).
    std is the sample standard deviation, as in the reference GRPO implementation."""
    mean = rewards.mean(dim=-1, keepdim=True)  # (Q, 1)
    std = rewards.std(dim=-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)  # (Q, G)


def light_advantages(pair_correct: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """m's advantages: each guided answer's 0/1 correctness normalized over all n_M·n_m guided
    answers of its question. pair_correct: (Q, S, A) -> (Q, S, A)."""
    q, s, a = pair_correct.shape
    return group_advantages(pair_correct.float().reshape(q, s * a), eps).reshape(q, s, a)


def token_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    completion_mask: torch.Tensor | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """log p(token_t | tokens_<t) for every position t >= 1 under the policy that sampled them:
    logits over `temperature`, so the objective is that of the sampling distribution (the one
    greedy decoding is the cold limit of), not of the raw logits. (B, T) -> (B, T-1).

    With `completion_mask` (B, T-1), only the marked positions are scored (the rest are 0):
    the decoder's last hidden states are gathered there and projected onto the vocabulary
    `chunk` positions at a time, each chunk recomputed in the backward pass. Neither the
    prompt's logits nor an fp32 copy of the batch's logits ever exists (Qwen3's 151,936-word
    vocabulary makes those the largest tensors of a step)."""
    if completion_mask is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
        if temperature > 0 and temperature != 1.0:
            logits = logits / temperature
        return -F.cross_entropy(logits.transpose(1, 2).float(), input_ids[:, 1:], reduction="none")
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    rows, cols = completion_mask.nonzero(as_tuple=True)  # position t predicts token t+1
    states, targets = hidden[rows, cols], input_ids[rows, cols + 1]  # (N, H), (N,)
    head = model.get_output_embeddings()
    scale = 1.0 / temperature if temperature > 0 else 1.0

    def chunk_logps(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = head(h).float() * scale  # (n, V), fp32 for this chunk only
        return logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)

    pieces = [
        checkpoint(chunk_logps, states[i : i + chunk], targets[i : i + chunk], use_reentrant=False)
        for i in range(0, len(targets), chunk)
    ]
    out = torch.zeros(completion_mask.shape, dtype=torch.float32, device=hidden.device)  # (B, T-1)
    if pieces:
        out = out.index_put((rows, cols), torch.cat(pieces))
    return out


def ppo_clip_loss(
    logps: torch.Tensor,  # (B, T) current policy
    old_logps: torch.Tensor,  # (B, T) policy that sampled
    advantages: torch.Tensor,  # (B,) one per sequence
    mask: torch.Tensor,  # (B, T) 1 on sampled tokens
    clip_eps: float = 0.2,
    token_count: float | None = None,
) -> torch.Tensor:
    """PPO-clip with token-mean aggregation: the mean over every sampled token of the batch
    (`token_count` overrides the divisor, so shards of one batch sum to the whole's loss)."""
    ratio = torch.exp(logps - old_logps)  # (B, T)
    adv = advantages[:, None]  # (B, 1)
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)  # (B, T)
    divisor = mask.sum() if token_count is None else token_count
    return (per_token * mask).sum() / max(float(divisor), 1.0)


def kl_sum(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence summed log-ratio to the reference policy (the KL estimate put in M's
    reward). (B, T) -> (B,)."""
    return ((logps - ref_logps) * mask).sum(dim=-1)
