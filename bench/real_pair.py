"""Every method on a real model pair, on GSM8K and MATH-500, resumable after a kill.

    python bench/real_pair.py                                  # qwen2.5-coder on llama.cpp
    python bench/real_pair.py --gsm8k 300 --math500 100
    python bench/real_pair.py --only gsm8k --steps main,probe  # a part of it
    python bench/real_pair.py --report                         # the tables and figures only

Part by part, each over both tasks (the telling ones first, so an interrupted bench has them):
M-alone, duet and m-alone; the probe (binary and stable search, on M-alone's rows); settle with
its two finishes; duet@B and M@B at three budgets; M-settle; duet in the sketch and think
styles; then the other settle rules (m probed on its own turn, three agreeing probes, a
probability floor). Each part is a run folder of
its own under OUT/TASK/ (results written as batches finish; a rerun resumes where the last
stopped), and both models' llama.cpp servers start once for the whole bench. The report step
writes OUT/TASK/report.md (accuracy with a 95% interval, M and m tokens, M tokens saved, wall
time, cost per solved question at the prices below) and the accuracy-against-M-tokens figure.

OUT defaults to bench/results/real-pair, which the repository keeps: the measured rows ship with
it, so the report and the figure regenerate from them, and a bench spread over many sittings
(it takes most of a day on a 2-core CPU) extends them instead of starting over. Pass another
--out to measure afresh.

Needs the pair installed (`duet models install qwen2.5-coder`) and the benchmark files:
`--data-dir` (default: ../shared/data next to the repository) holds gsm8k/test.jsonl and
math500/test.jsonl. These are small coder models, not the paper's Qwen3 pair.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

from duetlm.backends import Backend, BackendOptions, load_backend
from duetlm.backends.base import GenerationRequest, SamplingParams
from duetlm.config import DuetConfig
from duetlm.evaluate import EvalConfig, run_eval
from duetlm.evaluate.compose import composed_summaries
from duetlm.evaluate.probe import ProbeConfig, run_probe
from duetlm.evaluate.report import plot
from duetlm.evaluate.summary import results_rows
from duetlm.models import config_defaults
from duetlm.models.catalog import PAIRS
from duetlm.protocol import Duet

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = {"gsm8k": (96, 192, 288), "math500": (128, 256, 384)}
PRICES = {
    "capable_price": {"input_per_mtok": 0.15, "output_per_mtok": 0.60},
    "light_price": {"input_per_mtok": 0.05, "output_per_mtok": 0.20},
}
"""Assumed prices in $ per million tokens, in proportion to the models' sizes (1.5B : 0.5B):
they only scale the cost column."""
STEPS = ("main", "probe", "settle", "budgets", "settle-self", "styles", "settle-more")
SETTLE_RULES = {
    "settle": {},  # the family's own rule
    "settle-continue": {"finish": "continue"},
    "settle-own-turn": {"probe": "continue", "probe_max_tokens": 192},
    "settle-agree3": {"agree": 3, "finish": "continue"},
    "settle-sure": {"min_prob": 0.9, "finish": "continue"},
}
"""Settle's variants, measured side by side: each a run folder of its own."""


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pair", default="qwen2.5-coder")
    parser.add_argument("--backend", default="llamacpp", help="llamacpp or hf (the same models)")
    parser.add_argument("--gsm8k", type=int, default=300, help="GSM8K test questions (the first N)")
    parser.add_argument("--math500", type=int, default=100, help="MATH-500 questions (the first N)")
    parser.add_argument("--only", default="gsm8k,math500", help="tasks to run")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"parts to run: {', '.join(STEPS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "real-pair")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--rules", default=",".join(list(SETTLE_RULES)[2:]), help="the settle rules settle-more runs"
    )
    parser.add_argument("--report", action="store_true", help="only write the reports from what has run")
    return parser.parse_args()


def pair_config(capable: str, light: str, **changes) -> DuetConfig:
    """The family's defaults with the bench's prices and `changes` on top."""
    # the shipped rows were measured before m's empty turns were asked again (`answer_retry`);
    # the bench keeps measuring that protocol so that its run folders extend rather than restart
    base = config_defaults(capable, light).model_dump() | PRICES | {"answer_retry": False}
    for key, value in changes.items():
        base[key] = base[key] | value if isinstance(value, dict) else value
    return DuetConfig.model_validate(base)


def eval_part(
    duet: Duet, task: str, data: Path, limit: int, methods: list[str], out: Path, batch: int
) -> None:
    config = EvalConfig(
        tasks=[task],
        methods=methods,
        capable=duet.capable.spec,
        light=duet.light.spec,
        limit=limit,
        data={task: str(data)},
        batch_size=batch,
        duet=duet.config,
    )
    started = time.perf_counter()
    run_eval(config, out, duet=duet)
    print(
        f"  {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}: {', '.join(methods)} "
        f"({time.perf_counter() - started:.0f} s this run)",
        flush=True,
    )


def probe_part(
    duet: Duet, task: str, data: Path, limit: int, search: str, out: Path, batch: int, reuse: Path
) -> None:
    config = ProbeConfig(
        task=task,
        capable=duet.capable.spec,
        light=duet.light.spec,
        limit=limit,
        data=str(data),
        search=search,
        stride=4 if search == "stable" else 1,
        batch_size=batch,
        reuse=str(reuse) if (reuse / "results.jsonl").is_file() else None,
        duet=duet.config,
    )
    started = time.perf_counter()
    run_probe(config, out, duet=duet)
    print(f"  {out}: probe ({search}) ({time.perf_counter() - started:.0f} s this run)", flush=True)


def run_part(args, part: str, task: str, limit: int, capable, light) -> None:
    """One part of the bench for one task; a finished part costs only the check that it is."""
    data = args.data_dir / task / "test.jsonl"
    folder = args.out / task
    duet = Duet(capable, light, pair_config(capable.spec, light.spec))
    batch = args.batch_size
    print(f"{task} ({limit} questions), {part}", flush=True)
    if part == "main":
        eval_part(duet, task, data, limit, ["M-alone", "duet", "m-alone"], folder / "main", batch)
    elif part == "probe":
        for search, name in (("binary", "probe"), ("stable", "probe-stable")):
            probe_part(duet, task, data, limit, search, folder / name, batch, folder / "main")
    elif part in ("settle", "settle-more"):
        names = args.rules.split(",") if part == "settle-more" else list(SETTLE_RULES)[:2]
        for name in names:
            if name not in SETTLE_RULES:
                raise SystemExit(f"unknown settle rule {name!r}: use {', '.join(SETTLE_RULES)}")
            rule = SETTLE_RULES[name]
            ruled = Duet(capable, light, pair_config(capable.spec, light.spec, settle=rule))
            eval_part(ruled, task, data, limit, ["settle"], folder / name, batch)
    elif part == "budgets":
        methods = [f"{kind}@{b}" for kind in ("duet", "M") for b in BUDGETS[task]]
        eval_part(duet, task, data, limit, methods, folder / "budgets", batch)
    elif part == "settle-self":
        eval_part(duet, task, data, limit, ["M-settle"], folder / "settle-self", batch)
    elif part == "styles":
        for style in ("sketch", "think"):
            styled = Duet(capable, light, pair_config(capable.spec, light.spec, signal_style=style))
            eval_part(styled, task, data, limit, ["duet"], folder / f"duet-{style}", batch)
    else:
        raise SystemExit(f"unknown part {part!r}: use {', '.join(STEPS)}")


def report_task(args, task: str) -> None:
    """OUT/TASK/report.md and the figure, from whatever parts have run."""
    folder = args.out / task
    if not (folder / "main" / "results.jsonl").is_file():
        return
    added = {
        label: str(folder / part)
        for label, part in [
            *((part, part) for part in SETTLE_RULES),
            ("budgets", "budgets"),
            ("M-settle", "settle-self"),
            ("duet sketch", "duet-sketch"),
            ("duet think", "duet-think"),
            ("oracle", "probe"),
            ("stable oracle", "probe-stable"),
        ]
        if (folder / part / "results.jsonl").is_file()
    }
    summaries = composed_summaries(folder / "main", added)
    for s in summaries:  # the parts' own labels read better without the part's name
        s["method"] = s["method"].removeprefix("budgets ")
    lines = [
        "| method | n | acc % (95% CI) | M tok | m tok | M saved % | Δ acc (pts) | wall s | $ per 1k solved |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in sorted(summaries, key=lambda s: -s["M_output_tokens_mean"]):
        n, p = s["n_questions"], s["accuracy"]
        low, high = wilson(p, n)
        cells = [
            s["method"],
            str(n),
            f"{100 * p:.1f} ({100 * low:.1f}–{100 * high:.1f})",
            f"{s['M_output_tokens_mean']:.1f}",
            number(s.get("m_output_tokens_mean"), "{:.1f}"),
            number(s.get("savings_pct"), "{:.1f}"),
            number(s.get("accuracy_delta"), "{:+.1f}", 100),
            number(s.get("wall_s"), "{:.0f}"),
            number(s.get("cost_per_solved"), "{:.3f}", 1000),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *same_reasoning_split(results_rows(folder / "main"))]
    (folder / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "summaries.json").write_text(json.dumps(summaries, indent=2) + "\n", encoding="utf-8")
    figures = plot(summaries, folder)
    print(f"{task}: {folder / 'report.md'}; figure {', '.join(map(str, figures))}")
    print("\n".join(lines))


def same_reasoning_split(rows: list[dict]) -> list[str]:
    """duet against M-alone, split by whether duet's M wrote M-alone's reasoning word for word.

    llama.cpp does not decode a request identically in different batches, so duet's stage 1
    and M-alone, both greedy, part ways on many questions. Where they do not, any difference
    in accuracy is the handoff's (m writing the answer from M's reasoning); where they do, it
    is mostly M's own run-to-run variance.
    """
    by_method: dict[str, dict] = {}
    for row in rows:
        by_method.setdefault(row["method"], {})[(row["id"], row["sample"])] = row
    alone, duet = by_method.get("M-alone", {}), by_method.get("duet", {})
    shared = [key for key in alone if key in duet]
    if not shared:
        return []

    def same(key) -> bool:
        signal = (duet[key].get("signal") or "").strip()
        return bool(signal) and (alone[key].get("capable_text") or alone[key]["text"]).startswith(signal)

    lines = [
        "| duet's M reasoning | n | M-alone right | duet right | lost | gained |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, keys in (
        ("as M-alone's, word for word", [k for k in shared if same(k)]),
        ("parted from M-alone's", [k for k in shared if not same(k)]),
    ):
        right_alone = sum(alone[k]["correct"] for k in keys)
        right_duet = sum(duet[k]["correct"] for k in keys)
        lost = sum(alone[k]["correct"] and not duet[k]["correct"] for k in keys)
        gained = sum(duet[k]["correct"] and not alone[k]["correct"] for k in keys)
        lines.append(f"| {label} | {len(keys)} | {right_alone} | {right_duet} | {lost} | {gained} |")
    return lines


def number(value, form: str, scale: float = 1.0) -> str:
    return "–" if value is None else form.format(scale * value)


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion p over n questions."""
    if n == 0:
        return 0.0, 0.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def decode_speed(backend: Backend, tokens: int = 64) -> float:
    """Tokens a second for one greedy request alone (prompt included, a few dozen tokens).

    The shared 2-core machine this bench runs on has decoded the 1.5B anywhere between about
    10 and 28 tokens a second from one sitting to the next, so a wall time means something
    only next to the speed of the sitting that measured it."""
    request = GenerationRequest(
        messages=(("user", "Count from one to one hundred in words, separated by commas."),),
        sampling=SamplingParams(max_tokens=tokens, temperature=0.0),
    )
    backend.generate(
        [dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, max_tokens=1))]
    )
    started = time.perf_counter()  # timed after a first request, which pages the weights in
    (result,) = backend.generate([request])
    return result.output_tokens / (time.perf_counter() - started)


def log_sitting(out: Path, capable: Backend, light: Backend, steps: list[str], tasks: list[str]) -> None:
    """Appends this sitting's machine speed to OUT/sittings.jsonl, beside the rows it measures."""
    sitting = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "capable": capable.spec,
        "light": light.spec,
        "M_decode_tok_s": round(decode_speed(capable), 1),
        "m_decode_tok_s": round(decode_speed(light), 1),
        "steps": steps,
        "tasks": tasks,
    }
    out.mkdir(parents=True, exist_ok=True)
    with (out / "sittings.jsonl").open("a", encoding="utf-8") as log:
        log.write(json.dumps(sitting) + "\n")
    print(
        f"this sitting decodes {sitting['M_decode_tok_s']} tokens/s (M) and "
        f"{sitting['m_decode_tok_s']} (m) for one request alone",
        flush=True,
    )


def main() -> None:
    args = parse()
    tasks = [t.strip() for t in args.only.split(",") if t.strip()]
    if not args.report:
        capable_name, light_name = PAIRS[args.pair]
        options = BackendOptions(batch_size=args.batch_size)
        capable = load_backend(f"{args.backend}:{capable_name}", options)
        light = load_backend(f"{args.backend}:{light_name}", options)
        steps = [s.strip() for s in args.steps.split(",") if s.strip()]
        try:
            log_sitting(args.out, capable, light, steps, tasks)
            # part by part over the tasks: an interrupted bench has the first parts of both
            for part in steps:
                for task in tasks:
                    run_part(args, part, task, getattr(args, task), capable, light)
        finally:
            capable.close()
            light.close()
    for task in tasks:
        report_task(args, task)


if __name__ == "__main__":
    main()
