"""`duet train --dry-run`: what a training config needs on each device, before anything loads.

DDP gives every device whole models and a share of the questions, so the plan is the same on
each device. It counts, per model: weights (fp32 master copies of what is trained, bf16 for
what is frozen under bf16-mixed), gradients, AdamW's two moments, the reference model, the
activations of one micro-batch (checkpointed or not), the fp32 logits of one log-prob chunk,
and the rollout engine (vLLM's reserved share, or the hf engine's KV cache). Rollouts and the
update do not overlap: gradients are freed after every optimizer step, and a sleeping vLLM
engine gives its memory back during the update, so the peak is the larger of the two phases.
Estimates, not measurements: activations vary with the attention kernel; allow 10-20%.

Model shapes come from a local folder's config.json, or for the Qwen3 models the recipe uses
from the table below (their published configs), so the plan runs offline.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from duetlm.errors import ConfigError
from duetlm.train.config import LoraSettings, TrainConfig

GB = 1e9


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qk_norm: bool = True  # Qwen3 normalizes queries and keys per head; Llama does not

    @property
    def params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = (
            h * q + 2 * h * kv + q * h + (2 * self.head_dim if self.qk_norm else 0)
        )  # q, k, v, o; norms
        layer = attention + 3 * h * self.intermediate + 2 * h  # SwiGLU MLP; two norms
        embeddings = self.vocab * h * (1 if self.tied else 2)
        return self.layers * layer + embeddings + h

    def lora_params(self, lora: LoraSettings) -> int:
        h, q, kv, i = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        sizes = {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        per_layer = sum(lora.r * sum(sizes[m]) for m in lora.target_modules if m in sizes)
        return self.layers * per_layer

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def activation_bytes_per_token(self, checkpointed: bool) -> int:
        """bf16 bytes one token keeps alive for the backward pass: with checkpointing, each
        layer's input plus one layer recomputed in full; without, every layer in full."""
        h, q, kv, i = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        full_layer = 2 * (6 * h + 2 * q + 2 * kv + 3 * i)  # norms, q/k/v/o, attention out, MLP
        if checkpointed:
            return 2 * h * self.layers + full_layer
        return full_layer * self.layers


QWEN3 = {  # published configs of the Qwen3 dense models (config.json on the hub)
    "Qwen/Qwen3-0.6B": Shape(1024, 28, 16, 8, 128, 3072, 151_936, True),
    "Qwen/Qwen3-1.7B": Shape(2048, 28, 16, 8, 128, 6144, 151_936, True),
    "Qwen/Qwen3-4B": Shape(2560, 36, 32, 8, 128, 9728, 151_936, True),
    "Qwen/Qwen3-8B": Shape(4096, 36, 32, 8, 128, 12288, 151_936, False),
    "Qwen/Qwen3-14B": Shape(5120, 40, 40, 8, 128, 17408, 151_936, False),
}


def shape_of(spec: str) -> Shape:
    """A model's shape without loading it: a local folder's config.json, an embedded model's,
    or the table of Qwen3 models."""
    from duetlm.models import EMBEDDED

    name = spec.strip()
    if name in EMBEDDED:
        return _from_config(EMBEDDED[name]() / "config.json")
    name = re.sub(r"^(hf|vllm):", "", name)
    if (Path(name).expanduser() / "config.json").is_file():
        return _from_config(Path(name).expanduser() / "config.json")
    if name in QWEN3:
        return QWEN3[name]
    raise ConfigError(
        f"no shape known for {spec!r} offline: give a local model folder, or one of {', '.join(QWEN3)}"
    )


def _from_config(path: Path) -> Shape:
    c = json.loads(path.read_text())
    heads = c["num_attention_heads"]
    return Shape(
        c["hidden_size"],
        c["num_hidden_layers"],
        heads,
        c.get("num_key_value_heads", heads),
        c.get("head_dim") or c["hidden_size"] // heads,
        c["intermediate_size"],
        c["vocab_size"],
        bool(c.get("tie_word_embeddings", False)),
        c.get("model_type", "").startswith("qwen3"),
    )


def parse_size(text: str) -> float:
    """`80GB`, `80 GiB`, `141g` -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(G|GB|GiB|g|gb|gib|T|TB|TiB)?\s*", text)
    if not match:
        raise ConfigError(f"--device-memory takes a size like 80GB, got {text!r}")
    unit = (match.group(2) or "GB").lower()
    scale = {"g": GB, "gb": GB, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}[unit]
    return float(match.group(1)) * scale


TRANSIENT = ("gradients", "activations", "logits chunk", "rollout engine")


@dataclass
class ModelPlan:
    name: str
    params: int
    trainable: int
    rows: dict[str, float]  # what -> bytes
    rollout: float  # bytes alive only while rolling out (the engine)
    update: float  # bytes alive only while updating (gradients, activations, logits)
    engine: str  # what the rollout engine row is

    @property
    def resident(self) -> float:
        return sum(v for k, v in self.rows.items() if k not in TRANSIENT)


def model_plan(
    role: str,
    spec: str,
    cfg: TrainConfig,
    lora: LoraSettings | None,
    trained: bool,
    device_memory: float,
    devices: int,
) -> ModelPlan:
    shape = shape_of(spec)
    bf16 = cfg.precision == "bf16-mixed"
    n = shape.params
    trainable = (shape.lora_params(lora) if lora is not None else n) if trained else 0
    if not trained:
        weights = n * (2 if bf16 else 4)
    elif lora is not None:
        weights = n * (2 if bf16 else 4) + trainable * 4
    else:
        weights = n * 4
    rows = {"weights": weights, "gradients": trainable * 4, "AdamW state": trainable * 8}
    if role == "M" and cfg.kl_beta > 0 and lora is None and not cfg.single_model:
        rows["reference model"] = n * (2 if bf16 else 4)
    questions = cfg.questions_per_step // devices
    sequence = (
        cfg.signal_max_tokens + 512 if role == "M" else cfg.signal_max_tokens + cfg.answer_max_tokens + 512
    )
    rows["activations"] = (
        cfg.micro_batch * sequence * shape.activation_bytes_per_token(cfg.gradient_checkpointing)
        if trained
        else 0
    )
    rows["logits chunk"] = cfg.logprob_chunk * shape.vocab * (2 + 4 + 4) if trained else 0  # bf16, fp32, grad
    if role == "M" and spec.startswith("vllm:"):
        share = cfg.vllm_gpu_memory_utilization or 0.3  # the GPU default
        rows["rollout engine"] = share * device_memory
        asleep = ", asleep in updates" if cfg.vllm_sleep else ""
        label = f"vLLM engine ({share:.0%} of the device reserved{asleep})"
    else:
        rows_per_call = questions * (cfg.n_capable if role == "M" else cfg.n_capable * cfg.n_light)
        tokens = min(cfg.rollout_batch_tokens, rows_per_call * sequence)  # m's prompt holds the signal
        rows["rollout engine"] = tokens * shape.kv_bytes_per_token()
        label = f"hf engine KV cache ({tokens:,} tokens)"
    rollout = rows["rollout engine"]
    if role == "M" and spec.startswith("vllm:") and not cfg.vllm_sleep:
        rows.pop("rollout engine")
        rows["vLLM engine (always resident)"] = rollout
        rollout = 0.0
    update = rows["gradients"] + rows["activations"] + rows["logits chunk"]
    return ModelPlan(f"{role} {re.sub(r'^(hf|vllm):', '', spec)}", n, trainable, rows, rollout, update, label)


def plan(cfg: TrainConfig, device_memory: float, devices: int) -> tuple[list[ModelPlan], float]:
    """(per-model plans, peak bytes per device)."""
    plans = [model_plan("M", cfg.capable, cfg, cfg.lora_capable, True, device_memory, devices)]
    if not cfg.single_model:
        plans.append(model_plan("m", cfg.light, cfg, cfg.lora_light, cfg.train_light, device_memory, devices))
    resident = sum(p.resident for p in plans)
    rollout_phase = resident + sum(p.rollout for p in plans)
    update_phase = resident + max(p.update for p in plans)  # M and m update one after the other
    return plans, max(rollout_phase, update_phase)


def render(cfg: TrainConfig, device_memory: float, devices: int) -> tuple[str, bool]:
    """The plan as text, and whether it fits; when it does not, the changes that would."""
    plans, peak = plan(cfg, device_memory, devices)
    width = 34
    lines = [
        f"memory plan per device: {devices} device(s) of {device_memory / GB:.0f} GB, DDP (whole models on each),",
        f"{cfg.questions_per_step // devices} question(s) per device per step, precision {cfg.precision}, "
        f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}",
        "",
        f"{'':<{width}}" + "".join(f"{p.name:>22}" for p in plans),
        f"{'parameters (trained)':<{width}}"
        + "".join(f"{p.params / 1e9:>13.2f}B ({p.trainable / 1e9:.2f}B)" for p in plans),
    ]
    keys = list(dict.fromkeys(k for p in plans for k in p.rows))
    for key in keys:
        lines.append(f"{key:<{width}}" + "".join(f"{p.rows.get(key, 0) / GB:>19.1f} GB" for p in plans))
    for p in plans:
        lines.append(f"  {p.name}: {p.engine}")
    resident = sum(p.resident for p in plans)
    lines += [
        "",
        f"resident (weights, optimizer, reference): {resident / GB:.1f} GB",
        f"rollout phase: {(resident + sum(p.rollout for p in plans)) / GB:.1f} GB; "
        f"update phase: {(resident + max(p.update for p in plans)) / GB:.1f} GB",
        f"peak: {peak / GB:.1f} GB of {device_memory / GB:.0f} GB",
    ]
    fits = peak <= device_memory
    if fits:
        lines.append(f"verdict: fits ({(device_memory - peak) / GB:.1f} GB to spare)")
        return "\n".join(lines), True
    lines.append(f"verdict: does not fit (short by {(peak - device_memory) / GB:.1f} GB)")
    for change, changed in _remedies(cfg):
        _, new_peak = plan(changed, device_memory, devices)
        verdict = "fits" if new_peak <= device_memory else "still does not fit"
        lines.append(f"  with {change}: peak {new_peak / GB:.1f} GB, {verdict}")
    return "\n".join(lines), False


def _remedies(cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
    lora = LoraSettings(r=64, alpha=128)
    steps = []
    if cfg.lora_capable is None:
        steps.append(("lora_capable = { r = 64, alpha = 128 }", {"lora_capable": lora}))
    if cfg.precision != "bf16-mixed":
        steps.append(("precision = 'bf16-mixed'", {"precision": "bf16-mixed"}))
    if not cfg.gradient_checkpointing:
        steps.append(("gradient_checkpointing = true", {"gradient_checkpointing": True}))
    if cfg.lora_light is None and cfg.train_light:
        steps.append(("lora_light = { r = 64, alpha = 128 }", {"lora_light": lora}))
    out, update = [], {}
    for label, change in steps:  # cumulative: each line adds to the ones above it
        update |= change
        out.append((("... and " if out else "") + label, cfg.model_copy(update=dict(update))))
    return out
