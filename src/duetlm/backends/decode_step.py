"""The streaming engine's decode step for Llama-family decoders, as plain tensor operations.

For models as small as the embedded pair, a transformers forward of one token per row
spends much of its time around the arithmetic on a CPU: module calls and their hooks, the
attention-mask builder, the cache interface, the attention dispatcher; and the engine steps
once per token. `bench/decode_step.py` measures the two side by side. This step reads the model's
own parameters (no copies: a weight update is seen at once) and does the same arithmetic in
the same order and precision: RMS norms in fp32, rotary embeddings from the model's own
rotary module (so every rope scaling it knows is honoured), softmax in fp32. Each layer's
new key and value are written straight into the engine's row buffers, and a query attends
to its key-value head's columns with two batched matmuls (grouped-query attention without
repeating the keys).

Only models whose forward this reproduces are taken (`why_not` says why one is not): the
Llama, Qwen2 and Qwen3 decoders with SiLU MLPs, full attention in every layer, plain
`nn.Linear` projections (no adapters, quantization or offloading hooks). Others step
through their own forward. Logits agree with the model's forward to float rounding
(`tests/test_decode_step.py`, per architecture).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from duetlm.errors import BackendError

SUPPORTED_TYPES = ("llama", "qwen2", "qwen3")
CHOICES = ("auto", "transformers")
"""`auto`: this step where it covers the model, else the forward; `transformers`: the forward."""


def check_choice(choice: str) -> str:
    if choice not in CHOICES:
        raise BackendError(f"unknown decode step {choice!r} (choose from {', '.join(CHOICES)})")
    return choice


def why_not(model) -> str | None:
    """Why this step cannot stand in for `model`'s forward, or None when it can."""
    config = model.config
    if config.model_type not in SUPPORTED_TYPES:
        return f"model type {config.model_type!r} (supported: {', '.join(SUPPORTED_TYPES)})"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {config.hidden_act!r}"
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types) or getattr(config, "use_sliding_window", False):
        return "sliding-window attention"
    if getattr(model, "hf_quantizer", None) is not None:
        return "a quantized model"
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "an unexpected module layout"
    if type(getattr(model, "lm_head", None)) is not nn.Linear:
        return "an lm_head that is not a plain linear layer"
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
        )
        if any(type(p) is not nn.Linear for p in projections):
            return "projections that are not plain linear layers (adapters?)"
    if any(hasattr(module, "_hf_hook") for module in model.modules()):
        return "offloading hooks"
    return None


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """The transformers RMSNorm: normalized in fp32, cast back, then scaled by the weight."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class DecodeStep:
    """One token for every row of the engine's batch, through `model`'s weights."""

    def __init__(self, model) -> None:
        reason = why_not(model)
        if reason is not None:
            raise ValueError(f"the engine's own decode step does not cover {reason}")
        self.model = model
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor
    ) -> torch.Tensor:
        """Next-token logits (B, V). tokens, positions: (B,); mask: (B, T), 1 where a column
        holds a real token, T = the cache's width + 1 (this step's column included)."""
        base = self.model.model
        rows, heads, kv_heads, head_dim = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        x = F.embedding(tokens, base.embed_tokens.weight)  # (B, hidden)
        cos, sin = base.rotary_emb(x, positions[:, None])  # (B, 1, head_dim): broadcasts over heads
        hidden = mask.new_zeros(mask.shape, dtype=x.dtype).masked_fill(mask == 0, torch.finfo(x.dtype).min)
        hidden = hidden[:, None, None, :]  # (B, 1, 1, T): padding columns get no weight
        groups = heads // kv_heads
        for index, layer in enumerate(base.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = _rms_norm(x, layer.input_layernorm)
            q = F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(rows, heads, head_dim)
            k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(rows, kv_heads, head_dim)
            v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(rows, kv_heads, head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3 normalizes each head before the rotation
                q, k = _rms_norm(q, attn.q_norm), _rms_norm(k, attn.k_norm)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            keys, values = cache.layers[index].update(k[:, :, None], v[:, :, None])  # (B, KV, T, D)
            # query head j reads key-value head j // groups, as transformers' repeat_kv lays them out
            scores = torch.matmul(q.view(rows, kv_heads, groups, head_dim), keys.transpose(-1, -2))
            weights = torch.softmax((scores * attn.scaling + hidden).float(), dim=-1).to(x.dtype)
            out = torch.matmul(weights, values).reshape(rows, heads * head_dim)
            x = x + F.linear(out, attn.o_proj.weight, attn.o_proj.bias)
            h = _rms_norm(x, layer.post_attention_layernorm)
            gate = F.silu(F.linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias))
            x = x + F.linear(
                gate * F.linear(h, mlp.up_proj.weight, mlp.up_proj.bias),
                mlp.down_proj.weight,
                mlp.down_proj.bias,
            )
        x = _rms_norm(x, base.norm)
        return F.linear(x, self.model.lm_head.weight, self.model.lm_head.bias)
