"""`duet train` configuration: every knob of docs/design.md section 2 with its reference default,
in sections (TOML tables): one per role, `[capable]` (M) and `[light]` (m), then `[models]`, `[data]`, `[objective]`, `[optimizer]`, `[rollout]`,
`[parallel]`, `[evaluation]`, `[logging]`, `[warm_start]` and `[duet]` (the prompts), with the
run's `out`, `seed`, `steps` and `save_every` at the top.

Reference values (the paper's verl runs): n_M = 4, n_m = 4, 64 questions a batch, η = 0.01,
λ_0 = 0, β = 0.001, ε = 0.2, one epoch per batch, AdamW, grad-clip 1.0. Values marked
"builtin" are sized for the embedded pair on a laptop CPU; `configs/qwen3-4b_0.6b.toml` sets
the reference ones. A field whose help ends in "May change on resume." may differ between a
run and its `--resume`; any other difference is refused (it would change what a step computes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from duetlm.config import DuetConfig, load_model_file, validate_config
from duetlm.train.config.sections import (
    DEFAULT_ENGINE_SHARE,
    DEFAULT_MODELS,
    RESUMABLE_NOTE,
    ROLE_NAMES,
    SECTIONS,
    CheckpointConfig,
    DataConfig,
    EvaluationConfig,
    LayoutConfig,
    LoggingConfig,
    LoraSettings,
    ModelsConfig,
    ObjectiveConfig,
    OptimizerConfig,
    ParallelConfig,
    RoleConfig,
    RolloutConfig,
    Section,
    WarmStartConfig,
    knob,
)

__all__ = [
    "DEFAULT_ENGINE_SHARE",
    "DEFAULT_MODELS",
    "MOVED",
    "RENAMED",
    "RESUMABLE_NOTE",
    "ROLE_NAMES",
    "SECTIONS",
    "CheckpointConfig",
    "DataConfig",
    "EvaluationConfig",
    "LayoutConfig",
    "LoggingConfig",
    "LoraSettings",
    "ModelsConfig",
    "ObjectiveConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RoleConfig",
    "RolloutConfig",
    "Section",
    "TrainConfig",
    "WarmStartConfig",
    "field_paths",
    "knob",
    "resumable_paths",
    "with_settings",
]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: str = knob("runs/train", "Run folder: checkpoints, metrics.jsonl, TensorBoard.", resumable=True)
    seed: int = knob(0, "Seeds data order, every rollout's sampling and forced stops.")
    steps: int = knob(100, "Optimizer steps (batches).", ge=1, resumable=True)
    save_every: int = knob(
        1, "Checkpoint every N steps (1: a kill loses at most one step).", ge=1, resumable=True
    )

    capable: RoleConfig = Field(default_factory=RoleConfig, description="M: " + (RoleConfig.__doc__ or ""))
    light: RoleConfig = Field(default_factory=RoleConfig, description="m: " + (RoleConfig.__doc__ or ""))
    models: ModelsConfig = Field(default_factory=ModelsConfig, description=ModelsConfig.__doc__)
    data: DataConfig = Field(default_factory=DataConfig, description=DataConfig.__doc__)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description=ObjectiveConfig.__doc__)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description=OptimizerConfig.__doc__)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description=RolloutConfig.__doc__)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description=ParallelConfig.__doc__)
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description=EvaluationConfig.__doc__
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description=LoggingConfig.__doc__)
    warm_start: WarmStartConfig = Field(default_factory=WarmStartConfig, description=WarmStartConfig.__doc__)
    layout: LayoutConfig = Field(default_factory=LayoutConfig, description=LayoutConfig.__doc__)
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description=CheckpointConfig.__doc__
    )
    duet: DuetConfig = Field(
        default_factory=DuetConfig, description="Prompts and templates (shared with inference)."
    )

    @model_validator(mode="before")
    @classmethod
    def _sections_named(cls, data: Any) -> Any:
        """A knob written at the top level (as in a flat config) is pointed to its section."""
        if not isinstance(data, dict):
            return data
        for section, knobs in data.items():
            for key in knobs if isinstance(knobs, dict) else ():
                moved = MOVED.get(f"{section}.{key}")
                if moved is not None:
                    raise ValueError(f"`{section}.{key}` is now {moved}")
        paths = field_paths() | RENAMED
        for key, value in data.items():
            if key not in cls.model_fields and key in paths:
                section, name = paths[key].split(".")
                raise ValueError(
                    f"`{key}` belongs in the [{section}] section, as `{name}` ({paths[key]} = ...)"
                )
            if key == "keep_checkpoints":
                raise ValueError("`keep_checkpoints` is gone: a run keeps its `last` checkpoint only")
            if key == "warm_start" and isinstance(value, str):
                raise ValueError(f"warm_start is a section: [warm_start] run = {value!r}")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        models = self.models
        for name, role in (("capable", self.capable), ("light", self.light)):
            if role.model is None:
                role.model = DEFAULT_MODELS[name]
        if self.capable.train is False:
            raise ValueError("capable.train = false: M is the model DUET trains (set light.train for m)")
        if models.single_model and self.light.train:
            raise ValueError(
                "light.train = true with models.single_model: the single-model baseline answers with M alone, "
                "so m plays no part and is not loaded (leave light.train unset)"
            )
        if self.capable.temperature == 0:
            raise ValueError(
                "capable.temperature = 0: M is trained on its own samples, which greedy decoding does not "
                "draw; sample at T > 0 (e.g. 1.0)"
            )
        if self.trains_light and self.light.temperature == 0:
            raise ValueError(
                "light.temperature = 0 with m trained: greedy answers are not samples of the policy whose "
                "log-probs are trained (and GRPO's groups would hold copies); sample at T > 0 (e.g. 1.0), "
                "or set light.train = false"
            )
        data = self.data
        if data.eval_task is None and data.task != "builtin":
            raise ValueError(
                f"data.eval_task is required for task {data.task!r}: name a held-out evaluation set "
                "(e.g. task = 'math_train', eval_task = 'math500')"
            )
        if self.evaluation_source == self.training_source:
            raise ValueError(
                f"training and evaluation read the same data ({data.task}, split {data.split or 'default'}, "
                f"data {data.data}): evaluate on a held-out set (data.eval_task / eval_split / eval_data)"
            )
        per_step, mini = self.objective.questions_per_step, self.optimizer.mini_batches
        if per_step % mini:
            raise ValueError(
                f"optimizer.mini_batches = {mini} must divide objective.questions_per_step = {per_step}"
            )
        return self

    def unused_knobs(self) -> list[str]:
        """Knobs set away from their defaults that this run does not read (the single-model
        baseline reads neither m's knobs nor forced stops); the trainer logs them once."""
        if not self.models.single_model:
            return []
        unused = [f"light.{name}" for name in self.light.model_fields_set if name != "model"]
        if self.rollout.forced_stop_prob > 0:
            unused.append("rollout.forced_stop_prob")
        if self.objective.n_light != ObjectiveConfig.model_fields["n_light"].default:
            unused.append("objective.n_light")
        return unused

    @property
    def trains_light(self) -> bool:
        return self.trains("light")

    def role(self, name: str) -> RoleConfig:
        """A role's knobs by its name (`capable`, `light`)."""
        if name not in ROLE_NAMES:
            raise KeyError(f"no role {name!r}: the roles are {', '.join(ROLE_NAMES)}")
        return self.capable if name == "capable" else self.light

    def roles(self) -> list[str]:
        """The roles this run loads: both, or M alone for the single-model baseline."""
        return ["capable"] if self.models.single_model else ["capable", "light"]

    def trains(self, name: str) -> bool:
        """Whether a role's model is updated (its `train`, or its default: see RoleConfig)."""
        role = self.role(name)
        if name == "capable":
            return True
        return (not self.models.single_model) if role.train is None else role.train

    def model_of(self, name: str) -> str:
        return self.role(name).model or DEFAULT_MODELS[name]

    def engine_share(self, name: str, on_gpu: bool) -> float | None:
        """A role's vLLM engine share of its device: its own, else its role's GPU default (None
        on a CPU, where the engine takes an explicit KV cache instead)."""
        share = self.role(name).gpu_memory_utilization
        return share if share is not None or not on_gpu else DEFAULT_ENGINE_SHARE[name]

    def correction_for(self, role: str) -> str:
        """The rollout correction a role's update applies (`auto` resolved by its engine)."""
        mode = self.rollout.rollout_correction
        if mode != "auto":
            return mode
        return "token_tis" if self.model_of(role).strip().startswith("vllm:") else "none"

    @property
    def training_source(self) -> tuple:
        data = self.data
        split = data.split or ("train" if data.task == "builtin" else None)
        return (data.task, split, data.data)

    @property
    def evaluation_source(self) -> tuple:
        data = self.data
        task = data.eval_task or data.task
        split = data.eval_split or ("test" if task == "builtin" else None)
        return (task, split, data.eval_data)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return load_model_file(cls, path)


MOVED = {
    "models.capable": "capable.model",
    "models.light": "light.model",
    "models.train_light": "light.train",
    "models.lora_capable": "capable.lora",
    "models.lora_light": "light.lora",
    "optimizer.capable_lr": "capable.lr",
    "optimizer.light_lr": "light.lr",
    "rollout.capable_temperature": "capable.temperature",
    "rollout.light_temperature": "light.temperature",
    "rollout.vllm_gpu_memory_utilization": "capable.gpu_memory_utilization and light.gpu_memory_utilization (each "
    "role's engine its own)",
    "rollout.top_p": "gone: rollouts sample the whole tempered distribution, the one whose log-probs are trained",
}
"""Knobs that moved into a role's section ([capable], [light]), or went, with where to."""

RENAMED = {
    "eval_every": "evaluation.every",
    "eval_questions": "evaluation.questions",
    "warm_start_epochs": "warm_start.epochs",
    "warm_start_lr": "warm_start.lr",
    "warm_start_batch": "warm_start.batch",
}
"""Knobs of the flat layout whose name changed with their section."""


def field_paths() -> dict[str, str]:
    """Every section knob's name -> its dotted path (`kl_beta` -> `objective.kl_beta`)."""
    return {
        name: f"{section}.{name}"
        for section, model in SECTIONS.items()
        if section not in ROLE_NAMES  # a role's knobs are in both role sections
        for name in model.model_fields
    }


def resumable_paths() -> frozenset[str]:
    """Dotted paths of the knobs a resumed run may change (marked `resumable`)."""
    paths = {name for name, f in TrainConfig.model_fields.items() if _resumable(f)}
    for section, model in SECTIONS.items():
        paths |= {f"{section}.{name}" for name, f in model.model_fields.items() if _resumable(f)}
    return frozenset(paths)


def _resumable(field) -> bool:
    return isinstance(field.json_schema_extra, dict) and bool(field.json_schema_extra.get("resumable"))


def with_settings(config: TrainConfig, settings: dict[str, Any], source: str = "config") -> TrainConfig:
    """`config` with `settings` ({"objective.kl_beta": 0.0, "steps": 3}) applied and checked
    again, as `duet train --set` applies them (a ConfigError names what is wrong)."""
    from duetlm.errors import ConfigError

    data = config.model_dump()
    for path, value in settings.items():
        *sections, name = path.split(".")
        target = data
        for section in sections:
            if not isinstance(target.get(section), dict):
                known = ", ".join(SECTIONS)
                raise ConfigError(f"{source}: {path}: no section {section!r} here (sections: {known})")
            target = target[section]
        target[name] = value
    return validate_config(TrainConfig, data, source=f"{source} with {', '.join(settings)}")
