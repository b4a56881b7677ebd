"""A model being trained: its weights in the right dtypes, its optimizer, its rollout engine.

Precision (`TrainConfig.precision`): trainable parameters are always fp32 (the master copy the
optimizer updates), and `bf16-mixed` runs every forward under bf16 autocast. Frozen weights
(LoRA's base, the reference model) are stored in bf16 under `bf16-mixed`, since no update
ever touches them. The module the optimizer steps through is a `LogprobNet` around the causal
LM, so that DDP wraps a forward that computes exactly the log-probs the loss needs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from duetlm.train.algorithm.grpo import packed_token_logps, token_logps
from duetlm.train.config import LoraSettings

if TYPE_CHECKING:
    from duetlm.train.engines.base import RolloutEngine


class LogprobNet(torch.nn.Module):
    """The policy as the loss sees it: token log-probs at a temperature over completion
    positions. DDP and FSDP wrap this module, so its forward is the one whose gradients are
    reduced. With `packed` (rows packed by shared prefix) the other inputs are not read."""

    def __init__(self, lm: torch.nn.Module, chunk: int) -> None:
        super().__init__()
        self.lm, self.chunk = lm, chunk

    def forward(
        self, input_ids, attention_mask, completion_mask, temperature: float, packed=None
    ) -> torch.Tensor:
        if packed is not None:
            return packed_token_logps(self.lm, packed, temperature, self.chunk, tuple(completion_mask.shape))
        return token_logps(self.lm, input_ids, attention_mask, temperature, completion_mask, self.chunk)


def check_output_layer(model: torch.nn.Module, name: str) -> None:
    """The trainer scores tokens with the output layer applied to the decoder's last hidden
    states (`grpo.head_logps`), never the whole vocabulary's logits; that must be what the
    model's own forward computes. Compared once, on a few tokens: a model whose logits are
    something else (a transform `grpo.output_logits` does not know) is refused, not trained
    on the wrong log-probs."""
    from torch.nn import functional as F

    from duetlm.errors import ConfigError
    from duetlm.train.algorithm.grpo import output_logits

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(base.parameters()).device
    ids = torch.arange(3, 11, device=device)[None] % base.config.get_text_config().vocab_size
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        expected = base(input_ids=ids).logits.float()
        hidden = base.get_decoder()(input_ids=ids).last_hidden_state
        head = base.get_output_embeddings()
        bias = None if getattr(head, "bias", None) is None else head.bias
        ours = output_logits(base.config, F.linear(hidden, head.weight, bias)).float()
    gap = float((expected - ours).abs().max())
    if gap > 1e-3 * max(1.0, float(expected.abs().max())):
        raise ConfigError(
            f"{name}: {type(base).__name__}'s logits are not its output layer applied to its last hidden states "
            f"(they differ by {gap:.3g} on a few tokens), and the trainer knows no transform that explains it: "
            "its log-probs would be wrong. Soft-capping (Gemma 2/3), a logit scale (Cohere) and a logits "
            "divisor (Granite) are handled; this model is not supported for training"
        )


@dataclass
class Policy:
    """A trainable model with its tokenizer, optimizer and the engine that samples from it."""

    lm: torch.nn.Module  # the causal LM (peft-wrapped with LoRA; sharded in place under FSDP)
    net: torch.nn.Module  # LogprobNet around `lm`: sharded, DDP-wrapped, or itself
    tokenizer: object
    optimizer: torch.optim.Optimizer | None
    engine: RolloutEngine  # what samples this model's rollouts
    temperature: float = 1.0  # the rollout temperature: log-probs are those of what was sampled
    lora: bool = False
    name: str = "capable"  # the role: capable (M) or light (m)


def autocast(device: torch.device, precision: str):
    """bf16 compute for `bf16-mixed`, nothing otherwise (CPU autocast supports bf16 too)."""
    if precision != "bf16-mixed":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def load_lm(
    location: str,
    device: torch.device,
    precision: str,
    lora: LoraSettings | None = None,
    adapter: str | None = None,
    trainable: bool = True,
    gradient_checkpointing: bool = False,
):
    """(model, tokenizer): fp32 where trained, bf16 where frozen under bf16-mixed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(location).exists()
    frozen_bf16 = precision == "bf16-mixed" and (lora is not None or not trainable)
    dtype = torch.bfloat16 if frozen_bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local)
    model = AutoModelForCausalLM.from_pretrained(location, local_files_only=local, dtype=dtype).to(device)
    if not trainable:
        return model.eval().requires_grad_(False), tokenizer
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # generation turns it back on per call
    if lora is not None:
        from peft import PeftModel

        if gradient_checkpointing:
            model.enable_input_require_grads()  # so checkpointed layers see a grad-requiring input
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        else:
            model = lora_model(model, lora)
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()  # adapters: fp32 master weights
    return model, tokenizer


def lora_model(model, lora: LoraSettings):
    """`model` with fresh LoRA adapters as `lora` sets them (peft)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def merged_state_dict(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights as a plain Hugging Face checkpoint names them, LoRA deltas merged in (the
    whole model at once: for saving; pushes go tensor by tensor, `parallel.full_tensors`)."""
    from duetlm.train.modeling.parallel import full_tensors

    return dict(full_tensors(lm, tied=False))
