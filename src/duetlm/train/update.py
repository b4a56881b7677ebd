"""Forward passes over a step's rollouts: log-probs without gradients, and the PPO-clip update
(docs/design.md section 2).

`ppo_update` takes `epochs` passes; each pass takes `mini_batches` optimizer steps on equal
shares of the batch's questions (a question's rows stay together, in a fresh order every
pass); each step accumulates its share in length-sorted micro-batches and normalizes by the
step's global token count (token-mean). Old log-probs are the sampling policy's, computed
before the first step. Gradients are freed after every step, so rollouts and log-prob passes
never share memory with them.

Under FSDP every forward gathers weights from every process, so every process must make the
same number of forward and backward calls whatever its rows: each pass runs the global
largest micro-batch count, a process with fewer running ghost micro-batches, and a
micro-batch whose rows carry no sampled token scores one position at zero weight. The loss
is then 0 but its graph reaches every weight, and the gradient reduction takes place.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

import torch

from duetlm.train.batch import RolloutBatch
from duetlm.train.distributed import Runtime
from duetlm.train.grpo import kl_sum, ppo_clip_loss
from duetlm.train.parallel import accumulating, clip_grad_norm, unwrapped
from duetlm.train.policy import Policy, autocast


@dataclass
class UpdateSettings:
    epochs: int
    mini_batches: int
    micro_batch: int
    clip_eps: float
    max_grad_norm: float
    precision: str
    seed: int  # seeds the shuffle of questions over mini-batches
    lockstep: bool = False  # every forward is a collective (FSDP): equal call counts on every process


@dataclass
class UpdateStats:
    loss: float  # the optimizer steps' global token-mean losses, averaged over steps
    grad_norm: float  # of the last step, before clipping
    clip_fraction: float  # share of all processes' tokens whose ratio left [1 - eps, 1 + eps]
    steps: int


def mini_batch_rows(groups: list[torch.Tensor], n_mini: int, rng: random.Random) -> list[torch.Tensor]:
    """Row indices of each mini-batch: whole question groups, shuffled, in equal shares."""
    order = list(range(len(groups)))
    rng.shuffle(order)
    share = len(groups) // n_mini
    return [torch.cat([groups[g] for g in order[i * share : (i + 1) * share]]) for i in range(n_mini)]


def micro_batches(
    batch: RolloutBatch, size: int, runtime: Runtime, lockstep: bool
) -> list[RolloutBatch | None]:
    """Length-sorted micro-batches, padded with `None` (a ghost) to the global largest count
    when every forward is a collective."""
    parts: list[RolloutBatch | None] = [batch.take(rows) for rows in batch.seqs.micro_batches(size)]
    if lockstep:
        parts += [None] * (int(runtime.max(len(parts))) - len(parts))
    return parts


def scored_positions(mask: torch.Tensor) -> torch.Tensor:
    """The positions to score: the sampled tokens, or when there are none one real position
    (row 0's first; it carries zero weight in the loss), so the backward reaches every weight."""
    if bool(mask.any()):
        return mask
    ghost = torch.zeros_like(mask)
    ghost[0, 0] = 1.0
    return ghost


def logps_of(
    net: torch.nn.Module,
    batch: RolloutBatch,
    temperature: float,
    settings: UpdateSettings,
    runtime: Runtime,
) -> torch.Tensor:
    """Per-token log-probs at the rollout temperature, no gradient, in length-sorted
    micro-batches. (B, T-1), 0 outside completions."""
    module = unwrapped(net)  # no DDP for a pass without gradients
    device = runtime.device
    out = torch.zeros(batch.seqs.completion_mask.shape)
    rows_of = batch.seqs.micro_batches(settings.micro_batch)
    ghosts = int(runtime.max(len(rows_of))) - len(rows_of) if settings.lockstep else 0
    module.eval()
    with torch.no_grad(), autocast(device, settings.precision):
        for rows in rows_of:
            part = batch.seqs.take(rows)
            logps = module(
                part.input_ids.to(device),
                part.attention_mask.to(device),
                part.completion_mask.to(device),
                temperature,
            )
            out[rows, : logps.shape[1]] = logps.float().cpu()
        for _ in range(ghosts):  # the other processes' extra micro-batches gather weights from this one
            part = batch.seqs.take(rows_of[0])
            module(
                part.input_ids.to(device),
                part.attention_mask.to(device),
                scored_positions(torch.zeros_like(part.completion_mask)).to(device),
                temperature,
            )
    return out


def ppo_update(
    policy: Policy, batch: RolloutBatch, settings: UpdateSettings, runtime: Runtime
) -> UpdateStats:
    """PPO-clip steps over `batch` (its `advantages` set; `old_logps` None: one step only,
    the ratio taken against its own forward)."""
    if batch.old_logps is None and settings.epochs * settings.mini_batches > 1:
        raise ValueError("several optimizer steps per batch need the sampling policy's old log-probs")
    rng = random.Random(settings.seed)
    policy.net.train()
    losses, clipped, tokens_seen, grad_norm, steps = [], 0.0, 0.0, 0.0, 0
    for _ in range(settings.epochs):
        for rows in mini_batch_rows(batch.question_rows(), settings.mini_batches, rng):
            share = batch.take(rows)
            step_tokens = runtime.sum(share.seqs.completion_mask.sum())
            parts = micro_batches(share, settings.micro_batch, runtime, settings.lockstep)
            total = 0.0
            for index, part in enumerate(parts):
                ghost = part is None
                part = share.take(torch.tensor([0])) if ghost else part
                mask = torch.zeros_like(part.seqs.completion_mask) if ghost else part.seqs.completion_mask
                with accumulating(policy.net, last=index == len(parts) - 1):
                    loss, logps, old = _part_loss(policy, part, mask, settings, runtime, step_tokens)
                    # gradients are averaged over processes; scaling restores the global token-mean
                    (loss * runtime.world).backward()
                total += loss.item()
                ratio = torch.exp(logps.detach() - old)
                clipped += float(
                    (((ratio - 1).abs() > settings.clip_eps).float() * mask.to(ratio.device)).sum()
                )
                tokens_seen += float(mask.sum())
            grad_norm = clip_grad_norm(policy.net, settings.max_grad_norm)
            policy.optimizer.step()
            policy.optimizer.zero_grad(set_to_none=True)
            losses.append(runtime.sum(total))
            steps += 1
    policy.net.eval()
    clip_fraction = runtime.sum(clipped) / max(runtime.sum(tokens_seen), 1.0)
    return UpdateStats(sum(losses) / len(losses), grad_norm, clip_fraction, steps)


def _part_loss(policy: Policy, part: RolloutBatch, mask: torch.Tensor, settings, runtime, step_tokens: float):
    """(loss, log-probs, old log-probs) of one micro-batch."""
    device = runtime.device
    mask = mask.to(device)
    with autocast(device, settings.precision):
        logps = policy.net(
            part.seqs.input_ids.to(device),
            part.seqs.attention_mask.to(device),
            scored_positions(mask),
            policy.temperature,
        )
        old = logps.detach() if part.old_logps is None else part.old_logps.to(device)
        loss = ppo_clip_loss(logps, old, part.advantages.to(device), mask, settings.clip_eps, step_tokens)
    return loss, logps, old


class PolicyPasses:
    """The forward passes of a step over its rollouts, with the run's settings: the sampling
    policy's log-probs, the KL to the reference, and each model's update."""

    def __init__(self, cfg, runtime: Runtime, reference: torch.nn.Module | None) -> None:
        self.cfg, self.runtime, self.reference = cfg, runtime, reference

    def settings(self, name: str = "", step: int = 0) -> UpdateSettings:
        cfg = self.cfg
        return UpdateSettings(
            cfg.optimizer.ppo_epochs,
            cfg.optimizer.mini_batches,
            cfg.parallel.micro_batch,
            cfg.objective.clip_eps,
            cfg.optimizer.max_grad_norm,
            cfg.parallel.precision,
            seed=zlib.crc32(f"{cfg.seed}:{step}:{name}".encode()),
            lockstep=cfg.parallel.strategy == "fsdp",
        )

    def logps(self, policy: Policy, batch: RolloutBatch) -> torch.Tensor:
        return logps_of(policy.net, batch, policy.temperature, self.settings(), self.runtime)

    def kl(self, policy: Policy, batch: RolloutBatch, policy_logps: torch.Tensor) -> torch.Tensor:
        """Per-row summed log-ratio to the initial M (B,): the reference model, or with LoRA
        the base with adapters off."""
        if self.cfg.objective.kl_beta == 0:
            return torch.zeros(len(batch))
        if self.reference is not None:
            ref = logps_of(self.reference, batch, policy.temperature, self.settings(), self.runtime)
        else:
            with policy.lm.disable_adapter():
                ref = self.logps(policy, batch)
        return kl_sum(policy_logps, ref, batch.seqs.completion_mask)

    def update(self, policy: Policy, batch: RolloutBatch, step: int) -> dict:
        """One model's PPO update on its scored rows; old log-probs are taken here when
        several optimizer steps need them and the batch has none."""
        settings = self.settings(policy.name, step)
        if batch.old_logps is None and settings.epochs * settings.mini_batches > 1:
            batch = batch.with_scores(batch.advantages, self.logps(policy, batch))
        stats = ppo_update(policy, batch, settings, self.runtime)
        return {
            f"loss_{policy.name}": stats.loss,
            f"grad_norm_{policy.name}": stats.grad_norm,
            f"clip_fraction_{policy.name}": stats.clip_fraction,
        }
