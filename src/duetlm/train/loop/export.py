"""`duet export RUN`: release folders from a run's last checkpoint, whatever its format.

Each trained model becomes a Hugging Face folder that transformers and vLLM load as they are:
its weights in one dtype (bfloat16 by default: what these models are released in, half the
fp32 masters a checkpoint holds), LoRA adapters merged in, the tokenizer and generation config
of the model it was trained from. A `whole` checkpoint's folders are read as they are; a
`sharded` one's shards are read in one process (no process group), only the weights, never the
optimizer state.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

import torch

from duetlm.errors import ConfigError
from duetlm.train.loop import checkpoint as ckpt

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export_run(run: str | Path, out: str | Path | None = None, dtype: str = "bfloat16") -> dict[str, Path]:
    """Write `OUT/<role>/` for each trained model of `run` (default OUT: RUN/export); returns the
    folders by role (`capable`, `light`)."""
    from duetlm.train.config import TrainConfig

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use {', '.join(DTYPES)}")
    run = Path(run)
    checkpoint = ckpt.find_checkpoint(run)
    if checkpoint is None:
        raise ConfigError(
            f"{run} holds no checkpoint (no last/{ckpt.STATE}): is it a `duet train` run folder?"
        )
    state = ckpt.load_state(checkpoint)
    config = TrainConfig.model_validate(state["config"])
    out = Path(out) if out is not None else run / "export"
    written = {}
    for role in config.roles():
        if not config.trains(role):
            continue
        lm = _trained_model(role, config, checkpoint, state.get("format", "whole"))
        target = out / role
        shutil.rmtree(target, ignore_errors=True)
        lm.to(DTYPES[dtype]).save_pretrained(target, safe_serialization=True)
        _copy_tokenizer_and_generation(config.model_of(role), target)
        written[role] = target
        logger.info("%s: %s written in %s", role, target, dtype)
    return written


def _trained_model(role: str, config, checkpoint: Path, fmt: str):
    """The trained weights of a role as a plain transformers model (adapters merged), in fp32."""
    from transformers import AutoModelForCausalLM

    from duetlm.train.modeling.models import model_location

    original = model_location(config.model_of(role))
    lora = config.role(role).lora
    if fmt == "whole":
        if (checkpoint / role).is_dir():
            return AutoModelForCausalLM.from_pretrained(checkpoint / role, dtype=torch.float32)
        adapter = checkpoint / f"{role}_adapter"
        if lora is None or not adapter.is_dir():
            raise ConfigError(
                f"{checkpoint} holds no weights for {role} (neither {role}/ nor {role}_adapter/)"
            )
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
        return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    lm = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    if lora is not None:
        from duetlm.train.modeling.policy import lora_model

        lm = lora_model(lm, lora)
    _load_shard_weights(lm, role, checkpoint / ckpt.SHARDS)
    return lm.merge_and_unload() if lora is not None else lm


def _load_shard_weights(lm: torch.nn.Module, role: str, shards: Path) -> None:
    """A role's weights from a sharded checkpoint into `lm`, in this one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    stored = set(FileSystemReader(str(shards)).read_metadata().state_dict_metadata)
    prefix = f"{role}.model."
    own = lm.state_dict()
    wanted = {key: tensor for key, tensor in own.items() if prefix + key in stored}
    missing = [key for key in own if key not in wanted and not key.endswith("lm_head.weight")]
    if missing:
        raise ConfigError(f"{shards} holds no {role} weights for {missing[:3]} (another model?)")
    template = {role: {"model": wanted}}
    dcp.load(template, checkpoint_id=str(shards), no_dist=True)
    lm.load_state_dict(template[role]["model"], strict=False)
    if hasattr(lm, "tie_weights"):  # an output layer tied to the embedding follows it
        lm.tie_weights()


def _copy_tokenizer_and_generation(spec: str, target: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    from duetlm.train.modeling.models import model_location

    original = model_location(spec)
    AutoTokenizer.from_pretrained(original).save_pretrained(target)
    with contextlib.suppress(OSError):  # a model without one: transformers derives it from the config
        GenerationConfig.from_pretrained(original).save_pretrained(target)
