"""Rewards, λ, advantages and the PPO-clip loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from duetlm.train.algorithm.correction import importance_weights
from duetlm.train.algorithm.grpo import (
    group_advantages,
    k3_kl,
    kl_sum,
    light_advantages,
    ppo_clip_loss,
    token_logps,
)
from duetlm.train.algorithm.reward import capable_rewards, single_model_rewards, update_lambda
from duetlm.train.rollouts.sequences import credit_only_tail, pack


def test_capable_rewards_by_hand():
    pair = torch.tensor([[[1, 1, 0, 0], [1, 1, 1, 1]]])  # (Q=1, S=2, A=4)
    lengths = torch.tensor([[32.0, 96.0]])
    parts = capable_rewards(pair, lengths, lam=0.5, length_bound=64)
    # R = r_pair - λ L / B
    assert parts["reward"][0].tolist() == pytest.approx([0.5 - 0.25, 1.0 - 0.75])
    assert parts["r_pair"][0].tolist() == [0.5, 1.0]


def test_r_m_cancels_exactly_from_every_advantage():
    # r(m)(x) is one number per question: subtracting it moves a group's rewards and its mean
    # alike, so no advantage changes (under every scale), and the step need not draw it
    rewards = torch.tensor([[0.5, 0.25, 1.0, 0.0], [0.75, 0.75, 0.5, 1.0]])
    r_light = torch.tensor([[1.0], [0.0]])
    for scale in ("group", "batch", "none"):
        plain = group_advantages(rewards, scale=scale, batch_std=0.3)
        marginal = group_advantages(rewards - r_light, scale=scale, batch_std=0.3)
        assert (plain - marginal).abs().max() < 1e-6, scale


# The worked example of docs/design.md: an all-correct group, L = [900, 1000, 1100, 1200],
# KL = [2, 0.5, 1.5, 0], B = 2048, β = 0.001.
LENGTHS, KL, BOUND, BETA = (
    torch.tensor([[900.0, 1000, 1100, 1200]]),
    torch.tensor([[2.0, 0.5, 1.5, 0.0]]),
    2048,
    1e-3,
)


def worked_rewards(lam: float, kl_in_reward: bool) -> torch.Tensor:
    reward = 1.0 - lam * LENGTHS / BOUND
    return reward - BETA * KL if kl_in_reward else reward


def test_the_worked_example_kl_in_the_reward_and_the_groups_std():
    # at λ = 1e-4 the KL noise decides, and makes the longest signal the best; at λ = 0.5 length does
    small = group_advantages(worked_rewards(1e-4, True))[0].tolist()
    assert small == pytest.approx([-1.09, 0.55, -0.55, 1.09], abs=0.01)
    large = group_advantages(worked_rewards(0.5, True))[0].tolist()
    assert large[0] > large[1] > large[2] > large[3]


def test_the_worked_example_kl_in_the_loss_under_each_scale():
    # without the KL in the reward the order is length's at any λ > 0; the group's std makes the
    # advantages about as large at λ = 1e-4 as at 0.5 (λ's size stops mattering; only the 1e-6 of
    # the denominator tells them apart), while batch and none keep it
    tiny, half = worked_rewards(1e-4, False), worked_rewards(0.5, False)
    group = [group_advantages(r)[0] for r in (tiny, half)]
    unit = [1.1619, 0.3873, -0.3873, -1.1619]  # (L̄ − L) / its sample std
    assert group[1].tolist() == pytest.approx(unit, abs=1e-3)
    std = 1e-4 * math.sqrt(50_000 / 3) / BOUND
    assert group[0].tolist() == pytest.approx([u * std / (std + 1e-6) for u in unit], rel=1e-3)
    none = [group_advantages(r, scale="none")[0] for r in (tiny, half)]
    assert none[0].tolist() == pytest.approx(
        [1e-4 * 150 / BOUND * k for k in (1, 1 / 3, -1 / 3, -1)], rel=1e-3
    )
    assert none[1][0] / none[0][0] == pytest.approx(0.5 / 1e-4, rel=1e-3)  # proportional to λ
    # a batch whose other groups differ in correctness: the std of the batch's rewards sets the scale
    batch = group_advantages(tiny, scale="batch", batch_std=0.5)[0]
    assert batch.tolist() == pytest.approx((none[0] / 0.5).tolist(), rel=1e-4)


def test_k3_is_the_low_variance_kl_estimate():
    logps, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.0, -1.0, -1.5]])
    expected = [math.exp(r - lp) - (r - lp) - 1 for lp, r in zip(logps[0].tolist(), ref[0].tolist())]
    assert k3_kl(logps, ref)[0].tolist() == pytest.approx(expected)
    assert k3_kl(logps, ref)[0, 0] == 0 and (k3_kl(logps, ref) >= 0).all()


def test_importance_weights_by_hand():
    # log π_old − log μ per token: row 0 [ln 3, 0, ln 0.25], row 1 [ln 1.5, NaN (not sampled by the engine)]
    old = torch.tensor([[math.log(0.6), math.log(0.5), math.log(0.1)], [math.log(0.3), math.log(0.2), 0.0]])
    engine = torch.tensor([[math.log(0.2), math.log(0.5), math.log(0.4)], [math.log(0.2), float("nan"), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    tis, stats = importance_weights(old, engine, mask, "token_tis", 2.0)
    assert tis[0].tolist() == pytest.approx([2.0, 1.0, 0.25]) and tis[1, :2].tolist() == pytest.approx(
        [1.5, 1.0]
    )
    assert stats.corrected == 1 and stats.tokens == 4 and stats.weight_max == pytest.approx(3.0)
    # the KL of the engine to the trainer: Σ (engine − old) = −ln(3 · 0.25 · 1.5); k3 Σ (w − 1 − ln w)
    assert stats.log_ratio == pytest.approx(-math.log(3 * 0.25 * 1.5))
    assert stats.k3 == pytest.approx(sum(w - 1 - math.log(w) for w in (3.0, 1.0, 0.25, 1.5)))
    mis, stats = importance_weights(old, engine, mask, "token_mis", 2.0)
    assert mis[0].tolist() == pytest.approx([0.0, 1.0, 0.0]) and mis[1, :2].tolist() == pytest.approx(
        [1.5, 1.0]
    )
    assert stats.corrected == 2
    # sequences: row 0's weight is 3 * 1 * 0.25 = 0.75, row 1's 1.5 (the unsampled token left out)
    seq, _ = importance_weights(old, engine, mask, "sequence_tis", 2.0)
    assert seq[0].tolist() == pytest.approx([0.75] * 3) and seq[1, :2].tolist() == pytest.approx([1.5, 1.0])
    masked, stats = importance_weights(old, engine, mask, "sequence_mis", 1.4)
    assert masked[0].tolist() == pytest.approx([0.75] * 3) and masked[1, :2].tolist() == pytest.approx(
        [0.0, 1.0]
    )
    assert stats.corrected == 1 and stats.units == 2


def test_importance_weights_scale_the_policy_term():
    logps = torch.log(torch.tensor([[0.5, 0.5]]))
    mask, advantages = torch.ones(1, 2), torch.tensor([1.0])
    plain = ppo_clip_loss(logps, logps, advantages, mask, 0.2)
    weighted = ppo_clip_loss(logps, logps, advantages, mask, 0.2, weights=torch.tensor([[2.0, 0.0]]))
    assert plain.item() == pytest.approx(-1.0) and weighted.item() == pytest.approx(-1.0)  # (2 + 0) / 2
    weighted = ppo_clip_loss(logps, logps, advantages, mask, 0.2, weights=torch.tensor([[0.5, 0.5]]))
    assert weighted.item() == pytest.approx(-0.5)


def test_single_model_rewards_by_hand():
    reward = single_model_rewards(torch.tensor([[1, 0]]), torch.tensor([[50, 10]]), lam=0.2, length_bound=100)
    assert reward[0].tolist() == pytest.approx([1 - 0.1, -0.02])


@pytest.mark.parametrize(
    ("lam", "mean_length", "schedule", "expected"),
    [
        (0.0, 128, "adaptive", 0.01),  # 0 + 0.01 * (128/64 - 1)
        (0.0, 32, "adaptive", 0.0),  # clipped at 0
        (0.3, 32, "adaptive", 0.3 - 0.005),
        (0.999, 640, "adaptive", 1.0),  # clipped at 1
        (0.3, 640, "constant", 0.3),
    ],
)
def test_update_lambda(lam, mean_length, schedule, expected):
    assert update_lambda(lam, mean_length, 64, 0.01, schedule) == pytest.approx(expected)


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    advantages = group_advantages(rewards)
    std = math.sqrt(1 / 3)  # sample std of (1, 0, 0, 1)
    assert advantages[0].tolist() == pytest.approx(
        [0.5 / (std + 1e-6), -0.5 / (std + 1e-6)] * 1 + [-0.5 / (std + 1e-6), 0.5 / (std + 1e-6)]
    )
    assert advantages[1].tolist() == [0.0] * 4


def test_light_advantages_normalize_over_all_guided_answers():
    pair = torch.tensor([[[1, 1], [0, 0]]])  # (Q=1, S=2, A=2)
    advantages = light_advantages(pair)
    flat = group_advantages(torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    assert advantages.reshape(-1).tolist() == pytest.approx(flat.reshape(-1).tolist())
    assert advantages.shape == (1, 2, 2)


def test_ppo_clip_loss_by_hand():
    logps = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    old = torch.log(torch.tensor([[0.25, 0.5], [0.9, 0.5]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    advantages = torch.tensor([1.0, -1.0])
    # ratios: row 0: 2.0 (clipped to 1.2 for A>0), 1.0; row 1: 1.0 (A<0); masked token ignored
    expected = -(1.2 * 1 + 1.0 * 1 + 1.0 * -1) / 3
    assert ppo_clip_loss(logps, old, advantages, mask, 0.2).item() == pytest.approx(expected)
    assert ppo_clip_loss(logps, old, advantages, mask, 0.2, token_count=6).item() == pytest.approx(
        expected / 2
    )


def test_ppo_clip_loss_keeps_the_pessimistic_side_for_negative_advantages():
    logps, old = torch.log(torch.tensor([[0.6]])), torch.log(torch.tensor([[0.3]]))
    # ratio 2: for A = -1 the unclipped term (-2) is the minimum, so the loss is +2.
    assert ppo_clip_loss(logps, old, torch.tensor([-1.0]), torch.ones(1, 1), 0.2).item() == pytest.approx(2.0)


def test_kl_sum_counts_only_sampled_tokens():
    logps = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0]])
    assert kl_sum(logps, ref, torch.tensor([[1.0, 1.0, 0.0]])).tolist() == [0.5]


def test_pack_aligns_completion_mask_with_logps():
    seqs = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert seqs.input_ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    # completion_mask[t] marks whether token t+1 was sampled
    assert seqs.completion_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]


def test_forced_stop_credit_keeps_only_the_inserted_close_tag():
    seqs = pack([[1, 2], [3]], [[4, 5, 6, 7], [8, 9, 10]], pad_id=0)
    credited = credit_only_tail(seqs, rows=[1], tail=1)
    # row 0 (sampled freely) keeps every sampled token; row 1 (cut) keeps only its last one
    assert credited.completion_mask.tolist() == [[0, 1, 1, 1, 1], [0, 0, 1, 0, 0]]
    assert seqs.completion_mask.tolist()[1] == [1, 1, 1, 0, 0]  # the original is untouched


class FixedLogits(torch.nn.Module):
    """A stand-in language model whose next-token logits are given, to check the arithmetic."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask):
        return type("Output", (), {"logits": self.logits})()


def test_token_logps_are_those_of_the_tempered_sampling_distribution():
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 0.0]]])  # (1, 3, V=3)
    ids = torch.tensor([[0, 2, 1]])
    for temperature in (1.0, 0.5):
        got = token_logps(FixedLogits(logits), ids, torch.ones_like(ids), temperature)
        tempered = torch.log_softmax(logits[0, :2] / temperature, dim=-1)
        assert torch.allclose(got[0], torch.stack([tempered[0, 2], tempered[1, 1]]))
    # colder sampling makes the likelier token likelier still: 0.5 beats 1.0 on token 1 at step 2
    assert (
        token_logps(FixedLogits(logits), ids, torch.ones_like(ids), 0.5)[0, 1]
        > token_logps(FixedLogits(logits), ids, torch.ones_like(ids), 1.0)[0, 1]
    )
