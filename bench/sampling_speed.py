"""Cost of the streaming engine's sampler per decode step at Qwen3's vocabulary size.

    python bench/sampling_speed.py

Random logits over 151,936 tokens, Qwen3's thinking-mode settings (temperature 0.6, top-k 20,
top-p 0.95), each row with its own seeded generator, as `duet serve` samples them; top-p alone;
the whole distribution at T 1 (how training samples); greedy rows for reference. Prints
milliseconds per step for several batch sizes.
"""

from __future__ import annotations

import argparse
import time

import torch

from duetlm.backends.base import SamplingParams
from duetlm.backends.hf.sampling import sample


def per_step_ms(rows: int, vocab: int, params: SamplingParams, repeats: int) -> float:
    logits = torch.randn(rows, vocab) * 3
    generators = [torch.Generator().manual_seed(seed) for seed in range(rows)]
    sample(logits, [params] * rows, generators)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        sample(logits, [params] * rows, generators)
    return (time.perf_counter() - started) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    qwen3 = SamplingParams(64, temperature=0.6, top_k=20, top_p=0.95)
    print(f"vocabulary {args.vocab:,}, {args.threads} threads, ms per decode step")
    print(f"{'rows':>4} {'T0.6 k20 p0.95':>15} {'T1 p0.95 (no k)':>16} {'T1 (training)':>14} {'greedy':>7}")
    settings = (
        qwen3,
        SamplingParams(64, temperature=1.0, top_p=0.95),
        SamplingParams(64, temperature=1.0),  # the whole distribution, as training samples it
        SamplingParams(64),
    )
    for rows in (int(r) for r in args.rows.split(",")):
        figures = [per_step_ms(rows, args.vocab, params, args.repeats) for params in settings]
        print(f"{rows:>4} {figures[0]:>15.1f} {figures[1]:>16.1f} {figures[2]:>14.1f} {figures[3]:>7.1f}")


if __name__ == "__main__":
    main()
