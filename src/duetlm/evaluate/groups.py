"""`duet report --by FIELD`: where the savings come from, one summary per value of a field.

An average over a benchmark hides whether DUET saves on easy questions and spends on hard
ones. Rows are grouped by a field of their example's metadata (MATH's `level` and
`subject`, the builtin task's `steps`, a user's `--field meta.NAME=...`) or by a field of
the row itself (`capable_finish`, `truncated`); each group gets the full report, savings and
paired Δ accuracy against the M-alone rows of the same group. A numeric field with many
values is cut into buckets.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

from duetlm.errors import InputError

MISSING = "(none)"
AUTO_BUCKETS = 5  # a numeric field with more distinct values than this is bucketed by default
MAX_AUTO_VALUES = 12


def field_value(row: dict, name: str):
    """The value of `name` for a row: its example's metadata first, then the row's own field."""
    meta = row.get("meta") or {}
    if name in meta:
        return meta[name]
    value = row.get(name, MISSING)
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def _numeric(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_bins(text: str | None) -> int | list[float] | None:
    """`--bins N` (N buckets of about equal size) or `--bins 3,5,8` (edges: below 3, 3 to
    below 5, 5 to below 8, 8 and above)."""
    if text is None or not text.strip():
        return None
    try:
        parts = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise InputError(f"--bins takes a number of buckets or comma-separated edges, got {text!r}") from None
    if len(parts) == 1 and "," not in text:
        if parts[0] < 2 or not parts[0].is_integer():
            raise InputError(f"--bins N needs a whole number of buckets >= 2, got {text!r}")
        return int(parts[0])
    if sorted(set(parts)) != parts:
        raise InputError(f"--bins edges must increase, got {text!r}")
    return parts


def _quantile_edges(values: list[float], buckets: int) -> list[float]:
    ordered = sorted(values)
    edges = sorted({ordered[len(ordered) * i // buckets] for i in range(1, buckets)})
    return [e for e in edges if e > ordered[0]]


def _label(low: float, high: float) -> str:
    shown = [int(v) if float(v).is_integer() else round(v, 3) for v in (low, high)]
    return f"{shown[0]}" if low == high else f"{shown[0]}–{shown[1]}"


def group_rows(
    rows: list[dict], name: str, bins: int | list[float] | None = None, per_question: bool = True
) -> list[tuple[object, list[dict]]]:
    """(value, rows) per value of `name`, in the field's natural order. Numeric values are
    bucketed when `bins` asks, or when there are more than 12 distinct ones (5 buckets); a
    bucket is labelled by the lowest and highest value in it. Rows without the field form a
    `(none)` group, last."""
    if not rows:
        return []
    values = [field_value(r, name) for r in rows]
    if all(v == MISSING for v in values):
        known = sorted({k for r in rows for k in (r.get("meta") or {})})
        raise InputError(
            f"no row has a field {name!r}; the examples' metadata holds: {', '.join(known) or 'nothing'} "
            "(a task read from a file keeps more with --field meta.NAME=FIELD)"
        )
    numbers = [v for v in values if _numeric(v)]
    distinct = set(numbers)
    if bins is not None and len(numbers) < sum(v != MISSING for v in values):
        raise InputError(f"--bins needs a numeric field; {name!r} holds text")
    if bins is None and len(distinct) > MAX_AUTO_VALUES and len(numbers) == len(values):
        bins = AUTO_BUCKETS
    keys: list = values
    if bins is not None and numbers:
        edges = _quantile_edges(numbers, bins) if isinstance(bins, int) else list(bins)
        index = [sum(v >= e for e in edges) if _numeric(v) else None for v in values]
        spans: dict[int, list[float]] = defaultdict(list)
        for i, v in zip(index, values, strict=True):
            if i is not None:
                spans[i].append(v)
        names = {i: (min(vs), _label(min(vs), max(vs))) for i, vs in spans.items()}
        keys = [names[i] if i is not None else MISSING for i in index]
    grouped: dict = defaultdict(list)
    for key, row in zip(keys, rows, strict=True):
        grouped[key].append(row)
    ordered = sorted(grouped, key=_order)
    return [(k[1] if isinstance(k, tuple) else k, grouped[k]) for k in ordered]


def _order(key) -> tuple:
    if key == MISSING:
        return (3, 0, "")
    if isinstance(key, tuple):  # a bucket: (its lowest value, its label)
        return (0, key[0], "")
    if _numeric(key):
        return (0, key, "")
    return (1, 0, str(key))


def summarize_by(
    rows: list[dict],
    name: str,
    summarize: Callable[[list[dict]], list[dict]],
    bins: int | list[float] | None = None,
) -> list[dict]:
    """`summarize` (a report's per-method summary) run on each group, each summary tagged
    with `field`, `value` and the group's share of the task's questions."""
    out = []
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        for value, members in group_rows(task_rows, name, bins):
            for summary in summarize(members):
                out.append({"field": name, "value": value, **summary})
    return out
