"""The streaming engine's sampler against the distribution it should draw from.

The expected distribution is computed here in plain Python (temperature, then top-k, then
the smallest set of tokens reaching top-p); 4,000 rows with their own seeds must match it
within sampling noise and never draw outside it."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from duetlm.backends.base import SamplingParams
from duetlm.backends.hf.sampling import sample

LOGITS = [2.0, 1.5, 1.4, 0.3, -0.2, 3.1, -1.0, 0.9, 0.0, 2.2]


def expected(logits: list[float], temperature: float, top_k: int, top_p: float) -> dict[int, float]:
    order = sorted(range(len(logits)), key=lambda i: -logits[i])[: top_k or len(logits)]
    weights = [math.exp(logits[i] / temperature) for i in order]
    total = sum(weights)
    kept, mass = [], 0.0
    for token, weight in zip(order, weights):
        if mass >= top_p:
            break
        kept.append((token, weight))
        mass += weight / total
    norm = sum(w for _, w in kept)
    return {token: w / norm for token, w in kept}


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(0.7, 4, 0.8), (1.0, 0, 1.0), (1.3, 0, 0.9), (0.6, 20, 0.95), (1.0, 3, 1.0)],
)
def test_draws_follow_the_truncated_distribution(temperature, top_k, top_p):
    rows = 4000
    logits = torch.tensor([LOGITS] * rows)
    params = [SamplingParams(8, temperature=temperature, top_k=top_k, top_p=top_p)] * rows
    generators = [torch.Generator().manual_seed(seed) for seed in range(rows)]
    counts = Counter(sample(logits, params, generators))
    target = expected(LOGITS, temperature, top_k, top_p)
    assert set(counts) <= set(target)  # nothing outside the truncated support
    for token, probability in target.items():
        assert abs(counts[token] / rows - probability) < 0.03, (token, counts[token] / rows, probability)


def test_greedy_rows_take_the_argmax_and_seeded_rows_ignore_their_neighbours():
    logits = torch.tensor([LOGITS, LOGITS[::-1], LOGITS])
    hot = SamplingParams(8, temperature=1.0, seed=3)
    cold = SamplingParams(8)
    mixed = sample(logits, [cold, hot, cold], [torch.Generator().manual_seed(s) for s in (1, 3, 2)])
    assert mixed[0] == mixed[2] == LOGITS.index(max(LOGITS))
    alone = sample(logits[1:2], [hot], [torch.Generator().manual_seed(3)])
    assert mixed[1] == alone[0]
