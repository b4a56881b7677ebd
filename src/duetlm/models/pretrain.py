"""Train the embedded pair from scratch: `duet pretrain-pair` (deterministic from a seed).

M (a Llama-style model of about 1.8M parameters) learns the builtin task's full reasoning
format by supervised learning: question -> `<think>` steps with redundancy `</think>` ->
write-up. m (about 3.5x smaller) learns to write the answer from the question plus a prefix
of the reasoning (none to all), with extra loss weight on the answer digit and prefixes that
leave one or two steps oversampled: finishing a step it was not shown is the only part of
m's job that takes arithmetic. Once that is learned, M's own greedy thinking joins m's data,
so m reads what it will really be handed. Each model trains until it passes a validation gate
(or its step cap), not for a fixed time. Both use exactly the prompts the protocol renders at
inference, so the pair is driven by the same code path as Qwen3.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from duetlm.backends.base import render_chat
from duetlm.backends.hf import HFBackend
from duetlm.config import DuetConfig
from duetlm.errors import InputError
from duetlm.grading import extract_boxed
from duetlm.models.tokenizer import build_tokenizer
from duetlm.protocol import Duet, Problem, capable_request, light_request
from duetlm.tasks import builtin

logger = logging.getLogger(__name__)

Segments = list[tuple[str, float]]  # target text pieces with their loss weight
Example = tuple[str, Segments]  # (rendered prompt, target segments)


@dataclass
class ModelShape:
    hidden: int
    layers: int
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512


@dataclass
class PretrainConfig:
    """Every knob of the pair's training, with the values the shipped checkpoints used."""

    seed: int = 0
    capable_shape: ModelShape = field(default_factory=lambda: ModelShape(192, 4, intermediate=512))
    light_shape: ModelShape = field(default_factory=lambda: ModelShape(128, 3, intermediate=256))
    batch_size: int = 32
    lr: float = 1e-3  # AdamW, linear warmup then cosine to 10% (3e-3 learned the lookups far slower)
    warmup_steps: int = 50
    capable_max_steps: int = 3000
    light_max_steps: int = 2400  # m's learning rate anneals by then: it reads long traces steadily
    min_steps: int = 300  # no gate is checked before this
    eval_every: int = 100
    eval_questions: int = 200  # validation questions (train split, never trained on)
    capable_gate: float = 0.95  # M-alone greedy accuracy
    light_gate_one_left: float = 0.90  # m given the essential trace minus its last step
    # m given the full essential trace; and m's answer from M's own thinking, against M's answer
    light_gate_full: float = 0.98
    light_batch_size: int = 64  # m's target is short: more examples per step
    micro_batches: int = 8  # length-sorted chunks per step: same gradient, far less padding
    # M's own greedy thinking on this many training questions (the ones M got right) becomes
    # part of m's data, drawn instead of a synthetic trace with probability light_capable_share.
    # M's real traces have quirks the generator's lack (a step written twice, a long run of
    # re-checks); trained on synthetic traces alone, m misread about 5% of M's complete signals
    # on long chains.
    # They enter at light_capable_from_step: mixed in from the start, they held back the
    # arithmetic m needs for a missing step (one step left: 24% right at step 1,800).
    light_capable_traces: int = 2000
    light_capable_share: float = 0.25
    light_capable_from_step: int = 1200
    light_answer_weight: float = 5.0  # loss weight of the restated last step and the answer in m's target
    # Share of M's training traces written without any redundancy. A little keeps M's step-by-step
    # computation working when its thinking is terse (trained on redundant traces only, M forced
    # to skip the re-checks got 31% right: the length penalty would have nowhere to go), while the
    # redundant majority keeps M's greedy thinking verbose, as a reasoning model's is.
    capable_clean_share: float = 0.08
    tokenizer_corpus: int = 3000  # sampled documents the BPE merges are trained on
    threads: int = 2


def render_capable_prompt(tokenizer, problem: builtin.ChainProblem, config: DuetConfig) -> str:
    return render_chat(tokenizer, capable_request(Problem(problem.question), config, 1))


def render_light_prompt(tokenizer, problem: builtin.ChainProblem, signal: str, config: DuetConfig) -> str:
    return render_chat(
        tokenizer, light_request(Problem(problem.question), signal, config, config.light_template_kwargs)
    )


def write_up_segments(problem: builtin.ChainProblem, key_weight: float) -> Segments:
    pieces = builtin.write_up_parts(problem)
    segments = [(text, key_weight if key else 1.0) for text, key in pieces]
    return [*segments[:-1], (segments[-1][0] + "<|im_end|>", 1.0)]


def capable_example(
    tokenizer, problem, rng: random.Random, config: DuetConfig, clean_share: float = 0.0
) -> Example:
    redundancy = rng.uniform(*builtin.REDUNDANCY_RANGE)
    if rng.random() < clean_share:
        redundancy = 0.0
    return render_capable_prompt(tokenizer, problem, config), [
        (builtin.capable_target(problem, rng, redundancy) + "<|im_end|>", 1.0)
    ]


def light_example(
    tokenizer, problem, rng: random.Random, config: DuetConfig, answer_weight: float
) -> Example:
    """m sees a prefix of an M-style trace; which prefix is drawn to oversample the cases
    that need arithmetic (one or two steps left)."""
    # M's traces are mostly redundant: two draws in three carry redundancy.
    redundancy = rng.choice([0.0, *[rng.uniform(*builtin.REDUNDANCY_RANGE)] * 2])
    lines = builtin.reasoning_lines(problem, rng, redundancy)
    essential_ends = [i + 1 for i, (_, essential) in enumerate(lines) if essential]
    n = len(essential_ends)
    draw = rng.random()
    if draw < 0.10:
        keep = 0  # no signal: m must produce the empty thinking itself (m-alone)
    elif draw < 0.45:
        keep = len(lines)  # the whole trace, often ending in re-checks: nothing is left to compute
    elif draw < 0.80:
        keep = rng.randint(essential_ends[n - 2], essential_ends[n - 1] - 1)  # one step left
    elif draw < 0.90:
        keep = rng.randint(essential_ends[n - 3], essential_ends[n - 2] - 1)  # two steps left
    else:
        keep = rng.randint(0, len(lines))
    signal = "\n".join(line for line, _ in lines[:keep])
    if draw > 0.95 and signal:
        signal = signal[: rng.randint(1, len(signal))]  # a budget cut mid-line
    answer = write_up_segments(problem, answer_weight)
    if keep == 0:
        prompt = render_chat(tokenizer, capable_request(Problem(problem.question), config, 1))
        return prompt, [("<think>\n\n</think>\n\n", 1.0), *answer]
    return render_light_prompt(tokenizer, problem, signal, config), answer


def collate(tokenizer, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T), attention mask (B, T) and per-token loss weights (B, T); the
    prompt and padding weigh 0. Prompts end at a pre-token boundary, so tokenizing the parts
    apart gives the same ids as tokenizing the whole."""
    rows, weights = [], []
    for prompt, segments in examples:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        row_weights = [0.0] * len(ids)
        for text, weight in segments:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            row_weights += [weight] * len(piece)
        rows.append(ids)
        weights.append(row_weights)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    weight = torch.zeros((len(rows), width))
    for i, (ids, w) in enumerate(zip(rows, weights)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        weight[i, : len(w)] = torch.tensor(w)
    return input_ids, mask, weight


def weighted_lm_loss(
    model,
    input_ids: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    total_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted next-token loss, divided by `total_weight` (default: these rows' own weight)."""
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
    targets, target_weight = input_ids[:, 1:], weight[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
    return (nll * target_weight).sum() / (target_weight.sum() if total_weight is None else total_weight)


def accumulate_weighted_lm_loss(
    model, input_ids: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, micro_batches: int
) -> float:
    """Backpropagate the batch's weighted loss in length-sorted micro-batches and return it.

    The rows are right-padded, so each chunk of similar lengths is cut to its own longest row:
    short examples stop paying for the longest one's padding (about a third of the compute on
    the builtin task). Every chunk's loss is divided by the whole batch's weight, so the
    accumulated gradient is the full batch's gradient; padding sits after every real token,
    where a causal model never looks, so no attention mask is needed either."""
    total_weight = weight[:, 1:].sum()
    lengths = mask.sum(dim=1)
    loss = 0.0
    for rows in torch.split(torch.argsort(lengths, stable=True), -(-len(lengths) // micro_batches)):
        width = int(lengths[rows].max())
        chunk = weighted_lm_loss(model, input_ids[rows, :width], None, weight[rows, :width], total_weight)
        chunk.backward()
        loss += chunk.item()
    return loss


def new_model(tokenizer, shape: ModelShape, max_positions: int = 512) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model


def train_until_gate(
    name: str,
    model,
    tokenizer,
    make_example: Callable[[random.Random, int], Example],
    evaluate: Callable[[], dict[str, float]],
    passed: Callable[[dict[str, float]], bool],
    max_steps: int,
    cfg: PretrainConfig,
    rng: random.Random,
    batch_size: int | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / cfg.warmup_steps) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / max_steps)))
        ),
    )
    history, started = [], time.perf_counter()
    bar = tqdm(range(1, max_steps + 1), desc=f"train {name}", unit="step")
    for step in bar:
        model.train()
        batch = collate(tokenizer, [make_example(rng, step) for _ in range(batch_size or cfg.batch_size)])
        optimizer.zero_grad()
        loss = accumulate_weighted_lm_loss(model, *batch, cfg.micro_batches)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss:.3f}")
        if step % cfg.eval_every == 0 or step == max_steps:
            model.eval()
            metrics = evaluate()
            history.append({"step": step, "loss": loss, **metrics})
            bar.write(
                f"{name} step {step}: loss {loss:.4f} " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
            )
            if checkpoint is not None:
                checkpoint()  # the latest weights are on disk at every evaluation
            if step >= cfg.min_steps and passed(metrics):
                break
    bar.close()
    model.eval()
    return {
        "steps": step,
        "seconds": time.perf_counter() - started,
        "passed": passed(history[-1]),
        "history": history,
    }


def save(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def pretrain_pair(
    out_dir: str | Path,
    cfg: PretrainConfig | None = None,
    reuse_capable: bool = False,
    reuse_light: bool = False,
) -> dict:
    """Build the tokenizer, train M then m, save both as Hugging Face folders under `out_dir`
    (`tiny-M`, `tiny-m`) with a `pretrain_report.json`. Returns the report.

    M is saved as soon as it passes; `reuse_capable` (`reuse_light`) loads M (m) from
    `out_dir` instead of training it again. Each model draws its data from its own seeded
    stream and is initialized before either trains, so either comes out the same whether the
    other is trained or reused."""
    cfg = cfg or PretrainConfig()
    out_dir = Path(out_dir)
    for reused, name in ((reuse_capable, "tiny-M"), (reuse_light, "tiny-m")):
        if reused and not (out_dir / name / "model.safetensors").is_file():
            raise InputError(f"asked to reuse {name}, but {out_dir / name} holds no trained model")
    previous = previous_report(out_dir) if reuse_capable or reuse_light else {}
    for reused, key in ((reuse_capable, "capable"), (reuse_light, "light")):
        if reused and key not in previous:
            raise InputError(f"{out_dir / 'pretrain_report.json'} has no record of the {key} model to reuse")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    duet_config = DuetConfig()
    byte_tokenizer = build_tokenizer()

    def corpus():
        for _ in range(cfg.tokenizer_corpus):
            problem = builtin.sample_problem(rng)
            yield render_capable_prompt(byte_tokenizer, problem, duet_config) + builtin.capable_target(
                problem, rng, rng.uniform(*builtin.REDUNDANCY_RANGE)
            )

    tokenizer = build_tokenizer(corpus())
    validation = builtin.generate(cfg.eval_questions, split="train", seed=10_000 + cfg.seed)
    held_out = {p.question for p in validation}

    def train_problem(r: random.Random) -> builtin.ChainProblem:
        while True:
            problem = builtin.sample_problem(r)
            if problem.split == "train" and problem.question not in held_out:
                return problem

    capable = new_model(tokenizer, cfg.capable_shape)
    light = new_model(tokenizer, cfg.light_shape)
    report: dict = {"config": asdict(cfg)}
    capable_dir = out_dir / "tiny-M"
    capable_backend = HFBackend(model=capable, tokenizer=tokenizer, batch_size=100, spec="tiny-M")
    light_backend = HFBackend(model=light, tokenizer=tokenizer, batch_size=100, spec="tiny-m")
    duet = Duet(capable_backend, light_backend, DuetConfig(signal_max_tokens=400, answer_max_tokens=24))
    questions = [Problem(p.question) for p in validation]

    def accuracy(answers: list[str | None]) -> float:
        return sum(a == str(p.answer) for a, p in zip(answers, validation)) / len(validation)

    def evaluate_capable() -> dict[str, float]:
        return {"M_alone_acc": accuracy([r.answer for r in duet.solve_batch(questions, "M-alone")])}

    trace_rng = random.Random(f"{cfg.seed}:validation-traces")
    full_traces = [
        "\n".join(line for line, _ in builtin.reasoning_lines(p, trace_rng, builtin.REDUNDANCY_RANGE[1]))
        for p in validation
    ]

    if reuse_capable:
        capable.load_state_dict(
            LlamaForCausalLM.from_pretrained(capable_dir, local_files_only=True).state_dict()
        )
        report["capable"] = previous["capable"]
    else:
        report["capable"] = train_until_gate(
            "M",
            capable,
            tokenizer,
            lambda r, _: capable_example(
                tokenizer, train_problem(r), r, duet_config, cfg.capable_clean_share
            ),
            evaluate_capable,
            lambda m: m["M_alone_acc"] >= cfg.capable_gate,
            cfg.capable_max_steps,
            cfg,
            rng,
        )
        save(capable, tokenizer, capable_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "pretrain_report.json").write_text(json.dumps(report, indent=2))
    light_dir = out_dir / "tiny-m"
    if reuse_light:
        light.load_state_dict(LlamaForCausalLM.from_pretrained(light_dir, local_files_only=True).state_dict())
        report["light"] = previous["light"]
    else:
        capable_traces = capable_trace_pool(duet, train_problem, cfg)
        # M's own greedy thinking on the validation questions, with the answer M wrote after it:
        # m is gated on finishing exactly what it will be handed at inference, long re-checking
        # traces included (synthetic traces alone let an m through that misread 5% of M's).
        capable_runs = [r for r in duet.solve_batch(questions, "M-alone") if r.answer is not None]

        def evaluate_light() -> dict[str, float]:
            finished = duet.finish([r.question for r in capable_runs], [r.signal or "" for r in capable_runs])
            agree = sum(extract_boxed(f.text) == r.answer for f, r in zip(finished, capable_runs))
            metrics = {"m_on_M_signal_agree": agree / max(1, len(capable_runs))}
            results = duet.finish(questions, full_traces)
            metrics["m_full_trace_acc"] = accuracy([extract_boxed(r.text) for r in results])
            for key, drop in (("m_full_acc", 0), ("m_one_left_acc", 1), ("m_two_left_acc", 2)):
                signals = [builtin.essential_signal(p, drop) for p in validation]
                metrics[key] = accuracy([extract_boxed(r.text) for r in duet.finish(questions, signals)])
            return metrics

        report["light"] = train_light(
            light, tokenizer, train_problem, capable_traces, evaluate_light, duet_config, cfg, out_dir
        )
        report["light"]["capable_traces"] = len(capable_traces)
    for name, model in (("tiny-M", capable), ("tiny-m", light)):
        report[f"{name}_parameters"] = sum(p.numel() for p in model.parameters())
    (out_dir / "pretrain_report.json").write_text(json.dumps(report, indent=2))
    return report


def capable_trace_pool(
    duet: Duet, train_problem: Callable[[random.Random], builtin.ChainProblem], cfg: PretrainConfig
) -> list[tuple[builtin.ChainProblem, str]]:
    """(problem, M's greedy thinking) for the training questions M answers right: the complete
    signals m must learn to read. Drawn from a stream of its own, so m's data stays the same
    whether M was just trained or reused."""
    rng = random.Random(f"{cfg.seed}:capable-traces")
    pool = [train_problem(rng) for _ in range(cfg.light_capable_traces)]
    runs = duet.solve_batch([Problem(p.question) for p in pool], "M-alone")
    return [(p, run.signal) for p, run in zip(pool, runs) if run.signal and run.answer == str(p.answer)]


def previous_report(out_dir: Path) -> dict:
    path = out_dir / "pretrain_report.json"
    if not path.is_file():
        raise InputError(f"no pretrain_report.json in {out_dir} to take the reused model's record from")
    return json.loads(path.read_text())


def train_light(
    light,
    tokenizer,
    train_problem,
    capable_traces: list[tuple[builtin.ChainProblem, str]],
    evaluate_light,
    duet_config,
    cfg: PretrainConfig,
    out_dir: Path,
):
    def make_example(r: random.Random, step: int) -> Example:
        if step >= cfg.light_capable_from_step and capable_traces and r.random() < cfg.light_capable_share:
            problem, signal = r.choice(capable_traces)
            return render_light_prompt(tokenizer, problem, signal, duet_config), write_up_segments(
                problem, cfg.light_answer_weight
            )
        return light_example(tokenizer, train_problem(r), r, duet_config, cfg.light_answer_weight)

    record = train_until_gate(
        "m",
        light,
        tokenizer,
        make_example,
        evaluate_light,
        lambda m: (
            m["m_one_left_acc"] >= cfg.light_gate_one_left
            and min(m["m_full_acc"], m["m_on_M_signal_agree"]) >= cfg.light_gate_full
        ),
        cfg.light_max_steps,
        cfg,
        random.Random(f"{cfg.seed}:light"),
        batch_size=cfg.light_batch_size,
        checkpoint=lambda: save(light, tokenizer, out_dir / "tiny-m"),
    )
    save(light, tokenizer, out_dir / "tiny-m")
    return record
