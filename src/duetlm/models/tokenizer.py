"""The byte-level tokenizer of the embedded pair.

One token per byte (256 of them, so any UTF-8 text encodes and a user can type anything),
plus the chat and thinking markers as single added tokens. A chat template in the Qwen3 layout
(`<|im_start|>role\\n...<|im_end|>`), including its `enable_thinking` switch, so the embedded
models are driven by exactly the code path that drives Qwen3.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, IM_START = "<|pad|>", "<|im_end|>", "<|im_start|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPECIAL_TOKENS = (PAD, EOS, IM_START)
MARKER_TOKENS = (THINK_OPEN, THINK_CLOSE)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tokenizer; deterministic, so every build has the same ids."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: index for index, char in enumerate(byte_chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_tokens(list(MARKER_TOKENS))  # not special: they must survive decoding
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
