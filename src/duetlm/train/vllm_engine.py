"""vLLM as the rollout engine of the M being trained (a `vllm:` capable spec), colocated with
the trainer on its GPU, or on the CPU with vLLM's CPU build.

- The engine is built with `worker_extension_cls` naming `WeightLoader` (a class in an
  importable module, mixed into every vLLM worker) and `logprobs_mode="processed_logprobs"`,
  so that the log-probs it returns are those of the distribution it sampled from (after
  temperature), comparable with the trainer's. Its dtype is the trainer's compute dtype
  (bf16 under `bf16-mixed`, else fp32), so both score the same numbers.
- With `vllm_sleep`, `LLM.sleep(level=2)` discards its weights and KV cache after the
  rollouts, giving the GPU memory back to the update, and `wake_up` brings them back. vLLM has
  no sleep mode on a CPU: there the engine says so once and keeps its memory.
- After the update the trained weights (LoRA merged in, `policy.merged_state_dict`) are cast
  to the engine's dtype and written to one safetensors file in shared memory; each worker
  reads it and reloads its model in place with `Worker.reload_weights`. That is vLLM's
  layerwise reload, the same one its weight-transfer engines (`init_weight_transfer_engine`,
  `update_weights`) run after receiving tensors: it maps Hugging Face names onto vLLM's fused
  and sharded layers and redoes the kernels' repacking (a plain `model.load_weights` fails
  once the CPU kernels have repacked a layer). Those engines move tensors by NCCL or CUDA IPC,
  which a CPU has not; a file works on both, for a copy through /dev/shm per step (a few
  seconds for a 4B model, small against the rollouts). With tied embeddings the reload leaves
  the output layer on the old weights; `refresh_tied_output_layer` brings it to the new ones. The prefix cache is
  reset, since it holds the old policy's keys and values.

Only a file path crosses the RPC boundary: no closure (vLLM's engine process refuses to
unpickle code unless `VLLM_ALLOW_INSECURE_SERIALIZATION` is set).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from duetlm.backends.base import GenerationRequest, GenerationResult
from duetlm.backends.vllm_start import VLLMSettings, on_cpu
from duetlm.errors import BackendError

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "duetlm.train.vllm_engine.WeightLoader"


class WeightLoader:
    """Methods vLLM adds to each of its workers (`worker_extension_cls`); called by name
    through `LLM.collective_rpc`, they run inside the worker, next to its model."""

    def load_weights_from_file(self, path: str) -> int:
        from safetensors.torch import load_file

        weights = load_file(path, device=str(self.device))
        self.reload_weights(weights_iterator=iter(weights.items()))
        refresh_tied_output_layer(self.model_runner.model)
        return len(weights)


def refresh_tied_output_layer(model: torch.nn.Module) -> None:
    """With tied embeddings the checkpoint has no output layer (vLLM's loader skips `lm_head.`),
    so the layerwise reload counts that layer as not loaded and puts its old kernel tensors
    back: on a CPU, where the output layer keeps a repacked copy of the embedding for its
    matrix product, the model would read its input with the new embedding and score its
    output with the old one. The layer is tied to the embedding again and its kernel copy
    redone from the new weights (a no-op on a GPU, which multiplies by the weight itself)."""
    config = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)  # vLLM's decoder layout
    if not getattr(config, "tie_word_embeddings", False) or head is None or embed is None:
        return
    if getattr(head, "weight", None) is not embed.weight:
        head.weight = embed.weight
    method = getattr(head, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(head)


def weights_file(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> Path:
    """The state dict as a safetensors file in shared memory (or the temp folder), in `dtype`.

    Tensors that share storage (tied embeddings: `lm_head.weight` is `embed_tokens.weight`)
    are written once, under the first name: safetensors refuses aliases, and a model with tied
    embeddings loads the output layer from the embedding."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous().cpu()
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    handle, name = tempfile.mkstemp(prefix="duetlm-weights-", suffix=".safetensors", dir=folder)
    os.close(handle)
    save_file(tensors, name)
    return Path(name)


class VLLMRolloutEngine:
    """A `VLLMBackend` that sleeps during updates (on a GPU) and takes new weights after them."""

    def __init__(
        self,
        location: str,
        *,
        settings: VLLMSettings,
        sleep: bool,
        spec: str,
    ) -> None:
        from duetlm.backends.vllm import VLLMBackend

        if sleep and on_cpu():
            logger.warning(
                "%s: vllm_sleep is off: vLLM has no sleep mode on a CPU, so the engine keeps its memory "
                "during updates",
                spec,
            )
            sleep = False
        self.backend = VLLMBackend(
            location,
            settings=settings,
            spec=spec,
            worker_extension_cls=WORKER_EXTENSION,
            enable_sleep_mode=sleep,
            logprobs_mode="processed_logprobs",
        )
        self.spec, self.sleeps, self.asleep = spec, sleep, False
        self.tokenizer = self.backend.tokenizer
        self.dtype = self.backend.llm.llm_engine.model_config.dtype  # a torch.dtype

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if self.asleep:
            self.backend.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        return self.backend.generate(requests)

    def release(self) -> None:
        """Before the update: give the GPU memory of weights and KV cache back."""
        if self.sleeps and not self.asleep:
            self.backend.llm.sleep(level=2)
            self.asleep = True

    def push(self, state_dict: dict[str, torch.Tensor]) -> None:
        """After the update: the engine samples from the trained weights from now on."""
        if self.asleep:
            self.backend.llm.wake_up(tags=["weights"])
        path = weights_file(state_dict, self.dtype)
        try:
            loaded = self.backend.llm.collective_rpc("load_weights_from_file", args=(str(path),))
        finally:
            path.unlink(missing_ok=True)
        if not loaded or not all(loaded):
            raise BackendError(f"{self.spec}: the vLLM workers loaded no weights ({loaded})")
        self.backend.llm.reset_prefix_cache()

    def close(self) -> None:
        self.backend.close()
