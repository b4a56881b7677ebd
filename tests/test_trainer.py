"""The joint trainer on tiny real models: parameters move, the loss moves them the right way,
checkpoints resume exactly, the switches run, bad configs stop early, and two processes
compute what one does."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUESTIONS, free_port, small_config
from duetlm.errors import ConfigError
from duetlm.train.algorithm.grpo import token_logps
from duetlm.train.config import LoraSettings, TrainConfig, with_settings
from duetlm.train.loop.data import TrainingData
from duetlm.train.loop.trainer import DuetTrainer, train
from duetlm.train.rollouts.batch import RolloutBatch
from duetlm.train.rollouts.sequences import Sequences, pack

ENV = os.environ | {"HF_HUB_OFFLINE": "1"}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_training_changes_both_models_and_logs_every_step(model_dirs, task_path, tmp_path):
    out = train(small_config(model_dirs, task_path, tmp_path / "run"), progress=False)
    for name in ("capable", "light"):
        before, after = weights(model_dirs[name]), weights(out / "last" / name)
        assert any(not torch.equal(before[k], after[k]) for k in before), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in (
        "reward",
        "r_pair",
        "eval_r_light",
        "marginal_reward",
        "lambda",
        "signal_tokens",
        "pair_accuracy",
        "kl",
        "loss_capable",
        "loss_light",
        "grad_norm_capable",
        "update_tokens_light",
        "kl_loss_capable",
        "step_s",
        "eval_accuracy",
    ):
        assert key in rows[-1], key
    assert "r_light" not in rows[-1]  # no standalone answers of m in a step
    assert rows[-1]["lambda"] >= 0


def test_update_raises_logps_of_advantaged_sequences(model_dirs, task_path, tmp_path):
    trainer = DuetTrainer(small_config(model_dirs, task_path, tmp_path / "run", kl_beta=0.0))
    tokenizer = trainer.capable.tokenizer
    prompt = tokenizer("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)[
        "input_ids"
    ]
    good = tokenizer("<think>\nshort\n</think>", add_special_tokens=False)["input_ids"]
    bad = tokenizer("<think>\nlonger thoughts\n</think>", add_special_tokens=False)["input_ids"]
    seqs = pack([prompt, prompt], [good, bad], tokenizer.pad_token_id)
    batch = RolloutBatch.of(seqs, [(0, 0, 0), (0, 1, 0)])  # one question, two signals
    passes, capable = trainer.passes, trainer.capable

    def sequence_logps():
        logps = passes.logps(capable, batch)
        return (logps * seqs.completion_mask).sum(dim=1)

    before = sequence_logps()
    for _ in range(3):
        passes.update(capable, batch.with_scores(torch.tensor([1.0, -1.0]), passes.logps(capable, batch)), 0)
    after = sequence_logps()
    assert after[0] > before[0] and after[1] < before[1]


def test_length_sorted_trimmed_micro_batches_change_nothing_but_compute(model_dirs, task_path, tmp_path):
    trainer = DuetTrainer(small_config(model_dirs, task_path, tmp_path / "run", micro_batch=2, kl_beta=0.0))
    tokenizer = trainer.capable.tokenizer
    prompt = tokenizer("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)[
        "input_ids"
    ]
    texts = [
        "<think>\na much longer line of thought\n</think>",
        "<think>\nx\n</think>",
        "<think>\nmid\n</think>",
    ]
    completions = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    seqs = pack([prompt] * 3, completions, tokenizer.pad_token_id)
    model, passes, capable = trainer.capable.lm, trainer.passes, trainer.capable
    with torch.no_grad():
        whole = token_logps(model, seqs.input_ids, seqs.attention_mask, capable.temperature)
    chunked = passes.logps(capable, RolloutBatch.of(seqs, [(0, s, 0) for s in range(3)]))
    mask = seqs.completion_mask.bool()
    assert torch.allclose(chunked[mask], whole[mask], atol=1e-5)

    # the ratio is 1 against the sampling policy's own log-probs, and the clip acts when it is not
    group = torch.tensor([1.0, -1.0])
    two = Sequences(seqs.input_ids[:2], seqs.attention_mask[:2], seqs.completion_mask[:2])
    two = RolloutBatch.of(two, [(0, 0, 0), (0, 1, 0)])
    same = passes.update(capable, two.with_scores(group, None), 0)
    assert same["clip_fraction_capable"] == 0.0
    shifted = passes.logps(capable, two) + math.log(2.0)  # old policy twice as likely
    moved = passes.update(capable, two.with_scores(group, shifted), 0)
    assert moved["clip_fraction_capable"] == 1.0


def test_resume_continues_exactly(model_dirs, task_path, tmp_path):
    straight = train(
        small_config(model_dirs, task_path, tmp_path / "a", steps=3, eval_every=0), progress=False
    )
    partial = small_config(model_dirs, task_path, tmp_path / "b", steps=2, eval_every=0)
    train(partial, progress=False)
    resumed = train(partial.model_copy(update={"steps": 3}), resume=True, progress=False)
    for name in ("capable", "light"):
        a, b = weights(straight / "last" / name), weights(resumed / "last" / name)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    rows_a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2, 3]
    assert rows_a[-1]["reward"] == pytest.approx(rows_b[-1]["reward"])
    assert rows_a[-1]["lambda"] == pytest.approx(rows_b[-1]["lambda"])


@pytest.mark.parametrize(
    "overrides",
    [
        {"train_light": False},
        {"use_marginal_utility": False, "lambda_schedule": "constant", "lambda_init": 0.5},
        {"single_model": True},
        {"lora_capable": LoraSettings(r=4, alpha=8), "lora_light": LoraSettings(r=4, alpha=8)},
    ],
    ids=["capable-only", "no-marginal-constant-lambda", "single-model", "lora"],
)
def test_switches(model_dirs, task_path, tmp_path, overrides):
    config = small_config(model_dirs, task_path, tmp_path / "run", steps=1, **overrides)
    out = train(config, progress=False)
    assert (out / "last" / "capable" / "model.safetensors").is_file()
    assert (out / "last" / "light").is_dir() == config.trains_light
    if config.capable.lora is not None:
        assert (out / "last" / "capable_adapter").is_dir()
        before, after = weights(model_dirs["capable"]), weights(out / "last" / "capable")
        assert set(before) == set(after)  # merged back into a plain model
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 1


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[objective]\nlength_bound = -4\n", "objective.length_bound"),
        ("[objective]\nn_capable = 1\n", "objective.n_capable"),
        ("[optimizer]\nlearning_rate = 0.1\n", "optimizer.learning_rate"),
        ("[objective]\nquestions_per_step = 0\n", "objective.questions_per_step"),
        ("kl_beta = 0.5\n", "belongs in the [objective] section"),
        ("[rollout]\ncapable_temperature = 0\n", "rollout.capable_temperature"),
        ("[light]\ntemperature = 0\n", "light.temperature = 0 with m trained"),
        ("[parallel]\nstrategy = 'zero3'\n", "parallel.strategy"),
    ],
)
def test_bad_config_is_rejected_before_any_model_loads(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text + '[capable]\nmodel = "hf:/no/such/model"\n')
    done = subprocess.run(
        [str(Path(sys.executable).with_name("duet")), "train", "--config", str(path)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert done.returncode == 2
    assert fragment in done.stderr and "does not exist" not in done.stderr
    assert "Traceback" not in done.stderr


def test_resume_without_checkpoint_is_a_clear_error(model_dirs, task_path, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        DuetTrainer(small_config(model_dirs, task_path, tmp_path / "empty"), resume=True)


def test_two_ddp_processes_compute_what_one_does(model_dirs, task_path, tmp_path):
    # Sampled rollouts (T = 1 and 1.5): every request is seeded from what it is, so the samples
    # do not depend on which process draws them. (FSDP: test_distributed.py.)
    # The lr is small because AdamW's first step moves a weight by about lr whatever the size of
    # its gradient: where a gradient is nearly 0, the last bits that two processes' reduction
    # order changes become lr-sized differences (8.9e-5 at lr 1e-3, 8.9e-6 at 1e-4, measured).
    common = {
        "questions_per_step": 4,
        "eval_every": 0,
        "forced_stop_prob": 1.0,
        "steps": 2,
        "capable_lr": 3e-5,
        "light_lr": 3e-5,
    }
    single = small_config(model_dirs, task_path, tmp_path / "one", **common)
    double = small_config(model_dirs, task_path, tmp_path / "two", **common)
    paths = []
    for config, processes in ((single, 1), (double, 2)):
        path = tmp_path / f"{processes}.json"
        path.write_text(config.model_dump_json())
        paths.append(path)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(processes),
                "--master_port",
                str(free_port()),
                "--no-python",
                str(Path(sys.executable).with_name("duet")),
                "train",
                "--config",
                str(path),
            ],
            capture_output=True,
            text=True,
            env=ENV | {"OMP_NUM_THREADS": "1"},
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    for name in ("capable", "light"):
        a, b = weights(Path(single.out) / "last" / name), weights(Path(double.out) / "last" / name)
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), name
    one = [json.loads(x) for x in (Path(single.out) / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (Path(double.out) / "metrics.jsonl").read_text().splitlines()]
    assert one[-1]["signal_tokens"] == pytest.approx(two[-1]["signal_tokens"])
    assert one[-1]["lambda"] == pytest.approx(two[-1]["lambda"])


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "configs").glob("*.toml")), ids=lambda p: p.name
)
def test_shipped_configs_validate(path):
    config = TrainConfig.load(path)
    assert config.objective.n_capable >= 2 and config.objective.length_bound > 0


def test_kill_during_training_loses_at_most_the_step_in_flight(model_dirs, task_path, tmp_path):
    import signal
    import time

    config = small_config(model_dirs, task_path, tmp_path / "run", steps=8, eval_every=0)
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json())
    command = [str(Path(sys.executable).with_name("duet")), "train", "--config", str(path)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    metrics = Path(config.out) / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = torch.load(Path(config.out) / "last" / "state.pt", weights_only=False)["step"]
    logged = len(metrics.read_text().splitlines())
    assert saved >= logged - 1  # at most the step in flight is lost
    done = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 9))


# --- data, checkpoints and run folders ------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"task": "builtin", "eval_task": "builtin", "eval_split": "train"}, "read the same data"),
        ({"eval_task": None}, "eval_task is required"),
        ({"rollout": {"top_p": 0.9}}, "rollout.top_p"),
        ({"mini_batches": 3}, "mini_batches = 3 must divide"),
    ],
)
def test_configs_that_would_train_wrongly_are_refused(model_dirs, task_path, tmp_path, overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        small_config(model_dirs, task_path, tmp_path / "run", **overrides)
    same_file = {"eval_task": f"jsonl:{task_path}"}
    with pytest.raises(ValueError, match="read the same data"):
        small_config(model_dirs, task_path, tmp_path / "run", **same_file)


def test_training_drops_the_evaluation_questions(model_dirs, task_path, tmp_path, caplog):
    mixed = tmp_path / "mixed.jsonl"
    rows = [json.loads(line) for line in task_path.read_text().splitlines()]
    rows += [{"id": "leak", "question": f"  {QUESTIONS[1].upper()} ", "answer": "14"}]  # an eval question
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING"):
        trainer = DuetTrainer(small_config(model_dirs, task_path, tmp_path / "run", task=f"jsonl:{mixed}"))
    assert "leak" not in {e.id for e in trainer.data.examples} and len(trainer.data.examples) == 12
    assert any("dropped 1 training question" in r.getMessage() for r in caplog.records)


def test_each_pass_over_the_data_has_its_own_order(model_dirs, task_path, tmp_path):
    data = TrainingData(small_config(model_dirs, task_path, tmp_path / "run"))
    per_step = 2
    ids = [e.id for step in range(12) for e in data.questions(step, step * per_step, 0, 1).examples]
    passes = [ids[:12], ids[12:]]
    assert sorted(passes[0]) == sorted(passes[1]) == sorted(e.id for e in data.examples)
    assert passes[0] != passes[1]
    # two processes take the batch's questions in turn, and together take what one does
    shares = [data.questions(0, 0, rank, 2) for rank in (0, 1)]
    assert [s.positions for s in shares] == [[0], [1]]
    assert [s.examples[0].id for s in shares] == [e.id for e in data.questions(0, 0, 0, 1).examples]


def test_state_loads_without_code_and_a_kill_between_renames_resumes(model_dirs, task_path, tmp_path):
    config = small_config(model_dirs, task_path, tmp_path / "run", steps=1, eval_every=0)
    out = train(config, progress=False)
    state = torch.load(out / "last" / "state.pt", weights_only=True)
    assert state["step"] == 1 and state["config"]["steps"] == 1
    (out / "last").rename(out / "last.old")  # killed after `last -> last.old`, before the new one
    resumed = train(config.model_copy(update={"steps": 2}), resume=True, progress=False)
    assert torch.load(resumed / "last" / "state.pt", weights_only=True)["step"] == 2
    assert not (out / "last.old").exists()


def test_resume_with_another_config_is_refused(model_dirs, task_path, tmp_path):
    config = small_config(model_dirs, task_path, tmp_path / "run", steps=1, eval_every=0)
    train(config, progress=False)
    changed = with_settings(config, {"steps": 2, "capable.lr": 5e-4})
    with pytest.raises(ConfigError, match=r"capable\.lr: 0\.001 -> 0\.0005"):
        train(changed, resume=True, progress=False)


def test_a_new_run_never_overwrites_another(model_dirs, task_path, tmp_path):
    config = small_config(model_dirs, task_path, tmp_path / "run", steps=1, eval_every=0)
    train(config, progress=False)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config, progress=False)
    train(config, progress=False, force=True)
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert len(moved) == 1 and (moved[0] / "metrics.jsonl").read_text() == rows


def test_missing_tensorboard_is_said(tmp_path, caplog):
    pytest.importorskip("torch")
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    from duetlm.train.loop.logging import MetricsLog

    with caplog.at_level("WARNING"):
        MetricsLog(tmp_path, TrainConfig(logging={"tensorboard": True}))
    assert any("tensorboard is not installed" in r.getMessage() for r in caplog.records)


def test_accelerates_fsdp_plugin_is_refused_before_loading(model_dirs, task_path, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    with pytest.raises(ConfigError, match=r"--use_fsdp: duetlm shards models with its own FSDP2"):
        DuetTrainer(small_config(model_dirs, task_path, tmp_path / "run", capable="hf:/no/such/model"))


def test_pretrain_pair_writes_to_a_run_folder_by_default():
    done = subprocess.run(
        [str(Path(sys.executable).with_name("duet")), "pretrain-pair", "--help"],
        capture_output=True,
        text=True,
        env=ENV | {"COLUMNS": "200"},
    )
    assert "[default: runs/pretrain-pair]" in done.stdout  # not the package's own assets


def test_a_sharded_checkpoint_resumes_exactly_and_keeps_the_saves_asked_for(model_dirs, task_path, tmp_path):
    straight = train(
        small_config(model_dirs, task_path, tmp_path / "a", steps=3, eval_every=0, format="sharded"),
        progress=False,
    )
    partial = small_config(
        model_dirs, task_path, tmp_path / "b", steps=2, eval_every=0, format="sharded", keep=2
    )
    train(partial, progress=False)
    resumed = train(partial.model_copy(update={"steps": 3}), resume=True, progress=False)
    assert (resumed / "last" / "shards" / ".metadata").is_file()
    assert not (resumed / "last" / "capable").exists()  # no whole model written by a sharded save
    assert sorted(p.name for p in resumed.glob("step-*")) == ["step-000002"]  # last, and one before it
    assert torch.load(resumed / "step-000002" / "state.pt", weights_only=True)["step"] == 2
    from duetlm.train.loop.export import export_run

    a = export_run(straight, tmp_path / "export-a", dtype="float32")
    b = export_run(resumed, tmp_path / "export-b", dtype="float32")
    for name in ("capable", "light"):
        wa, wb = weights(a[name]), weights(b[name])
        assert set(wa) == set(wb) and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa), name


def test_an_export_loads_as_it_is_and_answers_as_the_last_weights(model_dirs, task_path, tmp_path):
    from duetlm.backends.base import GenerationRequest, SamplingParams
    from duetlm.backends.hf import HFBackend

    run = train(small_config(model_dirs, task_path, tmp_path / "run", steps=1, eval_every=0), progress=False)
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("duet")),
            "export",
            str(run),
            "--dtype",
            "float32",
            "--out",
            str(tmp_path / "f32"),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    released = train_export(run, tmp_path / "bf16")
    request = GenerationRequest.chat(QUESTIONS[0], SamplingParams(24))
    for name in ("capable", "light"):
        folder = tmp_path / "f32" / name
        assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
            p.name for p in folder.iterdir()
        }
        [exported] = HFBackend(str(folder), device="cpu").generate([request])
        [last] = HFBackend(str(run / "last" / name), device="cpu").generate([request])
        assert exported.token_ids == last.token_ids, name
        assert all(t.dtype == torch.bfloat16 for t in weights(released[name]).values())
        [half] = HFBackend(str(released[name]), device="cpu").generate([request])
        assert half.output_tokens > 0


def train_export(run: Path, out: Path) -> dict[str, Path]:
    from duetlm.train.loop.export import export_run

    return export_run(run, out)
