"""`duet train` configuration: every knob of docs/design.md section 2 with its reference default.

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
    task: str = Field("builtin", description="Training task (see duetlm.tasks).")
    data: str | None = Field(None, description="Local data file for the task.")
    split: str | None = Field(
        None,
        description="Split of `task` to train on: the builtin task's 'train' (its default here) or a "
        "hub split; None = the task's own (ignored with a data file).",
    )
    fields: dict[str, str] = Field(
        default_factory=dict, description="Field mapping for the training data (see duetlm.tasks.fields)."
    )
    eval_task: str | None = Field(
        None,
        description="Task of the greedy evaluations; None = the builtin task's test split (builtin only). "
        "Training and evaluation data must differ: a config that names the same data for both is refused, "
        "and training questions that also occur in the evaluation set are dropped.",
    )
    eval_data: str | None = Field(None, description="Local data file for eval_task.")
    eval_split: str | None = Field(None, description="Split of eval_task (None: the task's own).")
    out: str = Field("runs/train", description="Run folder: checkpoints, metrics.jsonl, TensorBoard.")
    seed: int = Field(0, description="Seeds data order, sampling and forced stops.")
    device: str = Field("auto", description="hf device for single-process runs.")

    # the objective (docs/design.md section 2)
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
    ppo_epochs: int = Field(1, ge=1, description="Passes over each batch's rollouts (reference 1).")
    mini_batches: int = Field(
        1,
        ge=1,
        description="Optimizer steps per pass, each on an equal share of the batch's questions (the "
        "reference takes 2 per 64-question batch). With more than one step per batch the PPO ratio "
        "leaves 1 and the clip acts; old log-probs are those of the sampling policy, kept from before "
        "the first step.",
    )
    precision: Literal["fp32", "bf16-mixed"] = Field(
        "fp32",
        description="bf16-mixed: fp32 master weights and optimizer state, bf16 autocast for every forward "
        "(rollouts, log-probs, updates); LoRA's frozen base and the reference model are stored in bf16. "
        "The GPU recipe's choice: pure bf16 weights would drop AdamW updates below bf16's resolution "
        "(at lr 1e-6 about 2% of entries change). fp32: everything in fp32 (the embedded pair).",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in the backward pass (memory for compute)."
    )
    logprob_chunk: int = Field(
        1024,
        ge=1,
        description="Completion positions whose vocabulary logits exist at once when log-probs are "
        "computed (only completion positions are scored; each chunk's logits are recomputed in the "
        "backward pass, never kept for the whole batch).",
    )
    rollout_batch_tokens: int = Field(
        262_144,
        ge=1,
        description="hf rollout engine: rows per generate() call are bounded so that rows x (prompt + "
        "budget) stays under this many tokens (KV cache memory), not by a fixed row count.",
    )
    check_rollout_logprobs: bool = Field(
        False,
        description="Log `rollout_logprob_gap`: the largest difference between the log-probs the rollout "
        "engine sampled with and those the trainer computes (0 up to numerics when the sampled policy is "
        "the trained one). The hf engine keeps B x V scores per step for it: small runs and tests.",
    )
    vllm_gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="vLLM rollout engine (a vllm: capable spec): its share of the device's memory. None: "
        "0.3 on a GPU; on a CPU, where the share is of CPU memory, an explicit 2 GiB KV cache.",
    )
    vllm_sleep: bool = Field(
        True,
        description="vLLM rollout engine: release its weights and KV cache during the update (sleep "
        "level 2) and take the new weights on waking, so training and rollouts share the GPU. vLLM has no "
        "sleep mode on a CPU: there the engine says so once and keeps its memory.",
    )
    warm_start: str | None = Field(
        None,
        description="A `duet probe` run folder: before GRPO, M is fine-tuned on its own thinking cut at "
        "each training question's oracle cut and closed (probe the training split: --split train).",
    )
    warm_start_epochs: int = Field(3, ge=1, description="Warm start: passes over the cuts.")
    warm_start_lr: float = Field(
        1e-4, gt=0, description="Warm start: AdamW learning rate (its own optimizer)."
    )
    warm_start_batch: int = Field(16, ge=1, description="Warm start: cuts per optimizer step.")
    lora_capable: LoraSettings | None = Field(None, description="LoRA for M; None = full fine-tuning.")
    lora_light: LoraSettings | None = Field(None, description="LoRA for m; None = full fine-tuning.")
    merge_adapters: bool = Field(True, description="Save LoRA models merged into plain HF folders.")

    # sampling
    capable_temperature: float = Field(1.0, ge=0, description="M's rollout temperature.")
    light_temperature: float = Field(1.0, ge=0, description="m's rollout temperature.")
    top_p: float = Field(
        1.0,
        description="Must stay 1: the trained log-probs are those of the whole tempered distribution, so "
        "a truncated sampler would not be the policy being trained.",
    )
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
        if self.top_p != 1.0:
            raise ValueError(
                f"top_p = {self.top_p}: rollouts must sample the whole tempered distribution (top_p = 1), "
                "the one whose log-probs are trained"
            )
        if self.eval_task is None and self.task != "builtin":
            raise ValueError(
                f"eval_task is required for task {self.task!r}: name a held-out evaluation set "
                "(e.g. task = 'math_train', eval_task = 'math500')"
            )
        if self.evaluation_source == self.training_source:
            raise ValueError(
                f"training and evaluation read the same data ({self.task}, split {self.split or 'default'}, "
                f"data {self.data}): evaluate on a held-out set (eval_task / eval_split / eval_data)"
            )
        if self.questions_per_step % self.mini_batches:
            raise ValueError(
                f"mini_batches = {self.mini_batches} must divide questions_per_step = {self.questions_per_step}"
            )
        return self

    @property
    def training_source(self) -> tuple:
        split = self.split or ("train" if self.task == "builtin" else None)
        return (self.task, split, self.data)

    @property
    def evaluation_source(self) -> tuple:
        task = self.eval_task or self.task
        split = self.eval_split or ("test" if task == "builtin" else None)
        return (task, split, self.eval_data)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return load_model_file(cls, path)
