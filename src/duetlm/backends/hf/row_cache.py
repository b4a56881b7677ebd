"""The KV cache of the streaming engine's active rows, kept in buffers that outlive a step.

transformers' `DynamicCache` concatenates each new column onto the whole cache, so every
decode step copies all of it, and a row joining or leaving rebuilds it. Here each layer
keeps its keys and values in a buffer with room to spare (rows and columns, grown by
doubling): a decode step writes one column in place, a joining row is written into free
row slots, and a leaving row is replaced by the last one (only that row is copied).

Rows are left-padded to the common width (the engine's attention mask hides the padding),
so one column index serves every row. Buffers start zeroed: padding may hold a stale row's
values, but never NaN, which a masked attention weight of 0 would still spread.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class RowLayer(DynamicLayer):
    """One layer's keys and values: `store[:rows, :, :width]` is live."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.rows, self.width = 0, 0
        self.store_keys = keys.new_zeros((0, keys.shape[1], 0, keys.shape[3]))
        self.store_values = values.new_zeros((0, values.shape[1], 0, values.shape[3]))
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._publish()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """A decode step: the new columns of every live row, written in place."""
        columns = key_states.shape[-2]
        self.reserve(self.rows, self.width + columns)
        self.store_keys[: self.rows, :, self.width : self.width + columns] = key_states
        self.store_values[: self.rows, :, self.width : self.width + columns] = value_states
        self.width += columns
        self._publish()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.width

    def reserve(self, rows: int, width: int) -> None:
        """Room for `rows` x `width`, keeping what is live; grown by doubling."""
        have_rows, _, have_width, _ = self.store_keys.shape
        if rows <= have_rows and width <= have_width:
            return
        new_rows, new_width = max(rows, 2 * have_rows), max(width, 2 * have_width)
        for name in ("store_keys", "store_values"):
            old = getattr(self, name)
            grown = old.new_zeros((new_rows, old.shape[1], new_width, old.shape[3]))
            grown[: self.rows, :, : self.width] = old[: self.rows, :, : self.width]
            setattr(self, name, grown)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """New rows (their prefill, left-padded to their own common length), right-aligned
        to the live width; a longer prefill widens the live rows on the left."""
        count, length = keys.shape[0], keys.shape[2]
        if length > self.width:
            self.shift(length - self.width)
        self.reserve(self.rows + count, self.width)
        start = self.width - length
        self.store_keys[self.rows : self.rows + count, :, start : self.width] = keys
        self.store_values[self.rows : self.rows + count, :, start : self.width] = values
        self.rows += count
        self._publish()

    def shift(self, columns: int) -> None:
        """Move the live columns `columns` to the right (negative: to the left, dropping
        the leftmost ones)."""
        width = self.width + columns
        self.reserve(self.rows, width)
        for store in (self.store_keys, self.store_values):
            live = store[: self.rows, :, : self.width]
            if columns >= 0:
                store[: self.rows, :, columns:width] = live.clone()
                store[: self.rows, :, :columns] = 0
            else:
                store[: self.rows, :, :width] = live[:, :, -columns:].clone()
        self.width = width
        self._publish()

    def move_rows(self, sources: list[int], targets: list[int], rows: int) -> None:
        """Copy rows `sources` into slots `targets`, then keep the first `rows` slots."""
        if sources:
            src, dst = torch.tensor(sources, device=self.device), torch.tensor(targets, device=self.device)
            for store in (self.store_keys, self.store_values):
                store[dst, :, : self.width] = store[src, :, : self.width]
        self.rows = rows
        if rows == 0:
            self.width = 0
        self._publish()

    def _publish(self) -> None:
        self.keys = self.store_keys[: self.rows, :, : self.width]
        self.values = self.store_values[: self.rows, :, : self.width]


class RowCache(Cache):
    """The engine's cache: one `RowLayer` per decoder layer, all with the same rows and width."""

    def __init__(self, prefill: Cache) -> None:
        super().__init__(layers=[RowLayer(layer.keys, layer.values) for layer in prefill.layers])

    @property
    def width(self) -> int:
        return self.layers[0].width

    def append(self, prefill: Cache) -> None:
        for layer, new in zip(self.layers, prefill.layers, strict=True):
            layer.append(new.keys, new.values)

    def remove(self, gone: list[int]) -> list[int]:
        """Drop the rows at `gone`: the last live rows fill their slots. Returns the new order
        as old row indices (what the engine applies to its own per-row lists)."""
        rows = self.layers[0].rows
        order = list(range(rows))
        holes = sorted({i for i in gone if i < rows})
        keep_rows = rows - len(holes)
        movers = [i for i in range(keep_rows, rows) if i not in holes]
        targets = [h for h in holes if h < keep_rows]
        for target, source in zip(targets, movers, strict=True):
            order[target] = source
        for layer in self.layers:
            layer.move_rows(movers, targets, keep_rows)
        return order[:keep_rows]

    def drop_left(self, columns: int) -> None:
        for layer in self.layers:
            layer.shift(-columns)

    def widen_left(self, columns: int) -> None:
        for layer in self.layers:
            layer.shift(columns)
