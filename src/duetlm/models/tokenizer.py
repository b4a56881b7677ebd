"""The byte-level tokenizer of the embedded pair.

Every byte is a token (so any UTF-8 text encodes and a user can type anything); digits,
operators and newlines always stay single tokens (arithmetic is learned per character), and
BPE merges trained on the task's text compress the English around them (the instruction, the
chat markup), which keeps sequences short enough to train on a laptop CPU. The chat and
thinking markers are single added tokens. A chat template in the Qwen3 layout
(`<|im_start|>role\\n...<|im_end|>`), including its `enable_thinking` switch, so the embedded
models are driven by exactly the code path that drives Qwen3.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
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


# Digits, arithmetic operators, braces and newlines are cut out before BPE sees the text.
_ISOLATED = Regex(r"[0-9+\-*=/(){}\n]")


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A fresh tokenizer; deterministic for a given corpus. Without a corpus: pure bytes."""
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(_ISOLATED, behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    if corpus is None:
        byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
        core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(byte_chars)}, merges=[]))
        core.pre_tokenizer = pre_tokenizer
    else:
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizer
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
            min_frequency=2,
        )
        core.train_from_iterator(corpus, trainer=trainer)
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
