"""Configuration of the two-stage protocol (docs/design.md section 1).

Every knob has a type, a default and the reason for it. Prompt templates are configuration:
the placeholders `{question}`, `{options}`, `{letters}` and `{signal}` are replaced literally
(no `str.format`, so LaTeX braces in templates need no escaping).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package
    import tomli as tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from duetlm.errors import ConfigError
from duetlm.usage import Price


class PromptConfig(BaseModel):
    """The texts both models see. Defaults follow the paper's prompts (docs/design.md section 1)."""

    model_config = ConfigDict(extra="forbid")

    math_instruction: str = Field(
        "{question}\nLet's think step by step and output the final answer within \\boxed{}.",
        description="User turn for free-form (math) questions, for M and for m.",
    )
    choice_instruction: str = Field(
        "{question}\n\n{options}\n\nThink step by step. The last line of your response must be of the "
        "form 'Answer: $LETTER' (without quotes) where LETTER is one of {letters}.",
        description="User turn for multiple-choice questions; {options} are the lettered options.",
    )
    sketch_instruction: str = Field(
        "{question}\n\nDo not write the final answer. Write a concise solution sketch: the key steps "
        "and intermediate results that someone needs to finish the problem.",
        description="M's user turn when signal_style='sketch' (models without think tags).",
    )
    light_prefill: str = Field(
        "<think>\n{signal}\n</think>\n\n",
        description="Start of m's assistant turn; m continues it with the answer.",
    )
    budget_close: str = Field(
        "<think>\n{signal}\n\nMy thinking budget is used up, so I will write the final answer now from "
        "the work above.\n</think>\n\n",
        description="M@B: M's own turn when its thinking was cut at the budget B. The close tag and a "
        "short instruction to answer now (budget forcing), so M answers instead of thinking on "
        "in its write-up.",
    )
    think_open: str = Field("<think>", description="Tag that opens M's thinking.")
    think_close: str = Field("</think>", description="Tag that closes it; M's generation stops here.")
    answer_markers: list[str] = Field(
        default_factory=lambda: [
            "\\boxed",
            "the final answer is",
            "The final answer is",
            "Final Answer",
            "Answer:",
        ],
        min_length=1,
        description="signal_style='answer': where M's generation stops (the earliest of these strings "
        "it writes); its reasoning before the marker is the signal. Case matters.",
    )
    answer_prefill: str = Field(
        "{signal}",
        description="signal_style='answer': start of m's assistant turn: M's reasoning, which m continues "
        "and finishes with the answer.",
    )
    answer_close: str = Field(
        "{signal}\n\nSo the final answer is",
        description="signal_style='answer': a turn whose answer must come at once (a settle probe; M@B "
        "after its budget cut the reasoning): the reasoning so far and a cue to answer now.",
    )


class SettleConfig(BaseModel):
    """When M is stopped in the `settle` and `M-settle` modes (docs/settle.md): M thinks, and at
    the first line end after every `probe_every` of its tokens the prober (m, or M itself)
    answers greedily from the thinking so far, closed with the think tag. Once `agree`
    probes in a row give the same answer, M is stopped and that probe's answer is the result.
    Defaults were measured on the embedded base pair (docs/settle.md#choosing-the-settings)."""

    model_config = ConfigDict(extra="forbid")

    probe_every: int = Field(
        32, ge=1, description="M tokens between two probes (a probe waits for the next line end)."
    )
    agree: int = Field(
        3, ge=1, description="Consecutive probes that must give the same answer before M is stopped."
    )
    min_prob: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Also require the prober's probability of its answer's tokens to reach this in "
        "each agreeing probe; None: agreement alone. Needs per-token log-probs (hf, vllm, llamacpp).",
    )
    probe: Literal["answer", "continue"] = Field(
        "answer",
        description="What a probe asks: `answer` closes the reasoning so far with the answer cue "
        "(what the prober would answer now); `continue` gives the prober its own turn from the "
        "reasoning so far, as m gets it in `duet`, so it may finish the reasoning within "
        "probe_max_tokens (where the prober gets from here). A small m cut mid-solution answers "
        "`answer` probes with the last number M wrote, so two probes agree on a subtotal.",
    )
    probe_max_tokens: int = Field(
        48,
        ge=1,
        description="The prober's budget per probe (its answer after the closed thinking, or its "
        "finish of the reasoning with `probe = continue`).",
    )
    line_max_tokens: int = Field(
        32,
        ge=1,
        description="How far past probe_every M may write to finish its line; a line still open "
        "then is probed where it stands.",
    )
    finish: Literal["probe", "continue"] = Field(
        "probe",
        description="What answers once the probes agree: the settling probe's own answer (probe), or "
        "m's turn from M's reasoning so far as in `duet` (continue: m may finish the reasoning; one more "
        "call of m, within answer_max_tokens).",
    )


class DuetConfig(BaseModel):
    """How a question is solved: budgets, sampling, templates, prices."""

    model_config = ConfigDict(extra="forbid")

    prompts: PromptConfig = Field(default_factory=PromptConfig)
    signal_style: Literal["think", "answer", "sketch"] = Field(
        "think",
        description="think: M's thinking (up to think_close) is the signal. answer: for an M that "
        "reasons and answers in one turn without tags, M stops at its answer marker and its reasoning "
        "is the signal. sketch: M is asked for a solution sketch and its whole output is the signal.",
    )
    signal_max_tokens: int = Field(
        4096, ge=1, description="M's token budget for the signal in `duet` mode; a cut signal is flagged."
    )
    answer_max_tokens: int = Field(1024, ge=1, description="m's budget for the final write-up.")
    forced_answer_max_tokens: int = Field(
        128,
        ge=1,
        description="M@B: M's budget for its answer after its thinking was cut at B and closed "
        "(small, so that the baseline cannot go on reasoning after the close).",
    )
    answer_retry: bool = Field(
        True,
        description="signal_style='answer': when m ends its turn at once without writing anything (a "
        "small m can take a reasoning that stops short of its answer marker for a finished turn), ask "
        "it once more with the answer cue (prompts.answer_close), within forced_answer_max_tokens. "
        "Both requests count in m's usage; the row's handover says so.",
    )
    alone_max_tokens: int | None = Field(
        None, ge=1, description="M's budget in M-alone mode; None = signal_max_tokens + answer_max_tokens."
    )
    light_alone_max_tokens: int | None = Field(
        None, ge=1, description="m's budget in m-alone mode; None = same as alone_max_tokens."
    )
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy (the default, reproducible).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass when temperature > 0.")
    top_k: int = Field(
        0,
        ge=0,
        description="Sample among the k likeliest tokens when temperature > 0; 0 = all. Sampling "
        "settings are never taken from a model's generation_config.json: Qwen3's recommended "
        "thinking-mode sampling is temperature 0.6, top_k 20, top_p 0.95, set here.",
    )
    seed: int | None = Field(0, description="Sampling seed; None leaves the backend's RNG as it is.")
    capable_template_kwargs: dict = Field(
        default_factory=lambda: {"enable_thinking": True},
        description="Extra chat-template arguments for M (Qwen3: enable_thinking).",
    )
    light_template_kwargs: dict = Field(
        default_factory=lambda: {"enable_thinking": True},
        description="Extra chat-template arguments for m. Thinking stays on: with it off, Qwen3's "
        "template writes an empty <think></think> that would precede the pre-filled signal.",
    )
    settle: SettleConfig = Field(
        default_factory=SettleConfig, description="When M is stopped in the settle modes."
    )
    capable_price: Price = Field(default_factory=Price, description="M's price per 1M tokens.")
    light_price: Price = Field(default_factory=Price, description="m's price per 1M tokens.")

    @model_validator(mode="after")
    def _templates_have_placeholders(self) -> DuetConfig:
        p = self.prompts
        for name, template, needed in [
            ("math_instruction", p.math_instruction, "{question}"),
            ("choice_instruction", p.choice_instruction, "{options}"),
            ("sketch_instruction", p.sketch_instruction, "{question}"),
            ("light_prefill", p.light_prefill, "{signal}"),
            ("budget_close", p.budget_close, "{signal}"),
            ("answer_prefill", p.answer_prefill, "{signal}"),
            ("answer_close", p.answer_close, "{signal}"),
        ]:
            if needed not in template:
                raise ValueError(f"prompts.{name} must contain {needed}")
        return self

    @property
    def capable_alone_budget(self) -> int:
        return self.alone_max_tokens or self.signal_max_tokens + self.answer_max_tokens

    @property
    def light_alone_budget(self) -> int:
        return self.light_alone_max_tokens or self.capable_alone_budget

    @classmethod
    def load(cls, path: str | Path) -> DuetConfig:
        return load_model_file(cls, path)

    def identity(self) -> dict:
        """The settings as a run folder's hash takes them: every field, except a later-added
        one (`NEUTRAL_LATER_FIELDS`) while it holds the value that does what runs made before
        it did, so upgrading duetlm does not orphan a half-finished run's rows."""
        data = self.model_dump()
        for path, neutral in NEUTRAL_LATER_FIELDS.items():
            *parents, name = path
            section = data
            for parent in parents:
                section = section[parent]
            if section.get(name) == neutral:
                del section[name]
        if data["signal_style"] != "answer":
            data.pop("answer_retry", None)  # inert outside the answer style
        return data


NEUTRAL_LATER_FIELDS: dict[tuple[str, ...], object] = {
    ("settle", "probe"): "answer",
    ("answer_retry",): False,
}
"""Settings added once run folders already existed, with the value that reproduces the earlier
behaviour exactly. Left out of `DuetConfig.identity` at that value; any other value changes the
hash, as it changes the rows."""


def load_model_file(model: type[BaseModel], path: str | Path):
    """Read a TOML, YAML or JSON file into a pydantic model; any problem is a ConfigError that
    names the file, the key and the rule."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path}: use .toml, .yaml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:]}: {exc}") from exc
    return validate_config(model, data, source=str(path))


def validate_config(model: type[BaseModel], data: dict, source: str = "config"):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            + (f" (got {err['input']!r})" if err["type"] != "missing" else "")
            for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None
