"""Checks that need several real processes, run by `torchrun` from test_distributed.py:

    torchrun --nproc_per_node 2 tests/distributed_checks.py CHECK OUT_DIR

Each process writes what it saw to OUT_DIR/CHECK-RANK.json; the test reads those files.
The models are tiny random Qwen3s (the real architecture, tied embeddings), sharded with the
trainer's own FSDP2 strategy over gloo.
"""

from __future__ import annotations

import faulthandler
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from qwen3 import tiny_qwen3

from duetlm.train.engines.weight_push import Stager, WeightPush, staged_weights
from duetlm.train.loop.update import UpdateSettings, logps_of, ppo_update
from duetlm.train.modeling.distributed import start_runtime
from duetlm.train.modeling.parallel import full_tensors, wrap
from duetlm.train.modeling.policy import LogprobNet, Policy
from duetlm.train.rollouts.batch import RolloutBatch
from duetlm.train.rollouts.sequences import pack


def sharded_policy(runtime, seed: int = 1) -> Policy:
    lm = tiny_qwen3(seed=seed, hidden=32).train()
    net = wrap(LogprobNet(lm, 64), "fsdp", runtime, "fp32", trainable=True)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    return Policy(lm, net, None, optimizer, None)


def empty_micro_batch(runtime, out: Path) -> dict:
    """Process 0 trains on four rows with sampled tokens (two micro-batches); process 1 on one
    row whose completion is empty (one micro-batch, and nothing to score)."""
    policy = sharded_policy(runtime)
    if runtime.rank == 0:
        seqs = pack([[1, 2, 3]] * 4, [[7, 8, 9], [10, 11], [12], [13, 14, 15, 16]], 0)
        keys = [(q, s, 0) for q in range(2) for s in range(2)]
        advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    else:
        seqs = pack([[1, 2, 3, 4]], [[]], 0)
        keys = [(0, 0, 0)]
        advantages = torch.tensor([1.0])
    batch = RolloutBatch.of(seqs, keys).with_scores(advantages, None)
    settings = UpdateSettings(1, 1, 2, 0.2, 1.0, "fp32", seed=0, lockstep=True)
    before = [float(p.full_tensor().sum()) for p in policy.net.parameters()]
    started = time.perf_counter()
    logps_of(policy.net, batch, 1.0, settings, runtime)  # forward passes without gradients, in lockstep
    stats = ppo_update(policy, batch, settings, runtime)
    after = [float(p.full_tensor().sum()) for p in policy.net.parameters()]
    return {
        "seconds": time.perf_counter() - started,
        "loss": stats.loss,
        "moved": sum(a != b for a, b in zip(after, before)),
        "weights": after,
    }


def staged_copies(runtime, out: Path) -> dict:
    """Two pushes of a sharded model through the node's staged copy: every process reads the
    whole model back from it and compares it with the weights gathered from the shards."""
    policy = sharded_policy(runtime)
    stager = Stager(runtime, out / "staging", "check", bucket_bytes=1 << 20)
    agree, folders = [], []
    for _ in range(2):
        with WeightPush("capable", policy.lm, stager).staged(torch.bfloat16) as folder:
            read = dict(staged_weights(folder))
            folders.append(str(folder))
        gathered = dict(full_tensors(policy.lm, tied=True, dtype=torch.bfloat16))
        agree.append(set(read) == set(gathered) and all(torch.equal(read[k], gathered[k]) for k in read))
    leftovers = sorted(p.name for p in (out / "staging").iterdir()) if (out / "staging").is_dir() else []
    return {"copies": stager.copies, "agree": agree, "folders": folders, "leftovers": leftovers}


CHECKS = {"empty_micro_batch": empty_micro_batch, "staged_copies": staged_copies}


def main() -> None:
    faulthandler.enable()  # a native abort (gloo's) prints where Python was
    check, out = sys.argv[1], Path(sys.argv[2])
    runtime = start_runtime(torch.device("cpu"), timeout_s=float(sys.argv[3]) if len(sys.argv) > 3 else 30)
    report = CHECKS[check](runtime, out) | {"rank": runtime.rank, "node": runtime.node}
    (out / f"{check}-{runtime.rank}.json").write_text(json.dumps(report))
    runtime.close()


if __name__ == "__main__":
    main()
