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


@dataclass
class Packed:
    """Rows that share a prefix, packed: each group's prefix once, then every row's completion
    after it, in one sequence per group. A row's tokens see the prefix and their own row
    (`attention`, (G, 1, L, L), True where a query may look), and count their positions on
    from the prefix's end (`position_ids`), so each row computes as it would alone. m's n_m
    answers to a signal share the question and the signal: packed, the prefix (most of m's
    tokens) runs once instead of n_m times.

    Each scored token of the unpacked layout, `(rows, cols)` of its (B, T-1) completion mask,
    is predicted by the hidden state at packed `(groups, positions)` (a row's first token by
    the prefix's last position) and is `targets`."""

    input_ids: torch.Tensor  # (G, L)
    position_ids: torch.Tensor  # (G, L)
    attention: torch.Tensor  # (G, 1, L, L) bool
    rows: torch.Tensor  # (N,)
    cols: torch.Tensor  # (N,)
    groups: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,)
    targets: torch.Tensor  # (N,)

    @property
    def tokens(self) -> int:
        """Tokens the forward computes (what packing saves)."""
        return int(self.attention.diagonal(dim1=2, dim2=3).sum())


def completion_start(seqs: Sequences, row: int) -> int:
    """Index of a row's first sampled token (its length when it has none)."""
    sampled = seqs.completion_mask[row].nonzero().flatten()
    return int(sampled[0]) + 1 if len(sampled) else int(seqs.attention_mask[row].sum())


def shared_prefix_groups(seqs: Sequences) -> list[list[int]]:
    """Rows whose tokens before their completion are identical, in order of first row."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for row in range(len(seqs)):
        prefix = tuple(seqs.input_ids[row, : completion_start(seqs, row)].tolist())
        groups.setdefault(prefix, []).append(row)
    return list(groups.values())


def pack_shared_prefixes(seqs: Sequences, pad_id: int) -> Packed:
    groups = shared_prefix_groups(seqs)
    layouts = []  # per group: (ids, positions, owner of each token: -1 prefix, else the row)
    scored: list[tuple[int, int, int, int, int]] = []  # (row, col, group, position, target)
    for g, rows in enumerate(groups):
        start = completion_start(seqs, rows[0])
        ids = seqs.input_ids[rows[0], :start].tolist()
        positions, owner = list(range(start)), [-1] * start
        for row in rows:
            end = int(seqs.attention_mask[row].sum())
            offset = len(ids)
            for j, token in enumerate(seqs.input_ids[row, start:end].tolist()):
                col = start + j - 1  # the unpacked position that predicts this token
                if seqs.completion_mask[row, col] > 0:
                    scored.append((row, col, g, start - 1 if j == 0 else offset + j - 1, token))
                ids.append(token)
                positions.append(start + j)
                owner.append(row)
        layouts.append((ids, positions, owner))
    width = max(len(ids) for ids, _, _ in layouts)
    input_ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(groups), width), dtype=torch.long)
    attention = torch.zeros((len(groups), 1, width, width), dtype=torch.bool)
    for g, (ids, positions, owner) in enumerate(layouts):
        n = len(ids)
        input_ids[g, :n] = torch.tensor(ids)
        position_ids[g, :n] = torch.tensor(positions)
        who = torch.tensor(owner)  # (n,)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        visible = (who[None, :] == -1) | (who[None, :] == who[:, None])  # the prefix, or one's own row
        attention[g, 0, :n, :n] = causal & visible
        attention[g, 0, n:, 0] = True  # padding looks at something: no query without keys
    rows, cols, group, position, target = (
        (torch.tensor(c, dtype=torch.long) for c in zip(*scored))
        if scored
        else (torch.zeros(0, dtype=torch.long),) * 5
    )
    return Packed(input_ids, position_ids, attention, rows, cols, group, position, target)
