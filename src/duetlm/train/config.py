"""`duet train` configuration: every knob of DESIGN section 2 with its reference default.

Reference values (the paper's verl runs): n_M = 4, n_m = 4, 64 questions a batch, η = 0.01,
λ_0 = 0, β = 0.001, ε = 0.2, one epoch per batch, AdamW, grad-clip 1.0. Values marked
"builtin" are sized for the embedded pair on a laptop CPU; the GPU recipe in
`configs/qwen3-4b_0.6b.toml` sets the reference ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from duetlm.config import DuetConfig, load_model_file


class LoraSettings(BaseModel):
    """LoRA adapters (peft) instead of full fine-tuning."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Scaling numerator (alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # models and data
    capable: str = Field(
        "tiny-M", description="M to train (hf: or embedded name; vllm: rolls out with vLLM)."
    )
    light: str = Field("tiny-m", description="m to train (or only use, with train_light = false).")
    task: str = Field("builtin", description="Training task (its train split where it has one).")
    data: str | None = Field(None, description="Local data file for the task.")
    out: str = Field("runs/train", description="Run folder: checkpoints, metrics.jsonl, TensorBoard.")
    seed: int = Field(0, description="Seeds data order, sampling and forced stops.")
    device: str = Field("auto", description="hf device for single-process runs.")

    # the objective (DESIGN section 2)
    steps: int = Field(100, ge=1, description="Optimizer steps (batches).")
    questions_per_step: int = Field(16, ge=1, description="Questions per batch (reference 64; builtin 16).")
    n_capable: int = Field(4, ge=2, description="n_M: signals per question (reference 4; GRPO needs >= 2).")
    n_light: int = Field(4, ge=1, description="n_m: answers of m per signal and standalone (reference 4).")
    length_bound: float = Field(64.0, gt=0, description="B: the signal length bound in tokens (builtin 64).")
    lambda_schedule: Literal["adaptive", "constant"] = Field(
        "adaptive", description="λ by dual ascent or fixed."
    )
    lambda_init: float = Field(0.0, ge=0, le=1, description="λ_0 (reference 0).")
    lambda_lr: float = Field(0.01, ge=0, description="η of the dual ascent (reference 0.01).")
    use_marginal_utility: bool = Field(True, description="Subtract r(m)(x) in R_M.")
    kl_beta: float = Field(0.001, ge=0, description="β of the KL to the initial M in M's reward (reference).")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clip ε (reference 0.2).")
    train_light: bool = Field(True, description="Update m too (false: train M only).")
    single_model: bool = Field(False, description="Length-penalty GRPO baseline: M alone, reward acc − λL/B.")

    # optimization
    capable_lr: float = Field(1e-4, gt=0, description="AdamW learning rate of M (builtin 1e-4; Qwen 1e-6).")
    light_lr: float = Field(1e-4, gt=0, description="AdamW learning rate of m.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping (reference 1.0).")
    micro_batch: int = Field(64, ge=1, description="Sequences per forward/backward (memory knob only).")
    lora_capable: LoraSettings | None = Field(None, description="LoRA for M; None = full fine-tuning.")
    lora_light: LoraSettings | None = Field(None, description="LoRA for m; None = full fine-tuning.")
    merge_adapters: bool = Field(True, description="Save LoRA models merged into plain HF folders.")

    # sampling
    capable_temperature: float = Field(1.0, ge=0, description="M's rollout temperature.")
    light_temperature: float = Field(1.0, ge=0, description="m's rollout temperature.")
    top_p: float = Field(1.0, gt=0, le=1)
    signal_max_tokens: int = Field(256, ge=1, description="Cap on a rollout signal (tokens).")
    answer_max_tokens: int = Field(32, ge=1, description="Cap on m's answers and standalone answers.")
    forced_stop_prob: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Exploration: share of signals cut at a random line boundary and closed with the "
        "think tag, so GRPO sees shorter signals than the model samples by itself.",
    )
    forced_stop_credit: Literal["stop", "sequence"] = Field(
        "stop",
        description="What a forced stop's advantage trains: 'stop' only the inserted close tag (the "
        "prefix was sampled under a continuation that was thrown away, so its tokens get no credit "
        "for what the cut did), 'sequence' every token of the cut signal.",
    )

    # evaluation, logging, checkpoints
    eval_every: int = Field(10, ge=0, description="Greedy pair evaluation every N steps (0 = never).")
    eval_questions: int = Field(
        100, ge=1, description="Questions in that evaluation (the task's test split)."
    )
    save_every: int = Field(
        1, ge=1, description="Checkpoint every N steps (1: a kill loses at most one step)."
    )
    keep_checkpoints: int = Field(1, ge=1, description="How many step checkpoints to keep besides `last`.")
    tensorboard: bool = Field(True, description="Also log to TensorBoard (if installed).")
    wandb: bool = Field(False, description="Also log to Weights & Biases (if installed).")

    duet: DuetConfig = Field(
        default_factory=DuetConfig, description="Prompts and templates (shared with inference)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.single_model and self.train_light:
            # m plays no part in the single-model baseline; training it would be wasted work.
            self.train_light = False
        return self

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return load_model_file(cls, path)
