"""Run folders and checkpoints: written atomically, read safely, resumed only as they were.

A checkpoint (`last/`) holds `state.pt` (λ, step, data position, every process's RNG states,
the config) and the models and optimizers in one of two formats (`[checkpoint] format`):

- `whole`: a plain Hugging Face folder per trained model and the whole optimizer states in
  `state.pt` (`torch.distributed.checkpoint`'s state-dict helpers gather them under FSDP onto
  the main process and give each process its shard back on resume);
- `sharded`: `shards/`, written by `torch.distributed.checkpoint` itself: each process writes
  its own shards of every trained model's weights and optimizer state (and of a reference that
  a warm start moved) and reads them back, so no process ever holds a whole model; `duet
  export` turns it into release folders.

Either resumes under another strategy or process count. Every process must see the run
folder (several nodes: a shared filesystem); a process that does not is an error that says
so, at the save and at the resume. With `keep` > 1 the checkpoint that `last` replaces is
kept as `step-NNNNNN/`, the oldest beyond `keep` removed. A save is written next to `last` and swapped
in: `last` becomes `last.old`, the new folder becomes `last`, `last.old` is removed; a kill
between the two renames leaves only `last.old`, and resuming takes it. `state.pt` holds only
tensors and plain containers, so it loads with `torch.load(weights_only=True)`: a run folder
from elsewhere cannot run code. A resumed run must have the config it was saved with, except
for the knobs marked resumable (how long to run, how often to log, how to use memory and
processes).
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
SHARDS = "shards"


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


def save_checkpoint(out: Path, write_models: Callable[[Path], None], state: dict, keep: int = 1) -> Path:
    """Write models and state into a staging folder, then swap it in as `last`."""
    staging = out / "last.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_models(staging)
    return commit_checkpoint(out, state, keep)


def commit_checkpoint(out: Path, state: dict, keep: int = 1) -> Path:
    """`state.pt` into the staging folder (`last.tmp`, its models written), then the swap: the
    old `last` goes (or, with `keep` > 1, stays as `step-NNNNNN`), the staging folder becomes it."""
    last, staging, old = out / "last", out / "last.tmp", out / "last.old"
    torch.save(state, staging / STATE)
    if last.exists():
        shutil.rmtree(old, ignore_errors=True)
        last.rename(old)
    staging.rename(last)
    if old.exists():
        kept = keep > 1 and (old / STATE).is_file()
        if kept:
            step = int(torch.load(old / STATE, weights_only=True)["step"])
            old.rename(out / f"step-{step:06d}")
        else:
            shutil.rmtree(old, ignore_errors=True)
    for stale in sorted(out.glob("step-*"))[: max(len(list(out.glob("step-*"))) - (keep - 1), 0)]:
        shutil.rmtree(stale, ignore_errors=True)
    return last


def load_state(checkpoint: Path) -> dict:
    try:
        return torch.load(checkpoint / STATE, weights_only=True)
    except Exception as exc:  # a pickle that needs code to load, or a damaged file
        raise ConfigError(
            f"{checkpoint / STATE} does not load as plain tensors and containers ({exc}); "
            "it was not written by this version of duetlm, or it is damaged"
        ) from exc


def flat_settings(config: dict) -> dict:
    """A config dump keyed by dotted paths down to each section's knobs (`objective.kl_beta`)."""
    from duetlm.train.config import SECTIONS

    flat = {}
    for key, value in config.items():
        if key in SECTIONS and isinstance(value, dict):
            flat |= {f"{key}.{name}": inner for name, inner in value.items()}
        else:
            flat[key] = value
    return flat


def config_changes(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every setting that differs and matters (knobs marked
    resumable in the config may differ)."""
    from duetlm.train.config import resumable_paths

    saved, current = flat_settings(saved), flat_settings(current)
    keys = sorted((set(saved) | set(current)) - resumable_paths())
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def check_resumable(state: dict, current: dict, checkpoint: Path) -> None:
    changes = config_changes(state.get("config", {}), current)
    if changes:
        raise ConfigError(
            f"{checkpoint} was trained with another configuration ({'; '.join(changes)}); resume with the "
            "saved settings (only the knobs whose help says 'May change on resume' may differ: steps, "
            "logging, evaluation, memory and parallel settings), or start a new run in another folder"
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


# --- what a checkpoint holds, gathered from (and given back to) every process -------------


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def _hf_name(key: str) -> str:
    """A trainer FQN (`lm.model.layers.0...` under the LogprobNet) as the checkpoint names it."""
    for prefix in ("module.", "lm."):
        key = key.removeprefix(prefix)
    return key


def model_state(net: torch.nn.Module, tied: bool) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU of the main process ({} on the others), HF names.
    A collective under FSDP. With tied embeddings the output layer is left out, as Hugging
    Face writes such a model (gathered from shards, it would come back as a second tensor;
    and vLLM, started from a folder that holds one, no longer takes pushed weights whole)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(net, options=_options(full_state_dict=True, cpu_offload=True))
    state = {_hf_name(key): tensor for key, tensor in state.items()}
    if tied:
        state.pop("lm_head.weight", None)
    return state


def optimizer_state(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimizer state on the CPU of the main process, keyed by parameter names (so
    it loads under another strategy or process count). A collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(net, optimizer, options=_options(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(net: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Every process takes its part of a whole optimizer state (its shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(net, optimizer, state, options=_options(full_state_dict=True))


def rng_state() -> dict:
    """This process's generators: Python's, torch's CPU one and, on a GPU, CUDA's. (Rollouts
    draw from per-request seeds and forced stops from their own; these cover the rest, such as
    dropout.)"""
    import random

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))  # torch.save may have made the tuple a list
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- sharded checkpoints: every process its own shards -----------------------------------


def sharded_state(parts: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer | None]]) -> dict:
    """This process's shards of each part's weights (under Hugging Face names) and, for a
    trained part, of its optimizer state: what `torch.distributed.checkpoint` writes and reads."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    state = {}
    for name, (net, optimizer) in parts.items():
        if optimizer is None:
            model, optim = get_model_state_dict(net), None
        else:
            model, optim = get_state_dict(net, optimizer)
        state[name] = {"model": {_hf_name(key): tensor for key, tensor in model.items()}}
        if optim is not None:
            state[name]["optim"] = optim
    return state


def save_shards(parts: dict, folder: Path) -> None:
    """Every process writes its shards into `folder` (a collective; the folder is shared)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded_state(parts), checkpoint_id=str(folder), no_dist=not dist.is_initialized())


def load_shards(parts: dict, folder: Path) -> None:
    """Every process reads its shards back into the parts (resharded when the processes or the
    strategy changed: the checkpoint's metadata says where each piece lies)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_state_dict

    template = sharded_state(parts)
    dcp.load(template, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    for name, (net, optimizer) in parts.items():
        loaded = template[name]["model"]
        model = {key: loaded[_hf_name(key)] for key in get_model_state_dict(net)}
        if optimizer is None:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(net, model)
        else:
            set_state_dict(net, optimizer, model_state_dict=model, optim_state_dict=template[name]["optim"])


def check_visible(folder: Path, runtime) -> None:
    """Refuse, on every process, a folder that some process does not see (several nodes whose
    run folders are not one shared filesystem)."""
    seen = runtime.all_objects(folder.exists())
    if not all(seen):
        missing = [rank for rank, ok in enumerate(seen) if not ok]
        raise ConfigError(
            f"{folder} is not visible to process(es) {missing}: a run on several nodes needs its run folder "
            "on a filesystem every node reads and writes (docs/training.md#scale)"
        )
