"""The joint objective of docs/design.md section 2, row by row, through the real trainer step.

Rollouts are fixed (which answers were right, how long each signal is, which one was cut)
and so are the log-probs (policy −0.1 and initial M −0.3 per sampled token, so each signal's
KL is 0.2·L); everything else runs as in training. The expected numbers are worked out here
from the formulas, without the project's code, so that a wrong sign, a wrong group or a λ
updated at the wrong time changes at least one of them: first the reference's choices (KL
in the reward, each group's std), then the defaults (KL in the loss, the batch's std).
"""

from __future__ import annotations

import statistics

import pytest
import torch

from conftest import small_config
from duetlm.train.loop import update as update_module
from duetlm.train.loop.trainer import DuetTrainer
from duetlm.train.loop.update import UpdateStats
from duetlm.train.rollouts.batch import RolloutBatch
from duetlm.train.rollouts.rollout import CapableRollout, Signal
from duetlm.train.rollouts.sequences import pack

LENGTHS = [[4, 8, 2], [6, 12, 3]]  # L(y), Q = 2 questions x S = 3 signals
FORCED = [[0, 0, 0], [0, 1, 0]]  # the second signal of question 2 was cut by the trainer
PAIR = [[[1, 1], [1, 0], [0, 0]], [[0, 1], [1, 1], [1, 0]]]  # m's A = 2 answers per signal
LAMBDA, ETA, BOUND, BETA = 0.3, 0.1, 10.0, 0.5
REFERENCE = {"kl_placement": "reward", "scale_rewards": "group"}
DEFAULTS = {"kl_placement": "loss", "scale_rewards": "batch"}


def expected(kl_in_reward: bool = True, scale: str = "group"):
    rewards = []
    for q in range(2):
        row = []
        for s in range(3):
            r_pair = statistics.mean(PAIR[q][s])
            kl = 0.2 * LENGTHS[q][s]
            row.append(r_pair - LAMBDA * LENGTHS[q][s] / BOUND - (BETA * kl if kl_in_reward else 0.0))
        rewards.append(row)

    def normalized(groups):
        every = [v for group in groups for v in group]
        out = []
        for group in groups:
            spread = statistics.stdev(group) if scale == "group" else statistics.stdev(every)
            out.append([(v - statistics.mean(group)) / (spread + 1e-6) for v in group])
        return out

    capable = normalized(rewards)
    light = normalized([[a for answers in PAIR[q] for a in answers] for q in range(2)])
    unforced = [LENGTHS[q][s] for q in range(2) for s in range(3) if not FORCED[q][s]]
    next_lambda = min(1.0, max(0.0, LAMBDA + ETA * (statistics.mean(unforced) / BOUND - 1)))
    return rewards, capable, light, next_lambda


def test_expected_numbers_are_what_the_formulas_say():
    rewards, capable, _, next_lambda = expected()
    assert rewards[0] == pytest.approx([1.0 - 0.12 - 0.4, 0.5 - 0.24 - 0.8, -0.06 - 0.2])
    assert next_lambda == pytest.approx(0.3 + 0.1 * (23 / 5 / 10 - 1))
    assert capable[0][0] > 0 > capable[0][1]
    plain, _, _, _ = expected(kl_in_reward=False, scale="batch")
    assert plain[0] == pytest.approx([1.0 - 0.12, 0.5 - 0.24, -0.06])


@pytest.fixture(params=["reference", "defaults"])
def stubbed(request, model_dirs, task_path, tmp_path, monkeypatch):
    choices = REFERENCE if request.param == "reference" else DEFAULTS
    config = small_config(
        model_dirs,
        task_path,
        tmp_path / "run",
        questions_per_step=2,
        n_capable=3,
        n_light=2,
        kl_beta=BETA,
        lambda_init=LAMBDA,
        lambda_lr=ETA,
        length_bound=BOUND,
        forced_stop_prob=0.0,
        **choices,
    )
    trainer = DuetTrainer(config)
    pad = trainer.capable.tokenizer.pad_token_id
    signals = [
        [Signal(list(range(5, 5 + n)), f"signal {q}.{s}", bool(FORCED[q][s])) for s, n in enumerate(row)]
        for q, row in enumerate(LENGTHS)
    ]
    capable_seqs = pack([[1, 2, 3]] * 6, [s.ids for row in signals for s in row], pad)
    capable_batch = RolloutBatch.of(capable_seqs, [(q, s, 0) for q in range(2) for s in range(3)])
    light_seqs = pack([[1, 2]] * 12, [[7, 8]] * 12, pad)
    light_batch = RolloutBatch.of(
        light_seqs, [(q, s, a) for q in range(2) for s in range(3) for a in range(2)]
    )
    rollouts = trainer.rollouts
    monkeypatch.setattr(rollouts, "capable_signals", lambda questions: CapableRollout(signals, capable_batch))
    monkeypatch.setattr(
        rollouts,
        "light_guided",
        lambda questions, sigs: (light_batch, torch.tensor(PAIR, dtype=torch.float32)),
    )

    def fixed_logps(net, batch, temperature, settings, runtime):
        per_token = -0.3 if net is trainer.reference else -0.1
        return per_token * batch.seqs.completion_mask

    updates = []

    def record(policy, batch, settings, runtime):
        updates.append((policy, batch))
        return UpdateStats(0.0, 0.0, 0.0, 1)

    monkeypatch.setattr(update_module, "logps_of", fixed_logps)
    monkeypatch.setattr(update_module, "ppo_update", record)
    return trainer, updates, capable_seqs, choices


def test_a_joint_step_row_by_row(stubbed):
    trainer, updates, capable_seqs, choices = stubbed
    kl_in_reward = choices["kl_placement"] == "reward"
    rewards, capable_advantages, light_advantages, next_lambda = expected(
        kl_in_reward, choices["scale_rewards"]
    )
    metrics = trainer.train_step()

    assert [u[0] for u in updates] == [trainer.light, trainer.capable]  # m first, then M
    (_, light), (_, capable) = updates
    assert light.advantages.tolist() == pytest.approx([a for row in light_advantages for a in row], abs=1e-5)
    assert [len(g) for g in light.question_rows()] == [3 * 2] * 2  # m's group: all n_M * n_m answers
    assert capable.advantages.tolist() == pytest.approx(
        [a for row in capable_advantages for a in row], abs=1e-5
    )
    assert [len(g) for g in capable.question_rows()] == [3] * 2  # M's group: the n_M signals of a question
    assert torch.equal(capable.old_logps, -0.1 * capable_seqs.completion_mask)  # old = the sampling policy's
    if kl_in_reward:  # the KL acts once: in the reward, or in M's loss against the initial M's log-probs
        assert capable.ref_logps is None
    else:
        assert torch.equal(capable.ref_logps, -0.3 * capable_seqs.completion_mask)
    assert light.ref_logps is None  # m has no KL term
    assert metrics["reward"] == pytest.approx(statistics.mean(r for row in rewards for r in row), abs=1e-6)
    assert metrics["kl"] == pytest.approx(statistics.mean(0.2 * n for row in LENGTHS for n in row))
    assert "r_light" not in metrics  # no standalone answers of m in the step
    assert metrics["signal_tokens"] == pytest.approx(23 / 5)  # forced cuts are not the policy's samples
    assert trainer.lam == pytest.approx(next_lambda)
    # a cut signal trains only the inserted close tag; the others every sampled token
    mask = capable.seqs.completion_mask
    close = len(trainer.rollouts.close_ids)
    assert mask[4].sum() == close and mask[3].sum() == LENGTHS[1][0]


def test_the_clip_bounds_a_ratio_below_one_minus_eps_for_a_negative_advantage():
    # -min(r·A, clip(r, 1-ε, 1+ε)·A) per token, worked out by hand with ε = 0.2:
    #   r = 0.5, A = -1: min(-0.5, -0.8) = -0.8 -> 0.8, clipped: no gradient
    #   r = 1.5, A = +1: min(1.5, 1.2) = 1.2 -> -1.2, clipped: no gradient
    #   r = 0.9, A = -1: min(-0.9, -0.9) -> 0.9, inside the range: gradient -A·r = 0.9
    from duetlm.train.algorithm.grpo import ppo_clip_loss

    ratios = torch.tensor([[0.5], [1.5], [0.9]])
    logps = torch.log(ratios).requires_grad_(True)
    loss = ppo_clip_loss(logps, torch.zeros(3, 1), torch.tensor([-1.0, 1.0, -1.0]), torch.ones(3, 1), 0.2)
    assert loss.item() == pytest.approx((0.8 - 1.2 + 0.9) / 3)
    loss.backward()
    assert logps.grad.flatten().tolist() == pytest.approx([0.0, 0.0, 0.9 / 3])
