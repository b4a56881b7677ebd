"""One sampler for both hf paths: `generate()` batches and the streaming engine's rows.

Every row draws with its own `torch.Generator`, so a seeded request gives the same tokens
whatever shares its batch: the streaming engine mixes requests
as they arrive, and the trainer's processes each roll out their own shard of a batch yet must
sample what one process would. `generate()` reaches the same sampler through `RowSampler`, a
logits processor that picks each row's token and leaves the library's greedy step nothing
else to choose.
"""

from __future__ import annotations

import torch

from duetlm.backends.base import SamplingParams


def _truncates(params: SamplingParams, vocab: int) -> bool:
    return (0 < params.top_k < vocab) or params.top_p < 1.0


def _exponentials(widths: list[int], generators: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """(H, max width) Exp(1) draws: row h takes widths[h] from generators[h] (on that
    generator's device), and is padded with +inf, which never wins a race. A row's draws
    depend on its own width only, never on the rows beside it."""
    widest = max(widths)
    rows = []
    for width, generator in zip(widths, generators, strict=True):
        row = torch.empty(width, device=generator.device).exponential_(generator=generator)
        if width < widest:
            row = torch.cat([row, torch.full((widest - width,), float("inf"), device=row.device)])
        rows.append(row)
    return torch.stack(rows).to(device)


def sample(
    logits: torch.Tensor,
    settings: list[SamplingParams],
    generators: list[torch.Generator],
    logprobs: list[float] | None = None,
) -> list[int]:
    """One token per row: greedy rows take the argmax; the others draw from their tempered,
    top-k then top-p truncated distribution by an exponential race (the Gumbel-max trick: the
    token with the largest p / E wins, E ~ Exp(1) drawn per token from the row's own
    generator). logits: (B, V).

    The race, unlike an inverse CDF, keeps a seeded row's draw stable under the last-bit
    differences in logits that batching brings (a CDF summed over 152k tokens moves by more
    than a tail token's width, and the draw lands on its neighbour); a draw changes only where
    two tokens' noisy scores tie to within that noise. So a seeded row draws the same whatever
    shares its batch. With a top-k only the k best logits are sorted and raced; rows that
    truncate nothing race the whole vocabulary unsorted. `logprobs`, when given, receives each
    row's log-probability of its token under the distribution it was drawn from (greedy rows:
    the untempered softmax)."""
    tokens = logits.argmax(dim=-1)
    picked_logps = torch.zeros(len(settings), device=logits.device)
    if logprobs is not None:
        picked_logps = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None]).squeeze(1)
    vocab = logits.shape[-1]
    hot = [i for i, params in enumerate(settings) if params.temperature > 0]
    # rows that truncate and rows that do not draw apart, so neither's noise depends on the other
    for rows_of, draw in (
        ([i for i in hot if not _truncates(settings[i], vocab)], _sample_whole),
        ([i for i in hot if _truncates(settings[i], vocab)], _sample_truncated),
    ):
        if rows_of:
            temperatures = torch.tensor([[settings[i].temperature] for i in rows_of], device=logits.device)
            rows = logits[rows_of].float() / temperatures  # (H, V)
            chosen, chosen_logps = draw(
                rows, [settings[i] for i in rows_of], [generators[i] for i in rows_of]
            )
            tokens[rows_of] = chosen
            picked_logps[rows_of] = chosen_logps
    if logprobs is not None:
        logprobs.extend(picked_logps.tolist())
    return tokens.tolist()


def _sample_whole(
    rows: torch.Tensor, settings: list[SamplingParams], generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and their log-probs under the whole tempered distribution. rows: (H, V)."""
    logps = torch.log_softmax(rows, dim=-1)
    noise = _exponentials([rows.shape[-1]] * len(generators), generators, rows.device)
    chosen = (logps - noise.log()).argmax(dim=-1)  # argmax p / E, in logs
    return chosen, logps.gather(1, chosen[:, None]).squeeze(1)


def _sample_truncated(
    rows: torch.Tensor, settings: list[SamplingParams], generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and their log-probs under top-k then top-p, renormalized. rows: (H, V) tempered."""
    vocab = rows.shape[-1]
    ks = [min(params.top_k or vocab, vocab) for params in settings]
    widest = max(ks)
    if widest < vocab:
        values, index = rows.topk(widest, dim=-1)  # sorted, best first
    else:
        values, index = rows.sort(dim=-1, descending=True)
    rank = torch.arange(widest, device=rows.device)
    values = values.masked_fill(rank >= torch.tensor(ks, device=rows.device)[:, None], float("-inf"))
    probs = torch.softmax(values, dim=-1)  # (H, K)
    top_p = torch.tensor([[params.top_p] for params in settings], device=rows.device)
    probs = probs.masked_fill(probs.cumsum(dim=-1) - probs > top_p, 0.0)  # smallest set reaching top_p
    kept = probs / probs.sum(dim=-1, keepdim=True)
    noise = _exponentials(ks, generators, rows.device)  # each row races its own k
    choice = (kept / noise).argmax(dim=-1, keepdim=True)  # (H, 1)
    return index.gather(1, choice).squeeze(1), torch.log(kept.gather(1, choice).squeeze(1))


def row_generators(seeds: list[int | None], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """A generator per row, on the device whose logits it samples: a seeded row starts from
    its seed; an unseeded one from a seed drawn from torch's global generator (so
    `torch.manual_seed` still makes a run repeat)."""
    generators = []
    for seed in seeds:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        generators.append(torch.Generator(device=device).manual_seed(seed % 2**64))
    return generators


class RowSampler:
    """A `generate()` logits processor that samples each row with `sample` and its own
    generator, then leaves only that token standing, so generation runs greedy over it.

    With `record`, the log-probability of each step's tokens is kept (`logprobs`, (B, T)), as
    the processed scores of a sampled `generate()` would give them."""

    def __init__(self, settings: list[SamplingParams], device: torch.device, record: bool = False) -> None:
        self.settings = settings
        self.generators = row_generators([s.seed for s in settings], device)
        self.record = record
        self.steps: list[list[float]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logps: list[float] | None = [] if self.record else None
        tokens = sample(scores, self.settings, self.generators, logps)
        if logps is not None:
            self.steps.append(logps)
        chosen = torch.tensor(tokens, device=scores.device)[:, None]
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen, 0.0)

    @property
    def logprobs(self) -> torch.Tensor:
        """(B, T): the log-prob of the token each row took at each step."""
        return torch.tensor(self.steps).T if self.steps else torch.zeros(len(self.settings), 0)
