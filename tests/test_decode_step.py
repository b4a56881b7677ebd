"""The engine's own decode step against each architecture's transformers forward.

Rows of different lengths are left-padded into one batch (as the engine holds them); each
step's logits must equal the forward's, row by row, to float rounding, with the padding
masked and each row at its own position. Models it does not cover are named with a reason
and step through their forward.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from duetlm.backends.hf.decode_step import DecodeStep, why_not
from duetlm.backends.hf.engine import StepEngine
from duetlm.backends.hf.row_cache import RowCache
from duetlm.errors import BackendError
from duetlm.models import EMBEDDED

SHAPE = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}


def embedded_capable():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(EMBEDDED["tiny-M"]()))


def llama_with_biases_and_llama3_rope():
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    config = LlamaConfig(
        vocab_size=300,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters=rope,
        **SHAPE,
    )
    return LlamaForCausalLM(config)


def qwen2():
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=300, num_key_value_heads=1, **SHAPE))


def qwen3():
    from qwen3 import tiny_qwen3

    return tiny_qwen3(seed=3)


def randomize_norms_and_biases(model) -> None:
    """Norm weights start at 1 and biases at 0: random ones show one applied to the wrong
    tensor, or left out."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                parameter.uniform_(-0.5, 0.5)


def step_and_forward_logits(model, step: DecodeStep, steps: int = 4, seed: int = 0):
    """Rows of lengths 7, 3 and 11, left-padded, prefilled by the forward; then `steps`
    decode steps by both. Yields (step's logits, forward's logits) per step."""
    torch.manual_seed(seed)
    vocab = model.config.vocab_size
    lengths = [7, 3, 11]
    width = max(lengths)
    ids = torch.randint(0, min(vocab, 300), (len(lengths), width))
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.inference_mode():
        reference = DynamicCache()
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=reference)
        ours = RowCache(reference)
        ours.append(reference)
        reference = copy.deepcopy(reference)
        tokens = out.logits[:, -1].argmax(dim=-1)
        for _ in range(steps):
            next_positions = mask.sum(dim=1)
            mask = torch.cat([mask, torch.ones(len(lengths), 1, dtype=torch.long)], dim=1)
            expected = model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=next_positions[:, None],
                past_key_values=reference,
            ).logits[:, -1]
            yield step(tokens, next_positions, ours, mask), expected
            tokens = expected.argmax(dim=-1)


def assert_close(got: torch.Tensor, expected: torch.Tensor, tolerance: float, name: str) -> None:
    scale = expected.float().abs().max()
    assert (got.float() - expected.float()).abs().max() <= tolerance * scale, name


@pytest.mark.parametrize("joined", [True, False], ids=["joined", "own-weights"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("build", [embedded_capable, llama_with_biases_and_llama3_rope, qwen2, qwen3])
def test_the_step_gives_the_forwards_logits(build, dtype, joined, monkeypatch):
    # bf16 (what GPUs run) agrees to its own rounding: its epsilon is 2^-7
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.manual_seed(0)
    model = build().eval()
    randomize_norms_and_biases(model)
    model.to(dtype)
    assert why_not(model) is None
    if not joined:  # as a model too large for joined copies of its projections runs
        monkeypatch.setattr(DecodeStep, "join_limit_bytes", 0)
    step = DecodeStep(model)
    assert step.join is joined
    for got, expected in step_and_forward_logits(model, step):
        assert got.dtype == expected.dtype == dtype
        assert_close(got, expected, tolerance, build.__name__)


@pytest.mark.parametrize("update", ["in place", "load_state_dict", "new parameter"])
def test_a_weight_update_is_seen_at_the_next_step(update):
    # the joined q/k/v and gate/up copies must follow the model's weights, as they change
    # under a trainer's optimizer or a checkpoint load while the engine keeps its step
    model = llama_with_biases_and_llama3_rope().eval()
    randomize_norms_and_biases(model)
    step = DecodeStep(model)
    assert step.join
    for got, expected in step_and_forward_logits(model, step, steps=1):
        assert_close(got, expected, 1e-4, "before")
    layer = model.model.layers[1]
    with torch.no_grad():
        if update == "in place":
            layer.self_attn.k_proj.weight.mul_(-2.0)
            layer.mlp.up_proj.bias.add_(0.5)
        elif update == "load_state_dict":
            state = {k: v.clone() for k, v in model.state_dict().items()}
            state["model.layers.1.self_attn.v_proj.weight"].mul_(3.0)
            state["model.layers.1.mlp.gate_proj.weight"].mul_(-1.0)
            model.load_state_dict(state)
        else:
            layer.mlp.up_proj.weight = torch.nn.Parameter(layer.mlp.up_proj.weight.detach() * -4.0)
    for got, expected in step_and_forward_logits(model, step, steps=2, seed=1):
        assert_close(got, expected, 1e-4, update)


def test_models_it_does_not_cover_are_named_and_use_their_forward():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100))
    assert "gpt2" in why_not(gpt2)
    sliding = Qwen2ForCausalLM(
        Qwen2Config(vocab_size=100, use_sliding_window=True, sliding_window=8, max_window_layers=0, **SHAPE)
    )
    assert "sliding" in why_not(sliding)
    gelu = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_act="gelu", **SHAPE))
    assert "activation" in why_not(gelu)
    with pytest.raises(ValueError, match="does not cover"):
        DecodeStep(gpt2)
    assert StepEngine._pick_decode_step(gpt2, "auto") is None
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, **SHAPE))
    assert isinstance(StepEngine._pick_decode_step(llama, "auto"), DecodeStep)
    assert StepEngine._pick_decode_step(llama, "transformers") is None
    with pytest.raises(BackendError, match="unknown decode step 'fast'"):
        StepEngine._pick_decode_step(llama, "fast")


def test_a_model_with_adapters_uses_its_forward():
    peft = pytest.importorskip("peft")
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, **SHAPE))
    wrapped = peft.get_peft_model(llama, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert "adapters" in why_not(wrapped.base_model.model)


def test_an_unknown_decode_step_is_refused_when_the_backend_loads(random_backend):
    from duetlm.backends.hf import HFBackend

    with pytest.raises(BackendError, match=r"unknown decode step 'fast'.*auto, transformers"):
        HFBackend(model=random_backend.model, tokenizer=random_backend.tokenizer, decode_step="fast")
