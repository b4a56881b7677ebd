"""`duet train --dry-run`: what a training config needs on each device, before anything loads.

Every device gets a share of the questions and the same plan. It counts, per model: weights
(fp32 master copies of what is trained, bf16 for what is frozen under bf16-mixed), gradients,
AdamW's two moments, the reference model (all whole under ddp, 1/N each under fsdp, plus the
layers FSDP gathers while they compute), the activations of one micro-batch (checkpointed or
not), the fp32 logits of one log-prob chunk, the rollout engine (vLLM's reserved share, or the
hf engine's KV cache, over an unsharded replica under fsdp) and the weight push (the largest
tensor gathered whole, and a node leader's bucket). Rollouts, the update and the push do not
overlap: gradients are freed after every optimizer step, a sleeping vLLM engine gives its
memory back during the update, and the push follows the update; the peak is the largest of
the three phases. Host memory is reported beside it: the staged copy per node, and what a save
gathers on the main process. Estimates, not measurements: activations vary with the attention
kernel; allow 10-20%.

Model shapes come from a local folder's config.json, or for the Qwen3 models the recipe uses
from the table below (their published configs), so the plan runs offline.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from duetlm.errors import ConfigError
from duetlm.train.config import ROLE_NAMES, LoraSettings, TrainConfig, with_settings

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
        """All weights, a tied output layer once (what a checkpoint and a push hold)."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params + embeddings + self.hidden

    @property
    def layer_params(self) -> int:
        """One decoder layer: q, k, v, o (and Qwen3's per-head norms), the SwiGLU MLP, two norms."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h + (2 * self.head_dim if self.qk_norm else 0)
        return attention + 3 * h * self.intermediate + 2 * h

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


UPDATE_ROWS = ("gradients", "activations", "logits chunk", "FSDP gathered weights")
ROLLOUT_ROWS = ("rollout engine",)
PUSH_ROWS = ("weight push",)
TRANSIENT = UPDATE_ROWS + ROLLOUT_ROWS + PUSH_ROWS


@dataclass
class ModelPlan:
    name: str
    params: int
    trainable: int
    rows: dict[str, float]  # what -> bytes on one device
    engine: str  # what the rollout engine row is
    host_rows: dict[str, float]  # what -> bytes of host memory (per node, or on the main process)

    @property
    def resident(self) -> float:
        return sum(v for k, v in self.rows.items() if k not in TRANSIENT)

    def phase(self, names: tuple[str, ...]) -> float:
        return sum(self.rows.get(k, 0.0) for k in names)


def _sequence(role: str, cfg: TrainConfig) -> int:
    """Tokens of one training row: M's prompt and signal; m's prompt holds the signal too."""
    if role == "capable":
        return cfg.rollout.signal_max_tokens + 512
    return cfg.rollout.signal_max_tokens + cfg.rollout.answer_max_tokens + 512


def model_plan(role: str, cfg: TrainConfig, device_memory: float, devices: int) -> ModelPlan:
    """One model's bytes per device. Under fsdp a trained model and M's reference are sharded
    over the `devices` (1/N each), and a layer is gathered whole in the compute dtype while it
    computes (the root, embedding and head, stays gathered through a pass: FSDP2 keeps the root
    unsharded after its forward). `role` is `capable` or `light`."""
    spec, trained = cfg.model_of(role), cfg.trains(role)
    lora = cfg.role(role).lora if trained else None
    shape = shape_of(spec)
    parallel, rollout = cfg.parallel, cfg.rollout
    bf16 = parallel.precision == "bf16-mixed"
    compute = 2 if bf16 else 4
    n = shape.params
    sharded = trained and parallel.strategy == "fsdp" and lora is None
    share = devices if sharded else 1
    trainable = (shape.lora_params(lora) if lora is not None else n) if trained else 0
    if not trained:
        weights = n * compute
    elif lora is not None:
        weights = n * compute + trainable * 4
    else:
        weights = n * 4 / share
    rows = {"weights": weights, "gradients": trainable * 4 / share, "AdamW state": trainable * 8 / share}
    if role == "capable" and cfg.objective.kl_beta > 0 and lora is None:
        rows["reference model"] = n * compute / (devices if parallel.strategy == "fsdp" else 1)
    if trained:
        tokens = parallel.micro_batch * _sequence(role, cfg)
        rows["activations"] = tokens * shape.activation_bytes_per_token(parallel.gradient_checkpointing)
        rows["logits chunk"] = parallel.logprob_chunk * shape.vocab * (2 + 4 + 4)  # bf16, fp32, grad
    if sharded:
        root = shape.vocab * shape.hidden * (1 if shape.tied else 2) + shape.hidden
        rows["FSDP gathered weights"] = (
            root + 2 * shape.layer_params
        ) * compute  # root + a layer and the next
    vllm = spec.startswith("vllm:")
    engine_dtype = 2 if bf16 else 4
    if vllm:
        share_of_device = cfg.engine_share(role, on_gpu=True) or 0.0
        rows["rollout engine"] = share_of_device * device_memory
        asleep = ", asleep in updates" if rollout.vllm_sleep else ""
        label = f"vLLM engine ({share_of_device:.0%} of the device reserved{asleep})"
    else:
        questions = cfg.objective.questions_per_step // devices
        per_question = (
            cfg.objective.n_capable if role == "capable" else cfg.objective.n_capable * cfg.objective.n_light
        )
        tokens = min(rollout.rollout_batch_tokens, questions * per_question * _sequence(role, cfg))
        rows["rollout engine"] = tokens * shape.kv_bytes_per_token()
        label = f"hf engine KV cache ({tokens:,} tokens)"
        if sharded:
            rows["hf replica (unsharded)"] = n * 4
            label += " over an unsharded replica"
    if vllm and not rollout.vllm_sleep:
        rows["vLLM engine (always resident)"] = rows.pop("rollout engine")
    host: dict[str, float] = {}
    if trained and (vllm or sharded):
        # a push gathers one tensor at a time (the largest: the embedding), in the engine's dtype;
        # a node leader holds a bucket of them before writing the node's staged copy
        largest = shape.vocab * shape.hidden * engine_dtype
        bucket = parallel.push_bucket_mb * 2**20 if vllm else 0.0
        rows["weight push"] = largest + bucket
        if vllm:
            host["staged copy per node (/dev/shm)"] = shape.params * engine_dtype
    if trained:
        whole = trainable * 12 + (n - trainable) * 4  # fp32 weights, AdamW's two moments
        if cfg.checkpoint.format == "sharded":
            # each process streams its shards to disk (files of this size); a few tensors at a time
            # pass through host memory (bench/checkpoint_memory.py measures it)
            host["save: each process's shards on disk"] = whole / devices
        else:
            host["save: whole model + AdamW state on the main process"] = whole
    name = f"{ROLE_NAMES[role]} {re.sub(r'^(hf|vllm):', '', spec)}"
    return ModelPlan(name, n, trainable, rows, label, host)


def plan(cfg: TrainConfig, device_memory: float, devices: int) -> tuple[list[ModelPlan], float]:
    """(per-model plans, peak bytes per device). Rollouts, updates and pushes do not overlap:
    gradients are freed after every optimizer step, sleeping vLLM engines give their memory
    back during updates, and a push runs after the update."""
    plans = [model_plan(role, cfg, device_memory, devices) for role in cfg.roles()]
    return plans, max(phases(plans).values())


def phases(plans: list[ModelPlan]) -> dict[str, float]:
    resident = sum(p.resident for p in plans)
    engines = sum(p.phase(ROLLOUT_ROWS) for p in plans)
    return {
        "rollout": resident + engines,
        "update": resident + max(p.phase(UPDATE_ROWS) for p in plans),  # M and m update one after the other
        "push": resident + engines + max(p.phase(PUSH_ROWS) for p in plans),  # engines awake to take weights
    }


def render(cfg: TrainConfig, device_memory: float, devices: int, nodes: int = 1) -> tuple[str, bool]:
    """The plan as text, and whether it fits; when it does not, the changes that would."""
    if devices % nodes:
        raise ConfigError(f"--devices {devices} do not split evenly over --nodes {nodes}")
    plans, peak = plan(cfg, device_memory, devices)
    strategy = cfg.parallel.strategy
    layout = (
        "FSDP2 (trained models and the reference sharded over all devices)"
        if strategy == "fsdp"
        else "DDP (whole models on each)"
    )
    width = 34
    lines = [
        f"memory plan per device: {devices} device(s) of {device_memory / GB:.0f} GB on {nodes} node(s), {layout},",
        f"{cfg.objective.questions_per_step // devices} question(s) per device per step, precision "
        f"{cfg.parallel.precision}, gradient checkpointing {'on' if cfg.parallel.gradient_checkpointing else 'off'}",
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
    by_phase = phases(plans)
    resident = sum(p.resident for p in plans)
    lines += [
        "",
        f"resident (weights, optimizer, reference): {resident / GB:.1f} GB",
        "; ".join(f"{name} phase: {value / GB:.1f} GB" for name, value in by_phase.items()),
        f"peak: {peak / GB:.1f} GB of {device_memory / GB:.0f} GB",
    ]
    host = {}
    for p in plans:
        for key, value in p.host_rows.items():
            host[key] = host.get(key, 0.0) + value
    if host:
        lines.append(
            "host memory: " + "; ".join(f"{key}: {value / GB:.1f} GB" for key, value in host.items())
        )
    fits = peak <= device_memory
    if fits:
        lines.append(f"verdict: fits ({(device_memory - peak) / GB:.1f} GB to spare)")
        return "\n".join(lines), True
    lines.append(f"verdict: does not fit (short by {(peak - device_memory) / GB:.1f} GB)")
    for change, changed in _remedies(cfg):
        _, new_peak = plan(changed, device_memory, devices)
        verdict = "fits" if new_peak <= device_memory else "still does not fit"
        lines.append(f"  {change}: peak {new_peak / GB:.1f} GB, {verdict}")
    return "\n".join(lines), False


def _remedies(cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """Changes that shrink the plan, each adding to the ones before: sharding, bf16 compute,
    checkpointing, then LoRA (which trains under ddp: its trained weights are small already)."""
    lora = {"r": 64, "alpha": 128}
    full = cfg.capable.lora is None and cfg.light.lora is None
    steps: list[tuple[str, dict]] = []
    if cfg.parallel.strategy == "ddp" and full:
        steps.append(("parallel.strategy = 'fsdp'", {"parallel.strategy": "fsdp"}))
    if cfg.parallel.precision != "bf16-mixed":
        steps.append(("parallel.precision = 'bf16-mixed'", {"parallel.precision": "bf16-mixed"}))
    if not cfg.parallel.gradient_checkpointing:
        steps.append(("parallel.gradient_checkpointing = true", {"parallel.gradient_checkpointing": True}))
    lora_steps = []
    if cfg.capable.lora is None:
        lora_steps.append(("capable.lora = { r = 64, alpha = 128 }", {"capable.lora": lora}))
    if cfg.light.lora is None and cfg.trains_light:
        lora_steps.append(("light.lora = { r = 64, alpha = 128 }", {"light.lora": lora}))
    out, update = [], {}
    for label, change in steps:  # cumulative: each line adds to the ones above it
        update |= change
        out.append((("... and " if out else "with ") + label, with_settings(cfg, update)))
    sharded = update.pop("parallel.strategy", None) is not None  # LoRA instead of sharding, from here on
    for index, (label, change) in enumerate(lora_steps):
        update |= change
        if index == 0 and cfg.parallel.strategy == "fsdp":
            update["parallel.strategy"] = "ddp"
            label = f"parallel.strategy = 'ddp' and {label}"
        prefix = "... and " if out else "with "
        if index == 0 and sharded:
            prefix = "or, under ddp, with "
        out.append((prefix + label, with_settings(cfg, update)))
    return out
