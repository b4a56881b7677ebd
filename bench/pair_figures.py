"""Figures of the embedded pair on the builtin task (test split, greedy).

    python bench/pair_figures.py --questions 500

Prints: M-alone, m-alone and DUET accuracy; DUET with M's signal cut at 25/50/75% of its
lines; m given the essential trace with its last 1/2/3 steps removed; the task's floor (the
essential trace minus what m reliably finishes) against M-alone's output tokens; generation
speed of M and m at batch 1 and 32. The embedded pair is a small model pair trained on a
synthetic task: these are not results on real LLMs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from duetlm.backends import BackendOptions, load_backend
from duetlm.backends.base import GenerationRequest, SamplingParams
from duetlm.config import DuetConfig
from duetlm.grading import extract_boxed
from duetlm.protocol import Duet, Problem
from duetlm.tasks import builtin

RELIABLE = 0.90  # m "reliably finishes" k steps when its accuracy with k steps removed is at least this


def accuracy(answers, problems) -> float:
    return sum(a == str(p.answer) for a, p in zip(answers, problems, strict=True)) / len(problems)


def speed(backend, questions: list[str], batch: int) -> float:
    requests = [
        GenerationRequest.chat(q, SamplingParams(256), chat_template_kwargs={"enable_thinking": True})
        for q in questions[:batch]
    ]
    backend.batch_size = batch
    backend.generate(requests[:1])
    started = time.perf_counter()
    results = backend.generate(requests)
    return sum(r.output_tokens for r in results) / (time.perf_counter() - started)


def terse_accuracy(backend, test: list[builtin.ChainProblem], config: DuetConfig) -> float:
    """M-alone with the first token of every redundant line ("check ", "so far ") banned:
    whether M still computes when its thinking is terse, which is where the length penalty
    has to take it."""
    from duetlm.backends.base import render_chat
    from duetlm.protocol import capable_request

    tokenizer, model = backend.tokenizer, backend.model
    banned = [tokenizer(word, add_special_tokens=False)["input_ids"][:1] for word in ("check ", "so far ")]
    prompts = [render_chat(tokenizer, capable_request(Problem(p.question), config, 512)) for p in test]
    answers = []
    for start in range(0, len(prompts), 100):
        encoded = tokenizer(
            prompts[start : start + 100], return_tensors="pt", padding=True, add_special_tokens=False
        )
        with torch.no_grad():
            out = model.generate(
                **encoded,
                max_new_tokens=512,
                do_sample=False,
                bad_words_ids=banned,
                pad_token_id=tokenizer.pad_token_id,
            )
        texts = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=False)
        answers += [extract_boxed(text.split("</think>")[-1]) for text in texts]
    return accuracy(answers, test)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--capable", default="tiny-M")
    parser.add_argument("--light", default="tiny-m")
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    capable = load_backend(args.capable, BackendOptions(device="cpu", batch_size=64))
    light = load_backend(args.light, BackendOptions(device="cpu", batch_size=64))
    duet = Duet(capable, light, DuetConfig(signal_max_tokens=512, answer_max_tokens=64))
    test = builtin.generate(args.questions, split="test")
    problems = [Problem(p.question) for p in test]
    figures: dict = {"questions": len(test)}

    alone = duet.solve_batch(problems, "M-alone")
    figures["M-alone"] = accuracy([r.answer for r in alone], test)
    figures["M-alone output tokens (mean)"] = statistics.mean(r.usage.capable.output_tokens for r in alone)
    figures["M-alone with redundant lines banned"] = terse_accuracy(capable, test, duet.config)
    figures["m-alone"] = accuracy([r.answer for r in duet.solve_batch(problems, "m-alone")], test)
    together = duet.solve_batch(problems, "duet")
    figures["duet"] = accuracy([r.answer for r in together], test)
    figures["duet M output tokens (mean)"] = statistics.mean(r.usage.capable.output_tokens for r in together)

    for fraction in (0.25, 0.5, 0.75):
        signals = []
        for result in together:
            lines = (result.signal or "").split("\n")
            signals.append("\n".join(lines[: math.ceil(fraction * len(lines))]))
        answers = [extract_boxed(r.text) for r in duet.finish(problems, signals)]
        figures[f"duet, signal cut at {int(fraction * 100)}% of its lines"] = accuracy(answers, test)
    finishes = 0
    for drop in (0, 1, 2, 3):
        signals = [builtin.essential_signal(p, drop) for p in test]
        acc = accuracy([extract_boxed(r.text) for r in duet.finish(problems, signals)], test)
        figures[f"m given the essential trace minus {drop} step(s)"] = acc
        if drop > 0 and acc >= RELIABLE and finishes == drop - 1:
            finishes = drop
    count = capable.count_tokens
    figures["steps m finishes reliably (>= 90%)"] = finishes
    figures["essential trace tokens (mean)"] = statistics.mean(
        builtin.floor_tokens(p, count, 0) for p in test
    )
    figures["floor tokens (mean)"] = statistics.mean(builtin.floor_tokens(p, count, finishes) for p in test)
    figures["floor / M-alone output tokens"] = (
        figures["floor tokens (mean)"] / figures["M-alone output tokens (mean)"]
    )
    questions = [p.question for p in builtin.generate(32, split="test", seed=7)]
    for name, backend in (("M", capable), ("m", light)):
        for batch in (1, 32):
            figures[f"{name} tokens/s at batch {batch}"] = speed(backend, questions, batch)
    figures["parameters M / m"] = [
        sum(p.numel() for p in capable.model.parameters()),
        sum(p.numel() for p in light.model.parameters()),
    ]
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(
        f"builtin task, test split, greedy, {args.capable} + {args.light} (a toy pair; not real-LLM results)"
    )
    for key, value in figures.items():
        shown = (
            f"{100 * value:.1f}%"
            if isinstance(value, float) and value <= 1 and "tokens" not in key
            else value
        )
        if isinstance(shown, float):
            shown = f"{shown:.1f}"
        print(f"  {key:<50} {shown}")


if __name__ == "__main__":
    main()
