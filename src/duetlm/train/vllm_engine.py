"""vLLM as the rollout engine of the M being trained (a `vllm:` capable spec; CUDA GPUs only).

The path vLLM documents for RL training, colocated on the trainer's GPU:

- the engine is built with `worker_extension_cls` naming `WeightLoader` (a class defined in
  an importable module, mixed into every vLLM worker), `enable_sleep_mode=True`, and
  `logprobs_mode="processed_logprobs"` so that the log-probs it returns are those of the
  distribution it sampled from (after temperature), comparable with the trainer's;
- after the rollouts, `LLM.sleep(level=2)` discards its weights and KV cache, giving the GPU
  memory back to the update;
- after the update, `LLM.wake_up(tags=["weights"])` reallocates the weights, the trained ones
  are written to a safetensors file in shared memory (LoRA merged in, see
  `policy.merged_state_dict`), and `LLM.collective_rpc("load_weights_from_file", args=(path,))`
  has every worker load them with its model's own `load_weights` (which maps Hugging Face
  names onto vLLM's fused layers and shards them under tensor parallelism); the prefix cache
  is reset, since it holds the old policy's keys and values;
- the next generate wakes the KV cache (`wake_up(tags=["kv_cache"])`).

Only a file path crosses the RPC boundary: no closure (vLLM's engine process refuses to
unpickle code unless `VLLM_ALLOW_INSECURE_SERIALIZATION` is set) and no CUDA IPC handle. The
price is one write and one read of the weights per step through /dev/shm (a few seconds for a
4B model, small against the rollouts). None of this can run on the project's CPU-only
machines: it is kept to this module, and everything around it is tested there.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from duetlm.backends.base import GenerationRequest, GenerationResult
from duetlm.errors import BackendError

WORKER_EXTENSION = "duetlm.train.vllm_engine.WeightLoader"


class WeightLoader:
    """Methods vLLM adds to each of its workers (`worker_extension_cls`); called by name
    through `LLM.collective_rpc`, they run inside the worker, next to its model."""

    def load_weights_from_file(self, path: str) -> int:
        from safetensors.torch import load_file

        weights = load_file(path, device=str(self.device))
        self.model_runner.model.load_weights(weights=weights.items())
        return len(weights)


def weights_file(state_dict: dict) -> Path:
    """The state dict as a safetensors file in shared memory (or the temp folder)."""
    from safetensors.torch import save_file

    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    handle, name = tempfile.mkstemp(prefix="duetlm-weights-", suffix=".safetensors", dir=folder)
    os.close(handle)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, name)
    return Path(name)


class VLLMRolloutEngine:
    """A `VLLMBackend` that sleeps during updates and takes new weights after them."""

    def __init__(
        self, location: str, *, gpu_memory_utilization: float, sleep: bool, seed: int, spec: str
    ) -> None:
        from duetlm.backends.vllm import VLLMBackend

        self.backend = VLLMBackend(
            location,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            spec=spec,
            worker_extension_cls=WORKER_EXTENSION,
            enable_sleep_mode=sleep,
            logprobs_mode="processed_logprobs",
        )
        self.spec, self.sleeps, self.asleep = spec, sleep, False
        self.tokenizer = self.backend.tokenizer

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

    def push(self, state_dict: dict) -> None:
        """After the update: the engine samples from the trained weights from now on."""
        if self.asleep:
            self.backend.llm.wake_up(tags=["weights"])
        path = weights_file(state_dict)
        try:
            loaded = self.backend.llm.collective_rpc("load_weights_from_file", args=(str(path),))
        finally:
            path.unlink(missing_ok=True)
        if not loaded or not all(loaded):
            raise BackendError(f"{self.spec}: the vLLM workers loaded no weights ({loaded})")
        self.backend.llm.reset_prefix_cache()

    def close(self) -> None:
        self.backend.close()
