"""Two joint DUET steps on real pretrained weights, on a CPU: the time of each phase.

    python bench/train_real.py                       # M = m = qwen2.5-coder-0.5b (LoRA on M)
    python bench/train_real.py --steps 2 --questions 2 --out runs/train-real

M is Qwen2.5-Coder-0.5B-Instruct with LoRA adapters and m the same model, trained fully, both
read from the Hugging Face folder `duet models install qwen2.5-coder-0.5b` wrote (converted from
its GGUF: Qwen2.5's chat template, bf16 weights, its own output layer); GSM8K training
questions; the family's protocol (the answer style: M is stopped at its answer marker);
short budgets so that a step takes minutes. It prints, per step, the seconds of each phase
(M's rollouts, m's rollouts, log-probs, m's update, M's update), the step's total and its
signal lengths. No accuracy is claimed: two steps on two questions teach nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from duetlm.models import config_defaults
from duetlm.train.config import TrainConfig
from duetlm.train.loop.trainer import train

ROOT = Path(__file__).resolve().parents[1]
NAME = "qwen2.5-coder-0.5b"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--questions", type=int, default=2, help="questions per step")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "train-real")
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
    )
    return parser.parse_args()


def main() -> None:
    args = parse()
    duet = config_defaults(f"hf:{NAME}", f"hf:{NAME}").model_dump()
    config = TrainConfig.model_validate(
        {
            "out": str(args.out),
            "steps": args.steps,
            "save_every": args.steps,
            "models": {
                "capable": f"hf:{NAME}",
                "light": f"hf:{NAME}",
                "train_light": True,
                "lora_capable": {"r": 8, "alpha": 16},
            },
            "data": {
                "task": "gsm8k",
                "data": str(args.data),
                "eval_task": "gsm8k",
                "eval_data": str(args.data.with_name("test.jsonl")),
            },
            "objective": {
                "questions_per_step": args.questions,
                "n_capable": 2,
                "n_light": 2,
                "length_bound": 96.0,
            },
            "optimizer": {"capable_lr": 1e-5, "light_lr": 1e-6},
            "rollout": {
                "capable_temperature": 0.7,
                "light_temperature": 0.7,
                "signal_max_tokens": 128,
                "answer_max_tokens": 32,
                "forced_stop_prob": 0.0,
            },
            "parallel": {"device": "cpu", "micro_batch": 4},
            "evaluation": {"every": 0},
            "logging": {"tensorboard": False},
            "duet": duet,
        }
    )
    started = time.perf_counter()
    folder = train(config, force=True)
    total = time.perf_counter() - started
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [row for row in rows if "step_s" in row]
    phases = sorted({key for row in steps for key in row if key.startswith("time_")})
    print(
        f"{NAME} as M (LoRA r=8) and m (full), {args.questions} GSM8K questions a step, 2 signals x 2 answers"
    )
    print(
        "step | "
        + " | ".join(p.removeprefix("time_").removesuffix("_s") for p in phases)
        + " | step s | signal tok p50/max"
    )
    for row in steps:
        cells = [f"{row.get(p, 0.0):.1f}" for p in phases]
        print(
            f"{row['step']} | " + " | ".join(cells) + f" | {row['step_s']:.1f} | "
            f"{row.get('signal_tokens_p50', 0):.0f}/{row.get('signal_tokens_max', 0):.0f}"
        )
    print(f"whole run (loading, {args.steps} steps, checkpoint): {total:.0f} s; run folder {folder}")


if __name__ == "__main__":
    main()
