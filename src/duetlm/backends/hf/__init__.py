"""The Hugging Face transformers backend and its streaming engine.

- `backend`: `HFBackend`, batched `generate` (KV cache, stop strings, exact counts) and the
  entry to streaming;
- `engine`: the continuous-batching step engine of `duet serve` (rows join and leave between
  decode steps), over `row_cache` (the batch's KV cache) and `decode_step` (its own decode
  step for Llama, Qwen2 and Qwen3);
- `process`: the same engine in a process of its own, one per model;
- `loading`: where a model lives, its device, dtype, tokenizer and end ids, for both.

Imports run one way: `backend` uses `process` and `engine`; `process` builds its engine from
`loading` and `engine`, never from `backend`.
"""

from duetlm.backends.hf.backend import ENGINES, HFBackend
from duetlm.backends.hf.loading import pick_device, pick_dtype, resolve_model_location

__all__ = ["ENGINES", "HFBackend", "pick_device", "pick_dtype", "resolve_model_location"]
