"""Grading throughput: `duetlm.grading.grade` on degenerate responses, then calls per second on
MATH-500's golds.

    python bench/grading_throughput.py [--data ../shared/data/math500/test.jsonl] [--threads 8]

First, what a model caught in a loop writes (repeated `\\boxed{`, repeated `$1$ `, one long
digit run, a repeated sentence) at 10 KB, 100 KB and 1 MB: the seconds one `grade()` call
takes on each, and its growth from 10 KB to 1 MB (the grader reads the last
`extract.WINDOW_CHARS` characters, so it should not grow at all; linear would be 100x).

Then each MATH-500 gold is graded against a boxed equivalent rewriting of itself (right) and
against the next question's gold (wrong, unless the same value), first from the main thread
(math-verify under an alarm, in process), then from a pool of threads (each comparison goes to
a grading worker process; the first calls include starting the workers, so the pool runs twice
and the second pass is reported). Prints calls/s and the verdict counts of each pass, which
must agree.
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


DEGENERATE = {
    "repeated \\boxed{": "\\boxed{",
    "repeated $1$": "$1$ ",
    "one digit run": "7",
    "repeated sentence": "The answer might be 42, let me check again. ",
}
SIZES = (10_000, 100_000, 1_000_000)


def degenerate() -> None:
    print(f"{'response':20s} " + " ".join(f"{size // 1000:>7,} KB" for size in SIZES) + "   growth")
    for label, unit in DEGENERATE.items():
        seconds = []
        for size in SIZES:
            text = unit * (size // len(unit))
            grade(text[:100], "42")  # warm: imports, compiled patterns
            elapsed, _ = timed(lambda text=text: grade(text, "42"))
            seconds.append(elapsed)
        cells = " ".join(f"{s * 1000:>8.1f}ms" for s in seconds)
        print(f"{label:20s} {cells}   {seconds[-1] / seconds[0]:6.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MATH-500 as JSONL")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    degenerate()
    if not args.data.is_file():
        raise SystemExit(f"no MATH-500 copy at {args.data}: pass --data PATH for the throughput part")
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
