"""Load benchmark of `duet serve` on loopback: requests/s, latency and time to first chunk.

    python bench/serve_load.py                          # embedded pair, both schedulers, 1/8/32
    python bench/serve_load.py --schedulers continuous --levels 32 --requests 128
    python bench/serve_load.py --levels 32 --requests 128 --rounds 5   # medians of 5 runs each
    git worktree add /tmp/before 102ed35 && python bench/serve_load.py --before-tree /tmp/before

For each scheduler (`batch`: gather requests, solve them together, then send; `continuous`:
stream while the models write, each request moving on to m when its own signal ends), the
server starts on 127.0.0.1 (a free port) and builtin-task questions go
through the official async openai client as streams (`stream=True`, the signal asked for).
Per concurrency level it prints requests/s, p50/p99 latency, and p50/p99 of the time to the
first reasoning chunk (M's signal) and to the first answer chunk (m's), the CPU cores the
server and the client process kept busy (CPU seconds per second of the level, from /proc;
the machine's cores bound their sum), and for the batch scheduler the mean number of
requests per batch (from the server's /metrics). Every level
sends the same questions; a level stops after --requests requests or --max-seconds.

Each scheduler runs in its own `duet serve` process (started as a user starts it, torch
threads from --threads), and the load comes from a third process. --rounds runs the
schedulers in turn that many times and reports medians, since this machine's speed drifts.
--before-tree adds a `before` row: the server of another checkout of this project (its
`src`, with its own defaults), such as the commit the serving work started from.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import openai

from duetlm.serve import ServeConfig
from duetlm.tasks import builtin


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


async def batch_counters(url: str) -> tuple[int, int]:
    """(batches, requests batched) from the server's /metrics: the batch scheduler's batch sizes."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(url.removesuffix("/v1") + "/metrics")).text
    values = dict(line.split() for line in text.splitlines() if line.startswith("duet_batch"))
    return int(values.get("duet_batches_total", 0)), int(values.get("duet_batched_requests_total", 0))


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` and its live descendants (the engine processes
    of `duet serve`), all their threads (Linux /proc; NaN elsewhere)."""
    if _stat(pid) is None:
        return float("nan")
    parents = {}
    for entry in os.listdir("/proc"):
        fields = _stat(int(entry)) if entry.isdigit() else None
        if fields is not None:
            parents[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime+stime
    tree, ticks = {pid}, 0
    for _ in range(4):  # children, grandchildren...
        tree |= {child for child, (parent, _) in parents.items() if parent in tree}
    ticks = sum(parents[p][1] for p in tree if p in parents)
    return ticks / os.sysconf("SC_CLK_TCK")


async def level(
    url: str, questions: list[str], concurrency: int, max_seconds: float, server_pid: int
) -> dict:
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=max_seconds)
    latencies, first_reasoning, first_answer = [], [], []
    errors = 0
    queue = list(questions)
    batches_before, batched_before = await batch_counters(url)
    server_cpu, client_cpu = cpu_seconds(server_pid), time.process_time()
    started = time.perf_counter()

    async def one(question: str) -> None:
        t0 = time.perf_counter()
        reasoning_at = answer_at = None
        stream = await client.chat.completions.create(
            model="duet",
            messages=[{"role": "user", "content": question}],
            stream=True,
            extra_body={"duet": {"return_signal": True}},
        )
        async for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            if reasoning_at is None and (delta.model_extra or {}).get("reasoning_content"):
                reasoning_at = time.perf_counter() - t0
            if answer_at is None and delta.content:
                answer_at = time.perf_counter() - t0
        latencies.append(time.perf_counter() - t0)
        if reasoning_at is not None:
            first_reasoning.append(reasoning_at)
        if answer_at is not None:
            first_answer.append(answer_at)

    async def worker() -> None:
        nonlocal errors
        while queue and time.perf_counter() - started < max_seconds:
            try:
                await one(queue.pop())
            except openai.APIError:
                errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    server_cpu, client_cpu = cpu_seconds(server_pid) - server_cpu, time.process_time() - client_cpu
    await client.close()
    batches, batched = await batch_counters(url)
    return {
        "concurrency": concurrency,
        "batch_size": (batched - batched_before) / max(1, batches - batches_before),
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "reasoning_p50": percentile(first_reasoning, 0.5),
        "reasoning_p99": percentile(first_reasoning, 0.99),
        "answer_p50": percentile(first_answer, 0.5),
        "answer_p99": percentile(first_answer, 0.99),
        "server_cores": server_cpu / elapsed,
        "client_cores": client_cpu / elapsed,
    }


def run_scheduler(
    scheduler: str, args: argparse.Namespace, questions: list[str], levels: list[int]
) -> list[dict]:
    """One scheduler's levels against its own `duet serve` process, started as a user starts
    it. Schedulers never share a process: a thread the other left alive would slow this one's
    torch kernels (each thread keeps its own OpenMP team)."""
    port = free_port()
    command = [sys.executable, "-m", "duetlm.cli", "serve", "--capable", args.capable, "--light", args.light]
    command += ["--port", str(port), "--device", "cpu", "--max-batch", "64"]
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    if scheduler == "before":  # another checkout's server, with the options it has
        env["PYTHONPATH"] = os.path.join(args.before_tree, "src")
    else:
        command += ["--scheduler", scheduler, "--stream-interval-ms", str(args.stream_interval_ms)]
        command += ["--decode-step", args.decode_step]
        command += ["--engine", args.engine, "--engine-threads", str(args.engine_threads)]
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = wait_until_up(port, server, log)
            # the load comes from a third process, as it would from real clients
            client = [sys.executable, __file__, "--client", url, "--server-pid", str(server.pid)]
            client += ["--levels", ",".join(map(str, levels))]
            client += ["--max-seconds", str(args.max_seconds), "--questions-json", json.dumps(questions)]
            done = subprocess.run(client, capture_output=True, text=True, check=True)
        finally:
            server.terminate()
            server.wait(timeout=60)
    return json.loads(done.stdout)


def wait_until_up(port: int, server: subprocess.Popen, log) -> str:
    """The server's /v1 URL once /health answers; its output if it exits first."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"duet serve exited ({server.returncode}):\n{log.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return f"http://127.0.0.1:{port}/v1"
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("duet serve did not come up within 300 s")


def client_main(
    url: str, levels: list[int], max_seconds: float, questions: list[str], server_pid: int
) -> None:
    asyncio.run(level(url, questions[:4], 2, max_seconds, server_pid))  # warm-up
    print(json.dumps([asyncio.run(level(url, questions, c, max_seconds, server_pid)) for c in levels]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--capable", default="tiny-M")
    parser.add_argument("--light", default="tiny-m")
    parser.add_argument("--schedulers", default="batch,continuous")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--requests", type=int, default=256, help="Requests per level (at most).")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="Time cap per level.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=1, help="Run the schedulers in turn this many times; report medians."
    )
    parser.add_argument(
        "--stream-interval-ms", type=float, default=ServeConfig().stream_interval_ms, help="As in duet serve."
    )
    parser.add_argument(
        "--decode-step", default="auto", help="hf engine: auto (its own step) or transformers (the forward)."
    )
    parser.add_argument(
        "--engine", default="process", help="hf engine of the continuous scheduler: process or thread."
    )
    parser.add_argument("--engine-threads", type=int, default=1, help="As in duet serve.")
    parser.add_argument(
        "--before-tree", help="A checkout of this project whose server to measure too, as `before`."
    )
    parser.add_argument("--save", help="Write every round's figures and the medians to this JSON file.")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # internal: run the load against this URL
    parser.add_argument("--questions-json", help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        levels = [int(c) for c in args.levels.split(",")]
        client_main(args.client, levels, args.max_seconds, json.loads(args.questions_json), args.server_pid)
        return
    questions = [p.question for p in builtin.generate(args.requests, split="test", seed=3)]
    levels = [int(c) for c in args.levels.split(",")]
    print(
        f"duet serve on loopback, {args.capable} + {args.light}, CPU, {args.threads} threads, streamed requests"
    )
    header = f"{'scheduler':<11} {'conc':>4} {'reqs':>4} {'err':>3} {'req/s':>6} {'p50 s':>6} {'p99 s':>6}"
    header += (
        f" {'1st sig p50':>11} {'p99':>6} {'1st ans p50':>11} {'p99':>6} {'cores srv/cli':>13} {'batch':>5}"
    )
    schedulers = (["before"] if args.before_tree else []) + args.schedulers.split(",")
    rounds: dict[str, list[list[dict]]] = {s: [] for s in schedulers}
    for _ in range(args.rounds):  # in turn: a drift in the machine's speed hits every scheduler
        for scheduler in schedulers:
            rounds[scheduler].append(run_scheduler(scheduler, args, questions, levels))
    results = {
        s: [median_row([r[i] for r in runs]) for i in range(len(levels))] for s, runs in rounds.items()
    }
    if args.rounds > 1:
        print(f"medians over {args.rounds} rounds")
    print(header)
    for scheduler, rows in results.items():
        for r in rows:
            print(
                f"{scheduler:<11} {r['concurrency']:>4} {r['requests']:>4} {r['errors']:>3} {r['rps']:>6.2f} "
                f"{r['p50']:>6.3f} {r['p99']:>6.3f} {r['reasoning_p50']:>11.3f} {r['reasoning_p99']:>6.3f} "
                f"{r['answer_p50']:>11.3f} {r['answer_p99']:>6.3f} "
                f"{r['server_cores']:>8.2f}/{r['client_cores']:<4.2f} "
                + (f"{r['batch_size']:>5.1f}" if scheduler != "continuous" else f"{'-':>5}")
            )
    for baseline in ("before", "batch"):
        if baseline not in results or "continuous" not in results:
            continue
        old, new = results[baseline][-1], results["continuous"][-1]
        print(
            f"at concurrency {new['concurrency']}: p50 latency {new['p50'] / old['p50']:.2f}x {baseline}'s, "
            f"throughput {new['rps'] / old['rps']:.2f}x"
        )
    for baseline in ("before", "batch"):
        if baseline not in rounds or "continuous" not in rounds:
            continue
        for index, (old, new) in enumerate(zip(rounds[baseline], rounds["continuous"], strict=True)):
            old, new = old[-1], new[-1]
            batches = f" (batches of {old['batch_size']:.1f})" if old["batch_size"] else ""
            print(
                f"  round {index + 1}: {baseline} {old['rps']:.2f} req/s p50 {old['p50']:.3f} s{batches}, "
                f"continuous {new['rps']:.2f} req/s p50 {new['p50']:.3f} s: "
                f"p50 {new['p50'] / old['p50']:.2f}x, throughput {new['rps'] / old['rps']:.2f}x"
            )
    if args.save:
        with open(args.save, "w") as out:
            json.dump({"args": vars(args), "rounds": rounds, "medians": results}, out, indent=1)


def median_row(runs: list[dict]) -> dict:
    """One level's figures across rounds: the median of each (errors summed)."""
    row = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    row["errors"] = sum(r["errors"] for r in runs)
    row["concurrency"], row["requests"] = runs[0]["concurrency"], min(r["requests"] for r in runs)
    return row


if __name__ == "__main__":
    main()
