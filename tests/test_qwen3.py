"""The path a Qwen3 user takes, on the Qwen3 test bed (real tokenizer, template and
generation config; tiny weights): sampling exactly the asked distribution, templates,
end-of-turn handling."""

from __future__ import annotations

import pytest
import torch

from conftest import QUESTIONS, SIGNAL, UNCLOSED_QUESTION, counting_forwards
from duetlm.backends.base import GenerationRequest, GenerationResult, SamplingParams, render_chat
from duetlm.backends.hf import HFBackend
from duetlm.config import DuetConfig
from duetlm.protocol import Duet, Problem, user_prompt
from duetlm.train.algorithm.grpo import token_logps


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


def test_rows_with_their_own_budgets_share_one_batch(random_qwen3):
    # Training rollouts mix budgets (forced early stops), and budgets cut to fit a context
    # differ by prompt length: one generate() serves them all, each row ending at its own.
    backend = random_qwen3
    budgets = (30, 9, 17)
    greedy = [ask(f"question number {i}?" * (i + 1), SamplingParams(b)) for i, b in enumerate(budgets)]
    with counting_forwards(backend.model) as forwards:
        batched = backend.generate(greedy)
    assert len(forwards) == max(budgets)
    for b, request in zip(batched, greedy, strict=True):
        [alone] = backend.generate([request])
        assert (b.token_ids, b.text, b.finish_reason) == (alone.token_ids, alone.text, alone.finish_reason)
    # sampled with log-probs, as the trainer asks: each row's log-probs stop with its tokens
    sampled = [
        ask(f"q{i}", SamplingParams(b, temperature=0.6, seed=7, logprobs=True)) for i, b in enumerate(budgets)
    ]
    for request, result in zip(sampled, backend.generate(sampled), strict=True):
        assert result.output_tokens <= request.sampling.max_tokens
        assert len(result.logprobs) == result.output_tokens == len(result.token_ids)
        prompt = backend.prompt_ids(request)
        ids = torch.tensor([prompt + result.token_ids])
        with torch.no_grad():
            recomputed = token_logps(backend.model, ids, torch.ones_like(ids), 0.6)[0, len(prompt) - 1 :]
        assert torch.allclose(recomputed, torch.tensor(result.logprobs), atol=1e-4)


def sampled_ranks(backend: HFBackend, request: GenerationRequest, token_ids: list[int]) -> list[int]:
    """Each sampled token's rank among the model's logits at its position (0 = the likeliest)."""
    prompt = backend.tokenizer(render_chat(backend.tokenizer, request), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + token_ids])
    with torch.no_grad():
        logits = backend.model(ids).logits[0, len(prompt) - 1 : -1]
    sampled = ids[0, len(prompt) :]
    return (logits > logits.gather(1, sampled[:, None])).sum(dim=1).tolist()


def test_the_streaming_engine_samples_what_is_asked(random_qwen3):
    # duet serve's path: requests stream through the engine together. With Qwen3's settings
    # (T 0.6, top-k 20, top-p 0.95) every token is among the 20 likeliest; with T 0.6 alone
    # most are not (random weights: a nearly flat distribution over 152k tokens). A seeded
    # request repeats alone what it drew in company.
    import asyncio

    backend = random_qwen3
    qwen3 = [
        ask(f"q{i}?", SamplingParams(30, temperature=0.6, top_k=20, top_p=0.95, seed=i)) for i in range(3)
    ]
    plain = [ask(f"p{i}?", SamplingParams(30, temperature=0.6, seed=i)) for i in range(2)]

    async def results(requests):
        async def one(request):
            async for item in backend.astream(request):
                if isinstance(item, GenerationResult):
                    return item

        return await asyncio.gather(*(one(r) for r in requests))

    together = asyncio.run(results(qwen3 + plain))
    limited = [rank for r, res in zip(qwen3, together) for rank in sampled_ranks(backend, r, res.token_ids)]
    assert len(limited) == 90 and max(limited) < 20
    free = [rank for r, res in zip(plain, together[3:]) for rank in sampled_ranks(backend, r, res.token_ids)]
    assert sum(rank >= 20 for rank in free) > len(free) / 2
    [alone] = asyncio.run(results(qwen3[1:2]))
    assert alone.token_ids == together[1].token_ids


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
