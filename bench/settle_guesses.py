"""How often m is right from a prefix of M's thinking that stops before M's last step.

    python bench/settle_guesses.py                 # 500 builtin test questions
    python bench/settle_guesses.py --questions 200 --split train

The base pair (tiny-M + tiny-m) on the builtin task: M thinks once (`duet` mode, greedy), and
m answers greedily from every line-end prefix of that thinking, as a probe of `settle` or a
cut of `duet probe` hands it over. Each prefix is put on one side of the point where M's last
essential step (`a op d = v` for the chain's last operation) appears: before it the answer is
not yet on the page, so a right answer there is m finishing the chain or guessing the digit.
This is why the shortest working cut (the probe oracle) is far below what a stopping rule that
never sees the gold could reach. The embedded pair is a small model pair trained on a
synthetic task: these are not results on real LLMs.
"""

from __future__ import annotations

import argparse
import time

from duetlm.backends import load_backend
from duetlm.config import DuetConfig
from duetlm.evaluate.probe import cut_text, line_ends
from duetlm.models import EMBEDDED_BUDGETS
from duetlm.protocol import Duet
from duetlm.tasks import builtin, grade, load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--split", default="test", choices=("test", "train"))
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
