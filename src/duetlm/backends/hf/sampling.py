"""One sampler for both hf paths: `generate()` batches and the streaming engine's rows.

Every row draws with its own `torch.Generator`, one uniform number per token, so a seeded
request gives the same tokens whatever shares its batch: the streaming engine mixes requests
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


def sample(
    logits: torch.Tensor,
    settings: list[SamplingParams],
    generators: list[torch.Generator],
    logprobs: list[float] | None = None,
) -> list[int]:
    """One token per row: greedy rows take the argmax; the others draw from their tempered,
    top-k then top-p truncated distribution, with one uniform number from their own generator
    (so a seeded row draws the same whatever shares its batch). logits: (B, V).

    All sampled rows are handled together. With a top-k only the k best logits are ever
    sorted, and rows that truncate nothing are not sorted at all (the inverse CDF needs no
    order): per row, or over a 152k vocabulary, sorting would cost more than the step.
    `logprobs`, when given, receives each row's log-probability of its token under the
    distribution it was drawn from (greedy rows: the untempered softmax)."""
    tokens = logits.argmax(dim=-1)
    hot = [i for i, params in enumerate(settings) if params.temperature > 0]
    picked_logps = torch.zeros(len(settings), device=logits.device)
    if logprobs is not None:
        picked_logps = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None]).squeeze(1)
    if hot:
        vocab = logits.shape[-1]
        temperatures = torch.tensor([[settings[i].temperature] for i in hot], device=logits.device)
        rows = logits[hot].float() / temperatures  # (H, V)
        draws = torch.tensor(
            [[float(torch.rand(1, generator=generators[i]))] for i in hot], device=logits.device
        )  # (H, 1)
        if any(_truncates(settings[i], vocab) for i in hot):
            chosen, chosen_logps = _sample_truncated(rows, [settings[i] for i in hot], draws)
        else:
            probs = torch.softmax(rows, dim=-1)
            cdf = probs.cumsum(dim=-1)
            chosen = torch.searchsorted(cdf, draws * cdf[:, -1:], right=True).clamp(max=vocab - 1).squeeze(1)
            chosen_logps = torch.log_softmax(rows, dim=-1).gather(1, chosen[:, None]).squeeze(1)
        tokens[hot] = chosen
        picked_logps[hot] = chosen_logps
    if logprobs is not None:
        logprobs.extend(picked_logps.tolist())
    return tokens.tolist()


def _sample_truncated(
    rows: torch.Tensor, settings: list[SamplingParams], draws: torch.Tensor
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
    cdf = probs.cumsum(dim=-1)
    choice = torch.searchsorted(cdf, draws * cdf[:, -1:], right=True).clamp(max=widest - 1)  # (H, 1)
    kept = probs.gather(1, choice).squeeze(1) / cdf[:, -1]
    return index.gather(1, choice).squeeze(1), torch.log(kept)


def row_generators(seeds: list[int | None]) -> list[torch.Generator]:
    """A generator per row: a seeded row starts from its seed; an unseeded one from a seed
    drawn from torch's global generator (so `torch.manual_seed` still makes a run repeat)."""
    generators = []
    for seed in seeds:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        generators.append(torch.Generator(device="cpu").manual_seed(seed % 2**64))
    return generators


class RowSampler:
    """A `generate()` logits processor that samples each row with `sample` and its own
    generator, then leaves only that token standing, so generation runs greedy over it.

    With `record`, the log-probability of each step's tokens is kept (`logprobs`, (B, T)), as
    the processed scores of a sampled `generate()` would give them."""

    def __init__(self, settings: list[SamplingParams], record: bool = False) -> None:
        self.settings = settings
        self.generators = row_generators([s.seed for s in settings])
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
