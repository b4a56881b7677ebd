"""Loading a transformers model: where it lives, on which device, in which dtype, and the
pieces every engine over it needs (tokenizer, configs, end-of-sequence ids). Shared by the
backend and the engine process, which loads its own copy of the weights."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from duetlm.errors import BackendError

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_location(path_or_id: str) -> tuple[str, bool]:
    """(location, is_local). Local folders become absolute paths: transformers treats a
    relative path that does not exist as a hub id and stalls on network retries."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BackendError(f"model path {path} is a file; expected a Hugging Face model folder")
        return str(path.resolve()), True
    looks_like_path = path_or_id.startswith(("/", ".", "~")) or path_or_id.count("/") > 1
    if looks_like_path or not _HUB_ID.match(path_or_id):
        raise BackendError(
            f"model path {path_or_id!r} does not exist (and is not a hub id like 'Qwen/Qwen3-0.6B')"
        )
    return path_or_id, False


def pick_device(device: str) -> torch.device:
    """The device to load on; one that this machine or torch build lacks is a clear error,
    not a traceback from deep inside the first tensor copy."""
    if device != "auto":
        try:
            chosen = torch.device(device)
        except RuntimeError:
            raise BackendError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
        if chosen.type == "cuda" and not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise BackendError(
                f"--device {device}: no CUDA GPU is usable (torch {torch.__version__}, {build}); "
                "use --device cpu, or install a CUDA build of torch on a GPU machine"
            )
        if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise BackendError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        if chosen.type == "mps" and not (torch.backends.mps.is_available()):
            raise BackendError(f"--device {device}: MPS (Apple GPU) is not available here; use --device cpu")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str, device: torch.device, stored: torch.dtype | None = None) -> torch.dtype:
    """The dtype to compute in. `auto`: bf16 (else fp16) on a GPU; fp16 on MPS; on a CPU, bf16
    for a model stored in bf16 when the CPU computes bf16 natively (AVX512-BF16 or AMX: about
    twice as fast as fp32 for a 1.5B model at batch 1 there), else fp32 (a model stored in fp32,
    like the embedded pair, keeps its precision)."""
    if dtype != "auto":
        try:
            chosen = getattr(torch, dtype)
        except AttributeError:
            chosen = None
        if not isinstance(chosen, torch.dtype):
            raise BackendError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        return chosen
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    if stored == torch.bfloat16 and cpu_computes_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic of its own (x86 AVX512-BF16 or AMX-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def stored_dtype(config) -> torch.dtype | None:
    """The dtype a checkpoint's config says its weights are stored in."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def load_tokenizer(location: str, local: bool, trust_remote_code: bool):
    """The tokenizer, set up for batched generation: left padding, a pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            location, local_files_only=local, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise BackendError(f"could not load model {location!r}: {exc}") from exc
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_configs(location: str, local: bool, trust_remote_code: bool):
    """The model's config and generation config, without its weights."""
    from transformers import AutoConfig, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(
            location, local_files_only=local, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise BackendError(f"could not load model {location!r}: {exc}") from exc
    # a folder without the file gets what from_pretrained derives; a file there must parse
    optional = not local or not Path(location, "generation_config.json").is_file()
    try:
        generation_config = GenerationConfig.from_pretrained(location, local_files_only=local)
    except OSError as exc:
        if not optional:
            raise BackendError(f"could not load model {location!r}: {exc}") from exc
        generation_config = GenerationConfig.from_model_config(config)
    except ValueError as exc:
        raise BackendError(f"could not load model {location!r}: {exc}") from exc
    return config, generation_config


def load_weights(location: str, local: bool, dtype: str, device: torch.device, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    config, _ = load_configs(location, local, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location,
            local_files_only=local,
            dtype=pick_dtype(dtype, device, stored_dtype(config)),
            trust_remote_code=trust_remote_code,
        )
    except Exception as exc:  # a corrupt weights file raises the safetensors library's own error
        raise BackendError(f"could not load model {location!r}: {type(exc).__name__}: {exc}") from exc
    model.to(device).eval()
    logger.info("loaded %s on %s (%s)", location, device, model.dtype)
    return model


def eos_ids(generation_config, tokenizer, spec: str) -> list[int]:
    """Every id that ends a turn: the generation config's and the tokenizer's own."""
    ids = generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise BackendError(f"{spec}: the model and tokenizer define no EOS token")
    return ids


def end_ids(eos: list[int], tokenizer) -> list[int]:
    """The ids after which a row of a batch is done: EOS, and the padding it is filled with."""
    return sorted({*eos, tokenizer.pad_token_id})
