"""Peak host memory of a checkpoint save, whole against sharded, at 1 and 2 processes.

    python bench/checkpoint_memory.py                 # hidden 512, 8 layers (about 100M parameters)
    python bench/checkpoint_memory.py --hidden 768 --layers 12

Each run is a real `duet train` process group (torchrun, FSDP2 over gloo, on the CPU): M a random
Qwen3 of the given shape with the real 151,936-word vocabulary, m the test bed's tiny one; one
step, so that AdamW has its state; then `save()`, while a thread samples each process's resident
memory every 5 ms. It prints, per format and process count, the peak above the resident memory
just before the save, for the main process and the others, and the checkpoint's size on disk.
A whole save gathers every trained model and its AdamW state onto the main process; a sharded
one has each process stream its own shards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "checkpoint-memory")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a torchrun process's config
    return parser.parse_args()


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(config_path: Path) -> None:
    """One torchrun process: a step, then a save under the sampler."""
    from duetlm.train.config import TrainConfig
    from duetlm.train.loop.trainer import DuetTrainer

    config = TrainConfig.model_validate_json(config_path.read_text())
    trainer = DuetTrainer(config)
    trainer.train_step()
    import gc

    gc.collect()
    base, peak, stop = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    trainer.save()
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    rank = trainer.runtime.rank
    report = {"rank": rank, "extra_mb": (max(peak[0], resident_bytes()) - base) / 2**20, "seconds": seconds}
    (config_path.parent / f"report-{rank}.json").write_text(json.dumps(report))
    trainer.close()


def models(folder: Path, hidden: int, layers: int) -> dict[str, Path]:
    from qwen3 import qwen3_tokenizer, save, tiny_qwen3

    tokenizer = qwen3_tokenizer()
    paths = {}
    for role, shape in (("capable", {"hidden": hidden, "layers": layers, "head_dim": 64}), ("light", {})):
        path = folder / role
        if not (path / "config.json").is_file():
            save(tiny_qwen3(seed=1, **shape), tokenizer, path)
        paths[role] = path
    return paths


def run(paths: dict[str, Path], folder: Path, processes: int, fmt: str) -> dict:
    from conftest import qwen3_config, qwen3_task_folder

    task = qwen3_task_folder(folder / "task")
    config = qwen3_config(
        {k: str(v) for k, v in paths.items()},
        task,
        folder / f"run-{fmt}-{processes}",
        strategy="fsdp",
        questions_per_step=2 * processes,
        signal_max_tokens=8,
        answer_max_tokens=4,
        capable_temperature=1.0,
        light_temperature=1.0,
        format=fmt,
        kl_beta=0.0,
    )
    config_path = folder / f"config-{fmt}-{processes}" / "config.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(config.model_dump_json())
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_port", str(29500 + processes + (10 if fmt == "sharded" else 0)),
        str(Path(__file__).resolve()), "--worker", str(config_path),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    reports = [json.loads((config_path.parent / f"report-{r}.json").read_text()) for r in range(processes)]
    last = folder / f"run-{fmt}-{processes}" / "last"
    size = sum(p.stat().st_size for p in last.rglob("*") if p.is_file())
    return {"format": fmt, "processes": processes, "reports": reports, "disk_mb": size / 2**20}


def main() -> None:
    args = parse()
    if args.worker is not None:
        worker(args.worker)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    paths = models(args.out / "models", args.hidden, args.layers)
    print(
        f"M: random Qwen3, hidden {args.hidden}, {args.layers} layers; m: the test bed's tiny one; FSDP2, gloo"
    )
    print("format  | processes | main process extra MB | other process extra MB | save s | checkpoint MB")
    for fmt in ("whole", "sharded"):
        for processes in (1, 2):
            result = run(paths, args.out, processes, fmt)
            main_rank = result["reports"][0]
            others = [r["extra_mb"] for r in result["reports"][1:]]
            other = f"{max(others):.0f}" if others else "-"
            print(
                f"{fmt:<7} | {processes:>9} | {main_rank['extra_mb']:>21.0f} | {other:>22} | "
                f"{main_rank['seconds']:>6.1f} | {result['disk_mb']:>13.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
