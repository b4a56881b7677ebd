"""Forward passes over a step's rollouts: log-probs without gradients, and the PPO-clip update
(docs/design.md section 2).

`ppo_update` takes `epochs` passes; each pass takes `mini_batches` optimizer steps on equal
shares of the batch's questions (a question's rows stay together, in a fresh order every
pass); each step accumulates its share in length-sorted micro-batches and normalizes by the
step's global token count (token-mean). Old log-probs are the sampling policy's, computed
before the first step. A token's policy term is weighted by the rollout correction's
importance weight when the batch carries one, and with `kl_placement = "loss"` M's loss adds
β·k3 to the initial M, token-mean like the policy term. Gradients are freed after every step,
so rollouts and log-prob passes never share memory with them.

With `share_prefixes` (m's update), rows that share a prefix (m's n_m answers to one signal)
are packed: the prefix runs once per micro-batch group, not once per row.

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

from duetlm.train.algorithm.grpo import k3_kl, kl_sum, ppo_clip_loss
from duetlm.train.modeling.distributed import Runtime
from duetlm.train.modeling.parallel import accumulating, clip_grad_norm, unwrapped
from duetlm.train.modeling.policy import Policy, autocast
from duetlm.train.rollouts.batch import RolloutBatch
from duetlm.train.rollouts.sequences import pack_shared_prefixes, shared_prefix_groups


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
    kl_beta: float = 0.0  # β of the k3 term in the loss (kl_placement = "loss"; needs ref_logps)
    share_prefixes: bool = False  # pack rows that share a prefix (m's answers to one signal)
    pad_id: int = 0


@dataclass
class UpdateStats:
    loss: float  # the optimizer steps' global token-mean losses, averaged over steps
    grad_norm: float  # of the last step, before clipping
    clip_fraction: float  # share of all processes' tokens whose ratio left [1 - eps, 1 + eps]
    steps: int
    kl: float | None = None  # the k3 term's global token-mean (kl_placement = "loss"), last step
    forward_tokens: float = 0.0  # tokens the update's forwards computed, all processes


def mini_batch_rows(groups: list[torch.Tensor], n_mini: int, rng: random.Random) -> list[torch.Tensor]:
    """Row indices of each mini-batch: whole question groups, shuffled, in equal shares."""
    order = list(range(len(groups)))
    rng.shuffle(order)
    share = len(groups) // n_mini
    return [torch.cat([groups[g] for g in order[i * share : (i + 1) * share]]) for i in range(n_mini)]


def micro_batch_rows(batch: RolloutBatch, size: int, share_prefixes: bool) -> list[torch.Tensor]:
    """Length-sorted micro-batches of at most `size` rows; with `share_prefixes` rows that
    share a prefix stay in one micro-batch (a group larger than `size` goes alone)."""
    if not share_prefixes:
        return batch.seqs.micro_batches(size)
    lengths = batch.seqs.attention_mask.sum(dim=1)
    groups = sorted(shared_prefix_groups(batch.seqs), key=lambda rows: int(lengths[rows].max()))
    parts: list[list[int]] = [[]]
    for rows in groups:
        if parts[-1] and len(parts[-1]) + len(rows) > size:
            parts.append([])
        parts[-1].extend(rows)
    return [torch.tensor(rows) for rows in parts if rows]


def micro_batches(
    batch: RolloutBatch, settings: UpdateSettings, runtime: Runtime
) -> list[RolloutBatch | None]:
    """The micro-batches of a share, padded with `None` (a ghost) to the global largest count
    when every forward is a collective."""
    rows = micro_batch_rows(batch, settings.micro_batch, settings.share_prefixes)
    parts: list[RolloutBatch | None] = [batch.take(r) for r in rows]
    if settings.lockstep:
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


def forward_logps(
    net: torch.nn.Module,
    part: RolloutBatch,
    scored: torch.Tensor,
    temperature: float,
    settings: UpdateSettings,
    device,
) -> tuple[torch.Tensor, float]:
    """(log-probs (B, T-1) at the `scored` positions, tokens computed): packed by shared prefix
    when the settings say so, else row by row."""
    seqs = part.seqs
    if settings.share_prefixes:
        view = type(seqs)(seqs.input_ids, seqs.attention_mask, scored.cpu())
        packed = pack_shared_prefixes(view, settings.pad_id)
        logps = net(None, None, scored, temperature, packed=_to(packed, device))
        return logps, float(packed.tokens)
    logps = net(seqs.input_ids.to(device), seqs.attention_mask.to(device), scored.to(device), temperature)
    return logps, float(seqs.attention_mask.sum())


def _to(packed, device):
    from dataclasses import fields, replace

    return replace(packed, **{f.name: getattr(packed, f.name).to(device) for f in fields(packed)})


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
    rows_of = micro_batch_rows(batch, settings.micro_batch, settings.share_prefixes)
    ghosts = int(runtime.max(len(rows_of))) - len(rows_of) if settings.lockstep else 0
    module.eval()
    with torch.no_grad(), autocast(device, settings.precision):
        for rows in rows_of:
            part = batch.take(rows)
            logps, _ = forward_logps(module, part, part.seqs.completion_mask, temperature, settings, device)
            out[rows, : logps.shape[1]] = logps.float().cpu()
        for _ in range(ghosts):  # the other processes' extra micro-batches gather weights from this one
            part = batch.take(rows_of[0])
            ghost = scored_positions(torch.zeros_like(part.seqs.completion_mask))
            forward_logps(module, part, ghost, temperature, settings, device)
    return out


def ppo_update(
    policy: Policy, batch: RolloutBatch, settings: UpdateSettings, runtime: Runtime
) -> UpdateStats:
    """PPO-clip steps over `batch` (its `advantages` set; `old_logps` None: one step only,
    the ratio taken against its own forward)."""
    if batch.old_logps is None and settings.epochs * settings.mini_batches > 1:
        raise ValueError("several optimizer steps per batch need the sampling policy's old log-probs")
    rng = random.Random(settings.seed)
    train_without_dropout(policy.net)
    losses, clipped, tokens_seen, grad_norm, steps, computed = [], 0.0, 0.0, 0.0, 0, 0.0
    kl_total = None
    for _ in range(settings.epochs):
        for rows in mini_batch_rows(batch.question_rows(), settings.mini_batches, rng):
            share = batch.take(rows)
            step_tokens = runtime.sum(share.seqs.completion_mask.sum())
            parts = micro_batches(share, settings, runtime)
            total, kl_total = 0.0, 0.0 if settings.kl_beta and batch.ref_logps is not None else None
            for index, part in enumerate(parts):
                ghost = part is None
                part = share.take(torch.tensor([0])) if ghost else part
                mask = torch.zeros_like(part.seqs.completion_mask) if ghost else part.seqs.completion_mask
                with accumulating(policy.net, last=index == len(parts) - 1):
                    loss, logps, old, kl, tokens = _part_loss(
                        policy, part, mask, settings, runtime, step_tokens
                    )
                    # gradients are averaged over processes; scaling restores the global token-mean
                    (loss * runtime.world).backward()
                total += loss.item()
                computed += tokens
                if kl_total is not None:
                    kl_total += kl
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
    kl = None if kl_total is None else runtime.sum(kl_total)
    return UpdateStats(sum(losses) / len(losses), grad_norm, clip_fraction, steps, kl, runtime.sum(computed))


def train_without_dropout(net: torch.nn.Module) -> None:
    """Training mode (gradient checkpointing acts only in it) with every dropout off: the
    sampling policy's log-probs were computed without dropout, and PPO's ratio compares the same
    function, so that it is exactly 1 before the first optimizer step (LoRA's `dropout`, a
    model's own, would otherwise make it a random number)."""
    net.train()
    for module in net.modules():
        # dropout modules (LoRA's among them), and attention layers, which drop attention weights
        # by their own `attention_dropout` while in training mode
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) or hasattr(module, "attention_dropout"):
            module.eval()


def _part_loss(policy: Policy, part: RolloutBatch, mask: torch.Tensor, settings, runtime, step_tokens: float):
    """(loss, log-probs, old log-probs, the k3 term's share of the token-mean, tokens computed)
    of one micro-batch."""
    device = runtime.device
    mask = mask.to(device)
    with autocast(device, settings.precision):
        logps, tokens = forward_logps(
            policy.net, part, scored_positions(mask), policy.temperature, settings, device
        )
        old = logps.detach() if part.old_logps is None else part.old_logps.to(device)
        weights = None if part.is_weights is None else part.is_weights.to(device)
        loss = ppo_clip_loss(
            logps, old, part.advantages.to(device), mask, settings.clip_eps, step_tokens, weights
        )
        kl = 0.0
        if settings.kl_beta and part.ref_logps is not None:
            k3 = (k3_kl(logps, part.ref_logps.to(device)) * mask).sum() / max(step_tokens, 1.0)
            loss = loss + settings.kl_beta * k3
            kl = float(k3.detach())
    return loss, logps, old, kl, tokens


class PolicyPasses:
    """The forward passes of a step over its rollouts, with the run's settings: the sampling
    policy's log-probs, the reference's, and each model's update."""

    def __init__(self, cfg, runtime: Runtime, reference: torch.nn.Module | None) -> None:
        self.cfg, self.runtime, self.reference = cfg, runtime, reference

    def settings(self, policy: Policy | None = None, step: int = 0) -> UpdateSettings:
        cfg = self.cfg
        name = policy.name if policy is not None else ""
        in_loss = cfg.objective.kl_placement == "loss" and name == "capable"
        return UpdateSettings(
            cfg.optimizer.ppo_epochs,
            cfg.optimizer.mini_batches,
            cfg.parallel.micro_batch,
            cfg.objective.clip_eps,
            cfg.optimizer.max_grad_norm,
            cfg.parallel.precision,
            seed=zlib.crc32(f"{cfg.seed}:{step}:{name}".encode()),
            lockstep=cfg.parallel.strategy == "fsdp",
            kl_beta=cfg.objective.kl_beta if in_loss else 0.0,
            share_prefixes=name == "light" and cfg.parallel.share_prefixes,
            pad_id=_pad_id(policy),
        )

    def logps(self, policy: Policy, batch: RolloutBatch) -> torch.Tensor:
        return logps_of(policy.net, batch, policy.temperature, self.settings(policy), self.runtime)

    def reference_logps(self, policy: Policy, batch: RolloutBatch) -> torch.Tensor | None:
        """The initial M's log-probs of M's rows (B, T-1): the reference model, or with LoRA the
        base with adapters off; None without a KL term."""
        if self.cfg.objective.kl_beta == 0:
            return None
        if self.reference is not None:
            return logps_of(self.reference, batch, policy.temperature, self.settings(policy), self.runtime)
        with policy.lm.disable_adapter():
            return self.logps(policy, batch)

    def kl(
        self, batch: RolloutBatch, policy_logps: torch.Tensor, ref_logps: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-row summed log-ratio to the initial M (B,): the KL in the reward, and the logged
        `kl` whatever its placement."""
        if ref_logps is None:
            return torch.zeros(len(batch))
        return kl_sum(policy_logps, ref_logps, batch.seqs.completion_mask)

    def update(self, policy: Policy, batch: RolloutBatch, step: int) -> dict:
        """One model's PPO update on its scored rows; old log-probs are taken here when
        several optimizer steps need them and the batch has none."""
        settings = self.settings(policy, step)
        if batch.old_logps is None and settings.epochs * settings.mini_batches > 1:
            batch = batch.with_scores(
                batch.advantages, self.logps(policy, batch), batch.ref_logps, batch.is_weights
            )
        stats = ppo_update(policy, batch, settings, self.runtime)
        metrics = {
            f"loss_{policy.name}": stats.loss,
            f"grad_norm_{policy.name}": stats.grad_norm,
            f"clip_fraction_{policy.name}": stats.clip_fraction,
            f"update_tokens_{policy.name}": stats.forward_tokens,
        }
        if stats.kl is not None:
            metrics[f"kl_loss_{policy.name}"] = stats.kl
        return metrics


def _pad_id(policy: Policy | None) -> int:
    """The pad id of a policy's tokenizer (0 without a policy: a ghost batch pads nothing real)."""
    return int((policy.tokenizer.pad_token_id if policy is not None else 0) or 0)
