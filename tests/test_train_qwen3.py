"""Training on the Qwen3 test bed (real tokenizer, chat template and generation config; tiny
weights): the path a Qwen3-4B + Qwen3-0.6B user takes, at a size a CPU runs."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import QUESTIONS, UNCLOSED_QUESTION, assert_truncated_weights, qwen3_config, record_updates
from duetlm.tasks import Example
from duetlm.train.algorithm.grpo import k3_kl
from duetlm.train.config import LoraSettings
from duetlm.train.loop.trainer import DuetTrainer, train
from duetlm.train.modeling.policy import load_lm, merged_state_dict
from duetlm.train.rollouts.batch import StepQuestions


def test_old_and_recomputed_logprobs_agree_at_step_0(qwen3_dirs, qwen3_task, tmp_path):
    # The rollout engine's log-probs of what it sampled (Qwen3's generation config says top-k
    # 20, top-p 0.95) against the trainer's at the rollout temperature: the same policy.
    config = qwen3_config(
        qwen3_dirs,
        qwen3_task,
        tmp_path / "run",
        capable=f"hf:{qwen3_dirs['random']}",
        check_rollout_logprobs=True,
    )
    trainer = DuetTrainer(config)
    metrics = trainer.train_step()
    assert 0 <= metrics["rollout_logprob_gap"] < 1e-3


def test_signals_never_carry_the_end_of_turn_token(qwen3_dirs, qwen3_task, tmp_path):
    # a cold temperature: training refuses 0 (greedy is not the sampled policy), and the scripted
    # M's continuation is all but certain at 0.01
    trainer = DuetTrainer(qwen3_config(qwen3_dirs, qwen3_task, tmp_path / "run", capable_temperature=0.01))
    question = Example("u", UNCLOSED_QUESTION, "7")
    rollout = trainer.rollouts.capable_signals(StepQuestions(0, [question], [0]))
    for signal in rollout.signals[0]:
        assert signal.text == "first 3+4=7"  # what inference hands m too
        assert signal.ids[-1] == 151645  # M is still trained on ending its turn there


def test_bf16_mixed_keeps_fp32_masters_and_moves_weights_at_lr_1e_6(qwen3_dirs, qwen3_task, tmp_path):
    config = qwen3_config(
        qwen3_dirs,
        qwen3_task,
        tmp_path / "run",
        capable=f"hf:{qwen3_dirs['random']}",
        precision="bf16-mixed",
        capable_lr=1e-6,
        kl_beta=0.0,
    )
    trainer = DuetTrainer(config)
    lm = trainer.capable.lm
    assert all(p.dtype == torch.float32 for p in lm.parameters())
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    seen = []
    hook = lm.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    rollout = trainer.rollouts.capable_signals(
        StepQuestions(0, [Example("a", QUESTIONS[0], "14")] * 2, [0, 1])
    )
    seen.clear()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    trainer.passes.update(trainer.capable, rollout.batch.with_scores(advantages, None), 0)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # bf16 compute
    layer = "model.layers.0.mlp.down_proj.weight"
    moved = (lm.get_parameter(layer) != before[layer]).float().mean()
    assert moved > 0.9  # a bf16 copy would keep almost all of them (1e-6 is below its resolution)
    as_bf16 = (lm.get_parameter(layer).bfloat16() != before[layer].bfloat16()).float().mean()
    assert as_bf16 < 0.1


def test_ppo_epochs_and_mini_batches_take_several_clipped_steps(qwen3_dirs, qwen3_task, tmp_path):
    config = qwen3_config(
        qwen3_dirs,
        qwen3_task,
        tmp_path / "run",
        capable=f"hf:{qwen3_dirs['random']}",
        ppo_epochs=2,
        mini_batches=2,
        capable_lr=5e-2,
        clip_eps=0.05,
        kl_beta=0.0,
    )
    trainer = DuetTrainer(config)
    steps = []
    optimizer = trainer.capable.optimizer
    original = optimizer.step
    optimizer.step = lambda *a, **k: (steps.append(1), original(*a, **k))[1]
    trainer.train_step()
    assert len(steps) == 4  # 2 epochs x 2 mini-batches
    rollout = trainer.rollouts.capable_signals(
        StepQuestions(1, [Example("a", QUESTIONS[0], "14")] * 2, [0, 1])
    )
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    stats = trainer.passes.update(trainer.capable, rollout.batch.with_scores(advantages, None), 1)
    assert len(steps) == 8
    assert stats["clip_fraction_capable"] > 0  # after the first step the ratio leaves 1 and the clip acts


def test_two_step_joint_run_with_lora_and_bf16(qwen3_dirs, qwen3_task, tmp_path):
    lora = LoraSettings(r=4, alpha=8)
    config = qwen3_config(
        qwen3_dirs,
        qwen3_task,
        tmp_path / "run",
        steps=2,
        eval_every=2,
        lora_capable=lora,
        lora_light=lora,
        precision="bf16-mixed",
        mini_batches=2,
    )
    out = train(config, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval_accuracy" in rows[-1]
    for name in ("capable", "light"):
        assert (out / "last" / f"{name}_adapter" / "adapter_config.json").is_file()
        merged = json.loads((out / "last" / name / "config.json").read_text())
        assert merged["model_type"] == "qwen3" and merged["vocab_size"] == 151936
        generation = json.loads((out / "last" / name / "generation_config.json").read_text())
        assert generation["top_k"] == 20  # the model's own sampling advice travels with it
    state = torch.load(out / "last" / "state.pt", weights_only=True)
    assert state["step"] == 2


def test_merged_weights_equal_peft_merge(qwen3_dirs):
    lm, _ = load_lm(str(qwen3_dirs["random"]), torch.device("cpu"), "fp32", LoraSettings(r=4, alpha=8))
    for name, parameter in lm.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_()  # as if trained: B starts at zero
    merged = merged_state_dict(lm)
    import copy

    reference = copy.deepcopy(lm).merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    for key, value in reference.items():
        assert torch.allclose(merged[key], value, atol=1e-6), key
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"],
        lm.get_base_model().state_dict()["model.layers.0.self_attn.q_proj.base_layer.weight"],
    )


def test_staged_weights_hold_tied_embeddings_once_in_the_engine_dtype(tmp_path):
    # Qwen3-0.6B and -4B tie the output layer to the embedding: the state dict holds one tensor
    # under two names. The staged copy keeps the embedding (vLLM's loader skips `lm_head.` for a
    # tied model), in the engine's dtype, in buckets, and is gone once the engines have read it.
    from qwen3 import tiny_qwen3

    from duetlm.train.engines.weight_push import Stager, WeightPush, staged_weights
    from duetlm.train.modeling.distributed import Runtime

    model = tiny_qwen3(seed=3)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    stager = Stager(Runtime(), tmp_path, "run", bucket_bytes=1 << 16)  # small buckets: several files
    with WeightPush("capable", model, stager).staged(torch.bfloat16) as folder:
        files = sorted(folder.glob("*.safetensors"))
        written = dict(staged_weights(folder))
    assert len(files) > 1 and not folder.exists() and stager.copies == 1
    assert "lm_head.weight" not in written and set(written) == set(state) - {"lm_head.weight"}
    assert all(t.dtype == torch.bfloat16 for t in written.values())
    assert torch.equal(written["model.embed_tokens.weight"], state["model.embed_tokens.weight"].bfloat16())


def test_warm_start_on_the_qwen3_template_trains_the_close_token(qwen3_dirs, qwen3_task, tmp_path):
    # the probe on the real Qwen3 template and tokenizer, then the warm start in bf16-mixed: the
    # completions M is fine-tuned on end in Qwen3's single </think> token, and M's weights move
    from duetlm.config import DuetConfig
    from duetlm.evaluate.probe import ProbeConfig, run_probe
    from duetlm.train.loop.warm_start import completion_text

    probe = tmp_path / "probe"
    run_probe(
        ProbeConfig(
            task=f"jsonl:{qwen3_task / 'train.jsonl'}",
            capable=f"hf:{qwen3_dirs['capable']}",
            light=f"hf:{qwen3_dirs['light']}",
            limit=4,
            duet=DuetConfig(signal_max_tokens=24, answer_max_tokens=12),
        ),
        probe,
        progress=False,
    )
    rows = [json.loads(line) for line in (probe / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["thinking_tokens"] > 0 for r in rows)
    config = qwen3_config(
        qwen3_dirs, qwen3_task, tmp_path / "run", warm_start=str(probe), precision="bf16-mixed"
    )
    trainer = DuetTrainer(config)
    tokenizer = trainer.capable.tokenizer
    close = tokenizer.convert_tokens_to_ids("</think>")
    ids = tokenizer(completion_text("first 3+4=7", config.duet), add_special_tokens=False)["input_ids"]
    assert ids[-1] == close and ids.count(close) == 1
    before = {n: p.detach().clone() for n, p in trainer.capable.lm.named_parameters()}
    assert any(r["oracle_lines"] is not None for r in rows)
    report = trainer.warm_start()
    assert report["examples"] == sum(r["oracle_lines"] is not None for r in rows)
    assert any((p != before[n]).any() for n, p in trainer.capable.lm.named_parameters())


@pytest.mark.parametrize("mode", ["token_tis", "none"])
def test_an_engine_at_another_temperature_is_corrected_only_with_the_option_on(
    qwen3_dirs, qwen3_task, tmp_path, monkeypatch, mode
):
    # the engine samples M at 1.6 while the trainer's policy is at 1.0: μ is not π_old, and the
    # engine's log-probs (what it sampled with) say so; the correction weighs each token by
    # π_old / μ truncated at the threshold (1.02 here: random weights are nearly flat, so the
    # weights stay near 1), and without it nothing does

    config = qwen3_config(
        qwen3_dirs,
        qwen3_task,
        tmp_path / "run",
        capable=f"hf:{qwen3_dirs['random']}",
        capable_temperature=1.0,
        rollout_correction=mode,
        rollout_correction_threshold=1.02,
        signal_max_tokens=12,
    )
    trainer = DuetTrainer(config)
    rollouts = trainer.rollouts
    sampling = rollouts._sampling
    monkeypatch.setattr(rollouts, "_sampling", lambda t: sampling(1.6 if t == 1.0 else t))
    seen = record_updates(monkeypatch)
    metrics = trainer.train_step()
    [capable] = [b for p, b in seen if p is trainer.capable]
    if mode == "none":
        assert capable.is_weights is None and "rollout_kl_capable" not in metrics
        return
    known = assert_truncated_weights(capable, 1.02)
    assert (capable.is_weights[~known] == 1).all()
    assert metrics["rollout_kl_capable"] > 1e-3  # the mismatch shows (an engine in sync: about 1e-6)
    assert 0 < metrics["is_corrected_fraction_capable"] < 1 and metrics["is_weight_max_capable"] > 1.02


def test_the_kl_in_the_loss_draws_the_capable_model_back_to_its_reference(qwen3_dirs, qwen3_task, tmp_path):
    # M moved away from the initial M (noise on its weights); with a β in the loss large enough to
    # outweigh the policy term, three steps bring its KL to the reference (k3, what the loss
    # minimizes) down, measured on fixed rollouts
    config = qwen3_config(
        qwen3_dirs,
        qwen3_task,
        tmp_path / "run",
        capable=f"hf:{qwen3_dirs['random']}",
        kl_placement="loss",
        kl_beta=50.0,
        capable_lr=1e-3,
        signal_max_tokens=12,
    )
    trainer = DuetTrainer(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in trainer.capable.lm.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    batch = trainer.rollouts.capable_signals(
        StepQuestions(0, [Example("a", QUESTIONS[0], "14")] * 2, [0, 1])
    ).batch
    passes, capable = trainer.passes, trainer.capable

    def kl() -> float:
        k3 = k3_kl(passes.logps(capable, batch), passes.reference_logps(capable, batch))
        mask = batch.seqs.completion_mask
        return float((k3 * mask).sum() / mask.sum())

    before = kl()
    metrics = [trainer.train_step() for _ in range(3)]
    assert all("kl_loss_capable" in m for m in metrics)
    print("k3 before, after; kl_loss per step:", before, kl(), [m["kl_loss_capable"] for m in metrics])
    assert kl() < 0.7 * before, (before, kl())
