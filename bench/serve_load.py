"""Load benchmark of `duet serve` on loopback: requests/s and latency at several concurrencies.

    python bench/serve_load.py                       # embedded pair, concurrency 1, 8, 32
    python bench/serve_load.py --requests 64 --max-seconds 120

Starts the server in this process on 127.0.0.1 (a free port), sends builtin-task questions
through the official async openai client, and stops by itself: each level sends at most
--requests requests and stops after --max-seconds. Prints requests/s, p50 and p99 latency per
level and the throughput ratio of the highest concurrency to concurrency 1.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import threading
import time

import openai
import torch
import uvicorn

from duetlm.backends import BackendOptions, load_backend
from duetlm.config import DuetConfig
from duetlm.protocol import Duet
from duetlm.serve import ServeConfig, create_app
from duetlm.tasks import builtin


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def level(url: str, questions: list[str], concurrency: int, max_seconds: float) -> dict:
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=max_seconds)
    latencies: list[float] = []
    errors = 0
    queue = list(questions)
    started = time.perf_counter()

    async def worker() -> None:
        nonlocal errors
        while queue and time.perf_counter() - started < max_seconds:
            question = queue.pop()
            t0 = time.perf_counter()
            try:
                await client.chat.completions.create(
                    model="duet", messages=[{"role": "user", "content": question}]
                )
                latencies.append(time.perf_counter() - t0)
            except openai.APIError:
                errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await client.close()
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "rps": len(latencies) / elapsed,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--capable", default="tiny-M")
    parser.add_argument("--light", default="tiny-m")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--requests", type=int, default=64, help="Requests per level (at most).")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="Time cap per level.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = BackendOptions(device="cpu", batch_size=64)
    duet = Duet(
        load_backend(args.capable, options),
        load_backend(args.light, options),
        DuetConfig(signal_max_tokens=512, answer_max_tokens=64),
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(duet, ServeConfig(max_batch=64)), host="127.0.0.1", port=port, log_level="error"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1"
    questions = [p.question for p in builtin.generate(args.requests, split="test", seed=3)]
    asyncio.run(level(url, questions[:4], 2, args.max_seconds))  # warm-up
    rows = [asyncio.run(level(url, questions, int(c), args.max_seconds)) for c in args.levels.split(",")]
    server.should_exit = True
    thread.join(timeout=30)
    print(f"duet serve on loopback, {args.capable} + {args.light}, CPU, {args.threads} threads")
    print(f"{'conc':>5} {'reqs':>5} {'errors':>6} {'req/s':>7} {'p50 s':>7} {'p99 s':>7}")
    for r in rows:
        print(
            f"{r['concurrency']:>5} {r['requests']:>5} {r['errors']:>6} {r['rps']:>7.2f} {r['p50']:>7.3f} {r['p99']:>7.3f}"
        )
    print(
        f"throughput ratio, concurrency {rows[-1]['concurrency']} / {rows[0]['concurrency']}: "
        f"{rows[-1]['rps'] / rows[0]['rps']:.1f}x"
    )


if __name__ == "__main__":
    main()
