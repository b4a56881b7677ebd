"""The most `duet serve` could do: DUET's two stages straight through the streaming engines,
with no HTTP, no event loop and no client process.

    python bench/engine_ceiling.py                        # embedded pair, 32 in flight, 3 rounds
    python bench/engine_ceiling.py --concurrency 8 --requests 128
    python bench/engine_ceiling.py --beside 0.6       # a process beside it busy 60% of the time
    python bench/engine_ceiling.py --engine process   # each engine in a process of its own

A closed loop of --concurrency requests, as `bench/serve_load.py` sends them: each question
goes to M's engine; when its signal ends the engine thread itself submits m's request, and
when m's answer ends it records the latency and submits the next question. Tokenization runs
on the engine thread (in `duet serve` it runs on the event loop). With --engine process each
model's engine runs in a process of its own (as `duet serve` runs them by default), with
--engine-threads torch threads, and the next stage is submitted from the reader thread that
receives the results. Prints requests/s and
p50/p99 latency per round, then the medians. Comparing these figures with `serve_load.py`'s
at the same concurrency shows what the server adds around the engines. --beside F starts a
process that keeps one core busy a fraction F of the time (pure Python, in 10 ms periods), as
the server's HTTP side and the load client do: it tells CPU sharing apart from contention for
the GIL, which a separate process cannot cause.

The embedded pair is a pair of toy models trained on a synthetic task: its figures say how the
serving machinery performs, not how any real LLM does.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import threading
import time

import torch

from duetlm.backends import BackendOptions, load_backend
from duetlm.backends.base import GenerationResult
from duetlm.config import DuetConfig
from duetlm.protocol import as_problem, capable_request, light_request, signal_of
from duetlm.tasks import builtin


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class ClosedLoop:
    """`concurrency` requests in flight until `problems` run out; each finished request
    starts the next one from the engine thread."""

    def __init__(self, capable, light, problems: list, concurrency: int, config: DuetConfig) -> None:
        self.capable, self.light, self.config = capable, light, config
        self.problems, self.concurrency = list(problems), concurrency
        self.latencies: list[float] = []
        self.failures = 0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._total = len(problems)

    def run(self) -> float:
        """Seconds until every problem has its answer."""
        started = time.perf_counter()
        for _ in range(self.concurrency):
            self._start()
        self._done.wait()
        return time.perf_counter() - started

    def _start(self) -> None:
        with self._lock:
            if not self.problems:
                return
            problem = self.problems.pop()
        began = time.perf_counter()
        request = capable_request(problem, self.config, self.config.signal_max_tokens)

        def on_signal(event) -> None:
            if isinstance(event, GenerationResult):
                answer = light_request(
                    problem, signal_of(event, self.config), self.config, self.config.light_template_kwargs
                )
                self.light.engine.submit(self.light.prompt_ids(answer), answer.sampling, on_answer)

        def on_answer(event) -> None:
            if isinstance(event, GenerationResult):
                with self._lock:
                    self.latencies.append(time.perf_counter() - began)
                    self.failures += bool(event.extra.get("failure"))
                    if len(self.latencies) == self._total:
                        self._done.set()
                self._start()

        self.capable.engine.submit(self.capable.prompt_ids(request), request.sampling, on_signal)


def busy(fraction: float, stop) -> None:
    """Keep a core busy `fraction` of each 10 ms until `stop` is set (in its own process)."""
    while not stop.is_set():
        began = time.perf_counter()
        while time.perf_counter() - began < 0.010 * fraction:
            pass
        time.sleep(0.010 * (1 - fraction))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--capable", default="tiny-M")
    parser.add_argument("--light", default="tiny-m")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=256, help="Requests per round.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="Torch threads of this process.")
    parser.add_argument("--engine", default="thread", choices=("thread", "process"))
    parser.add_argument(
        "--engine-threads", type=int, default=1, help="--engine process: torch threads of each engine."
    )
    parser.add_argument("--decode-step", default="auto", help="As in duet serve.")
    parser.add_argument(
        "--beside", type=float, default=0.0, help="Busy fraction of a process beside the engines (0: none)."
    )
    args = parser.parse_args()
    if not 0 <= args.beside <= 1:
        parser.error(f"--beside is a fraction of the time, from 0 to 1 (got {args.beside})")
    torch.set_num_threads(args.threads)
    options = BackendOptions(
        device="cpu", decode_step=args.decode_step, engine=args.engine, engine_threads=args.engine_threads
    )
    capable, light = load_backend(args.capable, options), load_backend(args.light, options)
    config = DuetConfig()
    problems = [as_problem(p.question) for p in builtin.generate(args.requests, split="test", seed=3)]
    ClosedLoop(capable, light, problems[:8], 4, config).run()  # warm-up
    stop = multiprocessing.Event() if args.beside > 0 else threading.Event()
    if args.beside > 0:
        multiprocessing.Process(target=busy, args=(args.beside, stop), daemon=True).start()
    print(
        f"{args.capable} + {args.light} through their engines alone, {args.concurrency} in flight, "
        + (
            f"CPU, a process per engine with {args.engine_threads} threads each"
            if args.engine == "process"
            else f"CPU, {args.threads} threads"
        )
        + (f", a process beside them busy {args.beside:.0%} of the time" if args.beside > 0 else "")
        + " (toy pair: not figures of a real LLM)"
    )
    rows = []
    for index in range(args.rounds):
        loop = ClosedLoop(capable, light, problems, args.concurrency, config)
        elapsed = loop.run()
        row = {
            "rps": len(loop.latencies) / elapsed,
            "p50": percentile(loop.latencies, 0.5),
            "p99": percentile(loop.latencies, 0.99),
        }
        rows.append(row)
        print(
            f"round {index + 1}: {row['rps']:.2f} req/s, p50 {row['p50']:.3f} s, p99 {row['p99']:.3f} s"
            + (f", {loop.failures} failed" if loop.failures else "")
        )
    stop.set()
    capable.close()
    light.close()
    median = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    print(f"median: {median['rps']:.2f} req/s, p50 {median['p50']:.3f} s, p99 {median['p99']:.3f} s")


if __name__ == "__main__":
    main()
