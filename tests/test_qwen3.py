"""The path a Qwen3 user takes, on the Qwen3 test bed (real tokenizer, template and
generation config; tiny weights): sampling exactly the asked distribution, templates,
end-of-turn handling."""

from __future__ import annotations

import pytest
import torch

from conftest import QUESTIONS, SIGNAL, UNCLOSED_QUESTION
from duetlm.backends.base import GenerationRequest, SamplingParams, render_chat
from duetlm.backends.hf import HFBackend
from duetlm.config import DuetConfig
from duetlm.protocol import Duet, Problem, user_prompt
from duetlm.train.grpo import token_logps


def ask(question: str, sampling: SamplingParams) -> GenerationRequest:
    return GenerationRequest.chat(
        user_prompt(Problem(question), DuetConfig()), sampling, chat_template_kwargs={"enable_thinking": True}
    )


@pytest.fixture(scope="module")
def random_qwen3(qwen3_dirs) -> HFBackend:
    return HFBackend(str(qwen3_dirs["random"]), device="cpu")


def test_sampling_ignores_the_models_generation_config(random_qwen3):
    # Qwen3's generation_config.json says top_k 20, top_p 0.95. A request for temperature 0.6
    # and nothing else must sample the whole tempered distribution: with random weights most
    # sampled tokens then rank far below the 20 likeliest.
    backend = random_qwen3
    assert backend.model.generation_config.top_k == 20
    requests = [ask(f"question {i}?", SamplingParams(40, temperature=0.6, seed=i)) for i in range(4)]
    results = backend.generate(requests)
    ranks = []
    for request, result in zip(requests, results):
        prompt = backend.tokenizer(render_chat(backend.tokenizer, request), add_special_tokens=False)[
            "input_ids"
        ]
        ids = torch.tensor([prompt + result.token_ids])
        with torch.no_grad():
            logits = backend.model(ids).logits[0, len(prompt) - 1 : -1]  # (T, V)
        sampled = ids[0, len(prompt) :]
        ranks += (logits > logits.gather(1, sampled[:, None])).sum(dim=1).tolist()
    assert sum(rank >= 20 for rank in ranks) > len(ranks) / 2
    assert backend.model.generation_config.top_k == 20  # set aside during generate, then restored
    # and top-k, when asked for, is applied
    [limited] = backend.generate([ask("question 0?", SamplingParams(40, temperature=0.6, seed=0, top_k=5))])
    assert limited.output_tokens == 40


def test_sampled_logprobs_equal_the_recomputed_ones(random_qwen3):
    # What the trainer relies on: the log-prob of each sampled token under the distribution it
    # was drawn from equals token_logps at the rollout temperature.
    backend = random_qwen3
    requests = [ask(f"q{i}", SamplingParams(30, temperature=0.6, seed=i, logprobs=True)) for i in range(3)]
    for request, result in zip(requests, backend.generate(requests)):
        prompt = backend.tokenizer(render_chat(backend.tokenizer, request), add_special_tokens=False)[
            "input_ids"
        ]
        ids = torch.tensor([prompt + result.token_ids])
        with torch.no_grad():
            recomputed = token_logps(backend.model, ids, torch.ones_like(ids), 0.6)[0, len(prompt) - 1 :]
        assert len(result.logprobs) == result.output_tokens
        assert torch.allclose(recomputed, torch.tensor(result.logprobs), atol=1e-4)
        untempered = token_logps(backend.model, ids, torch.ones_like(ids), 1.0)[0, len(prompt) - 1 :]
        assert not torch.allclose(untempered, torch.tensor(result.logprobs), atol=1e-2)


def test_duet_on_the_qwen3_template(qwen3_dirs):
    capable = HFBackend(str(qwen3_dirs["capable"]), device="cpu")
    light = HFBackend(str(qwen3_dirs["light"]), device="cpu")
    assert capable.eos_token_ids == [151645, 151643]
    duet = Duet(capable, light, DuetConfig(signal_max_tokens=60, answer_max_tokens=20))
    result = duet.solve(QUESTIONS[0])
    assert (result.signal, result.answer, result.capable_finish) == (SIGNAL, "14", "stop")
    # M ends its turn inside its thinking: the end-of-turn token is not part of the signal
    cut = duet.solve(UNCLOSED_QUESTION)
    assert cut.capable_finish == "eos"
    assert cut.signal == "first 3+4=7" and "<|im_end|>" not in cut.signal
