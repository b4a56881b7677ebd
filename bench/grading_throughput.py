"""Grading throughput: `duetlm.grading.grade` calls per second on MATH-500's golds.

    python bench/grading_throughput.py [--data ../shared/data/math500/test.jsonl] [--threads 8]

Each gold is graded against a boxed equivalent rewriting of itself (right) and against the
next question's gold (wrong, unless the same value), first from the main thread (math-verify
under an alarm, in process), then from a pool of threads (each comparison goes to a grading
worker process; the first calls include starting the workers, so the pool runs twice and the
second pass is reported). Prints calls/s and the verdict counts of each pass, which must agree.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from duetlm.grading import grade
from duetlm.grading.selfcheck import equivalent_rewriting
from duetlm.tasks import load_task

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "math500" / "test.jsonl"


def cases(golds: list[str]) -> list[tuple[str, str]]:
    right = [(f"\\boxed{{{equivalent_rewriting(g)}}}", g) for g in golds]
    wrong = [(f"\\boxed{{{golds[(i + 1) % len(golds)]}}}", g) for i, g in enumerate(golds)]
    return right + wrong


def timed(run) -> tuple[float, list[bool]]:
    started = time.perf_counter()
    verdicts = run()
    return time.perf_counter() - started, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MATH-500 as JSONL")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    golds = [e.gold for e in load_task("math500", data=args.data)]
    work = cases(golds)
    print(f"{len(work)} grade() calls: {len(golds)} golds x (equivalent rewriting, other question's gold)")

    seconds, main_verdicts = timed(lambda: [grade(text, gold).correct for text, gold in work])
    print(f"main thread:      {len(work) / seconds:8.1f} calls/s  ({sum(main_verdicts)} correct)")
    with ThreadPoolExecutor(args.threads) as pool:
        for label in ("first pass", "warm"):
            seconds, verdicts = timed(lambda: list(pool.map(lambda case: grade(*case).correct, work)))
            print(
                f"{args.threads} threads, {label + ':':11s} {len(work) / seconds:8.1f} calls/s  "
                f"({sum(verdicts)} correct)"
            )
            if verdicts != main_verdicts:
                raise SystemExit("threads and main thread disagree: a grading bug")


if __name__ == "__main__":
    main()
