"""The embedded pair: tokenizer, pretraining plumbing, save/load, and the shipped assets."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from duetlm.backends import parse_spec
from duetlm.errors import InputError
from duetlm.models import EMBEDDED, EMBEDDED_BUDGETS
from duetlm.models.pretrain import (
    ModelShape,
    PretrainConfig,
    accumulate_weighted_lm_loss,
    capable_example,
    capable_trace_pool,
    collate,
    light_example,
    new_model,
    pretrain_pair,
    weighted_lm_loss,
    write_up_segments,
)
from duetlm.models.tokenizer import build_tokenizer
from duetlm.tasks import builtin


def test_tokenizer_encodes_any_text_and_keeps_digits_single():
    tokenizer = build_tokenizer(["Start at 7, then +5 (mod 10). What is the result?"] * 50)
    for text in ["héllo wörld ✓ 中文 🙂", "\\boxed{x}", "<think>\na\n</think>"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("1234+56=7", add_special_tokens=False)["input_ids"])
    assert tokens == list("1234+56=7")
    assert len(tokenizer("What is the result?", add_special_tokens=False)["input_ids"]) < 5


def test_collate_weights_only_the_target(tokenizer):
    problem = builtin.generate(1, "train")[0]
    prompt, segments = "<|im_start|>user\nq<|im_end|>\n", write_up_segments(problem, 5.0)
    ids, _, weight = collate(tokenizer, [(prompt, segments)])
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert weight[0, :n_prompt].sum() == 0
    assert tokenizer.decode(ids[0, n_prompt:]) == "".join(text for text, _ in segments)
    key_positions = (weight[0] == 5.0).nonzero().flatten().tolist()
    assert tokenizer.decode(ids[0, key_positions]) == problem.essential_lines[-1] + str(problem.answer)


def test_light_examples_cover_every_kind_of_prefix(tokenizer):
    from duetlm.config import DuetConfig

    rng, config = random.Random(0), DuetConfig()
    prompts = [light_example(tokenizer, p, rng, config, 5.0)[0] for p in builtin.generate(300, "train")]
    assert any(p[-len("<|im_start|>assistant\n") :] == "<|im_start|>assistant\n" for p in prompts)  # m-alone
    assert any(p.endswith("\n</think>\n\n") for p in prompts)  # a pre-filled signal
    assert all("<think>" in p or p.endswith("assistant\n") for p in prompts)


@pytest.mark.parametrize("micro_batches", [1, 3, 8])
def test_length_sorted_micro_batches_give_the_full_batch_gradient(tokenizer, micro_batches):
    from duetlm.config import DuetConfig

    torch.manual_seed(0)
    model = new_model(tokenizer, ModelShape(32, 2, intermediate=64))
    rng, config = random.Random(0), DuetConfig()
    examples = [capable_example(tokenizer, p, rng, config, 0.5) for p in builtin.generate(8, "train")]
    batch = collate(tokenizer, examples)
    assert batch[1].sum(dim=1).unique().numel() > 1  # rows of different lengths: padding to skip

    full = weighted_lm_loss(model, *batch)
    full.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = accumulate_weighted_lm_loss(model, *batch, micro_batches)
    assert loss == pytest.approx(full.item(), rel=1e-5)
    for got, want in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def tiny_pretrain_config(steps: int) -> PretrainConfig:
    """The pair's recipe at a size that trains in seconds."""
    return PretrainConfig(
        capable_shape=ModelShape(32, 1, intermediate=64),
        light_shape=ModelShape(16, 1, intermediate=32),
        batch_size=4,
        light_batch_size=4,
        capable_max_steps=steps,
        light_max_steps=steps,
        eval_every=steps,
        eval_questions=4,
        tokenizer_corpus=200,
        light_capable_traces=6,
        light_capable_from_step=2,
    )


def test_pretrain_writes_loadable_safetensors_folders(tmp_path):
    report = pretrain_pair(tmp_path, tiny_pretrain_config(steps=3))
    assert set(report) >= {"capable", "light", "tiny-M_parameters", "tiny-m_parameters"}
    assert json.loads((tmp_path / "pretrain_report.json").read_text())["capable"]["steps"] == 3
    for name in ("tiny-M", "tiny-m"):
        folder = tmp_path / name
        assert (folder / "model.safetensors").is_file()
        assert not list(folder.glob("*.bin"))
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        assert model.config.vocab_size == len(tokenizer)
        assert tokenizer.convert_tokens_to_ids("</think>") != tokenizer.unk_token_id


def test_pretrain_is_deterministic_and_retrains_either_model_alone(tmp_path):
    config = tiny_pretrain_config(steps=4)
    pretrain_pair(tmp_path / "whole", config)
    shutil.copytree(tmp_path / "whole", tmp_path / "capable_again")
    pretrain_pair(tmp_path / "capable_again", config, reuse_light=True)
    shutil.copytree(tmp_path / "whole", tmp_path / "light_again")
    pretrain_pair(tmp_path / "light_again", config, reuse_capable=True)
    for again in ("capable_again", "light_again"):
        for name in ("tiny-M", "tiny-m"):
            first = (tmp_path / "whole" / name / "model.safetensors").read_bytes()
            assert (tmp_path / again / name / "model.safetensors").read_bytes() == first, (again, name)


def test_reusing_a_model_that_is_not_there_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="holds no trained model"):
        pretrain_pair(tmp_path, tiny_pretrain_config(steps=2), reuse_light=True)


@pytest.mark.parametrize("name", ["tiny-M", "tiny-m", "duet-M", "duet-m"])
def test_embedded_names_resolve_to_hf_folders(name):
    spec = parse_spec(name)
    assert spec.kind == "hf" and spec.model.endswith(name)
    assert (EMBEDDED[name]() / "model.safetensors").is_file()


def test_m_learns_from_the_traces_the_shipped_M_got_right():
    """The pool of M's own thinking in m's data: training questions only, M's greedy thinking
    cut at `</think>`, only where M's answer is right, and the same pool every time."""
    from duetlm.backends import BackendOptions, load_backend
    from duetlm.config import DuetConfig
    from duetlm.protocol import Duet

    options = BackendOptions(device="cpu", batch_size=100)
    duet = Duet(
        load_backend("tiny-M", options),
        load_backend("tiny-m", options),
        DuetConfig(signal_max_tokens=400, answer_max_tokens=24),
    )

    def train_problem(rng: random.Random) -> builtin.ChainProblem:
        while (problem := builtin.sample_problem(rng)).split != "train":
            pass
        return problem

    config = PretrainConfig(light_capable_traces=40)
    pool = capable_trace_pool(duet, train_problem, config)
    assert 32 <= len(pool) <= 40  # M is right on about 97% of questions
    assert all(problem.split == "train" for problem, _ in pool)
    assert all("</think>" not in signal and "boxed" not in signal for _, signal in pool)
    assert sum(problem.essential_lines[-1] in signal for problem, signal in pool) >= 0.9 * len(pool)
    assert capable_trace_pool(duet, train_problem, config) == pool


# Measured with `python bench/pair_figures.py --questions 500` (builtin test split, greedy).
STATED = {"M-alone": 0.966, "duet": 0.964, "m-alone": 0.160, "one_left": 0.978}


def test_shipped_pair_reaches_its_stated_figures():
    """A broken asset fails CI: 100 test questions, at least 80% of each stated accuracy, and
    m alone still needs the signal."""
    from duetlm.backends import BackendOptions, load_backend
    from duetlm.config import DuetConfig
    from duetlm.grading import extract_boxed
    from duetlm.protocol import Duet, Problem

    options = BackendOptions(device="cpu", batch_size=100)
    duet = Duet(
        load_backend("tiny-M", options),
        load_backend("tiny-m", options),
        DuetConfig(**EMBEDDED_BUDGETS),
    )
    test = builtin.generate(100, "test")
    problems = [Problem(p.question) for p in test]

    def accuracy(answers):
        return sum(a == str(p.answer) for a, p in zip(answers, test, strict=True)) / len(test)

    for mode in ("M-alone", "duet"):
        assert accuracy([r.answer for r in duet.solve_batch(problems, mode)]) >= 0.8 * STATED[mode], mode
    assert accuracy([r.answer for r in duet.solve_batch(problems, "m-alone")]) <= 0.30
    finished = duet.finish(problems, [builtin.essential_signal(p, 1) for p in test])
    assert accuracy([extract_boxed(r.text) for r in finished]) >= 0.8 * STATED["one_left"]


# Measured with `python bench/train_duet.py` (builtin test split, greedy): the jointly trained pair.
TRAINED = {"duet": 0.958, "M_tokens": 39.6}


def test_shipped_trained_pair_keeps_its_accuracy_on_a_fraction_of_the_tokens():
    """duet-M + duet-m (100 test questions): at least 80% of the stated accuracy, M tokens within
    10% of the stated mean and under half of what the base pair spends."""
    from duetlm.backends import BackendOptions, load_backend
    from duetlm.config import DuetConfig
    from duetlm.protocol import Duet, Problem

    options = BackendOptions(device="cpu", batch_size=100)
    config = DuetConfig(**EMBEDDED_BUDGETS)
    test = builtin.generate(100, "test")
    problems = [Problem(p.question) for p in test]
    light = load_backend("duet-m", options)
    trained = Duet(load_backend("duet-M", options), light, config).solve_batch(problems, "duet")
    base = Duet(load_backend("tiny-M", options), light, config).solve_batch(problems, "duet")
    accuracy = sum(r.answer == str(p.answer) for r, p in zip(trained, test, strict=True)) / len(test)
    tokens = sum(r.usage.capable.output_tokens for r in trained) / len(test)
    base_tokens = sum(r.usage.capable.output_tokens for r in base) / len(test)
    assert accuracy >= 0.8 * TRAINED["duet"]
    assert tokens <= 1.1 * TRAINED["M_tokens"]
    assert tokens < 0.5 * base_tokens
