"""The streaming engine's row cache against a plain list of per-row tensors.

Every operation the engine performs (rows joining shorter and longer than the batch, decode
columns, rows leaving from the middle, padding columns dropped on the left) is replayed on
both; each row's real columns must match, in place and order, and the padding must be finite.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from duetlm.backends.hf.row_cache import RowCache

HEADS, DIM, LAYERS = 2, 3, 2


def prefill(lengths: list[int], generator: torch.Generator) -> tuple[DynamicCache, list[torch.Tensor]]:
    """A cache of new rows left-padded to their longest, and each row's own real keys."""
    width = max(lengths)
    real = [torch.randn(HEADS, n, DIM, generator=generator) for n in lengths]
    padded = torch.zeros(len(lengths), HEADS, width, DIM)
    for i, keys in enumerate(real):
        padded[i, :, width - keys.shape[1] :] = keys
    layers = [(padded + layer, -(padded + layer)) for layer in range(LAYERS)]
    return DynamicCache(ddp_cache_data=layers), real


def check(cache: RowCache, rows: list[torch.Tensor]) -> None:
    for index, layer in enumerate(cache.layers):
        assert layer.keys.shape[:3] == (len(rows), HEADS, cache.width)
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
        for row, real in enumerate(rows):
            n = real.shape[1]
            assert torch.equal(layer.keys[row, :, cache.width - n :], real + index)
            assert torch.equal(layer.values[row, :, cache.width - n :], -(real + index))


def decode(cache: RowCache, rows: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    new = torch.randn(len(rows), HEADS, 1, DIM, generator=generator)
    for index, layer in enumerate(cache.layers):
        keys, _ = layer.update(new + index, -(new + index))
        assert keys.shape[2] == cache.width
    return [torch.cat([real, new[i]], dim=1) for i, real in enumerate(rows)]


def test_row_cache_follows_every_engine_operation():
    generator = torch.Generator().manual_seed(0)
    first, rows = prefill([5, 3], generator)
    cache = RowCache(first)
    cache.append(first)
    check(cache, rows)
    for _ in range(40):  # past the first buffer's width: the buffer grows
        rows = decode(cache, rows, generator)
    check(cache, rows)
    shorter, new = prefill([4], generator)  # joins right-aligned under the live rows
    cache.append(shorter)
    rows += new
    check(cache, rows)
    longer, new = prefill([60, 2, 7], generator)  # longer than the batch: the live rows widen on the left
    cache.append(longer)
    rows += new
    check(cache, rows)
    rows = decode(cache, rows, generator)
    order = cache.remove([1, 3])  # from the middle: the last rows fill the slots
    assert sorted(order) == [0, 2, 4, 5] and len(order) == 4
    rows = [rows[i] for i in order]
    check(cache, rows)
    order = cache.remove([0, 3])  # the longest row among them
    rows = [rows[i] for i in order]
    check(cache, rows)
    unused = cache.width - max(r.shape[1] for r in rows)
    assert unused > 0
    cache.drop_left(unused)
    assert cache.width == max(r.shape[1] for r in rows)
    check(cache, rows)
    rows = decode(cache, rows, generator)
    check(cache, rows)
    assert cache.remove(list(range(len(rows)))) == [] and cache.width == 0
