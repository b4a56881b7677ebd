"""`duet train` with `warm_start`: M fine-tuned on a probe's oracle cuts of training questions.

Two tiny models trained in the module: M thinks two lines ("first 3+4=7", "then 7*2=14")
and answers 14; m answers 14 after the first line alone or both, and 7 with nothing. So the
probe finds, on every question, that m needs exactly the first line, and after the warm
start M hands over that line and stops; the evaluation questions in the probe are left out.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import CAPABLE_SCRIPT, QUESTIONS, SIGNAL, _prompt, small_config, tiny_model, train_script
from duetlm.backends.hf import HFBackend
from duetlm.config import DuetConfig
from duetlm.errors import ConfigError
from duetlm.evaluate.probe import ProbeConfig, run_probe
from duetlm.protocol import Duet
from duetlm.train.loop.trainer import DuetTrainer
from duetlm.train.loop.warm_start import completion_text

BUDGETS = DuetConfig(signal_max_tokens=40, answer_max_tokens=24)
FIRST_LINE = SIGNAL.splitlines()[0]


@pytest.fixture(scope="module")
def pair(tokenizer, task_path, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("warm-pair")
    training = [json.loads(line)["question"] for line in task_path.read_text().splitlines()][:6]
    asked = [*training, *QUESTIONS]
    capable = tiny_model(tokenizer, seed=1)
    train_script(capable, tokenizer, [(_prompt(tokenizer, q), CAPABLE_SCRIPT) for q in asked], steps=120)
    light = tiny_model(tokenizer, seed=2, hidden=32)
    scripts = []
    for question in asked:
        scripts += [
            (
                _prompt(tokenizer, question, f"<think>\n{signal}\n</think>\n\n"),
                f"So \\boxed{{{answer}}}<|im_end|>",
            )
            for signal, answer in ((SIGNAL, 14), (FIRST_LINE, 14), ("", 7))
        ]
    train_script(light, tokenizer, scripts, steps=120)
    specs = {}
    for name, model in (("capable", capable), ("light", light)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        specs[name] = root / name
    return specs


@pytest.fixture(scope="module")
def probe_run(pair, task_path, tmp_path_factory):
    """A probe over six training questions and the three evaluation questions."""
    folder = tmp_path_factory.mktemp("warm")
    rows = [json.loads(line) for line in task_path.read_text().splitlines()][:6]
    rows += [json.loads(line) for line in task_path.with_name("eval.jsonl").read_text().splitlines()]
    data = folder / "probed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = ProbeConfig(
        task=f"jsonl:{data}", capable=f"hf:{pair['capable']}", light=f"hf:{pair['light']}", duet=BUDGETS
    )
    run_probe(config, folder / "probe", progress=False)
    return folder / "probe"


def signals(capable: HFBackend, light: HFBackend, questions) -> list[str]:
    return [r.signal for r in Duet(capable, light, BUDGETS).solve_batch(questions, "duet")]


def test_the_warm_start_teaches_m_to_hand_over_at_the_oracle_cut(pair, task_path, tmp_path, probe_run):
    rows = [json.loads(line) for line in (probe_run / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and all(r["thinking"] == SIGNAL and r["oracle_signal"] == FIRST_LINE for r in rows)
    config = small_config(
        pair,
        task_path,
        tmp_path / "run",
        warm_start=str(probe_run),
        warm_start_epochs=8,
        warm_start_batch=2,
        warm_start_lr=1e-3,
    )
    trainer = DuetTrainer(config)
    questions = [json.loads(line)["question"] for line in task_path.read_text().splitlines()][:6]
    assert signals(trainer.capable.engine, trainer.light.engine, questions) == [SIGNAL] * 6
    report = trainer.warm_start()
    assert report["examples"] == 6  # the three evaluation questions are left out
    assert report["epoch_losses"][-1] < report["epoch_losses"][0]
    assert signals(trainer.capable.engine, trainer.light.engine, questions) == [FIRST_LINE] * 6
    saved = json.loads((tmp_path / "run" / "warm_start.json").read_text())
    assert saved["examples"] == 6 and saved["run"] == str(probe_run)
    # the KL reference is the warm-started M, not the verbose one
    reference = dict(trainer.reference.lm.named_parameters())
    for name, parameter in trainer.capable.lm.named_parameters():
        assert (parameter == reference[name]).all(), name


def test_a_probe_of_evaluation_questions_only_is_refused(model_dirs, task_path, tmp_path):
    config = ProbeConfig(
        task=f"jsonl:{task_path.with_name('eval.jsonl')}",
        capable=f"hf:{model_dirs['capable']}",
        light=f"hf:{model_dirs['light']}",
        duet=BUDGETS,
    )
    run_probe(config, tmp_path / "probe", progress=False)
    trainer = DuetTrainer(
        small_config(model_dirs, task_path, tmp_path / "run", warm_start=str(tmp_path / "probe"))
    )
    with pytest.raises(ConfigError, match="none of its 3 probed questions is a training question"):
        trainer.warm_start()


def test_warm_start_needs_a_probe_run(model_dirs, task_path, tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "run.json").write_text(json.dumps({"tasks": ["builtin"]}))
    trainer = DuetTrainer(
        small_config(model_dirs, task_path, tmp_path / "run", warm_start=str(tmp_path / "eval"))
    )
    with pytest.raises(ConfigError, match="not a probe run"):
        trainer.warm_start()


def test_completion_text_closes_the_cut():
    config = DuetConfig()
    assert completion_text("a\nb", config) == "<think>\na\nb\n</think>"
    assert completion_text("", config) == "<think>\n\n</think>"


def test_a_resumed_run_keeps_the_warm_started_reference(pair, task_path, tmp_path, probe_run):
    """After a warm start the KL reference is the warm-started M; a run that resumes from a
    checkpoint must optimize the same objective, so the reference comes back from the run, not
    from the verbose M the config names."""
    from duetlm.train.loop.trainer import train

    config = small_config(
        pair,
        task_path,
        tmp_path / "run",
        warm_start=str(probe_run),
        warm_start_epochs=2,
        warm_start_batch=2,
        warm_start_lr=1e-3,
        steps=1,
        eval_every=0,
    )
    out = train(config, progress=False)
    assert (out / "last" / "reference").is_dir()
    resumed = DuetTrainer(config.model_copy(update={"steps": 2}), resume=True)
    try:
        saved = load_file(out / "last" / "reference" / "model.safetensors")
        initial = load_file(pair["capable"] / "model.safetensors")
        reference = resumed.reference.lm.state_dict()
        moved = [name for name in saved if not torch.equal(saved[name], initial[name])]
        assert moved  # the warm start moved M, so the saved reference is not the initial M
        for name in saved:
            assert torch.equal(reference[name].to(saved[name].dtype), saved[name]), name
        assert any(not torch.equal(reference[name], initial[name]) for name in moved)
    finally:
        resumed.close()
