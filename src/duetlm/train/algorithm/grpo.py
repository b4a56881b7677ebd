"""GRPO pieces: group-normalized advantages, log-probs of sampled tokens, the PPO-clip loss
and the KL term (docs/design.md section 2). Pure functions over padded tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def group_advantages(
    rewards: torch.Tensor, eps: float = 1e-6, scale: str = "group", batch_std: float | None = None
) -> torch.Tensor:
    """R − the mean of its row (a question's group), divided by a scale (`scale_rewards`):
    `group`, the row's sample standard deviation (the reference GRPO's); `batch`, `batch_std`,
    the standard deviation over the whole batch (every process's rows); `none`, nothing
    (Dr. GRPO). rewards: (Q, G) -> (Q, G)."""
    dtype, rewards = rewards.dtype, rewards.double()  # a tie must center to exactly 0, not to fp32 noise
    mean = rewards.mean(dim=-1, keepdim=True)  # (Q, 1)
    centered = rewards - mean  # (Q, G)
    if scale == "none":
        return centered.to(dtype)
    if scale == "batch":
        if batch_std is None:
            raise ValueError("scale 'batch' needs the batch's standard deviation")
        return (centered / (batch_std + eps)).to(dtype)
    std = rewards.std(dim=-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    return (centered / (std + eps)).to(dtype)  # (Q, G)


def light_advantages(
    pair_correct: torch.Tensor, eps: float = 1e-6, scale: str = "group", batch_std: float | None = None
) -> torch.Tensor:
    """m's advantages: each guided answer's 0/1 correctness centered on all n_M·n_m guided
    answers of its question and scaled as `group_advantages`. (Q, S, A) -> (Q, S, A)."""
    q, s, a = pair_correct.shape
    flat = pair_correct.float().reshape(q, s * a)
    return group_advantages(flat, eps, scale, batch_std).reshape(q, s, a)


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
    `chunk` positions at a time (`head_logps`), each chunk recomputed in the backward pass.
    Neither the prompt's logits nor a copy of the batch's logits ever exists (Qwen3's
    151,936-word vocabulary makes those the largest tensors of a step)."""
    if completion_mask is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
        if temperature > 0 and temperature != 1.0:
            logits = logits / temperature
        return -F.cross_entropy(logits.transpose(1, 2).float(), input_ids[:, 1:], reduction="none")
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    rows, cols = completion_mask.nonzero(as_tuple=True)  # position t predicts token t+1
    logps = head_logps(model, hidden[rows, cols], input_ids[rows, cols + 1], temperature, chunk)  # (N,)
    out = torch.zeros(completion_mask.shape, dtype=torch.float32, device=hidden.device)  # (B, T-1)
    return out.index_put((rows, cols), logps) if len(logps) else out


def packed_token_logps(model, packed, temperature: float, chunk: int, shape: tuple[int, int]) -> torch.Tensor:
    """`token_logps` of rows packed by shared prefix (`sequences.Packed`): one decoder pass per
    group, each row's tokens seeing the prefix and themselves only; the result is laid out as
    the unpacked rows' (B, T-1), so the loss never knows."""
    attention = packed.attention
    if getattr(model.config, "_attn_implementation", "sdpa") == "eager":  # it adds the mask to the scores
        dtype = next(model.parameters()).dtype
        attention = torch.zeros(attention.shape, dtype=dtype, device=attention.device).masked_fill(
            ~attention, torch.finfo(dtype).min
        )
    hidden = model.get_decoder()(
        input_ids=packed.input_ids, attention_mask=attention, position_ids=packed.position_ids
    ).last_hidden_state  # (G, L, H)
    logps = head_logps(model, hidden[packed.groups, packed.positions], packed.targets, temperature, chunk)
    out = torch.zeros(shape, dtype=torch.float32, device=hidden.device)
    return (
        out.index_put((packed.rows.to(out.device), packed.cols.to(out.device)), logps) if len(logps) else out
    )


def head_logps(
    model, states: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int
) -> torch.Tensor:
    """log-softmax of the output layer at `states` (N, H), read at `targets` (N,), `chunk` rows
    at a time and recomputed in the backward pass. The matrix product runs in fp32 whatever the
    autocast (a bf16 head rounds 151,936 logits before their log-sum-exp: the trainer's share of
    the gap to an engine), and the model's own output transform (`output_logits`) follows."""
    head = model.get_output_embeddings()
    scale = 1.0 / temperature if temperature > 0 else 1.0
    config = model.config

    def chunk_logps(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=h.device.type, enabled=False):
            bias = None if getattr(head, "bias", None) is None else head.bias.float()
            logits = output_logits(config, F.linear(h.float(), head.weight.float(), bias)) * scale  # (n, V)
        return logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)

    pieces = [
        checkpoint(chunk_logps, states[i : i + chunk], targets[i : i + chunk], use_reentrant=False)
        for i in range(0, len(targets), chunk)
    ]
    return torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)


def output_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """What a model does to its output layer's product before the softmax, for the families
    that do something (each reads its own config): Gemma 2/3's soft-capping, Cohere's scale,
    Granite's divisor. Others: nothing. `check_output_layer` refuses a model where this is not
    the whole story."""
    text = getattr(config, "text_config", None) or config
    cap = getattr(text, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    if getattr(text, "logit_scale", None) is not None:
        logits = logits * text.logit_scale
    if getattr(text, "logits_scaling", None):
        logits = logits / text.logits_scaling
    return logits


def ppo_clip_loss(
    logps: torch.Tensor,  # (B, T) current policy
    old_logps: torch.Tensor,  # (B, T) policy that sampled
    advantages: torch.Tensor,  # (B,) one per sequence
    mask: torch.Tensor,  # (B, T) 1 on sampled tokens
    clip_eps: float = 0.2,
    token_count: float | None = None,
    weights: torch.Tensor | None = None,  # (B, T) importance weights of the rollout correction
) -> torch.Tensor:
    """PPO-clip with token-mean aggregation: the mean over every sampled token of the batch
    (`token_count` overrides the divisor, so shards of one batch sum to the whole's loss).
    `weights` scale each token's term (rollout correction: the trainer's sampling policy over
    the engine's, truncated or masked)."""
    ratio = torch.exp(logps - old_logps)  # (B, T)
    adv = advantages[:, None]  # (B, 1)
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)  # (B, T)
    if weights is not None:
        per_token = per_token * weights
    divisor = mask.sum() if token_count is None else token_count
    return (per_token * mask).sum() / max(float(divisor), 1.0)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate to the reference (Schulman's k3: e^(ref − logp) − (ref − logp) − 1,
    unbiased for samples of the policy, never negative, low variance): the KL term of
    `kl_placement = "loss"`. (B, T) -> (B, T)."""
    log_ratio = ref_logps - logps
    return torch.exp(log_ratio) - log_ratio - 1.0


def kl_sum(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence summed log-ratio to the reference policy (the KL estimate put in M's
    reward). (B, T) -> (B,)."""
    return ((logps - ref_logps) * mask).sum(dim=-1)
