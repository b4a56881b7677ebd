"""m's update with and without prefix sharing (`parallel.share_prefixes`): forward tokens and
time of one PPO step over m's rows, and how far the two log-probs lie apart.

    python bench/prefix_sharing.py                         # n_m = 4, 2,048-token signals
    python bench/prefix_sharing.py --signal 4096 --answers 8 --repeats 3

The Qwen3 test bed's shape (hidden 64, 2 layers, head size 32, the 151,936-token vocabulary,
tied embeddings; max positions raised to fit the rows), one question with n_M signals of
`--signal` tokens and n_m answers of 64 to 256 tokens for each, laid out as m's update gets
them: every answer's row holds the question, the signal and the answer, right-padded. Row by
row, each micro-batch (one signal's n_m answers) runs its prefix n_m times; shared, once, the
answers packed behind it with their own position ids and a mask that lets each see the prefix
and itself. The step is AdamW over the whole model, gradient checkpointing off, fp32; the
median over `--repeats` steps (after one warm-up) is printed. A toy model on a CPU: attention
and the vocabulary projection dominate as they do at scale, but the absolute times are not
those of a real model on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def m_rows(vocab: int, signals: int, signal_tokens: int, answers: int, seed: int = 0):
    from duetlm.train.rollouts.batch import RolloutBatch
    from duetlm.train.rollouts.sequences import pack

    rng = random.Random(seed)
    question = [rng.randrange(5, vocab) for _ in range(60)]
    prompts, completions, keys = [], [], []
    for s in range(signals):
        prefix = question + [rng.randrange(5, vocab) for _ in range(signal_tokens)]
        for a in range(answers):
            prompts.append(prefix)
            completions.append([rng.randrange(5, vocab) for _ in range(rng.randrange(64, 257))])
            keys.append((0, s, a))
    seqs = pack(prompts, completions, pad_id=0)
    advantages = torch.tensor([rng.choice([-1.0, 1.0]) * rng.random() for _ in keys])
    return RolloutBatch.of(seqs, keys).with_scores(advantages, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--signal", type=int, default=2048, help="tokens of each signal")
    parser.add_argument("--signals", type=int, default=4, help="n_M: signals of the question")
    parser.add_argument("--answers", type=int, default=4, help="n_m: answers per signal")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    from qwen3 import tiny_qwen3

    from duetlm.train.loop.update import UpdateSettings, logps_of, ppo_update
    from duetlm.train.modeling.distributed import Runtime
    from duetlm.train.modeling.policy import LogprobNet, Policy

    base = tiny_qwen3(seed=0, hidden=64, head_dim=32, max_positions=args.signal + 512).float()
    batch = m_rows(base.config.vocab_size, args.signals, args.signal, args.answers)
    real = int(batch.seqs.attention_mask.sum())
    print(
        f"{len(batch)} rows (n_M = {args.signals}, n_m = {args.answers}), signals of {args.signal} tokens, "
        f"{real:,} real tokens, {int(batch.seqs.completion_mask.sum()):,} of them answers'"
    )
    print("| layout | forward tokens | step s (median) | log-prob pass s |")
    print("| --- | --- | --- | --- |")
    logps = {}
    for share in (False, True):
        model = copy.deepcopy(base).train()
        net = LogprobNet(model, 1024)
        policy = Policy(model, net, None, torch.optim.AdamW(model.parameters(), lr=1e-6), None, name="light")
        settings = UpdateSettings(1, 1, args.answers, 0.2, 1.0, "fp32", seed=0, share_prefixes=share)
        started = time.perf_counter()
        logps[share] = logps_of(net, batch, 1.0, settings, Runtime())
        pass_s = time.perf_counter() - started
        times, tokens = [], 0.0
        for repeat in range(args.repeats + 1):
            started = time.perf_counter()
            stats = ppo_update(policy, batch, settings, Runtime())
            if repeat:  # the first is a warm-up
                times.append(time.perf_counter() - started)
            tokens = stats.forward_tokens
        name = "shared prefix" if share else "row by row"
        print(f"| {name} | {tokens:,.0f} | {statistics.median(times):.2f} | {pass_s:.2f} |", flush=True)
        logps[(share, "tokens")] = tokens
    mask = batch.seqs.completion_mask.bool()
    gap = float((logps[True][mask] - logps[False][mask]).abs().max())
    ratio = logps[(False, "tokens")] / logps[(True, "tokens")]
    print(f"{ratio:.2f}x fewer forward tokens shared; largest |log-prob difference| {gap:.1e} (fp32)")


if __name__ == "__main__":
    main()
