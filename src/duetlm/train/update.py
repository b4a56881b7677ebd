"""The policy update of a step: PPO-clip over the batch's rollouts (docs/design.md section 2).

`ppo_epochs` passes; each pass takes `mini_batches` optimizer steps on equal shares of the
batch's questions (a question's sequences stay together, in a fresh order every pass); each
step accumulates its share in length-sorted micro-batches, all-reducing gradients only on the
last one (DDP `no_sync`), and normalizes by the step's global token count (token-mean). Old
log-probs are those of the sampling policy, computed before the first step. Gradients are
freed after every step, so rollouts and log-prob passes never share memory with them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from duetlm.train.grpo import ppo_clip_loss
from duetlm.train.policy import Policy, autocast
from duetlm.train.sequences import Sequences


@dataclass
class UpdateSettings:
    epochs: int
    mini_batches: int
    micro_batch: int
    clip_eps: float
    max_grad_norm: float
    precision: str
    seed: int  # seeds the shuffle of questions over mini-batches


@dataclass
class UpdateStats:
    loss: float  # summed over the optimizer steps' token-mean losses, averaged over steps
    grad_norm: float  # of the last step, before clipping
    clip_fraction: float  # share of tokens whose ratio left [1 - eps, 1 + eps]
    steps: int


def mini_batch_rows(n_groups: int, group_size: int, n_mini: int, rng: random.Random) -> list[torch.Tensor]:
    """Row indices of each mini-batch: whole question groups, shuffled, in equal shares."""
    groups = list(range(n_groups))
    rng.shuffle(groups)
    share = n_groups // n_mini
    return [
        torch.tensor(
            [g * group_size + k for g in groups[i * share : (i + 1) * share] for k in range(group_size)]
        )
        for i in range(n_mini)
    ]


def ppo_update(
    policy: Policy,
    accelerator,
    seqs: Sequences,
    old_logps: torch.Tensor | None,  # (B, T-1); None: one step only, taken from its own forward
    advantages: torch.Tensor,  # (B,)
    group_size: int,
    settings: UpdateSettings,
    global_sum: Callable[[torch.Tensor], float],
) -> UpdateStats:
    if old_logps is None and settings.epochs * settings.mini_batches > 1:
        raise ValueError("several optimizer steps per batch need the sampling policy's old log-probs")
    device, world = accelerator.device, accelerator.num_processes
    rng = random.Random(settings.seed)
    policy.net.train()
    losses, clipped, tokens_seen, grad_norm, steps = [], 0.0, 0.0, 0.0, 0
    for _ in range(settings.epochs):
        for rows in mini_batch_rows(len(seqs) // group_size, group_size, settings.mini_batches, rng):
            share = seqs.take(rows)
            step_tokens = global_sum(share.completion_mask.sum())
            micro = share.micro_batches(settings.micro_batch)
            total = 0.0
            for index, part_rows in enumerate(micro):
                part = share.take(part_rows)
                sync = index == len(micro) - 1
                context = accelerator.no_sync(policy.net) if world > 1 and not sync else _nothing()
                with context, autocast(device, settings.precision):
                    logps = policy.net(
                        part.input_ids.to(device),
                        part.attention_mask.to(device),
                        part.completion_mask.to(device),
                        policy.temperature,
                    )
                    mask = part.completion_mask.to(device)
                    width = mask.shape[1]
                    old = (
                        logps.detach() if old_logps is None else old_logps[rows[part_rows], :width].to(device)
                    )
                    loss = ppo_clip_loss(
                        logps,
                        old,
                        advantages[rows[part_rows]].to(device),
                        mask,
                        settings.clip_eps,
                        step_tokens,
                    )
                    # DDP averages gradients over processes; scaling restores the global token-mean.
                    accelerator.backward(loss * world)
                total += loss.item()
                ratio = torch.exp(logps.detach() - old)
                outside = ((ratio - 1).abs() > settings.clip_eps).float() * mask
                clipped += float(outside.sum())
                tokens_seen += float(mask.sum())
            grad_norm = float(accelerator.clip_grad_norm_(policy.net.parameters(), settings.max_grad_norm))
            policy.optimizer.step()
            policy.optimizer.zero_grad(set_to_none=True)
            losses.append(global_sum(torch.tensor(total)))
            steps += 1
    policy.net.eval()
    return UpdateStats(sum(losses) / len(losses), grad_norm, clipped / max(tokens_seen, 1.0), steps)


def _nothing():
    import contextlib

    return contextlib.nullcontext()
