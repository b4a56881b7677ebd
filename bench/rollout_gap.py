"""The engine-trainer log-prob gap under bf16-mixed, with the output layer in bf16 and in fp32,
and what the rollout correction sees of it. Run in the vLLM environment:

    .venv-vllm/bin/python bench/rollout_gap.py              # 3 steps per head precision
    .venv-vllm/bin/python bench/rollout_gap.py --steps 1

The Qwen3 test bed (151,936-token vocabulary, tied embeddings, scripted as the tests script
it), both models full and rolled out on vLLM's CPU build in bf16, trained with `precision =
"bf16-mixed"` and `rollout_correction = "token_tis"`. Each run writes its metrics.jsonl as any
training run does; this prints, per step, the largest |engine − trainer| log-prob over the
sampled tokens (`rollout_logprob_gap`, M and m), the engine-vs-trainer KL over them (its
mean log-ratio `rollout_kl_*`, and `rollout_k3_*`, whose terms are never negative) and the
importance weights' range and truncated share. Step 1 compares the two heads on the same
rollouts (every rollout is seeded, and both runs start from the same weights); later steps
train differently. "bf16 head"
scores the output layer under the autocast (the matrix product rounded to bf16 before the
log-softmax); "fp32 head" is what the trainer does. Toy models: the figures compare the two
numerics, not results on real LLMs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

COLUMNS = [
    ("rollout_logprob_gap", "gap M"),
    ("rollout_logprob_gap_light", "gap m"),
    ("rollout_kl_capable", "KL M"),
    ("rollout_kl_light", "KL m"),
    ("rollout_k3_capable", "k3 M"),
    ("rollout_k3_light", "k3 m"),
    ("is_weight_min_capable", "w min"),
    ("is_weight_max_capable", "w max"),
    ("is_corrected_fraction_capable", "truncated"),
]


def bf16_head_logps(model, states, targets, temperature, chunk):
    """The output layer as autocast runs it: the product in bf16, then fp32 for the softmax."""
    import torch

    head = model.get_output_embeddings()
    scale = 1.0 / temperature if temperature > 0 else 1.0
    pieces = []
    for i in range(0, len(targets), chunk):
        logits = head(states[i : i + chunk]).float() * scale
        y = targets[i : i + chunk]
        pieces.append(logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1))
    return torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)


def run(dirs, task: Path, out: Path, steps: int, head: str) -> list[dict]:
    import duetlm.train.algorithm.grpo as grpo
    from conftest import qwen3_config
    from duetlm.train.loop.trainer import train

    config = qwen3_config(
        dirs,
        task,
        out,
        capable=f"vllm:{dirs['capable']}",
        light=f"vllm:{dirs['light']}",
        steps=steps,
        precision="bf16-mixed",
        check_rollout_logprobs=True,
        rollout_correction="token_tis",
        capable_temperature=1.0,
        light_temperature=1.0,
        questions_per_step=4,
        n_capable=4,
        n_light=4,
        forced_stop_prob=0.5,
        capable_lr=1e-3,
        light_lr=1e-3,
    )
    fp32_head = grpo.head_logps
    if head == "bf16":
        grpo.head_logps = bf16_head_logps
    try:
        train(config, progress=False)
    finally:
        grpo.head_logps = fp32_head
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "rollout_logprob_gap" in row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    from conftest import _scripted_qwen3, qwen3_task_folder

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = _scripted_qwen3(root / "models", hidden=64, head_dim=32)
        task = qwen3_task_folder(root / "task")
        print("| head | step | " + " | ".join(label for _, label in COLUMNS) + " |")
        print("| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |")
        for head in ("bf16", "fp32"):
            for row in run(dirs, task, root / f"run-{head}", args.steps, head):
                cells = [f"{row[key]:.3g}" if key in row else "-" for key, _ in COLUMNS]
                print(f"| {head} | {row['step']} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
