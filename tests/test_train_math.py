"""Rewards, λ, advantages and the PPO-clip loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from duetlm.train.grpo import group_advantages, kl_sum, light_advantages, ppo_clip_loss, token_logps
from duetlm.train.reward import capable_rewards, single_model_rewards, update_lambda
from duetlm.train.sequences import credit_only_tail, pack


def test_capable_rewards_by_hand():
    pair = torch.tensor([[[1, 1, 0, 0], [1, 1, 1, 1]]])  # (Q=1, S=2, A=4)
    alone = torch.tensor([[1, 0, 0, 0]])  # r(m) = 0.25
    lengths = torch.tensor([[32.0, 96.0]])
    parts = capable_rewards(pair, alone, lengths, lam=0.5, length_bound=64, marginal_utility=True)
    # R = r_pair - r_m - λ L / B
    assert parts["reward"][0].tolist() == pytest.approx([0.5 - 0.25 - 0.25, 1.0 - 0.25 - 0.75])
    assert parts["r_light"].tolist() == [0.25]
    plain = capable_rewards(pair, alone, lengths, lam=0.5, length_bound=64, marginal_utility=False)
    assert plain["reward"][0].tolist() == pytest.approx([0.25, 0.25])


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
