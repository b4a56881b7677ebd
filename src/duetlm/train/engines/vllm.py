"""vLLM as the rollout engine of a model being trained (a `vllm:` spec for M or m), colocated
with the trainer: one engine per process, on the process's GPU, or on the CPU with vLLM's
CPU build.

- The engine is built with `worker_extension_cls` naming `WeightLoader` (a class in an
  importable module, mixed into every vLLM worker) and `logprobs_mode="processed_logprobs"`,
  so that the log-probs it returns are those of the distribution it sampled from (after
  temperature), comparable with the trainer's. Its dtype is the trainer's compute dtype
  (bf16 under `bf16-mixed`, else fp32), so both score the same numbers.
- With `vllm_sleep`, `LLM.sleep(level=2)` discards its weights and KV cache before the update,
  giving the GPU memory back to it, and `wake_up` brings them back. vLLM has no sleep mode on
  a CPU: there the engine says so once and keeps its memory.
- After the update the trained weights (LoRA merged in) arrive as the node's staged copy
  (`weight_push`: written once per node, in the engine's dtype, in bounded buckets); each
  worker reads it file by file and reloads its model in place with `Worker.reload_weights`.
  That is vLLM's layerwise reload, the same one its weight-transfer engines
  (`init_weight_transfer_engine`, `update_weights`) run after receiving tensors: it maps
  Hugging Face names onto vLLM's fused and sharded layers and redoes the kernels' repacking
  (a plain `model.load_weights` fails once the CPU kernels have repacked a layer). Those
  engines move tensors by NCCL or CUDA IPC, which a CPU has not; a staged copy works on both.
  With tied embeddings the reload leaves the output layer on the old weights;
  `refresh_tied_output_layer` brings it to the new ones. The prefix cache is reset, since it
  holds the old policy's keys and values.
- On a machine with several GPUs, each trainer process's engine is started with
  CUDA_VISIBLE_DEVICES naming that process's GPU only, so that vLLM's engine process (which
  takes the first device it sees) lands beside its trainer and not on GPU 0.

Only a folder path crosses the RPC boundary: no closure (vLLM's engine process refuses to
unpickle code unless `VLLM_ALLOW_INSECURE_SERIALIZATION` is set).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from duetlm.backends.base import GenerationRequest, GenerationResult
from duetlm.backends.vllm.start import VLLMSettings, on_cpu
from duetlm.errors import BackendError

if TYPE_CHECKING:
    from duetlm.train.engines.weight_push import WeightPush

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "duetlm.train.engines.vllm.WeightLoader"


class WeightLoader:
    """Methods vLLM adds to each of its workers (`worker_extension_cls`); called by name
    through `LLM.collective_rpc`, they run inside the worker, next to its model."""

    def load_weights_from_folder(self, folder: str) -> int:
        from duetlm.train.engines.weight_push import staged_weights

        count = 0

        def counted():
            nonlocal count
            for item in staged_weights(folder, device=str(self.device)):
                count += 1
                yield item

        self.reload_weights(weights_iterator=counted())
        refresh_tied_output_layer(self.model_runner.model)
        return count

    def watch_trainer(self, trainer_pid: int) -> bool:
        """End this engine (its engine process and this worker) once the trainer that started
        it is gone. A trainer killed outright (`kill -9`, the OOM killer, torchrun's launcher
        dying) cannot shut its engine down, and an engine left behind holds its memory."""
        import threading

        engine_process = os.getppid()
        threading.Thread(target=_watch, args=(engine_process, trainer_pid), daemon=True).start()
        return True


def _watch(engine_process: int, trainer_pid: int) -> None:
    import signal
    import time

    while True:
        time.sleep(1.0)
        if _parent_of(engine_process) != trainer_pid:  # the trainer died: its engine was orphaned
            with contextlib.suppress(ProcessLookupError):
                os.kill(engine_process, signal.SIGKILL)
            os._exit(1)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


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


class VLLMRolloutEngine:
    """A `VLLMBackend` that sleeps during updates (on a GPU) and takes the staged weights
    after them (`RolloutEngine`)."""

    reads_staged_weights = True

    def __init__(
        self,
        location: str,
        *,
        settings: VLLMSettings,
        sleep: bool,
        spec: str,
        device: torch.device | None = None,
    ) -> None:
        from duetlm.backends.vllm.offline import VLLMBackend

        if sleep and on_cpu():
            logger.warning(
                "%s: vllm_sleep is off: vLLM has no sleep mode on a CPU, so the engine keeps its memory "
                "during updates",
                spec,
            )
            sleep = False
        with only_device(device):
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
        if os.path.isdir("/proc"):  # Linux: the workers watch for this process's death
            self.backend.llm.collective_rpc("watch_trainer", args=(os.getpid(),))
        self.dtype = self.backend.llm.llm_engine.model_config.dtype  # a torch.dtype

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if self.asleep:
            self.backend.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        return self.backend.generate(requests)

    def sleep(self) -> None:
        """Before the update: give the GPU memory of weights and KV cache back."""
        if self.sleeps and not self.asleep:
            self.backend.llm.sleep(level=2)
            self.asleep = True

    def take_weights(self, push: WeightPush) -> None:
        """After the update: the engine samples from the trained weights from now on."""
        if self.asleep:
            self.backend.llm.wake_up(tags=["weights"])
        with push.staged(self.dtype) as folder:
            loaded = self.backend.llm.collective_rpc("load_weights_from_folder", args=(str(folder),))
        if not loaded or not all(loaded):
            raise BackendError(f"{self.spec}: the vLLM workers loaded no weights ({loaded})")
        self.backend.llm.reset_prefix_cache()

    def close(self) -> None:
        self.backend.close()


@contextlib.contextmanager
def only_device(device: torch.device | None):
    """CUDA_VISIBLE_DEVICES naming `device` alone while a vLLM engine starts (its engine
    process inherits the environment and takes the first visible device)."""
    if device is None or device.type != "cuda" or device.index is None:
        yield
        return
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = saved.split(",") if saved else [str(i) for i in range(torch.cuda.device_count())]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[device.index]
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
