"""The sections of `TrainConfig`: one per role ([capable], [light]: the same `RoleConfig`
twice) and one per concern ([models], [data], [objective], [optimizer], [rollout],
[parallel], [evaluation], [logging], [warm_start]); every knob with its default and where it
comes from."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RESUMABLE_NOTE = " May change on resume."


def knob(default: Any = ..., description: str = "", *, resumable: bool = False, **rules) -> Any:
    """A documented field; `resumable` marks one a resumed run may change."""
    if resumable:
        return Field(
            default, description=description + RESUMABLE_NOTE, json_schema_extra={"resumable": True}, **rules
        )
    return Field(default, description=description, **rules)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraSettings(Section):
    """LoRA adapters (peft) instead of full fine-tuning."""

    r: int = knob(16, "Adapter rank.", ge=1)
    alpha: int = knob(32, "Scaling numerator (alpha / r).", ge=1)
    dropout: float = knob(0.0, "Dropout on the adapters' input.", ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers that get adapters (all of Qwen3's by default).",
    )


ROLE_NAMES = {"capable": "M", "light": "m"}
DEFAULT_MODELS = {"capable": "tiny-M", "light": "tiny-m"}
DEFAULT_ENGINE_SHARE = {"capable": 0.3, "light": 0.15}
"""A vLLM rollout engine's share of its GPU when its role sets none: M's engine holds the longer
sequences (its signals), m's the many short answers (docs/training.md#memory)."""


class RoleConfig(Section):
    """[capable] (M) and [light] (m): one model's part in training. The same knobs for both
    roles; the trainer asks a role for them and never branches on which role it is."""

    model: str | None = knob(
        None,
        "The model: hf:, vllm: (vLLM rolls it out) or an embedded name. None: tiny-M for M, tiny-m for m.",
    )
    train: bool | None = knob(
        None,
        "Update this model. None: M always is; m is in the joint objective and is not in the single-model "
        "baseline, where it plays no part. M is always trained (false is refused).",
    )
    lr: float = knob(1e-4, "AdamW learning rate (builtin 1e-4; Qwen 1e-6).", gt=0)
    temperature: float = knob(
        1.0,
        "Rollout temperature. > 0 for a trained model: its log-probs are those of the tempered policy that "
        "sampled; 0 (greedy) only for an m that only answers.",
        ge=0,
    )
    lora: LoraSettings | None = knob(None, "LoRA adapters (peft); None = full fine-tuning.")
    gpu_memory_utilization: float | None = knob(
        None,
        "vLLM rollout engine: its share of its device's memory. None: 0.3 for M and 0.15 for m on a GPU; on a "
        "CPU, where the share is of CPU memory, an explicit 2 GiB KV cache.",
        gt=0,
        le=1,
        resumable=True,
    )


class ModelsConfig(Section):
    """[models]: which objective, and how trained models are saved (each model's own knobs are
    its role's: [capable], [light])."""

    single_model: bool = knob(
        False,
        "Length-penalty GRPO baseline: M alone, reward acc − λL/B. m plays no part: it is neither loaded nor "
        "trained.",
    )
    merge_adapters: bool = knob(True, "Save LoRA models merged into plain HF folders.")


class DataConfig(Section):
    """[data]: training and held-out evaluation questions."""

    task: str = knob("builtin", "Training task (see duetlm.tasks).")
    data: str | None = knob(None, "Local data file for the task.")
    split: str | None = knob(
        None,
        "Split of `task` to train on: the builtin task's 'train' (its default here) or a hub split; None = the "
        "task's own (ignored with a data file).",
    )
    fields: dict[str, str] = Field(
        default_factory=dict, description="Field mapping for the training data (see duetlm.tasks.fields)."
    )
    eval_task: str | None = knob(
        None,
        "Task of the greedy evaluations; None = the builtin task's test split (builtin only). Training and "
        "evaluation data must differ: a config that names the same data for both is refused, and training "
        "questions that also occur in the evaluation set are dropped.",
    )
    eval_data: str | None = knob(None, "Local data file for eval_task.")
    eval_split: str | None = knob(None, "Split of eval_task (None: the task's own).")


class ObjectiveConfig(Section):
    """[objective]: docs/design.md section 2."""

    questions_per_step: int = knob(
        16, "Questions per batch, over all processes (reference 64; builtin 16).", ge=1
    )
    n_capable: int = knob(4, "n_M: signals per question (reference 4; GRPO needs >= 2).", ge=2)
    n_light: int = knob(4, "n_m: m's answers to each signal (reference 4).", ge=1)
    length_bound: float = knob(64.0, "B: the signal length bound in tokens (builtin 64).", gt=0)
    lambda_schedule: Literal["adaptive", "constant"] = knob("adaptive", "λ by dual ascent or fixed.")
    lambda_init: float = knob(0.0, "λ_0 (reference 0).", ge=0, le=1)
    lambda_lr: float = knob(0.01, "η of the dual ascent (reference 0.01).", ge=0)
    use_marginal_utility: bool = knob(
        True,
        "Report R_M with r(m)(x) subtracted (`marginal_reward`, from the latest evaluation's r(m)). Logging "
        "only: r(m)(x) is one number per question, so it cancels exactly from every advantage once the "
        "group's mean is subtracted, and no step draws m's standalone answers for it (the reference "
        "subtracted it in the reward).",
    )
    kl_beta: float = knob(0.001, "β of the KL to the initial M (reference 0.001).", ge=0)
    kl_placement: Literal["reward", "loss"] = knob(
        "loss",
        "Where the KL to the initial M acts. reward: β·(summed log-ratio) subtracted from R_M before the "
        "group normalization (the reference's; its noise can outweigh λ·L/B while λ is small, "
        "docs/design.md). loss: β·k3 added to M's loss per token, token-mean like the policy loss, "
        "outside the advantages.",
    )
    scale_rewards: Literal["group", "batch", "none"] = knob(
        "batch",
        "What a group's centered rewards are divided by: group, the group's standard deviation (the "
        "reference's; it stretches ties in correctness to unit variance, so λ's size stops mattering); "
        "batch, the standard deviation over the whole batch (λ keeps its size relative to correctness); "
        "none, nothing (Dr. GRPO). For M's and m's advantages alike.",
    )
    clip_eps: float = knob(0.2, "PPO clip ε (reference 0.2).", gt=0, lt=1)


class OptimizerConfig(Section):
    """[optimizer]: AdamW and the passes over each batch."""

    weight_decay: float = knob(0.0, "AdamW weight decay.", ge=0)
    max_grad_norm: float = knob(1.0, "Gradient clipping by the global norm (reference 1.0).", gt=0)
    ppo_epochs: int = knob(1, "Passes over each batch's rollouts (reference 1).", ge=1)
    mini_batches: int = knob(
        1,
        "Optimizer steps per pass, each on an equal share of the batch's questions (the reference takes 2 per "
        "64-question batch). With more than one step per batch the PPO ratio leaves 1 and the clip acts; old "
        "log-probs are those of the sampling policy, kept from before the first step.",
        ge=1,
    )


class RolloutConfig(Section):
    """[rollout]: how signals and answers are sampled."""

    signal_max_tokens: int = knob(256, "Cap on a rollout signal (tokens).", ge=1)
    answer_max_tokens: int = knob(
        32,
        "Cap on m's answers to a signal (in the single-model baseline: on M's answer after its thinking).",
        ge=1,
    )
    forced_stop_prob: float = knob(
        0.0,
        "Exploration: share of signals cut at a random line boundary and closed with the think tag, so GRPO "
        "sees shorter signals than the model samples by itself.",
        ge=0,
        le=1,
    )
    forced_stop_credit: Literal["stop", "sequence"] = knob(
        "stop",
        "What a forced stop's advantage trains: 'stop' only the inserted close tag (the prefix was sampled "
        "under a continuation that was thrown away, so its tokens get no credit for what the cut did), "
        "'sequence' every token of the cut signal.",
    )
    rollout_correction: Literal["auto", "none", "token_tis", "token_mis", "sequence_tis", "sequence_mis"] = (
        knob(
            "auto",
            "Importance weights π_old/μ for the gap between what the engine sampled with (μ, its own "
            "log-probs) and the trainer's sampling-time log-probs (π_old) (train/algorithm/correction.py): token_tis "
            "truncates each token's weight at the threshold, token_mis masks tokens whose weight leaves "
            "[1/threshold, threshold], sequence_* do the same per sequence. auto: token_tis for a model "
            "rolled out on vLLM (docs/training.md), none for hf (which samples from the trained module "
            "itself).",
        )
    )
    rollout_correction_threshold: float = knob(
        2.0, "The truncation or masking bound of the rollout correction (verl's and ms-swift's 2.0).", gt=1
    )
    check_rollout_logprobs: bool = knob(
        False,
        "Log `rollout_logprob_gap`: the largest difference between the log-probs the rollout engine sampled "
        "with and those the trainer computes (0 up to numerics when the sampled policy is the trained one).",
        resumable=True,
    )
    rollout_batch_tokens: int = knob(
        262_144,
        "hf rollout engine: rows per generate() call are bounded so that rows x (prompt + budget) stays under "
        "this many tokens (KV cache memory), not by a fixed row count.",
        ge=1,
        resumable=True,
    )
    vllm_sleep: bool = knob(
        True,
        "vLLM rollout engines: release weights and KV cache during the update (sleep level 2) and take the new "
        "weights on waking, so training and rollouts share the GPU. vLLM has no sleep mode on a CPU: there the "
        "engine says so once and keeps its memory.",
        resumable=True,
    )


class ParallelConfig(Section):
    """[parallel]: devices, processes, precision and memory."""

    strategy: Literal["ddp", "fsdp"] = knob(
        "ddp",
        "ddp: every process holds whole models (a single process is DDP of one). fsdp: torch's FSDP2, each "
        "process holds 1/N of each trained model's weights, gradients and AdamW state (and of the reference "
        "model); rollouts then run on vLLM or, for hf specs, on an unsharded replica per process that takes "
        "the pushed weights. Launch several processes with torchrun (docs/training.md#scale).",
        resumable=True,
    )
    precision: Literal["fp32", "bf16-mixed"] = knob(
        "fp32",
        "bf16-mixed: fp32 master weights and optimizer state, bf16 compute for every forward (rollouts, "
        "log-probs, updates); LoRA's frozen base and the reference model are stored in bf16. The GPU recipe's "
        "choice: pure bf16 weights would drop AdamW updates below bf16's resolution (at lr 1e-6 about 2% of "
        "entries change). fp32: everything in fp32 (the embedded pair).",
    )
    gradient_checkpointing: bool = knob(
        False, "Recompute each layer's activations in the backward pass (memory for compute).", resumable=True
    )
    micro_batch: int = knob(64, "Sequences per forward/backward (memory knob only).", ge=1, resumable=True)
    logprob_chunk: int = knob(
        1024,
        "Completion positions whose vocabulary logits exist at once when log-probs are computed (only "
        "completion positions are scored; each chunk's logits are recomputed in the backward pass, never "
        "kept for the whole batch).",
        ge=1,
        resumable=True,
    )
    share_prefixes: bool = knob(
        True,
        "m's update packs the n_m answers to each signal behind one copy of their shared prefix (question "
        "and signal), each answer attending to the prefix and itself only: the prefix, most of m's tokens, "
        "runs once instead of n_m times. Needs the sdpa or eager attention (not flash attention's).",
        resumable=True,
    )
    device: str = knob(
        "auto", "hf device: auto, cpu, cuda (each process takes its local rank's GPU).", resumable=True
    )
    dist_timeout_s: float = knob(
        1800.0,
        "Seconds a collective waits for the other processes before it fails with an error (torch's gloo "
        "default). Longer than anything one process does alone between two collectives: the longest "
        "rollout, a save.",
        gt=0,
        resumable=True,
    )
    staging_dir: str | None = knob(
        None,
        "Where each node stages the weights pushed to engines in other processes (vLLM) after every update, "
        "one copy per node: None = /dev/shm when it has room for a copy, else the system's temporary folder. "
        "Checked before step 0.",
        resumable=True,
    )
    push_bucket_mb: float = knob(
        512.0,
        "Weight push: MB of tensors a node leader holds before writing them to the staged copy (its extra "
        "memory during a push is this plus the largest tensor).",
        gt=0,
        resumable=True,
    )


class EvaluationConfig(Section):
    """[evaluation]: the greedy pair evaluations during training."""

    every: int = knob(10, "Greedy pair evaluation every N steps (0 = never).", ge=0, resumable=True)
    questions: int = knob(
        100, "Questions in that evaluation (the evaluation task's first ones).", ge=1, resumable=True
    )
    light_alone: bool = knob(
        True,
        "Also measure r(m) there: m alone, greedy, with the whole answer budget it has in inference "
        "(signal_max_tokens + answer_max_tokens, so that it can close its thinking); logged as "
        "eval_r_light.",
        resumable=True,
    )


class LoggingConfig(Section):
    """[logging]: where metrics go besides metrics.jsonl."""

    tensorboard: bool = knob(True, "Also log to TensorBoard (if installed).", resumable=True)
    wandb: bool = knob(
        False,
        "Also log to Weights & Biases (pip install 'duetlm[wandb]'; refused at start if missing).",
        resumable=True,
    )
    wandb_project: str = knob("duetlm", "The Weights & Biases project.", resumable=True)
    wandb_run: str | None = knob(
        None,
        "The run's name there; None: the run folder's name. A resumed run continues the same run.",
        resumable=True,
    )


class WarmStartConfig(Section):
    """[warm_start]: fine-tune M on a probe's oracle cuts before GRPO."""

    run: str | None = knob(
        None,
        "A `duet probe` run folder: before GRPO, M is fine-tuned on its own thinking cut at each training "
        "question's oracle cut and closed (probe the training split: --split train). None: no warm start.",
    )
    epochs: int = knob(3, "Passes over the cuts.", ge=1)
    lr: float = knob(1e-4, "AdamW learning rate (its own optimizer).", gt=0)
    batch: int = knob(16, "Cuts per optimizer step.", ge=1)


class CheckpointConfig(Section):
    """[checkpoint]: what a save writes, and how many saves are kept."""

    format: Literal["whole", "sharded"] = knob(
        "whole",
        "whole: a plain Hugging Face folder per trained model and the whole optimizer state, gathered "
        "on the main process (simple, and any process count resumes it; the embedded pair's). sharded: "
        "torch.distributed.checkpoint, each process writing and reading its own shards of weights and "
        "optimizer state, no process ever holding a whole model (the GPU recipe's; `duet export RUN` "
        "writes release folders from it). Both resume onto another process count.",
    )
    keep: int = knob(
        1,
        "Saves kept: `last`, and the ones before it as step-NNNNNN/ up to this many in all.",
        ge=1,
        resumable=True,
    )


class LayoutConfig(Section):
    """[layout]: the hardware a config was made for. `duet train --dry-run` plans for it when its
    flags do not say otherwise; a run takes its processes from its launcher, and says so when
    they are not the `devices` its plan was made for."""

    devices: int | None = knob(
        None,
        "Devices (one process each) over all nodes; None: what the launcher starts.",
        ge=1,
        resumable=True,
    )
    nodes: int = knob(1, "Nodes the devices are spread over.", ge=1, resumable=True)
    device_memory: str = knob(
        "80GB", "Memory of one device (for the plan), e.g. 80GB, 141GB.", resumable=True
    )


SECTIONS: dict[str, type[Section]] = {
    "capable": RoleConfig,
    "light": RoleConfig,
    "models": ModelsConfig,
    "data": DataConfig,
    "objective": ObjectiveConfig,
    "optimizer": OptimizerConfig,
    "rollout": RolloutConfig,
    "parallel": ParallelConfig,
    "evaluation": EvaluationConfig,
    "logging": LoggingConfig,
    "warm_start": WarmStartConfig,
    "layout": LayoutConfig,
    "checkpoint": CheckpointConfig,
}
