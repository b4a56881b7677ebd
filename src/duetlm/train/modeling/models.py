"""Each role's model as training needs it: weights in their dtypes, spread over the processes
by the strategy, its optimizer built over what this process holds, and its rollout engine.

Order matters under FSDP: the engine (an hf replica, or a vLLM engine that loads the folder
itself) is made from the whole model before it is sharded, and the optimizer after, over
the shards. A spec the trainer cannot honour is refused here, before any rollout.
"""

from __future__ import annotations

from pathlib import Path

import torch

from duetlm.backends import parse_spec
from duetlm.backends.hf import resolve_model_location
from duetlm.errors import ConfigError
from duetlm.train.config import ROLE_NAMES, TrainConfig
from duetlm.train.engines.base import LiveEngine, ReplicaEngine, RolloutEngine
from duetlm.train.modeling.distributed import Runtime
from duetlm.train.modeling.parallel import wrap
from duetlm.train.modeling.policy import LogprobNet, Policy, check_output_layer, load_lm


def model_location(spec: str) -> str:
    parsed = parse_spec(spec)
    if parsed.kind not in ("hf", "vllm"):
        raise ConfigError(
            f"training needs local weights (hf: or vllm: spec or an embedded name), got {spec!r}"
        )
    return resolve_model_location(parsed.model)[0]


def build_policy(name: str, cfg: TrainConfig, runtime: Runtime, checkpoint: Path | None) -> Policy:
    """One role's model (`capable`, `light`) as its role's knobs say, resumed from `checkpoint`
    when given."""
    parallel, role = cfg.parallel, cfg.role(name)
    spec, lr, trainable = cfg.model_of(name), role.lr, cfg.trains(name)
    lora = role.lora if trainable else None
    location, adapter = model_location(spec), None
    if checkpoint is not None:
        # a LoRA model resumes as its trained adapter over the base, which is saved whether or not
        # a merged copy is (merge_adapters); a fully trained one from its saved weights
        if lora is not None and (checkpoint / f"{name}_adapter").is_dir():
            adapter = str(checkpoint / f"{name}_adapter")
        elif (checkpoint / name).is_dir():
            location = str(checkpoint / name)
    lm, tokenizer = load_lm(
        location,
        runtime.device,
        parallel.precision,
        lora,
        adapter,
        trainable,
        parallel.gradient_checkpointing,
    )
    if trainable:
        check_output_layer(lm, spec)
        attention = getattr(lm.config, "_attn_implementation", "sdpa")
        if name == "light" and parallel.share_prefixes and attention not in ("sdpa", "eager"):
            raise ConfigError(
                f"parallel.share_prefixes packs m's answers behind their shared prefix with an attention mask "
                f"of its own, which {attention!r} attention cannot take; load m with sdpa attention, or set "
                "parallel.share_prefixes = false"
            )
    sharded = trainable and parallel.strategy == "fsdp"
    if sharded and lora is not None:
        raise ConfigError(
            f"strategy = 'fsdp' with LoRA on {ROLE_NAMES[name]} ({name}.lora): not supported. FSDP shards a "
            "model's weights so that full fine-tuning fits; LoRA's trained weights are small already, and its "
            "frozen base would be merged from gathered shards at every push. Use strategy = 'ddp' with LoRA, "
            "or full fine-tuning under fsdp"
        )
    engine = rollout_engine(name, spec, location, lm, tokenizer, cfg, runtime, sharded)
    net = wrap(
        LogprobNet(lm, parallel.logprob_chunk),
        parallel.strategy if sharded else "ddp",
        runtime,
        parallel.precision,
        trainable,
    )
    optimizer = None
    if trainable:
        parameters = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=cfg.optimizer.weight_decay)
    return Policy(lm, net, tokenizer, optimizer, engine, role.temperature, lora is not None, name)


def rollout_engine(
    name: str,
    spec: str,
    location: str,
    lm: torch.nn.Module,
    tokenizer,
    cfg: TrainConfig,
    runtime: Runtime,
    sharded: bool,
) -> RolloutEngine:
    """The engine of a role (see `engines`): vLLM for a vllm: spec, else the hf backend over
    the trained module itself, or over an unsharded replica when the module is sharded."""
    label = f"train:{name}"
    if parse_spec(spec).kind == "vllm":
        from duetlm.train.engines.vllm import VLLMRolloutEngine

        return VLLMRolloutEngine(
            location,
            settings=rollout_engine_settings(cfg, name),
            sleep=cfg.rollout.vllm_sleep,
            spec=label,
            device=runtime.device,
        )
    kind = ReplicaEngine if sharded else LiveEngine
    return kind(lm, tokenizer, label, cfg.rollout.rollout_batch_tokens)


def reference_model(cfg: TrainConfig, runtime: Runtime, checkpoint: Path | None = None) -> LogprobNet | None:
    """The initial M, frozen, for the KL term (None without one: β = 0, or LoRA, where the base
    with adapters off plays the part). Sharded like M under FSDP. A run that resumes takes the
    reference its checkpoint saved, if it saved one (a warm start made the warm-started M the
    reference): the objective it resumes is the one it left."""
    if cfg.objective.kl_beta == 0 or cfg.capable.lora is not None:
        return None
    parallel, spec = cfg.parallel, cfg.model_of("capable")
    location = model_location(spec)
    if checkpoint is not None and (checkpoint / "reference").is_dir():
        location = str(checkpoint / "reference")
    lm, _ = load_lm(location, runtime.device, parallel.precision, trainable=False)
    check_output_layer(lm, f"the reference ({spec})")
    return wrap(LogprobNet(lm, parallel.logprob_chunk), parallel.strategy, runtime, parallel.precision, False)


def rollout_engine_settings(cfg: TrainConfig, name: str):
    """A vLLM rollout engine computes in the trainer's dtype (bf16 under bf16-mixed: the fp32
    masters are cast when pushed), so that both score the same numbers. Sampling seeds are
    per request (`batch.sample_seed`); the engine's own seed only covers what has none."""
    from duetlm.backends.vllm.start import VLLMSettings, on_cpu, require_vllm

    require_vllm()
    share = cfg.engine_share(name, on_gpu=not on_cpu())
    dtype = "bfloat16" if cfg.parallel.precision == "bf16-mixed" else "float32"
    return VLLMSettings(gpu_memory_utilization=share, dtype=dtype, seed=cfg.seed)
