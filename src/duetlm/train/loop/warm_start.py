"""Warm start from a probe: before GRPO, M learns to stop where m no longer needs more.

`duet probe` found, per question, the shortest prefix of M's own thinking with which m
answers right (the oracle cut). Fine-tuning M on those prefixes, each closed with the think
tag, teaches it where to hand over (and to hand over nothing where m needs nothing) before
the length-penalized objective starts, which otherwise has to discover the cut by sampling.
Only training questions are used: a probe row whose question the evaluation set holds, or
that the training set lacks, is left out, so the train/eval separation holds.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from duetlm.config import DuetConfig
from duetlm.errors import ConfigError
from duetlm.evaluate.store import read_rows
from duetlm.problems import Problem
from duetlm.requests import capable_request
from duetlm.train.modeling.distributed import Runtime
from duetlm.train.modeling.parallel import clip_grad_norm
from duetlm.train.modeling.policy import Policy, autocast
from duetlm.train.rollouts.rollout import prompt_ids
from duetlm.train.rollouts.sequences import pack

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmStartSettings:
    epochs: int
    lr: float
    batch: int
    seed: int


def warm_start_targets(
    run: str | Path, is_training: Callable[[str], bool], capable: str
) -> list[tuple[Problem, str]]:
    """(question, oracle cut) for every probe row with a cut whose question `is_training`
    accepts (the trainer's: in the training set and not in the evaluation set)."""
    folder = Path(run)
    info_path = folder / "run.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConfigError(
            f"warm_start = {str(run)!r}: no probe run there (run `duet probe --out {run}`)"
        ) from None
    if info.get("kind") != "probe":
        raise ConfigError(f"warm_start = {str(run)!r} is not a probe run (written by `duet probe`)")
    if info.get("capable") != capable:
        logger.warning(
            "warm start: the probe ran %s, and the M trained is %s; the cuts are another model's thinking",
            info.get("capable"),
            capable,
        )
    rows = read_rows(folder / "results.jsonl")
    chosen, outside = [], 0
    for row in rows:
        if not is_training(row["question"]):
            outside += 1
            continue
        if row["oracle_lines"] is not None:
            chosen.append((Problem(row["question"]), row["oracle_signal"]))
    if not chosen:
        raise ConfigError(
            f"warm_start = {str(run)!r}: none of its {len(rows)} probed questions is a training question "
            "with a working cut (probe the training split: duet probe --split train)"
        )
    if outside:
        logger.warning(
            "warm start: %d probed question(s) are not training questions and are left out", outside
        )
    return chosen


def completion_text(cut: str, config: DuetConfig) -> str:
    """What M writes for a hand-over at `cut`: the thinking up to it, closed (an empty cut: the
    tags alone)."""
    prompts = config.prompts
    return (
        f"{prompts.think_open}\n{cut}\n{prompts.think_close}"
        if cut
        else f"{prompts.think_open}\n\n{prompts.think_close}"
    )


def fine_tune(
    policy: Policy,
    targets: list[tuple[Problem, str]],
    config: DuetConfig,
    signal_max_tokens: int,
    settings: WarmStartSettings,
    runtime: Runtime,
    precision: str,
    max_grad_norm: float = 1.0,
) -> dict:
    """Supervised epochs on the cuts (mean token negative log-likelihood of M's completion
    only). Every process trains on all of them (the gradients it averages are the same), so
    every process makes the same forward calls. A fresh AdamW: GRPO's optimizer starts clean
    after it. Returns the losses per epoch and the time."""
    device = runtime.device
    tokenizer = policy.tokenizer
    requests = [capable_request(problem, config, signal_max_tokens) for problem, _ in targets]
    prompts = prompt_ids(tokenizer, requests)
    completions = tokenizer([completion_text(cut, config) for _, cut in targets], add_special_tokens=False)[
        "input_ids"
    ]
    parameters = [p for p in policy.net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr)
    rng = random.Random(f"{settings.seed}:warm-start")
    losses, started = [], time.perf_counter()
    policy.net.train()
    for _ in range(settings.epochs):
        order = list(range(len(targets)))
        rng.shuffle(order)
        total = count = 0.0
        for start in range(0, len(order), settings.batch):
            rows = order[start : start + settings.batch]
            seqs = pack([prompts[i] for i in rows], [completions[i] for i in rows], tokenizer.pad_token_id)
            mask = seqs.completion_mask.to(device)
            with autocast(device, precision):
                logps = policy.net(seqs.input_ids.to(device), seqs.attention_mask.to(device), mask, 1.0)
            loss = -(logps.float() * mask).sum() / mask.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_grad_norm(policy.net, max_grad_norm)
            optimizer.step()
            total += float(loss.detach()) * len(rows)
            count += len(rows)
        losses.append(total / count)
        logger.info("warm start epoch %d: loss %.4f", len(losses), losses[-1])
    policy.net.eval()
    return {"examples": len(targets), "epoch_losses": losses, "seconds": time.perf_counter() - started}
