"""What `answer_retry` changes on the real pair's shipped rows, without measuring them again.

    python bench/answer_retry.py                       # GSM8K's duet rows
    python bench/answer_retry.py --task math500 --part main --method duet

The retry only touches a row whose m ended its turn at once with nothing written, and then
sends one request that depends on nothing but the question and M's signal, both in the row.
So asking m again on exactly those rows gives what the shipped run would have scored with the
retry on, at the cost of a few dozen m tokens per row instead of a rerun of both models.
Prints each such row's answer before and after, and the method's accuracy both ways.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_pair import PAIRS, ROOT, pair_config

from duetlm.backends import BackendOptions, load_backend
from duetlm.evaluate.summary import results_rows
from duetlm.problems import Problem
from duetlm.requests import answer_again_request
from duetlm.tasks import grade, load_task


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pair", default="qwen2.5-coder")
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--part", default="main", help="the run folder under the task's results")
    parser.add_argument("--method", default="duet")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "real-pair")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    return parser.parse_args()


def main() -> None:
    args = parse()
    if args.pair not in PAIRS:
        raise SystemExit(f"unknown pair {args.pair!r}: use {', '.join(PAIRS)}")
    folder = args.results / args.task / args.part
    rows = [r for r in results_rows(folder) if r["method"] == args.method]
    if not rows:
        raise SystemExit(f"no {args.method!r} rows in {folder}: run the bench's part first, or pick --method")
    silent = [
        r for r in rows if r["no_answer"] and not r["text"].strip() and r["light_finish"] in ("eos", "stop")
    ]
    examples = {e.id: e for e in load_task(args.task, str(args.data_dir / args.task / "test.jsonl"))}
    _, light_name = PAIRS[args.pair]
    light = load_backend(f"llamacpp:{light_name}", BackendOptions(batch_size=max(1, min(len(silent), 32))))
    try:
        config = pair_config(f"llamacpp:{PAIRS[args.pair][0]}", light.spec, answer_retry=True)
        requests = [
            answer_again_request(
                Problem(examples[r["id"]].question, examples[r["id"]].choices), r["signal"], config
            )
            for r in silent
        ]
        answers = light.generate(requests) if requests else []
    finally:
        light.close()
    regained = 0
    for row, answer in zip(silent, answers, strict=True):
        verdict = grade(answer.text, examples[row["id"]])
        regained += verdict.correct
        print(
            f"{row['id']:>6}  gold {row['gold']:<12} asked again: {verdict.answer!s:<12} right: {verdict.correct}"
        )
    before = sum(r["correct"] for r in rows)
    print(
        f"{args.task} {args.part} {args.method}: {len(rows)} rows, {len(silent)} empty turns of m, "
        f"{regained} answered right when asked again; accuracy {100 * before / len(rows):.1f}% as "
        f"measured, {100 * (before + regained) / len(rows):.1f}% with the retry"
    )


if __name__ == "__main__":
    main()
