"""Starting a vLLM engine: the settings that differ between a GPU and a CPU, and a failed start
as one line.

Shared by the offline backend (`vllm`), the async one (`vllm_async`) and the trainer's rollout
engine (`train.vllm_engine`), so that all three start alike. vLLM runs on CUDA GPUs and, with
its CPU build (`scripts/install-vllm-cpu.sh`), on x86-64 CPUs; two of its settings mean
different things there:

- `gpu_memory_utilization` is, on the CPU platform, the share of the *CPU* memory of vLLM's
  NUMA node that it reserves for weights, activations and KV cache. A GPU's 0.85 asks for most
  of the machine and fails as soon as anything else holds memory (a second engine, the
  trainer). Left unset (`None`), duetlm gives vLLM an explicit KV cache instead
  (`kv_cache_memory_bytes`: 2 GiB, at most a quarter of the node's free memory), which starts
  beside other processes; on a GPU unset means 0.85 for the first engine of the process and
  0.9 of what is still free for the next one (M and m both on vLLM share the device).
- `dtype`: vLLM's `auto` takes bf16 on a CPU even where the CPU has no bf16 arithmetic and
  emulates it; unset (`auto`) here means bf16 on a CPU with AVX-512 BF16 or AMX, else fp32
  (which is also what the hf backend computes on a CPU). On a GPU it is vLLM's `auto`.
- `enforce_eager`: on a GPU vLLM captures CUDA graphs (worth the start-up time); on a CPU it
  would compile the model with torch.compile, minutes per start for seconds of decoding on
  the small models a CPU serves, so unset means eager there.

vLLM starts its engine core in a new process, and on the CPU platform always by `spawn`, which
re-imports the `__main__` script: a script that builds a backend at top level, without the
`if __name__ == "__main__":` guard, makes the child build one too. `start` refuses that before
anything is spawned, and any other failed start comes back as one `BackendError` line that
names `--gpu-memory-utilization` (vLLM's own traceback, from its engine process, is in the log
above it).
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from duetlm.errors import BackendError, ConfigError

logger = logging.getLogger(__name__)

GiB = 2**30
CPU_KV_CACHE_BYTES = 2 * GiB  # the CPU default's KV cache, before the quarter-of-free-memory cap
GPU_UTILIZATION = 0.85  # the first engine of a process on a GPU
_started_on_gpu = 0  # engines this process started on a GPU (the next ones share what is free)

T = TypeVar("T")


@dataclass(frozen=True)
class VLLMSettings:
    """How a vLLM engine is started; None means the platform's default (see the module)."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    dtype: str = "auto"  # see the module: vLLM's own on a GPU; bf16 or fp32 by the CPU's arithmetic
    max_model_len: int | None = None
    enforce_eager: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        share = self.gpu_memory_utilization
        if share is not None and not 0 < share <= 1:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {share}")


MIN_VLLM = (0, 32)
"""The oldest vLLM with every API duetlm calls: `logprobs_mode="processed_logprobs"` (the
log-probs of the distribution sampled from, which the rollout correction compares) and
`Worker.reload_weights(weights_iterator=...)` (the weight push's layerwise reload)."""


def require_vllm():
    """The vllm module, or the error that says how to get it (or a newer one)."""
    try:
        import vllm
    except ImportError as exc:
        raise BackendError(
            "the vllm backend needs the vllm package: pip install -r requirements-gpu.txt -e '.[vllm]' on a "
            "CUDA machine (docs/vllm.md), scripts/install-vllm-cpu.sh VENV on an x86-64 CPU machine"
        ) from exc
    found = version_tuple(getattr(vllm, "__version__", "0"))
    if found < MIN_VLLM:
        raise BackendError(
            f"vLLM {vllm.__version__} is installed; duetlm needs vLLM {'.'.join(map(str, MIN_VLLM))} or newer "
            "(logprobs_mode='processed_logprobs', Worker.reload_weights(weights_iterator=...)): "
            "pip install -r requirements-gpu.txt (docs/vllm.md)"
        )
    return vllm


def version_tuple(text: str) -> tuple[int, ...]:
    """`0.32.0`, `0.32.0+cpu`, `0.10.1.1` as numbers, the leading ones that parse."""
    numbers = []
    for part in text.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits or digits != part:
            break
        numbers.append(int(digits))
    return tuple(numbers)


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_arguments(location: str, settings: VLLMSettings, spec: str) -> dict:
    """Keyword arguments for `vllm.LLM` / `vllm.AsyncEngineArgs`, platform defaults filled in."""
    args: dict = {
        "model": location,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "dtype": settings.dtype,
        "max_model_len": settings.max_model_len,
        "seed": settings.seed,
        "enable_prefix_caching": True,  # M's and m's prompts share their question
    }
    if on_cpu():
        check_cpu_model(location, spec)
        if settings.dtype == "auto":
            args["dtype"] = "bfloat16" if cpu_has_bf16() else "float32"
        args["enforce_eager"] = True if settings.enforce_eager is None else settings.enforce_eager
        # A prefill split over scheduler steps throws its sampled token away and rewinds the
        # request's generator, which a CPU generator cannot do: any seeded request (every
        # training rollout) whose batch overflows a step would kill the engine. Whole prefills
        # only (vLLM then raises the step's token budget to the model's context).
        args["enable_chunked_prefill"] = False
        if settings.gpu_memory_utilization is None:
            args["kv_cache_memory_bytes"] = cpu_kv_cache_bytes()
        else:
            check_cpu_share(settings.gpu_memory_utilization, spec)
            args["gpu_memory_utilization"] = settings.gpu_memory_utilization
    else:
        args["gpu_memory_utilization"] = settings.gpu_memory_utilization or gpu_share()
        if settings.enforce_eager is not None:
            args["enforce_eager"] = settings.enforce_eager
    return args


def start(spec: str, build: Callable[[], T], settings: VLLMSettings) -> T:
    """`build()` (which constructs the engine), with a failed start as one clear line."""
    global _started_on_gpu
    if _inside_spawned_child() or (_spawns() and _main_script_unguarded()):
        raise BackendError(unguarded_script_message(spec))
    try:
        engine = build()
    except (BackendError, ConfigError):  # already one line
        raise
    except Exception as exc:
        raise BackendError(start_failure(spec, exc, settings)) from exc
    if not on_cpu():
        _started_on_gpu += 1
    return engine


def start_failure(spec: str, exc: BaseException, settings: VLLMSettings) -> str:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if "bootstrapping phase" in reason or _main_script_unguarded():
        return unguarded_script_message(spec)
    share = settings.gpu_memory_utilization
    if on_cpu():
        now = "auto: a 2 GiB KV cache" if share is None else f"now {share}"
        hint = (
            "on a CPU, --gpu-memory-utilization is the share of the CPU memory vLLM reserves "
            f"({now}); set it lower, or leave it unset"
        )
    else:
        hint = f"--gpu-memory-utilization is the share of GPU memory vLLM reserves (now {share or 'auto'})"
    return f"{spec}: vLLM could not start ({reason[:300]}); {hint}. vLLM's own log above says why"


def unguarded_script_message(spec: str) -> str:
    return (
        f"{spec}: vLLM starts its engine in a new process that re-imports your script; build "
        'backends under `if __name__ == "__main__":` in a script that uses vllm: specs'
    )


def check_cpu_model(location: str, spec: str) -> None:
    """Refuse a model whose head size vLLM's CPU attention has no kernel for, before starting
    (else the engine dies at the first request with a worker traceback)."""
    import json

    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
    except (ImportError, AttributeError):  # another vLLM version: let vLLM decide
        return
    config_file = Path(location) / "config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    config = config.get("text_config", config)
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (config["hidden_size"] // heads if heads else None)
    if head_dim is not None and head_dim not in supported:
        raise BackendError(
            f"{spec}: vLLM's CPU attention has kernels for head sizes {', '.join(map(str, supported))}; "
            f"this model's is {head_dim}. Run it with hf: instead"
        )


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX): vLLM's fast CPU path.
    Without it bf16 is emulated, slower than fp32 (on a 2-core AVX2 machine, 164 against 1,195
    tokens/s at 32 rows of the Qwen3 test bed, bench/vllm_vs_hf.py)."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def cpu_kv_cache_bytes() -> int:
    """The CPU default's KV cache: 2 GiB, at most a quarter of the free memory of the node
    vLLM binds to (the check vLLM makes against an explicit size)."""
    free = _cpu_node_memory()[1]
    return int(min(CPU_KV_CACHE_BYTES, free // 4)) if free else CPU_KV_CACHE_BYTES


def check_cpu_share(share: float, spec: str) -> None:
    """vLLM's own start check on a CPU (its share of the node's memory must be free), made
    here so that it fails as one line and not in the engine process."""
    total, free = _cpu_node_memory()
    if total and free and share * total > free:
        raise BackendError(
            f"{spec}: --gpu-memory-utilization {share} asks vLLM to reserve {share * total / GiB:.1f} GiB "
            f"of CPU memory, and {free / GiB:.1f} GiB is free on its memory node (on a CPU the option "
            "is the share of CPU memory): set it lower, or leave it unset for a 2 GiB KV cache"
        )


def _cpu_node_memory() -> tuple[int, int]:
    """(total, available) bytes of the memory node vLLM's CPU worker binds to; (0, 0) when
    this vLLM does not say."""
    try:
        from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

        info = get_memory_node_info(get_allowed_cpu_list()[0].numa_node)
        return int(info.total_memory), int(info.available_memory)
    except Exception:  # another vLLM version or an unusual host: vLLM checks at start
        return 0, 0


def gpu_share() -> float:
    """0.85 of the device for the process's first engine; 0.9 of what is then free for the
    next (vLLM refuses a share larger than the free memory)."""
    if _started_on_gpu == 0:
        return GPU_UTILIZATION
    import torch

    free, total = torch.cuda.mem_get_info()
    return round(max(0.9 * free / total, 0.01), 3)


def _spawns() -> bool:
    """Whether vLLM will start its engine by `spawn` (always on a CPU; on a GPU when asked)."""
    import os

    return on_cpu() or os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") == "spawn"


def _inside_spawned_child() -> bool:
    """True while a spawned child re-imports the parent's script (`__mp_main__`)."""
    main = sys.modules.get("__main__")
    return multiprocessing.parent_process() is not None and getattr(main, "__name__", "") == "__mp_main__"


def _main_script_unguarded() -> bool:
    """The running script (if any) builds things at top level without the main guard."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or getattr(main, "__spec__", None) is not None:  # -c, the REPL, -m
        return False
    try:
        source = Path(path).read_text()
    except OSError:
        return False
    return "__main__" not in source
