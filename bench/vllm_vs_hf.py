"""vLLM's CPU build against duetlm's hf backend on the same model, in the same run.

    python bench/vllm_vs_hf.py                       # the Qwen3 test bed's shape and tiny-m
    python bench/vllm_vs_hf.py --model hf:/models/Qwen3-0.6B --max-tokens 128

Needs the vLLM environment (`scripts/install-vllm-cpu.sh VENV`). For each model and each number
of concurrent rows (1, 8, 32), the same greedy requests go through the hf backend's batched
`generate()`, its streaming engine (what `duet serve` runs: continuous batching, one request
per row), vLLM's offline engine and vLLM's async engine, and the script prints output tokens per
second and whether each backend's tokens equal hf `generate()`'s. Each backend is warmed up
first; start-up times are printed apart.

The default models: a tiny random `Qwen3ForCausalLM` with the real Qwen3 tokenizer (151,936
tokens, the shape the tests use, built here in a temporary folder) and the embedded `tiny-m`
(Llama layout, its own 385-token tokenizer). The embedded `tiny-M` cannot run on vLLM's CPU
attention (head size 48; the kernels cover 32, 64, 80, ...), so it is left out, with the
reason printed. These are toy models: the figures compare engines, not real LLMs.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch

from duetlm.backends import BackendOptions, load_backend
from duetlm.backends.base import GenerationRequest, GenerationResult, SamplingParams
from duetlm.errors import BackendError
from duetlm.tasks import builtin

ROWS = (1, 8, 32)


def qwen3_test_bed(folder: Path) -> str:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from qwen3 import qwen3_tokenizer, save, tiny_qwen3

    return str(save(tiny_qwen3(seed=0, hidden=64, head_dim=32), qwen3_tokenizer(), folder / "qwen3"))


def requests_for(n: int, max_tokens: int) -> list[GenerationRequest]:
    questions = [p.question for p in builtin.generate(n, split="test", seed=1)]
    return [
        GenerationRequest.chat(q, SamplingParams(max_tokens), chat_template_kwargs={"enable_thinking": True})
        for q in questions
    ]


async def streamed(backend, requests: list[GenerationRequest]) -> list[GenerationResult]:
    async def one(request: GenerationRequest) -> GenerationResult:
        async for item in backend.astream(request):
            if isinstance(item, GenerationResult):
                return item
        raise RuntimeError("the stream ended without a result")

    return list(await asyncio.gather(*(one(r) for r in requests)))


def run_all(backend, requests: list[GenerationRequest], streaming: bool) -> list[GenerationResult]:
    return asyncio.run(streamed(backend, requests)) if streaming else backend.generate(requests)


def timed(run) -> tuple[list[GenerationResult], float]:
    started = time.perf_counter()
    results = run()
    return results, time.perf_counter() - started


def bench_model(name: str, location: str, max_tokens: int, dtype: str) -> None:
    print(f"\n{name} ({location}), greedy, {max_tokens} tokens at most per row")
    started = time.perf_counter()
    hf = load_backend(f"hf:{location}", BackendOptions(device="cpu"))
    backends = {"hf generate": hf, "hf engine": hf}
    starts = [f"hf {time.perf_counter() - started:.1f} s"]
    for label, streaming in (("vllm offline", False), ("vllm async", True)):
        started = time.perf_counter()
        try:
            backends[label] = load_backend(
                f"vllm:{location}", BackendOptions(streaming=streaming, dtype=dtype)
            )
        except BackendError as error:
            print(f"  {label}: not run: {error}")
            return
        starts.append(f"{label} {time.perf_counter() - started:.1f} s")
    print(f"  start: {', '.join(starts)}; vLLM computes in {dtype}, hf in float32")
    print(f"  {'rows':>4} " + " ".join(f"{label:>13}" for label in backends) + "   (output tokens/s)")
    for rows in ROWS:
        requests = requests_for(rows, max_tokens)
        rates, same = [], []
        reference = None
        for label, backend in backends.items():
            streaming = label in ("hf engine", "vllm async")
            run = functools.partial(run_all, backend, requests, streaming)
            run()  # warm-up: threads, caches, the first batch's allocations
            results, seconds = timed(run)
            tokens = [r.token_ids for r in results]
            reference = reference or tokens
            rates.append(sum(r.output_tokens for r in results) / seconds)
            same.append(tokens == reference)
        cells = " ".join(f"{rate:>10.0f}{'' if ok else ' !=':>3}" for rate, ok in zip(rates, same))
        print(f"  {rows:>4} {cells}")
    for label, backend in backends.items():
        if label.startswith("vllm"):
            backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", action="append", help="hf:PATH (repeatable); default: the Qwen3 test bed, tiny-m"
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the hf backend")
    parser.add_argument(
        "--vllm-dtype", default="float32", help="vLLM's dtype (float32 as hf's on CPU; auto, bfloat16)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from duetlm.models import EMBEDDED

    with tempfile.TemporaryDirectory() as folder:
        if args.model:
            models = [(spec, spec.removeprefix("hf:")) for spec in args.model]
        else:
            models = [
                ("Qwen3 test bed (hidden 64, 2 layers, head size 32, tied)", qwen3_test_bed(Path(folder))),
                ("embedded tiny-m (Llama layout, own tokenizer)", str(EMBEDDED["tiny-m"]())),
                ("embedded tiny-M", str(EMBEDDED["tiny-M"]())),
            ]
        for name, location in models:
            bench_model(name, location, args.max_tokens, args.vllm_dtype)
    print("\n!= marks a backend whose greedy tokens differ from hf generate()'s at that row count.")


if __name__ == "__main__":
    main()
