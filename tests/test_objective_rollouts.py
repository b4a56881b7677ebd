"""The objective through the real rollout-to-reward path: real models sample, the real
trainer grades, groups and packs, and the tests look on without replacing anything.

`test_objective.py` fixes the rollouts to check the formulas; here nothing is fixed, so the
question is whether each number reaches the right place. The fixture makes every index
matter: two questions with different golds (14 and 9), n_M = 3 signals per question and
n_m = 4 answers per signal (3 and 4 differ from each other and from 2). M is trained to
end its thinking with "answer 14" or "answer 9" about half the time each; m answers what
the signal says, answers 7 to a signal cut after its first line, and alone always says 14.
So the same answer is right for one question and wrong for the other, correctness differs
between a question's signals, and r(m), measured at evaluation, is 1 for one question and 0
for the other.

Every expected value is worked out here from what the engines returned (read through
wrappers that call the real `generate`), with a grader, a chat rendering and the formulas
written in this file.
"""

from __future__ import annotations

import json
import random
import re
import statistics

import pytest
import torch

from conftest import _prompt, small_config, tiny_model, train_script
from duetlm.models.tokenizer import build_tokenizer
from duetlm.train.loop import objectives, update
from duetlm.train.loop.trainer import DuetTrainer

GOLDS = {"What is (3+4)*2?": "14", "What is (3+4)+2?": "9"}
FIRST_LINE = "first 3+4=7"
S, A = 3, 4  # n_M signals per question, n_m answers per signal (Q = 2)
LAMBDA, BOUND = 0.3, 16.0
SEED = 3  # sampling: with it, some question's signals differ (the first test checks that they do)


def thinking(answer: str) -> str:
    return f"<think>\n{FIRST_LINE}\nanswer {answer}\n</think>"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(model folders, task file) of the fixture described at the top."""
    tokenizer = build_tokenizer()
    root = tmp_path_factory.mktemp("objective")
    capable = tiny_model(tokenizer, seed=1)
    train_script(
        capable,
        tokenizer,
        [
            (_prompt(tokenizer, q), f"{thinking(a)}\n\nSo \\boxed{{{a}}}<|im_end|>")
            for q in GOLDS
            for a in GOLDS.values()
        ],
    )
    light = tiny_model(tokenizer, seed=2, hidden=32)
    scripts = []
    for question in GOLDS:
        for answer in GOLDS.values():
            scripts.append(
                (_prompt(tokenizer, question, thinking(answer) + "\n\n"), f"So \\boxed{{{answer}}}<|im_end|>")
            )
        scripts.append(
            (_prompt(tokenizer, question, f"<think>\n{FIRST_LINE}\n</think>\n\n"), "So \\boxed{7}<|im_end|>")
        )
        scripts.append((_prompt(tokenizer, question), "So \\boxed{14}<|im_end|>"))
    train_script(light, tokenizer, scripts)
    dirs = {}
    for name, model in (("capable", capable), ("light", light)):
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    rows = [{"id": f"q{i}", "question": q, "answer": a} for i, (q, a) in enumerate(GOLDS.items())]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "eval.jsonl").write_text(
        json.dumps({"id": "e0", "question": "What is 1+1?", "answer": "2"}) + "\n"
    )
    return dirs, root / "train.jsonl"


def make_trainer(pair, tmp_path, **overrides) -> DuetTrainer:
    dirs, task = pair
    settings = {
        "questions_per_step": 2,
        "n_capable": S,
        "n_light": A,
        "light_temperature": 1.0,
        "forced_stop_prob": 0.0,
        "kl_beta": 0.0,
        "kl_placement": "reward",
        "scale_rewards": "group",
        "lambda_init": LAMBDA,
        "length_bound": BOUND,
        "eval_questions": 1,
        "seed": SEED,
    }
    return DuetTrainer(small_config(dirs, task, tmp_path / "run", **(settings | overrides)))


class Recorder:
    """Wraps a callable: calls it, keeps (args, result). A spy, not a stub."""

    def __init__(self, monkeypatch, owner, name: str) -> None:
        self.calls: list[tuple[tuple, object]] = []
        real = getattr(owner, name)

        def spy(*args, **kwargs):
            result = real(*args, **kwargs)
            self.calls.append((args + tuple(kwargs.values()), result))
            return result

        monkeypatch.setattr(owner, name, spy)


def answer_of(text: str) -> str | None:
    """The last \\boxed{...}, else the last number (a graders' common fallback)."""
    found = re.findall(r"\\boxed\{([^{}]*)\}", text) or re.findall(r"\d+", text)
    return found[-1].strip() if found else None


def question_of(request) -> str:
    user = request.messages[-1][1]
    (question,) = [q for q in GOLDS if q in user]
    return question


def signal_text(sampled: str) -> str:
    """What m should read of a stage-1 output: the thinking, tags and whitespace off."""
    return sampled.split("<think>", 1)[-1].split("</think>", 1)[0].strip()


def prefill_of(signal: str) -> str:
    return f"<think>\n{signal}\n</think>\n\n"


def rendered_ids(tokenizer, request) -> list[int]:
    """The prompt a request stands for, rendered here from the chat template itself."""
    messages = [{"role": role, "content": content} for role, content in request.messages]
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    return tokenizer(text + request.prefill, add_special_tokens=False)["input_ids"]


def grpo(values: list[float]) -> list[float]:
    mean, std = statistics.mean(values), statistics.stdev(values)
    return [(v - mean) / (std + 1e-6) for v in values]


def joint_step(pair, tmp_path, monkeypatch, **overrides):
    """One real joint step with everything recorded: the trainer, then the recorders of M's
    generate, m's generate, score_joint, ppo_update and the capable rollout."""
    trainer = make_trainer(pair, tmp_path, **overrides)
    spies = {
        "capable": Recorder(monkeypatch, trainer.capable.engine, "generate"),
        "light": Recorder(monkeypatch, trainer.light.engine, "generate"),
        "score": Recorder(monkeypatch, objectives, "score_joint"),
        "update": Recorder(monkeypatch, update, "ppo_update"),
        "signals": Recorder(monkeypatch, trainer.rollouts, "capable_signals"),
    }
    trainer.train_step()
    return trainer, spies


def test_every_guided_answer_is_graded_against_its_own_question_under_its_own_signal(
    pair, tmp_path, monkeypatch
):
    _, spies = joint_step(pair, tmp_path, monkeypatch)
    ((stage1_requests,), stage1) = spies["capable"].calls[0]
    questions = [question_of(r) for r in stage1_requests[::S]]
    assert sorted(questions) == sorted(GOLDS)
    assert [question_of(r) for r in stage1_requests] == [q for q in questions for _ in range(S)]
    signals = [[signal_text(stage1[qi * S + si].text + "</think>") for si in range(S)] for qi in range(2)]

    assert len(spies["light"].calls) == 1  # m's guided answers only: no standalone answers in a step
    (guided_requests,), guided = spies["light"].calls[0]
    expected = torch.zeros(2, S, A)
    for i, (request, result) in enumerate(zip(guided_requests, guided, strict=True)):
        qi, si, ai = i // (S * A), i // A % S, i % A
        assert question_of(request) == questions[qi]
        assert request.prefill == prefill_of(signals[qi][si])
        expected[qi, si, ai] = float(answer_of(result.text) == GOLDS[questions[qi]])
    # the fixture does what it is for: the same answer right for one question, wrong for the
    # other, and a question whose signals differ in how often m gets it right
    assert any(len(set(expected[qi].mean(dim=1).tolist())) > 1 for qi in range(2)), (expected, signals)
    pair_correct = spies["score"].calls[0][0][0]
    assert torch.equal(pair_correct, expected)


def test_rewards_and_advantages_follow_each_questions_own_signals(pair, tmp_path, monkeypatch):
    _, spies = joint_step(pair, tmp_path, monkeypatch)
    (_, stage1) = spies["capable"].calls[0]
    (pair_correct, *_), scores = spies["score"].calls[0]
    for qi in range(2):
        for si in range(S):
            length = len(stage1[qi * S + si].token_ids)
            r_pair = pair_correct[qi, si].mean().item()
            assert scores.reward[qi, si].item() == pytest.approx(
                r_pair - LAMBDA * length / BOUND, abs=1e-6
            ), (qi, si)
        assert scores.capable_advantages[qi].tolist() == pytest.approx(
            grpo(scores.reward[qi].tolist()), abs=1e-5
        )


def test_r_m_is_measured_at_evaluation_with_the_whole_budget(pair, tmp_path, monkeypatch):
    # m alone on the evaluation questions, greedy, with signal + answer budget (enough to close
    # its thinking): each question graded against its own gold, so r(m) = 1/2 here (m says 14)
    dirs, _ = pair
    held_out, training = tmp_path / "eval.jsonl", tmp_path / "train.jsonl"
    rows = [{"id": f"e{i}", "question": q, "answer": a} for i, (q, a) in enumerate(GOLDS.items())]
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    training.write_text(json.dumps({"id": "t0", "question": "What is 1+1?", "answer": "2"}) + "\n")
    config = small_config(
        dirs,
        training,
        tmp_path / "run",
        eval_task=f"jsonl:{held_out}",
        eval_questions=2,
        questions_per_step=1,
    )
    trainer = DuetTrainer(config)
    alone = Recorder(monkeypatch, trainer.light.engine, "generate")
    metrics = trainer.evaluate()
    (requests,), results = next(call for call in alone.calls if all(r.prefill == "" for r in call[0][0]))
    budget = trainer.cfg.rollout.signal_max_tokens + trainer.cfg.rollout.answer_max_tokens
    assert all(r.sampling.max_tokens == budget and r.sampling.temperature == 0 for r in requests)
    right = [answer_of(r.text) == GOLDS[question_of(q)] for q, r in zip(requests, results, strict=True)]
    assert metrics["eval_r_light"] == pytest.approx(sum(right) / len(right)) == 0.5
    assert trainer.objective.r_light == 0.5
    step = trainer.train_step()
    assert step["marginal_reward"] == pytest.approx(step["reward"] - 0.5)


def test_after_a_forced_cut_m_reads_exactly_the_cut_text(pair, tmp_path, monkeypatch):
    trainer, spies = joint_step(pair, tmp_path, monkeypatch, forced_stop_prob=1.0)
    tokenizer = trainer.capable.tokenizer
    close = tokenizer("</think>", add_special_tokens=False)["input_ids"]
    stage1 = spies["capable"].calls[0][1]
    rollout = spies["signals"].calls[0][1]
    (guided_requests,), _ = spies["light"].calls[0]
    cuts = 0
    for qi, group in enumerate(rollout.signals):
        for si, signal in enumerate(group):
            sampled = stage1[qi * S + si]
            read = [r.prefill for r in guided_requests[(qi * S + si) * A : (qi * S + si + 1) * A]]
            if not signal.forced:
                assert read == [prefill_of(signal_text(sampled.text + "</think>"))] * A
                continue
            cuts += 1
            body = signal.ids[: -len(close)]
            assert signal.ids[-len(close) :] == close
            assert sampled.token_ids[: len(body)] == body and len(body) < len(sampled.token_ids) - 1
            cut_text = signal_text(tokenizer.decode(body))
            assert cut_text != signal_text(sampled.text + "</think>")  # the cut removed something
            assert read == [prefill_of(cut_text)] * A, (qi, si)
    assert cuts >= 3


def test_loss_masks_cover_each_models_own_tokens_and_nothing_else(pair, tmp_path, monkeypatch):
    trainer, spies = joint_step(pair, tmp_path, monkeypatch)
    tokenizer = trainer.capable.tokenizer
    (light_call, _), (capable_call, _) = spies["update"].calls
    assert light_call[0] is trainer.light and capable_call[0] is trainer.capable
    (stage1_requests,), stage1 = spies["capable"].calls[0]
    (guided_requests,), guided = spies["light"].calls[0]
    for seqs, requests, results in (
        (light_call[1].seqs, guided_requests, guided),
        (capable_call[1].seqs, stage1_requests, stage1),
    ):
        assert len(seqs) == len(requests)
        for row, (request, result) in enumerate(zip(requests, results, strict=True)):
            prompt, sampled = rendered_ids(tokenizer, request), result.token_ids
            ids = seqs.input_ids[row].tolist()
            real = int(seqs.attention_mask[row].sum())
            assert real == len(prompt) + len(sampled)
            assert ids[:real] == prompt + sampled
            # position t predicts token t + 1: the loss covers exactly the sampled tokens
            expected = [0.0] * (len(ids) - 1)
            for t in range(len(prompt), real):
                expected[t - 1] = 1.0
            assert seqs.completion_mask[row].tolist() == expected, (row, request.prefill)
    # m's answers are its own words, not M's signal: the masked tokens read as m's answer
    first = light_call[1].seqs
    masked = first.input_ids[0, 1:][first.completion_mask[0].bool()].tolist()
    assert tokenizer.decode(masked, skip_special_tokens=True) == guided[0].text


def test_the_single_model_baseline_pays_its_kl(pair, tmp_path, monkeypatch):
    beta = 1.0
    trainer = make_trainer(
        pair,
        tmp_path,
        single_model=True,
        train_light=False,
        kl_beta=beta,
        kl_placement="reward",
        scale_rewards="group",
    )
    trainer.train_step()  # the policy moves away from the initial M: KL is 0 only at step 0
    generated = Recorder(monkeypatch, trainer.capable.engine, "generate")
    kls = Recorder(monkeypatch, trainer.passes, "kl")
    updates = Recorder(monkeypatch, update, "ppo_update")
    lam = trainer.lam
    metrics = trainer.train_step()

    (requests,), results = generated.calls[0]
    kl = kls.calls[0][1].tolist()
    assert max(abs(k) for k in kl) > 1e-3  # a KL that can show
    rewards = []
    for request, result, k in zip(requests, results, kl, strict=True):
        _, closed, final = result.text.partition("</think>")
        correct = float(bool(closed) and answer_of(final) == GOLDS[question_of(request)])
        rewards.append(correct - lam * result.output_tokens / trainer.cfg.objective.length_bound - beta * k)
    assert metrics["reward"] == pytest.approx(statistics.mean(rewards), abs=1e-5)
    advantages = updates.calls[0][0][1].advantages.tolist()
    expected = grpo(rewards[:S]) + grpo(rewards[S:])
    assert advantages == pytest.approx(expected, abs=1e-4)


def test_each_micro_batch_row_is_trained_with_its_own_advantage():
    # One process, several micro-batches sorted by length, questions shuffled over the step, and
    # a rollout correction's weight on every token: the update must equal the gradient of the
    # whole batch's weighted token-mean loss, computed here.
    from duetlm.train.loop.update import UpdateSettings, mini_batch_rows, ppo_update
    from duetlm.train.modeling.distributed import Runtime
    from duetlm.train.modeling.policy import LogprobNet, Policy
    from duetlm.train.rollouts.batch import RolloutBatch
    from duetlm.train.rollouts.sequences import pack

    tokenizer = build_tokenizer()
    model = tiny_model(tokenizer, seed=3)
    rng = random.Random(0)
    lengths = [11, 9, 7, 6, 4, 2]  # row order is the reverse of length order
    completions = [[rng.randrange(5, 200) for _ in range(n)] for n in lengths]
    seqs = pack([[1, 2, 3]] * 6, completions, tokenizer.pad_token_id)
    advantages = torch.tensor([1.5, -0.5, 0.25, -2.0, 0.75, -1.0])
    weights = 0.5 + 1.5 * torch.rand(seqs.completion_mask.shape, generator=torch.Generator().manual_seed(2))

    def reference_gradients() -> list[torch.Tensor]:
        model.zero_grad()
        logits = model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask).logits[:, :-1]
        logps = torch.log_softmax(logits.float(), dim=-1).gather(2, seqs.input_ids[:, 1:, None]).squeeze(2)
        # at ratio 1 both PPO branches have the gradient of -A * log p
        loss = (
            -(advantages[:, None] * weights * logps * seqs.completion_mask).sum() / seqs.completion_mask.sum()
        )
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    expected = reference_gradients()
    model.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    policy = Policy(
        model, LogprobNet(model, chunk=1024), tokenizer, torch.optim.SGD(model.parameters(), lr=1.0), None
    )
    settings = UpdateSettings(
        epochs=1, mini_batches=1, micro_batch=2, clip_eps=0.2, max_grad_norm=1e9, precision="fp32", seed=5
    )
    # the step's shuffle of the six one-row groups moves rows: position in a micro-batch is not row
    batch = RolloutBatch.of(seqs, [(q, 0, 0) for q in range(6)]).with_scores(advantages, None, None, weights)
    order = mini_batch_rows(batch.question_rows(), 1, random.Random(settings.seed))[0].tolist()
    assert order != sorted(order)
    ppo_update(policy, batch, settings, Runtime())
    for old, new, grad in zip(before, model.parameters(), expected, strict=True):
        torch.testing.assert_close(old - new.detach(), grad, rtol=1e-4, atol=1e-6)
