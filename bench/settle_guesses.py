"""How often m is right from a prefix of M's thinking that stops before M's last step.

    python bench/settle_guesses.py                 # 500 builtin test questions
    python bench/settle_guesses.py --questions 200 --split train
    python bench/settle_guesses.py --probe runs/settle-probe-stable   # also: what that probe's cuts save


The base pair (tiny-M + tiny-m) on the builtin task: M thinks once (`duet` mode, greedy), and
m answers greedily from every line-end prefix of that thinking, as a probe of `settle` or a
cut of `duet probe` hands it over. Each prefix is put on one side of the point where M's last
essential step (`a op d = v` for the chain's last operation) appears: before it the answer is
not yet on the page, so a right answer there is m finishing the chain or guessing the digit.
This is why the shortest working cut (the probe oracle) is far below what a stopping rule that
never sees the gold could reach. The embedded pair is a small model pair trained on a
synthetic task: these are not results on real LLMs.

With `--probe RUN` (a `duet probe` run folder, `--search stable` for the bound settle is held
to) it also prints what an oracle that chooses the questions to hand over saves with those
cuts: the cheapest cuts for as many questions as M-alone answers right, and for one point
fewer.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from duetlm.backends import load_backend
from duetlm.config import DuetConfig
from duetlm.evaluate.probe import cut_text, line_ends
from duetlm.evaluate.store import read_rows
from duetlm.models import EMBEDDED_BUDGETS
from duetlm.protocol import Duet
from duetlm.tasks import builtin, grade, load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--split", default="test", choices=("test", "train"))
    parser.add_argument("--probe", type=Path, help="a duet probe run folder to read the cuts of")
    args = parser.parse_args()
    if args.probe is not None:
        oracle_savings(args.probe)

    examples = list(load_task("builtin", split=args.split))[: args.questions]
    chains = {p.id: p for p in builtin.generate(args.questions, split=args.split)}
    config = DuetConfig(**EMBEDDED_BUDGETS, temperature=0.0)
    duet = Duet(load_backend("tiny-M"), load_backend("tiny-m"), config)
    started = time.perf_counter()
    results = duet.solve_batch([e.problem for e in examples], "duet")
    jobs = []  # (question index, before M's last step?, prefix)
    for index, (example, result) in enumerate(zip(examples, results, strict=True)):
        thinking = result.signal or ""
        ends = line_ends(thinking)
        lines = [thinking[:end].split("\n")[-1].strip() for end in ends]
        last = chains[example.id].essential_lines[-1]
        where = next((k for k, line in enumerate(lines, 1) if line == last), len(lines) + 1)
        jobs += [(index, cut < where, cut_text(thinking, ends, cut)) for cut in range(len(ends) + 1)]
    answers = duet.finish([examples[i].problem for i, _, _ in jobs], [cut for _, _, cut in jobs])
    right = {True: [0, 0], False: [0, 0]}
    lucky = set()
    for (index, before, _), answer in zip(jobs, answers, strict=True):
        correct = grade(answer.text, examples[index]).correct
        right[before][0] += correct
        right[before][1] += 1
        if before and correct:
            lucky.add(index)
    took = time.perf_counter() - started
    print(f"{len(examples)} builtin {args.split} questions, {len(jobs)} prefixes, {took:.1f} s")
    for before, name in ((True, "before M's last step"), (False, "from M's last step on")):
        hits, total = right[before]
        print(f"  m right {name}: {hits}/{total} prefixes ({100 * hits / max(total, 1):.1f}%)")
    print(
        f"  questions with a right prefix before M's last step: {len(lucky)} ({100 * len(lucky) / len(examples):.1f}%)"
    )
    print("The embedded pair is small and trained on a synthetic task; not results on real LLMs.")


def oracle_savings(run: Path) -> None:
    """The probe's cuts spent where they save most, at M-alone's accuracy and a point under it."""
    rows = read_rows(run / "results.jsonl")
    n = len(rows)
    alone = sum(r["capable_output_tokens"] for r in rows) / n
    accuracy = sum(r["capable_correct"] for r in rows) / n
    cuts = sorted(r["oracle_tokens"] for r in rows if r["oracle_tokens"] is not None)
    print(
        f"{run} ({rows[0].get('search', 'binary')} search): {n} questions, M-alone {100 * accuracy:.1f}% at {alone:.1f} M tokens"
    )
    for points in (0, 1):
        needed = math.ceil((accuracy - points / 100) * n - 1e-9)
        if needed > len(cuts):
            print(f"  at {points} point(s) under M-alone: not reached")
            continue
        tokens = sum(cuts[:needed]) / n
        print(
            f"  at {points} point(s) under M-alone ({needed} questions): {tokens:.1f} M tokens, {100 * (1 - tokens / alone):.1f}% saved"
        )


if __name__ == "__main__":
    main()
