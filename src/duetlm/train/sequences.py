"""Rollouts as padded training sequences, and exploration by forced early stops."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass
class Sequences:
    """Right-padded prompt+completion ids; `completion_mask` marks sampled tokens and is aligned
    with `token_logps` output (position t predicts token t+1)."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    completion_mask: torch.Tensor  # (B, T-1)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def take(self, rows: torch.Tensor) -> Sequences:
        """The given rows, with the padding columns none of them uses cut off (right padding and
        a causal model: the cut changes no real position's output, only the compute)."""
        width = int(self.attention_mask[rows].sum(dim=1).max())
        return Sequences(
            self.input_ids[rows, :width],
            self.attention_mask[rows, :width],
            self.completion_mask[rows, : width - 1],
        )

    def micro_batches(self, size: int) -> list[torch.Tensor]:
        """Row indices in chunks of `size`, by length, so each chunk carries little padding."""
        order = torch.argsort(self.attention_mask.sum(dim=1), stable=True)
        return list(torch.split(order, size))


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Sequences:
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    completion = torch.zeros((len(prompts), width), dtype=torch.float32)
    for row, (prompt, sampled) in enumerate(zip(prompts, completions, strict=True)):
        ids = prompt + sampled
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, : len(ids)] = 1
        completion[row, len(prompt) : len(ids)] = 1.0
    return Sequences(input_ids, attention, completion[:, 1:])


def line_boundaries(ids: list[int], tokenizer) -> list[int]:
    """Positions just after a token that ends a line: where a step of reasoning ends."""
    return [i + 1 for i, token in enumerate(ids) if tokenizer.decode([token]).endswith("\n")]


def force_early_stop(
    ids: list[int], tokenizer, close_ids: list[int], rng: random.Random, min_keep: int = 1
) -> list[int] | None:
    """Cut a sampled signal at a random line boundary and close the thinking there, or None
    when it has no boundary to cut at. The policy rarely samples such a stop by itself; GRPO
    can only learn that a shorter signal suffices if it sees one."""
    body = ids[: -len(close_ids)] if ids[-len(close_ids) :] == close_ids else ids
    cuts = [b for b in line_boundaries(body, tokenizer) if min_keep <= b < len(body)]
    if not cuts:
        return None
    return body[: rng.choice(cuts)] + close_ids


def credit_only_tail(seqs: Sequences, rows: list[int], tail: int) -> Sequences:
    """A copy of `seqs` whose completion mask keeps, in each of `rows`, only the last `tail`
    sampled tokens. A forced stop's outcome says whether stopping there was good; it says
    nothing about the prefix, which the policy sampled towards a continuation that was cut."""
    mask = seqs.completion_mask.clone()
    for row in rows:
        positions = mask[row].nonzero().flatten()
        mask[row, positions[: max(len(positions) - tail, 0)]] = 0.0
    return Sequences(seqs.input_ids, seqs.attention_mask, mask)
