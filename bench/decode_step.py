"""The streaming engine's decode step: its own (`decode_step.DecodeStep`) against the model's
transformers forward, at several batch sizes, on the same row cache.

    python bench/decode_step.py                       # the embedded pair, 1/3/8/16/32 rows
    python bench/decode_step.py --models hf:Qwen/Qwen3-0.6B --rows 1,8,32

Per model and row count: rows of a 100-token prompt are prefilled once, then each path
decodes 64 tokens from a copy of that cache (greedy, the same tokens); the figure is the
median milliseconds per step over --repeats runs, and the speedup of the engine's step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import DynamicCache

from duetlm.backends import load_backend
from duetlm.backends.hf.decode_step import DecodeStep
from duetlm.backends.hf.row_cache import RowCache


def decode(model, step: DecodeStep | None, prefill: DynamicCache, tokens: torch.Tensor, steps: int) -> float:
    """Seconds per step for `steps` greedy steps from the prefilled cache."""
    rows, width = tokens.shape[0], prefill.get_seq_length()
    cache = RowCache(prefill)
    cache.append(prefill)
    mask = torch.ones(rows, width, dtype=torch.long)
    started = time.perf_counter()
    for _ in range(steps):
        positions = mask.sum(dim=1)
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], dim=1)
        if step is None:
            logits = model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=positions[:, None],
                past_key_values=cache,
            ).logits[:, -1]
        else:
            logits = step(tokens, positions, cache, mask)
        tokens = logits.argmax(dim=-1)
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="tiny-M,tiny-m")
    parser.add_argument("--rows", default="1,3,8,16,32")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"ms per decode step (median of {args.repeats}), {args.threads} threads, CPU")
    print(f"{'model':<24} {'rows':>4} {'forward':>8} {'own step':>8} {'speedup':>7}")
    for spec in args.models.split(","):
        model = load_backend(spec).model
        step = DecodeStep(model)
        vocab = model.config.vocab_size
        for rows in [int(r) for r in args.rows.split(",")]:
            generator = torch.Generator().manual_seed(rows)
            ids = torch.randint(0, vocab, (rows, args.prompt_tokens), generator=generator)
            with torch.inference_mode():
                prefill = DynamicCache()
                tokens = model(input_ids=ids, past_key_values=prefill).logits[:, -1].argmax(dim=-1)
                times = {"forward": [], "own": []}
                decode(model, step, copy.deepcopy(prefill), tokens, 4)  # warm-up
                for _ in range(args.repeats):  # interleaved: drift in the machine hits both
                    for name, path in (("forward", None), ("own", step)):
                        times[name].append(decode(model, path, copy.deepcopy(prefill), tokens, args.steps))
            forward, own = statistics.median(times["forward"]), statistics.median(times["own"])
            print(f"{spec:<24} {rows:>4} {forward * 1e3:>8.2f} {own * 1e3:>8.2f} {forward / own:>6.2f}x")


if __name__ == "__main__":
    main()
