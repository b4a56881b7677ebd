"""Token, time and cost accounting per model (docs/design.md section 1, "Accounting").

`Usage` adds up: the usage of a batch is the sum of its requests', and the usage of a run the
sum of its batches'. Costs are computed when usage is recorded, from a `Price` per model, so a
sum of usages carries the right cost even when the two models are priced differently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pydantic import BaseModel, ConfigDict, Field


class Price(BaseModel):
    """Price of one model in currency units per million tokens (default 0: local models)."""

    model_config = ConfigDict(extra="forbid")

    input_per_mtok: float = Field(0.0, ge=0, description="Price per 1M prompt tokens.")
    output_per_mtok: float = Field(0.0, ge=0, description="Price per 1M output tokens.")

    def cost(self, prompt_tokens: int, output_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


@dataclass
class ModelUsage:
    """What one model consumed: tokens, requests, wall time (amortized over a batch) and cost."""

    prompt_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0
    wall_s: float = 0.0
    cost: float = 0.0

    def __add__(self, other: ModelUsage) -> ModelUsage:
        return ModelUsage(
            self.prompt_tokens + other.prompt_tokens,
            self.output_tokens + other.output_tokens,
            self.requests + other.requests,
            self.wall_s + other.wall_s,
            self.cost + other.cost,
        )


@dataclass
class Usage:
    """Usage of the capable model M and the light model m, kept apart because savings are
    measured on M's output tokens alone."""

    capable: ModelUsage = field(default_factory=ModelUsage)
    light: ModelUsage = field(default_factory=ModelUsage)

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.capable + other.capable, self.light + other.light)

    def __radd__(self, other: object) -> Usage:
        # Lets `sum(usages)` start from 0.
        if other == 0:
            return self
        return NotImplemented

    @property
    def total_tokens(self) -> int:
        c, m = self.capable, self.light
        return c.prompt_tokens + c.output_tokens + m.prompt_tokens + m.output_tokens

    @property
    def cost(self) -> float:
        return self.capable.cost + self.light.cost

    @property
    def wall_s(self) -> float:
        return self.capable.wall_s + self.light.wall_s

    def to_dict(self) -> dict:
        return {"capable": asdict(self.capable), "light": asdict(self.light), "cost": self.cost}


def savings_pct(capable_output_tokens: float, baseline_capable_output_tokens: float) -> float | None:
    """M-token savings in percent against M answering alone on the same questions.

    None when the baseline spent nothing (no meaningful ratio)."""
    if baseline_capable_output_tokens <= 0:
        return None
    return 100.0 * (1.0 - capable_output_tokens / baseline_capable_output_tokens)
