"""Training over several real processes (`torchrun`, gloo on the CPU): FSDP2 computes what one
process does and resumes exactly after a kill, an empty micro-batch on one process neither
hangs nor breaks the step, a node stages one copy of the weights per push whatever its
process count, and a process that fails stops the others with its error."""

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

from conftest import free_port, qwen3_config, small_config
from duetlm.train.loop.export import export_run

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
CHECKS = HERE / "distributed_checks.py"
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
DUET = str(Path(sys.executable).with_name("duet"))


def torchrun(*args: str, processes: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(free_port()),
        *extra,
        *args,
    ]


def duet_train(config_path: Path, *flags: str) -> list[str]:
    return torchrun("--no-python", DUET, "train", "--config", str(config_path), *flags)


def running(marker: str) -> list[int]:
    """Processes whose command line holds `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def fsdp_config(dirs, task, out, **overrides):
    """The Qwen3 pair, both models fully trained: M at temperature 1 and m at 1.2 (so that the
    scripted m errs and has something to learn), forced stops at their default, two
    micro-batches per update, gradient checkpointing, a short collective timeout (a hang
    fails in a minute)."""
    settings = {
        "steps": 3,
        "questions_per_step": 4,
        "capable_temperature": 1.0,
        "light_temperature": 1.2,
        "micro_batch": 2,
        "gradient_checkpointing": True,
        "capable_lr": 1e-3,
        "light_lr": 1e-3,
        "dist_timeout_s": 60.0,
    }
    return qwen3_config(dirs, task, out, **(settings | overrides))


@pytest.fixture(scope="module")
def one_process_run(qwen3_dirs, qwen3_task, tmp_path_factory):
    """The uninterrupted run in one process, whole checkpoints."""
    # the one process runs with torchrun's processes' thread count: AdamW turns the last-bit
    # differences of another reduction order into lr-sized ones where a gradient is nearly 0
    folder = tmp_path_factory.mktemp("one-process")
    single = fsdp_config(qwen3_dirs, qwen3_task, folder / "one")
    (folder / "one.json").write_text(single.model_dump_json())
    done = subprocess.run(
        [DUET, "train", "--config", str(folder / "one.json")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(single.out)


@pytest.mark.parametrize("checkpoints", ["whole", "sharded"])
def test_two_fsdp_processes_train_what_one_does_and_resume_exactly_after_kill_9(
    qwen3_dirs, qwen3_task, tmp_path, one_process_run, checkpoints
):
    """Checkpoints of either format: whole (gathered on the main process) or sharded (each
    process writes and reads its own shards); the sharded run's weights are read back through
    `duet export` (float32, to compare them exactly)."""
    one = one_process_run
    sharded = fsdp_config(qwen3_dirs, qwen3_task, tmp_path / "two", strategy="fsdp", format=checkpoints)
    path = tmp_path / "two.json"
    path.write_text(sharded.model_dump_json())
    process = subprocess.Popen(
        duet_train(path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, start_new_session=True
    )
    state = Path(sharded.out) / "last" / "state.pt"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not state.is_file():
        time.sleep(0.05)
    assert process.poll() is None, (
        f"training ended before it could be killed: {process.stderr.read()[-2000:]}"
    )
    os.killpg(process.pid, signal.SIGKILL)  # torchrun, mid-run (its processes have sessions of their own)
    process.wait()
    # they die with it: no orphan trains on and writes into the folder the resumed run uses
    deadline = time.time() + 30
    while time.time() < deadline and running(str(path)):
        time.sleep(0.1)
    assert not running(str(path)), "a training process outlived its launcher"
    saved = torch.load(state, weights_only=True)
    assert 1 <= saved["step"] < 3 and saved["world"] == 2 and len(saved["rng"]) == 2
    done = subprocess.run(duet_train(path, "--resume"), capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    two = Path(sharded.out)
    if checkpoints == "sharded":
        assert (two / "last" / "shards" / ".metadata").is_file() and not (two / "last" / "capable").exists()
        exported = export_run(two, tmp_path / "export", dtype="float32")
    for name in ("capable", "light"):
        a = weights(one / "last" / name)
        b = weights(exported[name] if checkpoints == "sharded" else two / "last" / name)
        shared = set(a) & set(b)
        assert shared >= set(b) - {"lm_head.weight"}, name  # the tied output layer may be left out
        worst = max(float((a[k] - b[k]).abs().max()) for k in shared)
        assert worst < 1e-5, (name, worst)
        start = weights(qwen3_dirs[name])
        assert any(not torch.equal(start[k], b[k]) for k in shared), f"{name} never moved"
    rows_one = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    rows_two = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_two] == [1, 2, 3]
    for a, b in zip(rows_one, rows_two, strict=True):
        assert b["lambda"] == pytest.approx(a["lambda"], abs=1e-7)
        assert b["signal_tokens"] == a["signal_tokens"] and b["pair_accuracy"] == a["pair_accuracy"]
        assert b["clip_fraction_capable"] == pytest.approx(a["clip_fraction_capable"], abs=1e-6)
    assert json.loads((two / "final.json").read_text())["processes"] == 2


def test_an_empty_micro_batch_on_one_process_finishes_in_seconds(tmp_path):
    # process 1 has one micro-batch and nothing to score, process 0 two micro-batches: every
    # forward gathers weights from both, so without equal call counts the step would wait out
    # the collective timeout, and without a graph its backward would fail. The timeout is long
    # enough that a busy machine (the vLLM suite runs beside this one) never reaches it while
    # the processes start and shard the model; the step itself must take well under half of it
    timeout_s = 90
    started = time.perf_counter()
    done = subprocess.run(
        torchrun(str(CHECKS), "empty_micro_batch", str(tmp_path), str(timeout_s)),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    written = sorted(p.name for p in tmp_path.glob("empty_micro_batch-*.json"))
    assert done.returncode == 0, f"reports written: {written}\n{done.stderr[-3000:]}"
    reports = [json.loads((tmp_path / f"empty_micro_batch-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["seconds"] < timeout_s / 2 for r in reports), reports
    assert time.perf_counter() - started < 2 * timeout_s
    assert reports[0]["moved"] > 0 and reports[0]["weights"] == reports[1]["weights"]  # one model, updated


@pytest.mark.parametrize("layout", ["1 node x 2 processes", "2 nodes x 1 process"])
def test_one_staged_copy_per_node_per_push(tmp_path, layout):
    if layout.startswith("1 node"):
        commands = [torchrun(str(CHECKS), "staged_copies", str(tmp_path))]
    else:  # two torchrun agents on this machine, as two nodes would each run one
        endpoint = f"127.0.0.1:{free_port()}"
        commands = [
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(node),
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                endpoint,
                "--rdzv_id",
                "staged",
                str(CHECKS),
                "staged_copies",
                str(tmp_path),
            ]
            for node in (0, 1)
        ]
    processes = [
        subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV) for c in commands
    ]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()[-3000:]
    reports = [json.loads((tmp_path / f"staged_copies-{rank}.json").read_text()) for rank in (0, 1)]
    nodes = len({r["node"] for r in reports})
    assert nodes == (1 if layout.startswith("1 node") else 2)
    assert sum(r["copies"] for r in reports) == 2 * nodes  # two pushes, one copy per node each
    assert all(r["agree"] == [True, True] for r in reports)  # every process read the whole model back
    assert all(r["leftovers"] == [] for r in reports)  # each copy is gone once its engines read it
    assert len({f for r in reports for f in r["folders"]}) == nodes


def test_a_failing_process_stops_the_others_with_its_error(model_dirs, task_path, tmp_path):
    # process 1 fails in its first update while process 0 goes on into the step's collectives;
    # the collective timeout is five minutes, so only the failure itself can end the run early
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import duetlm.train.loop.update as update\n"
        "    def fail(*args, **kwargs):\n"
        "        raise RuntimeError('injected failure on process 1')\n"
        "    update.ppo_update = fail\n"
    )
    config = small_config(
        model_dirs, task_path, tmp_path / "run", questions_per_step=4, eval_every=0, dist_timeout_s=300.0
    )
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json())
    started = time.perf_counter()
    done = subprocess.run(
        duet_train(path), capture_output=True, text=True, env=ENV | {"PYTHONPATH": str(hook)}, timeout=600
    )
    elapsed = time.perf_counter() - started
    assert done.returncode != 0
    assert "injected failure on process 1" in done.stderr
    assert elapsed < 120, elapsed
