"""The streaming engine's decode step for Llama-family decoders, as plain tensor operations.

For models as small as the embedded pair, a transformers forward of one token per row
spends much of its time around the arithmetic on a CPU: module calls and their hooks, the
attention-mask builder, the cache interface, the attention dispatcher; and the engine steps
once per token. `bench/decode_step.py` measures the two side by side. This step reads the model's
own parameters (small models' q/k/v and gate/up projections joined into one matrix each, a
copy rebuilt when a parameter changes: a weight update is seen at the next step) and does the
same arithmetic in the same order and precision: RMS norms in fp32, rotary embeddings from the model's own
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

from dataclasses import dataclass

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


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The transformers RMSNorm: normalized in fp32, cast back, then scaled by the weight."""
    if x.dtype == torch.float32:  # the same arithmetic as one op
        return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _eps(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _join(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear layers that read the same input as one weight and bias (a missing bias: zeros)."""
    weight = torch.cat([lin.weight for lin in linears])
    if all(lin.bias is None for lin in linears):
        return weight, None
    return weight, torch.cat(
        [lin.weight.new_zeros(lin.out_features) if lin.bias is None else lin.bias for lin in linears]
    )


@dataclass
class LayerWeights:
    """One decoder layer's tensors as the step reads them: plain tensors, so a step does no
    module attribute lookups. `qkv` and `gate_up` hold one (weight, bias) per projection, or
    a single joined one."""

    norm_in: torch.Tensor
    norm_in_eps: float
    qkv: list[tuple[torch.Tensor, torch.Tensor | None]]
    head_norms: tuple[torch.Tensor, float, torch.Tensor, float] | None  # Qwen3's q_norm, k_norm
    out: tuple[torch.Tensor, torch.Tensor | None]
    norm_post: torch.Tensor
    norm_post_eps: float
    gate_up: list[tuple[torch.Tensor, torch.Tensor | None]]
    down: tuple[torch.Tensor, torch.Tensor | None]
    scaling: float


def _layer_weights(layer: nn.Module, join: bool) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
    head_norms = None
    if hasattr(attn, "q_norm"):
        head_norms = (attn.q_norm.weight, _eps(attn.q_norm), attn.k_norm.weight, _eps(attn.k_norm))
    return LayerWeights(
        norm_in=layer.input_layernorm.weight,
        norm_in_eps=_eps(layer.input_layernorm),
        qkv=[_join(qkv)] if join else [(p.weight, p.bias) for p in qkv],
        head_norms=head_norms,
        out=(attn.o_proj.weight, attn.o_proj.bias),
        norm_post=layer.post_attention_layernorm.weight,
        norm_post_eps=_eps(layer.post_attention_layernorm),
        gate_up=[_join(gate_up)] if join else [(p.weight, p.bias) for p in gate_up],
        down=(mlp.down_proj.weight, mlp.down_proj.bias),
        scaling=attn.scaling,
    )


def _joined_bytes(model) -> int:
    """What joined copies of every layer's q/k/v and gate/up projections would take."""
    total = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            total += sum(p.numel() * p.element_size() for p in lin.parameters())
    return total


class DecodeStep:
    """One token for every row of the engine's batch, through `model`'s weights.

    The layers' tensors are gathered once (`LayerWeights`) and gathered again when any
    parameter of the model changes: replaced, or updated in place (its version counter
    moves), so a weight update is seen at the next step. Models whose joined projections
    fit in `join_limit_bytes` also run each layer's q/k/v and gate/up projections as one
    matrix product each, and rotate queries and keys as one: on a CPU, a model as small as
    the embedded pair spends most of a step on the fixed cost of each operation
    (`bench/decode_step.py`). Larger models, whose steps are dominated by the arithmetic,
    read their own weights with no copy."""

    join_limit_bytes = 256 * 2**20

    def __init__(self, model) -> None:
        reason = why_not(model)
        if reason is not None:
            raise ValueError(f"the engine's own decode step does not cover {reason}")
        self.model = model
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.join = _joined_bytes(model) <= self.join_limit_bytes
        self._owners = [
            (module, name)
            for module in model.modules()
            for name, parameter in module._parameters.items()
            if parameter is not None
        ]
        self._stamp: list | None = None
        self.layers: list[LayerWeights] = []

    def _fresh_layers(self) -> list[LayerWeights]:
        """The gathered tensors, gathered again if a parameter changed since."""
        stamp = [(id(p), p._version, p.data_ptr()) for p in (m._parameters[n] for m, n in self._owners)]
        if stamp != self._stamp:
            with torch.no_grad():
                self.layers = [_layer_weights(layer, self.join) for layer in self.model.model.layers]
            self._stamp = stamp
        return self.layers

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor
    ) -> torch.Tensor:
        """Next-token logits (B, V). tokens, positions: (B,); mask: (B, T), 1 where a column
        holds a real token, T = the cache's width + 1 (this step's column included)."""
        layers = self._fresh_layers()
        base = self.model.model
        rows, heads, kv_heads, head_dim = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        x = F.embedding(tokens, base.embed_tokens.weight)  # (B, hidden)
        cos, sin = base.rotary_emb(x, positions[:, None])  # (B, 1, head_dim): broadcasts over heads
        hidden = mask.new_zeros(mask.shape, dtype=x.dtype).masked_fill(mask == 0, torch.finfo(x.dtype).min)
        hidden = hidden[:, None, None, :]  # (B, 1, 1, T): padding columns get no weight
        groups = heads // kv_heads
        for index, w in enumerate(layers):
            h = _rms_norm(x, w.norm_in, w.norm_in_eps)
            projected = (
                torch.cat([F.linear(h, *p) for p in w.qkv], dim=-1)
                if len(w.qkv) > 1
                else F.linear(h, *w.qkv[0])
            )
            projected = projected.view(rows, heads + 2 * kv_heads, head_dim)
            qk, v = projected[:, : heads + kv_heads], projected[:, heads + kv_heads :]
            if w.head_norms is not None:  # Qwen3 normalizes each head before the rotation
                q_weight, q_eps, k_weight, k_eps = w.head_norms
                q = _rotate(_rms_norm(qk[:, :heads], q_weight, q_eps), cos, sin)
                k = _rotate(_rms_norm(qk[:, heads:], k_weight, k_eps), cos, sin)
            else:  # queries and keys side by side: rotated as one
                qk = _rotate(qk, cos, sin)
                q, k = qk[:, :heads], qk[:, heads:]
            keys, values = cache.layers[index].update(k[:, :, None], v[:, :, None])  # (B, KV, T, D)
            # query head j reads key-value head j // groups, as transformers' repeat_kv lays them out
            scores = torch.matmul(q.reshape(rows, kv_heads, groups, head_dim), keys.transpose(-1, -2))
            weights = torch.softmax(scores.mul_(w.scaling).add_(hidden).float(), dim=-1).to(x.dtype)
            out = torch.matmul(weights, values).reshape(rows, heads * head_dim)
            x = x + F.linear(out, *w.out)
            h = _rms_norm(x, w.norm_post, w.norm_post_eps)
            if len(w.gate_up) > 1:
                gate, up = (F.linear(h, *p) for p in w.gate_up)
            else:
                gate, up = F.linear(h, *w.gate_up[0]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, *w.down)
        x = _rms_norm(x, base.norm.weight, _eps(base.norm))
        return F.linear(x, self.model.lm_head.weight, self.model.lm_head.bias)
