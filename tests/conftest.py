"""Tiny real models for the tests, built from a config: no hub, no shipped weights.

`scripted` models are trained in a few seconds to answer every prompt with a fixed text, so
tests can assert on exact stop positions, signals and answers while running the real
transformers generation path.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from duetlm.backends.base import GenerationRequest, SamplingParams, render_chat
from duetlm.backends.hf import HFBackend
from duetlm.models.pretrain import ModelShape, new_model
from duetlm.models.tokenizer import build_tokenizer

torch.set_num_threads(min(2, os.cpu_count() or 1))

SIGNAL = "first 3+4=7\nthen 7*2=14"
CAPABLE_SCRIPT = f"<think>\n{SIGNAL}\n</think>\n\nThe result is \\boxed{{14}}.<|im_end|>"
LIGHT_SCRIPT = "So \\boxed{14}<|im_end|>"


@contextlib.contextmanager
def counting_forwards(model):
    """A list that gets one entry per forward pass of `model` while the block runs: how a
    test sees how many calls a batch took."""
    calls: list[int] = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        yield calls
    finally:
        hook.remove()


def tiny_model(tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return new_model(
        tokenizer, ModelShape(hidden, layers, intermediate=2 * hidden), max_positions=1024
    ).eval()


def train_script(model, tokenizer, examples: list[tuple[str, str]], steps: int = 150) -> None:
    """Teach `model` to continue each rendered prompt with its script (teacher forcing)."""
    rows = [tokenizer(p + s, add_special_tokens=False)["input_ids"] for p, s in examples]
    starts = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p, _ in examples]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (row, start) in enumerate(zip(rows, starts)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, start : len(row)] = torch.tensor(row[start:])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = _script_loss(model, ids, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _script_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """With Qwen3's 151,936-word vocabulary the logits of the prompt positions cost as much as
    the rest of the step and teach nothing, so only the scripted positions reach the head. The
    385-word models keep the whole-sequence loss: their scripted weights, and what they do on
    prompts they were never shown, are what the tests were written against."""
    if model.config.vocab_size < 10_000:
        return model(input_ids=ids, labels=labels).loss
    targets = labels[:, 1:]
    scripted = targets != -100
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1][scripted]
    return torch.nn.functional.cross_entropy(model.lm_head(hidden), targets[scripted])


QUESTIONS = ["What is (3+4)*2?", "Compute (3+4) times 2.", "x = (3 + 4) * 2; x?"]
UNCLOSED_QUESTION = "What is 3+4, briefly?"
UNCLOSED_SCRIPT = "<think>\nfirst 3+4=7<|im_end|>"  # the turn ends inside the thinking


def _prompt(tokenizer, question: str, prefill: str = "") -> str:
    from duetlm.config import DuetConfig
    from duetlm.protocol import Problem, user_prompt

    request = GenerationRequest.chat(
        user_prompt(Problem(question), DuetConfig()),
        SamplingParams(8),
        prefill=prefill,
        chat_template_kwargs={"enable_thinking": True},
    )
    return render_chat(tokenizer, request)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Saved folders: `random` (untrained), `capable` (thinks, then answers), `light` (answers
    after a pre-filled signal)."""
    root = tmp_path_factory.mktemp("models")
    prefill = f"<think>\n{SIGNAL}\n</think>\n\n"
    capable = tiny_model(tokenizer, seed=1)
    train_script(capable, tokenizer, [(_prompt(tokenizer, q), CAPABLE_SCRIPT) for q in QUESTIONS])
    light = tiny_model(tokenizer, seed=2, hidden=32)
    train_script(light, tokenizer, [(_prompt(tokenizer, q, prefill), LIGHT_SCRIPT) for q in QUESTIONS])
    dirs = {}
    for name, model in {"random": tiny_model(tokenizer, seed=0), "capable": capable, "light": light}.items():
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="session")
def qwen3_dirs(tmp_path_factory) -> dict[str, Path]:
    """The Qwen3 test bed (see `tests/qwen3.py`): saved folders with the real tokenizer, chat
    template and generation config. `random` is untrained; `capable` and `light` are scripted
    like the models of `model_dirs`, and `capable` ends a fourth question's thinking with
    `<|im_end|>` instead of `</think>` (as a real model cut at end of turn does)."""
    return _scripted_qwen3(tmp_path_factory.mktemp("qwen3"))


def _scripted_qwen3(root: Path, **shape) -> dict[str, Path]:
    from qwen3 import qwen3_tokenizer, save, tiny_qwen3

    tokenizer = qwen3_tokenizer()
    prefill = f"<think>\n{SIGNAL}\n</think>\n\n"
    capable = tiny_qwen3(seed=1, **shape)
    scripts = [(_prompt(tokenizer, q), CAPABLE_SCRIPT) for q in QUESTIONS]
    scripts.append((_prompt(tokenizer, UNCLOSED_QUESTION), UNCLOSED_SCRIPT))
    train_script(capable, tokenizer, scripts, steps=60)
    light = tiny_qwen3(seed=2, **shape)
    train_script(
        light, tokenizer, [(_prompt(tokenizer, q, prefill), LIGHT_SCRIPT) for q in QUESTIONS], steps=60
    )
    models = {"random": tiny_qwen3(seed=0, **shape), "capable": capable, "light": light}
    return {name: save(model, tokenizer, root / name) for name, model in models.items()}


@pytest.fixture(scope="session")
def qwen3_vllm_dirs(tmp_path_factory) -> dict[str, Path]:
    """The Qwen3 test bed scripted as `qwen3_dirs` is, with the head size vLLM's CPU attention
    has kernels for (32; `qwen3_dirs` has 8)."""
    return _scripted_qwen3(tmp_path_factory.mktemp("qwen3-vllm"), hidden=64, head_dim=32)


@pytest.fixture(scope="session")
def capable_backend(model_dirs) -> HFBackend:
    return HFBackend(str(model_dirs["capable"]), device="cpu")


@pytest.fixture(scope="session")
def light_backend(model_dirs) -> HFBackend:
    return HFBackend(str(model_dirs["light"]), device="cpu")


@pytest.fixture(scope="session")
def random_backend(model_dirs) -> HFBackend:
    return HFBackend(str(model_dirs["random"]), device="cpu", batch_size=16)


@pytest.fixture(scope="session")
def task_path(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("task")
    path = folder / "train.jsonl"
    rows = [{"id": f"q{i}", "question": f"{QUESTIONS[i % 3]} (#{i})", "answer": "14"} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    held_out = [{"id": f"e{i}", "question": q, "answer": "14"} for i, q in enumerate(QUESTIONS)]
    (folder / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in held_out) + "\n")
    return path


ROLE_KNOBS = {
    "capable": "capable.model",
    "light": "light.model",
    "train_light": "light.train",
    "lora_capable": "capable.lora",
    "lora_light": "light.lora",
    "capable_lr": "capable.lr",
    "light_lr": "light.lr",
    "capable_temperature": "capable.temperature",
    "light_temperature": "light.temperature",
}
"""The tests' short names for a role's knobs ([capable], [light])."""


def train_config(settings: dict):
    """A TrainConfig from knobs named without their sections (`kl_beta=0.0` goes to
    `[objective]`, `capable_lr` to `[capable] lr`), as the tests write them."""
    from duetlm.train.config import RENAMED, TrainConfig, field_paths

    paths = field_paths() | RENAMED | ROLE_KNOBS | {"warm_start": "warm_start.run"}
    nested: dict = {}
    for key, value in settings.items():
        if key in TrainConfig.model_fields and key not in ("warm_start", *ROLE_KNOBS):
            nested[key] = value
            continue
        section, name = paths[key].split(".")
        nested.setdefault(section, {})[name] = value
    return TrainConfig(**nested)


def free_port() -> int:
    """A loopback port nothing holds now: a fixed one collides with torchrun runs of the vLLM
    suite, which CI runs beside this one."""
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def small_config(model_dirs, task_path, out, **overrides):
    """A training config for the tiny scripted models: a few seconds a step."""
    settings = {
        "capable": f"hf:{model_dirs['capable']}",
        "light": f"hf:{model_dirs['light']}",
        "task": f"jsonl:{task_path}",
        "eval_task": f"jsonl:{task_path.with_name('eval.jsonl')}",
        "out": str(out),
        "steps": 2,
        "questions_per_step": 2,
        "n_capable": 2,
        "n_light": 2,
        "signal_max_tokens": 40,
        "answer_max_tokens": 24,
        "light_temperature": 1.5,
        "forced_stop_prob": 0.5,
        "eval_every": 1,
        "eval_questions": 3,
        "length_bound": 16,
        "capable_lr": 1e-3,
        "light_lr": 1e-3,
        "tensorboard": False,
        "device": "cpu",
    }
    return train_config(settings | overrides)


@pytest.fixture(scope="session")
def qwen3_task(tmp_path_factory):
    return qwen3_task_folder(tmp_path_factory.mktemp("qwen3-task"))


def qwen3_task_folder(folder: Path) -> Path:
    """Eight training questions and the three held out, all with the answer 14."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"q{i}", "question": f"{QUESTIONS[i % 3]} (#{i})", "answer": "14"} for i in range(8)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    held_out = [{"id": f"e{i}", "question": q, "answer": "14"} for i, q in enumerate(QUESTIONS)]
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out))
    return folder


def qwen3_config(qwen3_dirs, folder, out, **overrides):
    """A training config for the scripted Qwen3 pair: a step takes seconds."""
    settings = {
        "capable": f"hf:{qwen3_dirs['capable']}",
        "light": f"hf:{qwen3_dirs['light']}",
        "task": f"jsonl:{folder / 'train.jsonl'}",
        "eval_task": f"jsonl:{folder / 'eval.jsonl'}",
        "out": str(out),
        "steps": 1,
        "questions_per_step": 2,
        "n_capable": 2,
        "n_light": 2,
        "signal_max_tokens": 24,
        "answer_max_tokens": 12,
        "capable_temperature": 0.6,
        "light_temperature": 0.6,
        "length_bound": 16,
        "eval_every": 0,
        "tensorboard": False,
        "device": "cpu",
    }
    return train_config(settings | overrides)


def record_updates(monkeypatch) -> list[tuple]:
    """Every (policy, batch) the step hands to the PPO update, which still runs as it is."""
    from duetlm.train.loop import update

    seen = []
    real = update.ppo_update
    monkeypatch.setattr(update, "ppo_update", lambda p, b, s, r: (seen.append((p, b)), real(p, b, s, r))[1])
    return seen


def assert_truncated_weights(batch, cap: float) -> torch.Tensor:
    """A batch's importance weights are min(π_old/μ, cap), computed here by hand, wherever the
    engine gave a log-prob; returns where it did."""
    known = ~torch.isnan(batch.engine_logps) & batch.seqs.completion_mask.bool()
    by_hand = torch.exp(batch.old_logps - batch.engine_logps).clamp(max=cap)
    assert known.sum() > 10
    assert torch.allclose(batch.is_weights[known], by_hand[known], atol=1e-5)
    return known
