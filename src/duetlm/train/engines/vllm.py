"""vLLM as the rollout engine of a model being trained (a `vllm:` spec for M or m), colocated
with the trainer: one engine per process, on the process's GPU, or on the CPU with vLLM's
CPU build.

- The engine is built with `worker_extension_cls` naming `WeightLoader` (a class in an
  importable module, mixed into every vLLM worker) and `logprobs_mode="processed_logprobs"`,
  so that the log-probs it returns are those of the distribution it sampled from (after
  temperature), comparable with the trainer's. Its dtype is the trainer's compute dtype
  (bf16 under `bf16-mixed`, else fp32), so both score the same numbers.
- With `vllm_sleep`, each engine sleeps during the update at the level its weights allow: an
  engine whose model is trained sleeps at level 2 (weights and KV cache discarded: the push
  brings the new weights), one whose model is not (m with `light.train = false`) at level 1
  (weights kept in host memory and brought back on waking), so that no engine ever samples
  from freed weights. vLLM has no sleep mode on a CPU: there the engine says so once and keeps
  its memory; `DUETLM_EMULATE_SLEEP=1` makes a CPU engine act as a GPU's would (level 2 really
  zeroes its weights through the same reload a push uses; level 1 zeroes them and reloads the
  model's own on waking), so the CPU tests see what a GPU does.
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

    def emulate_discard(self, location: str) -> int:
        """A GPU's level-2 sleep on a CPU: the weights zeroed through the layerwise reload (what
        a lost weight reads as), the model folder at `location` giving the names and shapes."""
        from duetlm.train.engines.weight_push import folder_weights

        count = 0

        def zeros():
            nonlocal count
            for name, tensor in folder_weights(location):
                count += 1
                yield name, torch.zeros_like(tensor)

        self.reload_weights(weights_iterator=zeros())
        refresh_tied_output_layer(self.model_runner.model)
        return count

    def emulate_restore(self, location: str) -> int:
        """A GPU's wake from level 1 on a CPU: the model's own weights back from its folder."""
        from duetlm.train.engines.weight_push import folder_weights

        self.reload_weights(weights_iterator=folder_weights(location))
        refresh_tied_output_layer(self.model_runner.model)
        return 1

    def watch_trainer(self, trainer_pid: int) -> bool:
        """End this engine once the trainer that started it is gone, in whichever process
        layout vLLM chose (`watch`): a trainer killed outright (`kill -9`, the OOM killer,
        torchrun's launcher dying) cannot shut its engine down, and an engine left behind holds
        its memory. False when the worker runs in the trainer's own process."""
        from duetlm.train.engines.watch import watch_owner

        return watch_owner(trainer_pid)


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

        self.location = location
        self.emulated = sleep and on_cpu() and os.environ.get("DUETLM_EMULATE_SLEEP") == "1"
        if sleep and on_cpu() and not self.emulated:
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
                enable_sleep_mode=sleep and not self.emulated,
                logprobs_mode="processed_logprobs",
            )
        self.spec, self.sleeps = spec, sleep
        self.asleep = 0  # the level it sleeps at (0: awake)
        self.weights_lost = False  # slept at level 2 and given no weights since
        self.tokenizer = self.backend.tokenizer
        if os.path.isdir("/proc"):  # Linux: the workers watch for this process's death
            self.backend.llm.collective_rpc("watch_trainer", args=(os.getpid(),))
        self.dtype = self.backend.llm.llm_engine.model_config.dtype  # a torch.dtype

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if self.weights_lost:
            raise BackendError(
                f"{self.spec}: the engine slept at level 2, which discards its weights, and was given none "
                "since; an engine whose model is not trained sleeps at level 1"
            )
        self.wake()
        return self.backend.generate(requests)

    def wake(self) -> None:
        """Weights (after level 1) and KV cache back; after level 2 the weights came with the push."""
        if not self.asleep:
            return
        if self.emulated:
            if self.asleep == 1:
                self.backend.llm.collective_rpc("emulate_restore", args=(self.location,))
        else:
            self.backend.llm.wake_up(tags=None if self.asleep == 1 else ["kv_cache"])
        self.asleep = 0

    def sleep(self, keep_weights: bool = False) -> None:
        """Before the update: give the device memory back. `keep_weights` (a model that gets no
        push after the update) sleeps at level 1, its weights kept in host memory; else level 2,
        its weights discarded until the push."""
        if not self.sleeps or self.asleep:
            return
        level = 1 if keep_weights else 2
        if self.emulated:
            self.backend.llm.collective_rpc("emulate_discard", args=(self.location,))
        else:
            self.backend.llm.sleep(level=level)
        self.asleep, self.weights_lost = level, level == 2

    def take_weights(self, push: WeightPush) -> None:
        """After the update: the engine samples from the trained weights from now on."""
        if self.asleep == 2 and not self.emulated:
            self.backend.llm.wake_up(tags=["weights"])  # room for the new weights; the KV cache wakes later
        with push.staged(self.dtype) as folder:
            loaded = self.backend.llm.collective_rpc("load_weights_from_folder", args=(str(folder),))
        if not loaded or not all(loaded):
            raise BackendError(f"{self.spec}: the vLLM workers loaded no weights ({loaded})")
        self.weights_lost = False
        if self.emulated and self.asleep == 2:
            self.asleep = 0  # the emulation has nothing else to wake
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
