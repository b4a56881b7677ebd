"""Registry entry of the builtin task (see `duetlm.tasks.builtin` for the task itself)."""

from __future__ import annotations

from duetlm.errors import ConfigError
from duetlm.tasks import builtin
from duetlm.tasks.registry import Example, Task, TaskExamples, register

DEFAULT_SIZE = 1000


def load(
    data=None,
    n: int = DEFAULT_SIZE,
    seed: int = 0,
    split: str = "test",
    min_steps: int = 3,
    max_steps: int = 10,
):
    if data is not None:
        raise ConfigError("the builtin task is generated from a seed; it takes no --data")
    try:
        problems = builtin.generate(n, split=split, seed=seed, min_steps=min_steps, max_steps=max_steps)
    except ValueError as exc:
        raise ConfigError(f"builtin task: {exc}") from None
    examples = [Example(p.id, p.question, str(p.answer), meta={"steps": len(p.ops)}) for p in problems]
    return TaskExamples("builtin", examples, f"generated (split={split}, seed={seed}, n={n})")


register(Task("builtin", description="chained arithmetic mod 10 (the embedded pair's task)", loader=load))
