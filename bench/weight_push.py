"""The weight push after an update: time and peak extra memory, at 1 and 2 processes.

    python bench/weight_push.py                  # the Qwen3 test bed's shape, 1 and 2 processes
    python bench/weight_push.py --hidden 256 --layers 16 --bucket-mb 8   # layers outweigh a bucket

A tiny random Qwen3 of the test bed's shape (151,936-token vocabulary, tied embeddings),
trained weights in fp32, pushed as the trainer pushes them: whole tensors gathered one at a
time (`parallel.full_tensors`, FSDP2 over gloo at 2 processes) and staged once per node as
bf16 safetensors buckets, then read back by every process as an engine reads its node's copy
(vLLM's workers do exactly this read, `staged_weights`). Also the in-memory push an hf
replica takes. Prints the median over the pushes, and each process's peak resident memory
above what it held after a warm-up push (sampled every millisecond).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """The largest resident size while the block runs, sampled every millisecond."""

    def __enter__(self):
        self.peak, self.running = resident_bytes(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()


def worker(args) -> None:
    """One process of the measurement (run by torchrun, or alone)."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from qwen3 import tiny_qwen3

    from duetlm.train.engines.weight_push import Stager, WeightPush, staged_weights, weight_bytes
    from duetlm.train.modeling.distributed import start_runtime
    from duetlm.train.modeling.parallel import wrap
    from duetlm.train.modeling.policy import LogprobNet

    torch.set_num_threads(1)
    runtime = start_runtime(torch.device("cpu"), timeout_s=300, need_group=True)
    lm = tiny_qwen3(seed=0, hidden=args.hidden, layers=args.layers, head_dim=32)
    wrap(LogprobNet(lm, 1024), "fsdp", runtime, "fp32", trainable=True)
    stager = Stager(runtime, Path(args.staging), "bench", int(args.bucket_mb * 2**20))
    with WeightPush("capable", lm, stager).staged(torch.bfloat16) as folder:  # warm-up: one-time allocations
        sum(1 for _ in staged_weights(folder))
    stager.copies = 0
    base = resident_bytes()
    staged, in_memory, peaks = [], [], []
    for _ in range(args.pushes):
        with PeakMemory() as memory:
            started = time.perf_counter()
            with WeightPush("capable", lm, stager).staged(torch.bfloat16) as folder:
                tensors = sum(1 for _ in staged_weights(folder))
            staged.append(time.perf_counter() - started)
            started = time.perf_counter()
            for _name, _tensor in WeightPush("capable", lm, None).tensors():
                pass
            in_memory.append(time.perf_counter() - started)
        peaks.append(memory.peak - base)
    report = {
        "rank": runtime.rank,
        "staged_s": statistics.median(staged),
        "in_memory_s": statistics.median(in_memory),
        "peak_extra_mb": max(peaks) / 2**20,
        "copy_mb": weight_bytes(lm, torch.bfloat16) / 2**20,
        "tensors": tensors,
        "copies": stager.copies,
    }
    Path(args.report, f"{runtime.rank}.json").write_text(json.dumps(report))
    runtime.close()


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def measure(processes: int, args) -> list[dict]:
    with (
        tempfile.TemporaryDirectory() as report,
        tempfile.TemporaryDirectory(dir=args.staging_root) as staging,
    ):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(free_port()),
            __file__,
            "--worker",
            "--report",
            report,
            "--staging",
            staging,
            "--hidden",
            str(args.hidden),
            "--layers",
            str(args.layers),
            "--pushes",
            str(args.pushes),
            "--bucket-mb",
            str(args.bucket_mb),
        ]
        environment = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        subprocess.run(
            command, check=True, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        return [json.loads((Path(report) / f"{rank}.json").read_text()) for rank in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (the vLLM test bed's: 64)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (the test bed's: 2)")
    parser.add_argument("--pushes", type=int, default=5)
    parser.add_argument("--bucket-mb", type=float, default=512.0)
    parser.add_argument("--staging-root", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--staging", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(
        f"tiny Qwen3, hidden {args.hidden}, 151,936-token vocabulary, fp32 weights pushed as bf16; median of {args.pushes}"
    )
    print(
        f"{'processes':>9} {'staged push s':>14} {'in-memory s':>12} {'peak extra MB':>14} {'copy MB':>8} {'copies':>7}"
    )
    for processes in (1, 2):
        reports = measure(processes, args)
        print(
            f"{processes:>9} {max(r['staged_s'] for r in reports):>14.3f} "
            f"{max(r['in_memory_s'] for r in reports):>12.3f} {max(r['peak_extra_mb'] for r in reports):>14.1f} "
            f"{reports[0]['copy_mb']:>8.1f} {sum(r['copies'] for r in reports) // args.pushes:>7}"
        )


if __name__ == "__main__":
    main()
