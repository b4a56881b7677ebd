"""The hf backend on tiny real models: stop strings, exact token counts, batching, budgets."""

from __future__ import annotations

import pytest

from conftest import CAPABLE_SCRIPT, QUESTIONS, SIGNAL, _prompt, counting_forwards
from duetlm.backends.base import GenerationRequest, SamplingParams, render_chat
from duetlm.backends.hf import HFBackend
from duetlm.config import DuetConfig
from duetlm.errors import BackendError
from duetlm.protocol import Problem, user_prompt


def ask(question: str, max_tokens: int, stop: tuple[str, ...] = ()) -> GenerationRequest:
    return GenerationRequest.chat(
        user_prompt(Problem(question), DuetConfig()),
        SamplingParams(max_tokens, stop=stop),
        chat_template_kwargs={"enable_thinking": True},
    )


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_capable_stops_at_think_close_with_exact_counts(capable_backend, tokenizer):
    request = ask(QUESTIONS[0], 80, stop=("</think>",))
    [result] = capable_backend.generate([request])
    assert result.finish_reason == "stop"
    assert result.stop_string == "</think>"
    assert result.text == f"<think>\n{SIGNAL}\n"
    assert result.output_tokens == n_tokens(tokenizer, f"<think>\n{SIGNAL}\n</think>")
    assert result.prompt_tokens == n_tokens(tokenizer, render_chat(tokenizer, request))


def test_eos_is_counted_and_not_in_text(capable_backend, tokenizer):
    [result] = capable_backend.generate([ask(QUESTIONS[1], 120)])
    assert result.finish_reason == "eos"
    assert result.text == CAPABLE_SCRIPT.removesuffix("<|im_end|>")
    assert result.output_tokens == n_tokens(tokenizer, CAPABLE_SCRIPT)


def test_budget_cut_is_reported_as_length(capable_backend):
    [result] = capable_backend.generate([ask(QUESTIONS[0], 5, stop=("</think>",))])
    assert result.finish_reason == "length"
    assert result.output_tokens == 5
    assert result.stop_string is None


@pytest.mark.parametrize("stop", [(), ("</think>",), ("\n", "7")])
def test_batched_greedy_equals_one_by_one(random_backend, stop):
    # Prompts of different lengths, so the batch is left-padded.
    questions = ["a", "what is 2+2?", "a much longer question with many more tokens in it", "x" * 40]
    requests = [ask(q, 24, stop) for q in questions]
    batched = random_backend.generate(requests)
    single = [random_backend.generate([r])[0] for r in requests]
    for b, s in zip(batched, single, strict=True):
        assert (b.text, b.output_tokens, b.prompt_tokens, b.finish_reason) == (
            s.text,
            s.output_tokens,
            s.prompt_tokens,
            s.finish_reason,
        )


def test_rows_with_different_budgets_share_one_batch_and_stop_at_their_own(random_backend):
    # A budget cut to fit the context differs with every prompt length: grouping rows by
    # budget ran one generate() per budget. The random model writes on to its budget.
    questions = ["a", "what is 2+2?", "a much longer question with many more tokens in it", "x" * 40]
    requests = [ask(q, budget) for q, budget in zip(questions, (24, 7, 15, 3), strict=True)]
    with counting_forwards(random_backend.model) as forwards:
        batched = random_backend.generate(requests)
    assert len(forwards) == 24  # one prefill and 23 steps: a single batch, as long as its longest row
    single = [random_backend.generate([r])[0] for r in requests]
    for b, s in zip(batched, single, strict=True):
        assert (b.text, b.token_ids, b.finish_reason) == (s.text, s.token_ids, s.finish_reason)
    assert [r.output_tokens for r in batched] == [24, 7, 15, 3]


def test_a_chunk_fits_its_longest_budget_in_batch_tokens(random_backend):
    # rows x (longest prompt + longest budget): a short-budget row joining a long-budget one
    # still needs the long budget's room in the KV cache
    backend = HFBackend(
        model=random_backend.model, tokenizer=random_backend.tokenizer, spec="hf:random", batch_tokens=100
    )
    assert backend._chunks([0, 1, 2], [10, 10, 10], [40, 5, 5]) == [[0, 1], [2]]
    assert backend._chunks([0, 1, 2], [10, 10, 10], [5, 5, 5]) == [[0, 1, 2]]


def test_results_keep_request_order_across_groups(capable_backend):
    requests = [ask(QUESTIONS[0], 80, ("</think>",)), ask(QUESTIONS[1], 120), ask(QUESTIONS[2], 3)]
    results = capable_backend.generate(requests)
    assert [r.finish_reason for r in results] == ["stop", "eos", "length"]


def test_prefill_is_continued_not_repeated(light_backend, tokenizer):
    prefill = f"<think>\n{SIGNAL}\n</think>\n\n"
    request = GenerationRequest.chat(
        user_prompt(Problem(QUESTIONS[0]), DuetConfig()),
        SamplingParams(40),
        prefill=prefill,
        chat_template_kwargs={"enable_thinking": True},
    )
    assert render_chat(tokenizer, request) == _prompt(tokenizer, QUESTIONS[0], prefill)
    [result] = light_backend.generate([request])
    assert result.text == "So \\boxed{14}"
    assert result.prompt_tokens == n_tokens(tokenizer, render_chat(tokenizer, request))


def test_sampling_with_seed_is_reproducible(random_backend):
    request = GenerationRequest.chat("hello", SamplingParams(16, temperature=1.0, top_p=0.9, seed=7))
    first = random_backend.generate([request])[0].text
    assert random_backend.generate([request])[0].text == first


@pytest.mark.parametrize(
    "location",
    ["/definitely/not/a/model", "./missing-model-folder", "not a hub id!"],
)
def test_missing_model_is_a_clear_error(location):
    with pytest.raises(BackendError, match="does not exist"):
        HFBackend(location)


def test_file_instead_of_folder_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(BackendError, match="is a file"):
        HFBackend(str(path))


def test_budgets_are_cut_to_the_context_with_one_warning(tokenizer, caplog):
    from duetlm.models.pretrain import ModelShape, new_model

    model = new_model(tokenizer, ModelShape(32, 1, intermediate=64), max_positions=160).eval()
    backend = HFBackend(model=model, tokenizer=tokenizer, spec="hf:tiny-160")
    short, longer = ask("1+1?", 500), ask("2+2? " * 3, 500)
    too_long = ask("3+3? " * 40, 5)
    with caplog.at_level("WARNING", logger="duetlm.backends.base"):
        results = backend.generate([short, longer, too_long, ask("1+1?", 4)])
    prompts = [n_tokens(tokenizer, render_chat(tokenizer, r)) for r in (short, longer, too_long)]
    assert prompts[1] < 160 < prompts[2]
    for result, n_prompt in zip(results[:2], prompts):
        assert result.budget_clamped and result.prompt_tokens == n_prompt
        assert result.output_tokens == 160 - n_prompt and result.finish_reason == "length"
    assert results[2].output_tokens == 0 and results[2].extra["error"] == "context_length_exceeded"
    assert not results[3].budget_clamped and results[3].output_tokens == 4
    messages = [r.getMessage() for r in caplog.records]
    assert sum("budgets cut to fit the 160-token context" in m for m in messages) == 1
    assert sum("fills the 160-token context" in m for m in messages) == 1
    assert backend.context.clamped == 2 and backend.context.too_long == 1


def sampled(question: str, max_tokens: int, seed: int | None, temperature: float = 1.0) -> GenerationRequest:
    return GenerationRequest.chat(
        user_prompt(Problem(question), DuetConfig()),
        SamplingParams(max_tokens, temperature=temperature, seed=seed, logprobs=True),
        chat_template_kwargs={"enable_thinking": True},
    )


@pytest.mark.parametrize("fixture", ["model_dirs", "qwen3_dirs"])
def test_a_seeded_sample_does_not_depend_on_its_batch(request, fixture):
    # The trainer's processes each sample their own shard of a batch and must draw what one
    # process would: a row's tokens follow from its seed alone, whatever is batched beside it.
    backend = HFBackend(str(request.getfixturevalue(fixture)["random"]), device="cpu")
    questions = ["a", "what is 2+2?", "a much longer question with many more tokens in it", "x y z " * 8]
    requests = [sampled(q, 20, seed) for q, seed in zip(questions, (11, 12, 13, 14))]
    with counting_forwards(backend.model) as calls:
        together = backend.generate(requests)
    assert len(calls) <= 21  # one batch for all four seeds, not a batch per seed
    alone = [backend.generate([r])[0] for r in requests]
    shuffled = backend.generate([requests[2], requests[0], requests[3]])
    for a, b in zip(together, alone, strict=True):
        assert a.token_ids == b.token_ids
    assert sum(r.output_tokens for r in alone) >= 30  # rows long enough that a shared RNG would show
    assert [shuffled[1].token_ids, shuffled[0].token_ids] == [alone[0].token_ids, alone[2].token_ids]
    # one question twice with two seeds: two samples; the same seed again: the same sample
    twice = backend.generate([sampled(questions[1], 20, 1), sampled(questions[1], 20, 2)])
    assert twice[0].token_ids != twice[1].token_ids
    assert backend.generate([sampled(questions[1], 20, 1)])[0].token_ids == twice[0].token_ids


def test_sampled_logprobs_are_those_of_the_tempered_distribution(model_dirs):
    import torch

    from duetlm.train.algorithm.grpo import token_logps

    backend = HFBackend(str(model_dirs["random"]), device="cpu")
    requests = [sampled(q, 12, seed, temperature=0.7) for q, seed in (("a", 1), ("what is 2+2?", 2))]
    for request, result in zip(requests, backend.generate(requests), strict=True):
        prompt = backend.prompt_ids(request)
        ids = torch.tensor([prompt + result.token_ids])
        with torch.no_grad():
            expected = token_logps(backend.model, ids, torch.ones_like(ids), 0.7)[0, len(prompt) - 1 :]
        assert torch.allclose(torch.tensor(result.logprobs), expected, atol=1e-4)


def test_a_backend_that_declares_nothing_starts_closes_and_refuses_to_count():
    """The base every backend derives from: starting and closing do nothing, and counting a
    text without a tokenizer is a clear refusal, not an attribute error."""
    from duetlm.backends.base import BaseBackend, counts_tokens
    from duetlm.errors import BackendError

    class Bare(BaseBackend):
        spec = "bare"

    bare = Bare()
    assert bare.start() is None and bare.close() is None
    assert not counts_tokens(bare)
    with pytest.raises(BackendError, match="bare cannot count a text's tokens"):
        bare.count_tokens("12 + 3")
