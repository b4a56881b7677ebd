"""m's update with each signal's prefix computed once for its n_m answers (`share_prefixes`):
the same log-probs and gradients as row by row, for fewer forward tokens; and the output layer
the trainer scores with is the model's own."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from duetlm.errors import ConfigError
from duetlm.train.algorithm.grpo import token_logps
from duetlm.train.loop.update import UpdateSettings, logps_of, ppo_update
from duetlm.train.modeling.distributed import Runtime
from duetlm.train.modeling.policy import LogprobNet, Policy, check_output_layer
from duetlm.train.rollouts.batch import RolloutBatch
from duetlm.train.rollouts.sequences import pack, pack_shared_prefixes


def m_rows(vocab: int, prefix_lengths=(40, 23), answers=4, seed=0):
    """Rows as m's update sees them: per signal one prefix (question + signal), n_m answers of
    different lengths after it; the keys (question, signal, answer)."""
    rng = random.Random(seed)
    prompts, completions, keys = [], [], []
    for s, length in enumerate(prefix_lengths):
        prefix = [rng.randrange(5, vocab) for _ in range(length)]
        for a in range(answers):
            prompts.append(prefix)
            completions.append([rng.randrange(5, vocab) for _ in range(rng.randrange(1, 9))])
            keys.append((0, s, a))
    return pack(prompts, completions, pad_id=0), keys


@pytest.fixture(scope="module")
def qwen3():
    from qwen3 import tiny_qwen3

    return tiny_qwen3(seed=4, hidden=32).float()


def test_packed_logps_equal_row_by_row_on_qwen3(qwen3):
    seqs, _ = m_rows(qwen3.config.vocab_size)
    with torch.no_grad():
        rows = token_logps(qwen3, seqs.input_ids, seqs.attention_mask, 0.7, seqs.completion_mask)
        packed = pack_shared_prefixes(seqs, pad_id=0)
        shared = LogprobNet(qwen3, 1024)(None, None, seqs.completion_mask, 0.7, packed=packed)
    mask = seqs.completion_mask.bool()
    assert mask.sum() > 20 and torch.allclose(shared[mask], rows[mask], atol=1e-5)
    assert (shared[~mask] == 0).all()
    # two prefixes, each run once: the forward computes far fewer tokens than the rows hold
    assert packed.input_ids.shape[0] == 2 and packed.tokens < int(seqs.attention_mask.sum()) / 2.5


def test_a_packed_update_gives_the_row_by_row_update(qwen3):
    # SGD, one step, the same rows and advantages: the weights after it must agree
    import copy

    seqs, keys = m_rows(qwen3.config.vocab_size)
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.75, -0.25, 0.5, -0.75])
    batch = RolloutBatch.of(seqs, keys).with_scores(advantages, None)
    after = {}
    for share in (False, True):
        model = copy.deepcopy(qwen3).train()
        policy = Policy(
            model, LogprobNet(model, 1024), None, torch.optim.SGD(model.parameters(), lr=1.0), None
        )
        settings = UpdateSettings(1, 1, 4, 0.2, 1e9, "fp32", seed=0, share_prefixes=share)
        stats = ppo_update(policy, batch, settings, Runtime())
        after[share] = ({n: p.detach().clone() for n, p in model.named_parameters()}, stats.forward_tokens)
    (plain, plain_tokens), (shared, shared_tokens) = after[False], after[True]
    worst = max(float((plain[n] - shared[n]).abs().max()) for n in plain)
    assert worst < 1e-5, worst
    assert shared_tokens < plain_tokens / 2.5
    start = dict(qwen3.named_parameters())
    assert any(not torch.equal(start[n].detach(), shared[n]) for n in shared)  # the step moved weights


def test_packed_log_prob_passes_keep_each_row_in_place(qwen3):
    # micro-batches of whole groups, rows in any order: every row gets its own log-probs back
    seqs, keys = m_rows(qwen3.config.vocab_size, prefix_lengths=(12, 30, 7), answers=3, seed=3)
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(1))
    shuffled = RolloutBatch.of(seqs, keys).take(order)
    net = LogprobNet(qwen3, 1024)
    settings = UpdateSettings(1, 1, 3, 0.2, 1.0, "fp32", seed=0, share_prefixes=True)
    shared = logps_of(net, shuffled, 1.0, settings, Runtime())
    with torch.no_grad():
        plain = token_logps(
            qwen3, shuffled.seqs.input_ids, shuffled.seqs.attention_mask, 1.0, shuffled.seqs.completion_mask
        )
    mask = shuffled.seqs.completion_mask.bool()
    assert torch.allclose(shared[mask], plain[mask], atol=1e-5)


def test_soft_capped_logits_are_scored_as_the_model_computes_them():
    # Gemma 2 caps its logits (tanh(z / 30) * 30): the output layer alone would not be its policy
    config = Gemma2Config(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=0.5,  # small, so that capping changes every logit of random weights
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    check_output_layer(model, "gemma2")
    ids = torch.randint(5, 300, (2, 12))
    mask = torch.zeros(2, 11)
    mask[:, 5:] = 1
    with torch.no_grad():
        ours = token_logps(model, ids, torch.ones_like(ids), 1.0, mask)
        theirs = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1).gather(
            2, ids[:, 1:, None]
        )
    assert torch.allclose(ours[mask.bool()], theirs.squeeze(2)[mask.bool()], atol=1e-5)


class ScaledLogits(LlamaForCausalLM):
    """A model whose forward does something to its logits that no config says."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 3.0
        return output


def test_a_model_whose_logits_are_something_else_is_refused():
    config = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    torch.manual_seed(0)
    check_output_layer(LlamaForCausalLM(config).eval(), "llama")  # a plain model passes
    with pytest.raises(ConfigError, match="not its output layer applied to its last hidden states"):
        check_output_layer(ScaledLogits(config).eval(), "scaled")
