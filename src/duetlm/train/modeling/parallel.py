"""How a model is spread over the trainer's processes: DDP or FSDP2 (`strategy`).

- `ddp`: every process holds the whole model; gradients are all-reduced once per optimizer
  step (`no_sync` on the other micro-batches). A single process is DDP of one.
- `fsdp`: torch's FSDP2 (`fully_shard`), per decoder layer and then the root, so each
  process holds 1/N of the weights, gradients and AdamW state, and a layer's weights exist
  whole only while it computes. Gradients are reduce-scattered after every micro-batch
  (accumulating them unsharded would hold a whole model's gradients on every process).
  Under bf16-mixed the gathered weights are bf16 and gradients are reduced in fp32
  (`MixedPrecisionPolicy`), the fp32 masters staying sharded. The root is the `LogprobNet`,
  whose forward runs the decoder and the chunked head: sharding the causal LM itself would
  leave the embedding and head gathered by a forward the trainer never calls.

A sharded module never generates: rollouts go to an engine that takes pushed weights
(`engines`). The optimizer is built after sharding, over the shards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

from duetlm.errors import ConfigError
from duetlm.train.modeling.distributed import Runtime

Strategy = Literal["ddp", "fsdp"]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, by the class names transformers keeps whole
    (`_no_split_modules`), found under any wrapper (peft included)."""
    names: set[str] = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"strategy = 'fsdp': no decoder layers found in {type(model).__name__} (its _no_split_modules "
            "names none of its modules); use strategy = 'ddp'"
        )
    return layers


def shard(net: torch.nn.Module, runtime: Runtime, precision: str) -> torch.nn.Module:
    """FSDP2 over `net`: each decoder layer, then the root (in place; returns `net`)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if precision == "bf16-mixed":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(net):
        fully_shard(layer, mp_policy=policy)
    fully_shard(net, mp_policy=policy)
    return net


def wrap(net: torch.nn.Module, strategy: Strategy, runtime: Runtime, precision: str, trainable: bool):
    """The module forwards and the optimizer go through: sharded under fsdp, DDP-wrapped
    when several processes train it whole, `net` itself otherwise."""
    if strategy == "fsdp":
        return shard(net, runtime, precision)
    if trainable and runtime.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [runtime.device] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=device_ids)
    return net


def accumulating(net: torch.nn.Module, last: bool):
    """The context of one micro-batch's backward: DDP skips its all-reduce until the last
    micro-batch of an optimizer step; FSDP reduce-scatters every one."""
    if not last and hasattr(net, "no_sync"):
        return net.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(net: torch.nn.Module, max_norm: float) -> float:
    """Clip by the global gradient norm (over every process's shards) and return it."""
    parameters = [p for p in net.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process when sharded (a collective)."""
    if hasattr(tensor, "full_tensor"):
        return tensor.full_tensor()
    return tensor.detach()


def unwrapped(net: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP wrapper (forwards without gradients skip DDP)."""
    return getattr(net, "module", net)


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def full_tensors(
    lm: torch.nn.Module, tied: bool, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The causal LM's weights as its checkpoint names them, whole, one tensor at a time, in
    `dtype` (None: as stored). A collective under FSDP: every process must iterate to the end;
    each shard is cast before it is gathered. LoRA deltas are merged in; with tied embeddings
    the output layer, which is the embedding, is left out by name."""
    if hasattr(lm, "get_base_model"):
        yield from _merged_lora(lm, tied, dtype)
        return
    for name, tensor in lm.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        yield name, full(_cast(tensor.detach(), dtype))


def _merged_lora(
    lm: torch.nn.Module, tied: bool, dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """W + ΔW for every adapted layer, without touching the model (merging in place and back
    would round the base weights at every push), summed in fp32."""
    from peft.tuners.lora import LoraLayer

    base = lm.get_base_model()
    adapted = {f"{name}.base_layer.weight": m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        plain = name.replace(".base_layer.", ".")
        if tied and plain == "lm_head.weight":
            continue
        module = adapted.get(name)
        if module is None:
            yield plain, full(_cast(tensor.detach(), dtype))
            continue
        with torch.no_grad():
            delta = sum(full(module.get_delta_weight(a)).float() for a in module.active_adapters)
            merged = full(tensor.detach()).float() + delta
        yield plain, merged.to(dtype or tensor.dtype)
