"""Run folders and checkpoints: written atomically, read safely, resumed only as they were.

`last/` holds a plain Hugging Face folder per trained model and `state.pt` (optimizers, λ,
step, data position, RNG states, the config). A save is written next to `last` and swapped
in: `last` becomes `last.old`, the new folder becomes `last`, `last.old` is removed; a kill
between the two renames leaves only `last.old`, and resuming takes it. `state.pt` holds only
tensors and plain containers, so it loads with `torch.load(weights_only=True)`: a run folder
from elsewhere cannot run code. A resumed run must have the config it was saved with, except
for settings that only say how long to run, how often to log, or how to use memory.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from duetlm.errors import ConfigError

logger = logging.getLogger(__name__)

STATE = "state.pt"
RESUMABLE = frozenset(
    {
        "steps",
        "out",
        "eval_every",
        "eval_questions",
        "save_every",
        "keep_checkpoints",
        "tensorboard",
        "wandb",
        "device",
        "micro_batch",
        "logprob_chunk",
        "rollout_batch_tokens",
        "gradient_checkpointing",
        "check_rollout_logprobs",
        "vllm_gpu_memory_utilization",
        "vllm_sleep",
    }
)
"""Settings a resumed run may change: none of them changes what a step computes."""


def find_checkpoint(out: Path) -> Path | None:
    """The checkpoint to resume from: `last`, or `last.old` left by a kill mid-swap."""
    last = out / "last"
    if (last / STATE).is_file():
        return last
    old = out / "last.old"
    if (old / STATE).is_file():
        logger.warning("%s: resuming from last.old (a save was interrupted between its renames)", out)
        return old
    return None


def save_checkpoint(out: Path, write_models: Callable[[Path], None], state: dict) -> Path:
    """Write models and state into a staging folder, then swap it in as `last`."""
    last, staging, old = out / "last", out / "last.tmp", out / "last.old"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_models(staging)
    torch.save(state, staging / STATE)
    if last.exists():
        shutil.rmtree(old, ignore_errors=True)
        last.rename(old)
    staging.rename(last)
    shutil.rmtree(old, ignore_errors=True)
    return last


def load_state(checkpoint: Path) -> dict:
    try:
        return torch.load(checkpoint / STATE, weights_only=True)
    except Exception as exc:  # a pickle that needs code to load, or a damaged file
        raise ConfigError(
            f"{checkpoint / STATE} does not load as plain tensors and containers ({exc}); "
            "it was not written by this version of duetlm, or it is damaged"
        ) from exc


def config_changes(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every setting that differs and matters."""
    keys = sorted((set(saved) | set(current)) - RESUMABLE)
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def check_resumable(state: dict, current: dict, checkpoint: Path) -> None:
    changes = config_changes(state.get("config", {}), current)
    if changes:
        raise ConfigError(
            f"{checkpoint} was trained with another configuration ({'; '.join(changes)}); resume with the "
            "saved settings (only steps, logging, evaluation and memory settings may change), or start a "
            "new run in another folder"
        )


def claim_run_folder(out: Path, force: bool) -> None:
    """A new run needs a folder without another run's results: refuse, or with `force` move
    the old run aside (`OUT.YYYYmmdd-HHMMSS`), never overwrite it."""
    taken = [p.name for p in (out / "metrics.jsonl", out / "last", out / "last.old") if p.exists()]
    if not taken:
        return
    if not force:
        raise ConfigError(
            f"{out} already holds a run ({', '.join(taken)}): continue it with --resume, use another "
            "--out, or --force to move it aside and start over"
        )
    aside = out.with_name(f"{out.name}.{time.strftime('%Y%m%d-%H%M%S')}")
    out.rename(aside)
    logger.warning("moved the previous run in %s to %s", out, aside)
