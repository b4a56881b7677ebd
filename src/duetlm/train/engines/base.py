"""The engines that sample each role's rollouts, behind one interface.

Every role (M, m) has its own engine, chosen from its spec and the strategy:

| spec  | ddp (whole models)                         | fsdp (sharded models)                 |
| ----- | ------------------------------------------ | ------------------------------------- |
| hf:   | `LiveEngine`: generate() on the very module | `ReplicaEngine`: an unsharded copy    |
|       | being trained; nothing to push             | that takes the pushed weights         |
| vllm: | `VLLMRolloutEngine` (train/engines/vllm.py): a vLLM engine per process, that    |
|       | sleeps during updates and reloads the weights staged once per node after each |

A sharded module never generates (its forward interleaves gathers with compute, and
`generate()` on it mixes sharded and whole tensors). After every update the trainer hands
each trained model's engine a `WeightPush` (train/engines/weight_push.py) and the engine takes the
weights the way it can: in memory, or from the node's staged copy.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from duetlm.backends.base import GenerationRequest, GenerationResult
from duetlm.backends.hf import HFBackend

if TYPE_CHECKING:
    from duetlm.train.engines.weight_push import WeightPush


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a role's engine."""

    spec: str
    reads_staged_weights: bool  # takes pushed weights from the node's staged copy (another process)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    def take_weights(self, push: WeightPush) -> None:
        """After an update: sample from the trained weights from now on."""
        ...

    def sleep(self, keep_weights: bool = False) -> None:
        """Before an update: give back what memory the engine can. `keep_weights`: no push
        follows (the model is not trained), so the weights must come back by themselves."""
        ...

    def close(self) -> None: ...


class LiveEngine:
    """The hf backend over the module being trained (whole, in this process): rollouts see
    every update at once, so a push has nothing to do."""

    reads_staged_weights = False

    def __init__(self, lm: torch.nn.Module, tokenizer, spec: str, batch_tokens: int) -> None:
        self.spec = spec
        self.backend = HFBackend(
            model=lm, tokenizer=tokenizer, batch_size=1024, batch_tokens=batch_tokens, spec=spec
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return self.backend.generate(requests)

    def take_weights(self, push: WeightPush) -> None:
        return None

    def sleep(self, keep_weights: bool = False) -> None:
        return None

    def close(self) -> None:
        return None


class ReplicaEngine(LiveEngine):
    """An unsharded copy of a model trained under FSDP, in the trainer's process, that takes
    the pushed weights in memory (each process gathers them for its own copy anyway). The
    way to roll out with hf under FSDP where no vLLM runs (CPUs, tests); it costs a whole
    model per process, which vLLM costs too."""

    def __init__(self, lm: torch.nn.Module, tokenizer, spec: str, batch_tokens: int) -> None:
        replica = copy.deepcopy(lm)  # before sharding: plain tensors
        if hasattr(replica, "merge_and_unload"):  # LoRA: the copy holds merged weights, as pushed
            replica = replica.merge_and_unload()
        replica = replica.eval().requires_grad_(False)
        super().__init__(replica, tokenizer, spec, batch_tokens)
        self.tensors = dict(replica.state_dict(keep_vars=True))

    def take_weights(self, push: WeightPush) -> None:
        with torch.no_grad():
            for name, tensor in push.tensors():
                if name not in self.tensors:
                    raise KeyError(f"{self.spec}: the pushed weight {name!r} is not in the replica")
                self.tensors[name].copy_(tensor)
