"""bench/gpu_smoke.py's CPU side: the models it builds, the config it runs, the plan it checks
the GPU's figures against, and how it reads them (the GPU run itself needs a CUDA device)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_smoke  # noqa: E402

from duetlm.train.planning.memory import QWEN3  # noqa: E402


def test_the_real_size_configs_are_the_published_ones():
    for role, name in gpu_smoke.MODELS.items():
        config, shape = gpu_smoke.scaled_config(name, 1.0), QWEN3[name]
        assert (config["hidden_size"], config["num_hidden_layers"]) == (shape.hidden, shape.layers), role
        assert (config["num_attention_heads"], config["num_key_value_heads"]) == (shape.heads, shape.kv_heads)
        assert config["intermediate_size"] == shape.intermediate and config["vocab_size"] == shape.vocab
        small = gpu_smoke.scaled_config(name, 0.125)
        assert small["head_dim"] == 128 and small["num_hidden_layers"] < shape.layers
        assert small["num_attention_heads"] % small["num_key_value_heads"] == 0


def test_the_smoke_runs_the_reference_objective_and_fits_one_h100(tmp_path):
    data = gpu_smoke.write_questions(tmp_path / "data")
    folders = {}
    for role, name in gpu_smoke.MODELS.items():
        folders[role] = tmp_path / role
        folders[role].mkdir()
        (folders[role] / "config.json").write_text(json.dumps(gpu_smoke.scaled_config(name, 1.0)))
    config = gpu_smoke.smoke_config(folders, tmp_path / "run", data, 2)
    objective = config.objective
    assert (objective.kl_placement, objective.scale_rewards) == ("reward", "group")
    assert (objective.n_capable, objective.n_light) == (4, 4)
    assert config.model_of("capable").startswith("vllm:") and config.model_of("light").startswith("vllm:")
    planned = gpu_smoke.planned_phases(config, 80 * 2**30)
    assert set(planned) == {"rollout", "update", "push"}
    assert max(planned.values()) < 80  # GB: what the run is checked against fits the device


def test_the_verdict_sets_each_phase_against_the_plan():
    lines = gpu_smoke.compare(
        {"rollout": 50.0, "update": 25.0}, {"rollout": 52.8, "update": 21.2, "push": 54.1}
    )
    assert "within the plan" in lines[1] and "over the plan by 3.8 GB" in lines[2]
    assert "not measured" in lines[3]


@pytest.mark.slow
def test_the_models_it_builds_load_and_generate(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = gpu_smoke.build_models(tmp_path, scale=0.05)
    for role, path in paths.items():
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert model.config.vocab_size == QWEN3[gpu_smoke.MODELS[role]].vocab
        assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        ids = tokenizer("hello", return_tensors="pt").input_ids
        assert model.generate(ids, max_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2
