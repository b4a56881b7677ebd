"""What review found in the trainer, each pinned by a test that failed before its fix: a LoRA
run resumed without a merged copy, the single-model baseline loading m, dropout in the update,
m's answers to one signal being one answer n_m times, and m's rollout correction unseen."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_truncated_weights, qwen3_config, record_updates, small_config
from duetlm.tasks import Example
from duetlm.train.config import LoraSettings
from duetlm.train.loop.trainer import DuetTrainer, train
from duetlm.train.rollouts.batch import StepQuestions


def lora_weights(lm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.named_parameters() if "lora_" in n}


def test_lora_without_a_merged_copy_resumes_its_trained_adapter(model_dirs, task_path, tmp_path):
    config = small_config(
        model_dirs,
        task_path,
        tmp_path / "run",
        steps=1,
        eval_every=0,
        lora_capable=LoraSettings(r=4, alpha=8),
        merge_adapters=False,
        # groups large enough that one of M's groups has mixed rewards, so the step moves B
        questions_per_step=4,
        n_capable=4,
    )
    out = train(config, progress=False)
    assert (out / "last" / "capable_adapter").is_dir() and not (out / "last" / "capable").exists()
    saved = load_file(out / "last" / "capable_adapter" / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for n, t in saved.items() if "lora_B" in n)  # trained: B left 0
    resumed = DuetTrainer(config.model_copy(update={"steps": 2}), resume=True)
    try:
        adapters = lora_weights(resumed.capable.lm)
        for name, tensor in saved.items():
            [match] = [
                p for n, p in adapters.items() if n.endswith(name.replace(".weight", ".default.weight"))
            ]
            assert torch.equal(match, tensor.to(match.dtype)), name
    finally:
        resumed.close()


def test_the_single_model_baseline_loads_no_m(model_dirs, task_path, tmp_path):
    config = small_config(model_dirs, task_path, tmp_path / "run", steps=1, single_model=True, eval_every=1)
    trainer = DuetTrainer(config)
    try:
        assert trainer.light is None and [p.name for p in trainer.policies] == ["capable"]
        metrics = trainer.train_step() | trainer.evaluate()
        assert 0 <= metrics["eval_accuracy"] <= 1 and "eval_r_light" not in metrics
    finally:
        trainer.close()


def test_the_first_ratio_is_one_with_lora_dropout(qwen3_dirs, qwen3_task, tmp_path):
    """One optimizer step on the whole batch: its ratio is taken before the step, against the
    sampling-time log-probs, so it is exactly 1 and nothing is clipped, dropout or not."""
    config = qwen3_config(
        qwen3_dirs,
        qwen3_task,
        tmp_path / "run",
        capable=f"hf:{qwen3_dirs['random']}",
        capable_temperature=1.0,
        lora_capable=LoraSettings(r=4, alpha=8, dropout=0.5),
        signal_max_tokens=16,
    )
    trainer = DuetTrainer(config)
    try:
        with torch.no_grad():  # adapters as a resumed or warm-started run has them (a fresh B is 0)
            for name, parameter in trainer.capable.lm.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.5)
        metrics = trainer.train_step()
        assert metrics["clip_fraction_capable"] == 0.0
    finally:
        trainer.close()


def test_m_answers_each_signal_with_independent_draws(qwen3_dirs, qwen3_task, tmp_path):
    """n_m answers to one signal are n_m samples: each request has its own seed (the answer
    index is part of it), so at a high temperature they are not one answer n_m times."""
    config = qwen3_config(
        qwen3_dirs,
        qwen3_task,
        tmp_path / "run",
        light=f"hf:{qwen3_dirs['random']}",
        light_temperature=1.5,
        n_light=4,
        answer_max_tokens=8,
    )
    trainer = DuetTrainer(config)
    try:
        questions = StepQuestions(0, [Example("u", "What is 3+4?", "7")], [0])
        rollout = trainer.rollouts.capable_signals(questions)
        batch, _ = trainer.rollouts.light_guided(questions, rollout.signals)
        seqs = batch.seqs
        # each row's sampled tokens (the completion mask is shifted by one against the ids)
        sampled = [
            tuple(seqs.input_ids[row, 1:][seqs.completion_mask[row].bool()].tolist())
            for row in range(len(batch))
        ]
        for signal in range(config.objective.n_capable):
            answers = {sampled[row] for row in range(len(batch)) if int(batch.signal[row]) == signal}
            assert len(answers) > 1, f"signal {signal}: m's {config.objective.n_light} answers are one answer"
    finally:
        trainer.close()


@pytest.mark.parametrize("mode", ["none", "token_tis"])
def test_m_engine_at_another_temperature_is_corrected_on_its_own(
    qwen3_dirs, qwen3_task, tmp_path, monkeypatch, mode
):
    """m's rollouts are weighed by π_old/μ like M's: its engine samples m at 1.6 while the
    trainer's m is at 1.0, and only m's update carries the weights (M's engine is in sync)."""

    config = qwen3_config(
        qwen3_dirs,
        qwen3_task,
        tmp_path / "run",
        light=f"hf:{qwen3_dirs['random']}",
        capable_temperature=0.6,
        light_temperature=1.0,
        rollout_correction=mode,
        rollout_correction_threshold=1.02,
        answer_max_tokens=12,
    )
    trainer = DuetTrainer(config)
    try:
        rollouts = trainer.rollouts
        sampling = rollouts._sampling
        monkeypatch.setattr(rollouts, "_sampling", lambda t: sampling(1.6 if t == 1.0 else t))
        seen = record_updates(monkeypatch)
        metrics = trainer.train_step()
        [light] = [b for p, b in seen if p is trainer.light]
        if mode == "none":
            assert light.is_weights is None and "rollout_kl_light" not in metrics
            return
        assert_truncated_weights(light, 1.02)
        assert metrics["rollout_kl_light"] > 1e-3 and metrics["is_weight_max_light"] > 1.02
        assert json.dumps(metrics)
    finally:
        trainer.close()
