"""`duet train --dry-run`: the per-device memory plan, offline, before any weight loads."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from duet_process import run_command

from conftest import train_config
from duetlm.train.config import with_settings
from duetlm.train.planning.memory import QWEN3, parse_size, plan, shape_of

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "qwen3-4b_0.6b.toml"
DUET = str(Path(sys.executable).with_name("duet"))
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


@pytest.mark.parametrize(
    ("model", "published"),
    [("Qwen/Qwen3-0.6B", 0.596e9), ("Qwen/Qwen3-4B", 4.02e9), ("Qwen/Qwen3-8B", 8.19e9)],
)
def test_parameter_counts_from_shapes(model, published):
    # published totals: 0.6B (0.44B without embeddings), 4.0B, 8.2B
    assert abs(QWEN3[model].params - published) / published < 0.01


def test_shapes_of_local_and_embedded_models(model_dirs):
    assert shape_of("tiny-M").params == 1_697_664  # docs/embedded-pair.md's count for the embedded M
    assert shape_of(f"hf:{model_dirs['capable']}").hidden == 64


def test_the_plan_by_hand():
    config = train_config(
        dict(
            capable="hf:Qwen/Qwen3-0.6B",
            light="hf:Qwen/Qwen3-0.6B",
            task="builtin",
            train_light=False,
            kl_beta=0.0,
            precision="fp32",
            micro_batch=1,
            signal_max_tokens=512,
            logprob_chunk=1,
            rollout_batch_tokens=1,
        )
    )
    [capable, light], peak = plan(config, 80e9, 1)
    n = QWEN3["Qwen/Qwen3-0.6B"].params
    assert capable.rows["weights"] == 4 * n and capable.rows["gradients"] == 4 * n
    assert capable.rows["AdamW state"] == 8 * n
    assert light.rows["weights"] == 4 * n and light.trainable == 0
    lora = with_settings(config, {"capable.lora": {"r": 8}, "parallel.precision": "bf16-mixed"})
    [capable_lora, _], lora_peak = plan(lora, 80e9, 1)
    assert capable_lora.rows["weights"] < 2.1 * n and lora_peak < peak
    # FSDP over 4 devices: a quarter of the trained weights, gradients and AdamW state on each,
    # plus the root and two layers gathered whole while they compute; the frozen m stays whole
    [sharded, light_whole], _ = plan(with_settings(config, {"parallel.strategy": "fsdp"}), 80e9, 4)
    assert sharded.rows["weights"] == 4 * n / 4 and sharded.rows["AdamW state"] == 8 * n / 4
    shape = QWEN3["Qwen/Qwen3-0.6B"]
    gathered = (shape.vocab * shape.hidden + shape.hidden + 2 * shape.layer_params) * 4
    assert sharded.rows["FSDP gathered weights"] == gathered
    assert sharded.rows["hf replica (unsharded)"] == 4 * n and light_whole.rows["weights"] == 4 * n


@pytest.mark.parametrize(("devices", "nodes"), [("4", "1"), ("8", "2")])
def test_dry_run_of_the_reference_layout_offline(devices, nodes):
    done = run_command(
        [DUET, "train", "--config", str(RECIPE), "--dry-run", "--devices", devices, "--nodes", nodes],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for line in (
        f"{devices} device(s) of 80 GB on {nodes} node(s), FSDP2",
        "M Qwen/Qwen3-4B",
        "m Qwen/Qwen3-0.6B",
        "AdamW state",
        "FSDP gathered weights",
        "weight push",
        "vLLM engine",
        "staged copy per node",
        "verdict: fits",
    ):
        assert line in done.stdout, line


def test_dry_run_says_what_makes_a_plan_fit():
    # the reference layout with whole models on every device (ddp) does not fit on 80 GB
    done = run_command(
        [
            DUET,
            "train",
            "--config",
            str(RECIPE),
            "--dry-run",
            "--devices",
            "4",
            "--set",
            "parallel.strategy=ddp",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "DDP (whole models on each)" in done.stdout and "verdict: does not fit" in done.stdout
    assert "with parallel.strategy = 'fsdp': peak" in done.stdout and ", fits" in done.stdout


@pytest.mark.parametrize(("text", "size"), [("80GB", 80e9), ("141 GiB", 141 * 2**30), ("0.5T", 5e11)])
def test_device_memory_sizes(text, size):
    assert parse_size(text) == pytest.approx(size)
