"""The builtin task: chained arithmetic mod 10, the embedded pair's home ground.

A question names a start digit and 3 to 10 operations (`+d`, `-d`, `*d`, all mod 10), each
used at most once per question. Solving it needs the chain of intermediate results: a model
that has to answer in one go can only guess (about 1 in 10), a model that writes one line
per step (`7+5=2`) gets it right. That is the DUET setting in miniature: M's reasoning is what
makes the answer possible, and m only needs enough of it.

Like a real reasoning model's, M's training traces carry redundancy in a varying amount
(re-checks of the step just taken, restatements of the running value), so M's thinking is about two
to three times what is essential; that surplus is what the length-penalized training learns
to drop. `essential_signal` gives the trace without it, which defines the task's floor.

    >>> problem = ChainProblem(7, (("+", 5), ("*", 3), ("-", 8)))
    >>> problem.question
    'Start at 7, then +5, *3, -8 (mod 10). What is the result?'
    >>> problem.essential_lines
    ['7+5=2', '2*3=6', '6-8=8']
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

OPERATIONS: tuple[tuple[str, int], ...] = (
    tuple(("+", d) for d in range(1, 10))
    + tuple(("-", d) for d in range(1, 10))
    + tuple(("*", d) for d in range(2, 10))
)
MIN_STEPS, MAX_STEPS = 3, 10
REDUNDANCY_RANGE = (1.0, 2.5)  # extra lines per step, drawn per trace: ~2.5x the essential tokens
TEST_FRACTION_BUCKETS = 5  # one question in 5 (by hash) belongs to the test split


def apply(value: int, op: str, operand: int) -> int:
    if op == "+":
        return (value + operand) % 10
    if op == "-":
        return (value - operand) % 10
    return (value * operand) % 10


@dataclass(frozen=True)
class ChainProblem:
    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def question(self) -> str:
        chain = ", ".join(f"{op}{d}" for op, d in self.ops)
        return f"Start at {self.start}, then {chain} (mod 10). What is the result?"

    @property
    def values(self) -> list[int]:
        values = [self.start]
        for op, d in self.ops:
            values.append(apply(values[-1], op, d))
        return values

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def essential_lines(self) -> list[str]:
        values = self.values
        return [f"{values[i]}{op}{d}={values[i + 1]}" for i, (op, d) in enumerate(self.ops)]

    @property
    def id(self) -> str:
        return hashlib.sha256(self.question.encode()).hexdigest()[:12]

    @property
    def split(self) -> str:
        return "test" if int(self.id, 16) % TEST_FRACTION_BUCKETS == 0 else "train"


def essential_signal(problem: ChainProblem, drop_last: int = 0) -> str:
    """The reasoning without redundancy, minus the last `drop_last` steps."""
    lines = problem.essential_lines
    return "\n".join(lines[: max(len(lines) - drop_last, 0)])


def reasoning_lines(problem: ChainProblem, rng: random.Random, redundancy: float) -> list[tuple[str, bool]]:
    """M-style thinking: every essential step, each followed by up to three redundant lines (a
    re-check of the step just taken, or the running value restated), each with probability
    redundancy/3, so `redundancy` is the mean number of extra lines per step. Returns
    (line, is_essential) pairs."""
    values, essential = problem.values, problem.essential_lines
    lines: list[tuple[str, bool]] = []
    for step, line in enumerate(essential):
        lines.append((line, True))
        for _ in range(3):
            if rng.random() < redundancy / 3:
                extra = f"check {line}" if rng.random() < 0.5 else f"so far {values[step + 1]}"
                lines.append((extra, False))
    return lines


def write_up_parts(problem: ChainProblem) -> list[tuple[str, bool]]:
    """The final write-up, as reasoning models write one: it restates the last step and boxes
    the result. (text, is_key) pieces: the key ones (the step and the answer) are what a
    model that was not shown the last step has to compute."""
    last = problem.essential_lines[-1]
    return [
        ("Last step ", False),
        (last, True),
        (". The result is \\boxed{", False),
        (str(problem.answer), True),
        ("}.", False),
    ]


def write_up(problem: ChainProblem) -> str:
    return "".join(text for text, _ in write_up_parts(problem))


def capable_target(problem: ChainProblem, rng: random.Random, redundancy: float) -> str:
    """What M is trained to write: thinking in tags, then the short write-up."""
    thinking = "\n".join(line for line, _ in reasoning_lines(problem, rng, redundancy))
    return f"<think>\n{thinking}\n</think>\n\n{write_up(problem)}"


def sample_problem(
    rng: random.Random, min_steps: int = MIN_STEPS, max_steps: int = MAX_STEPS
) -> ChainProblem:
    steps = rng.randint(min_steps, max_steps)
    return ChainProblem(rng.randrange(10), tuple(rng.sample(OPERATIONS, steps)))


def generate(
    n: int, split: str = "test", seed: int = 0, min_steps: int = MIN_STEPS, max_steps: int = MAX_STEPS
) -> list[ChainProblem]:
    """`n` distinct problems of one split, deterministic in (split, seed, steps). The splits
    are disjoint by construction: membership is a hash of the question text."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not MIN_STEPS <= min_steps <= max_steps <= MAX_STEPS:
        raise ValueError(f"need {MIN_STEPS} <= min_steps <= max_steps <= {MAX_STEPS}")
    rng = random.Random(f"{split}:{seed}:{min_steps}:{max_steps}")
    seen: set[str] = set()
    problems: list[ChainProblem] = []
    while len(problems) < n:
        problem = sample_problem(rng, min_steps, max_steps)
        if problem.split == split and problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def check(response_answer: str | None, problem: ChainProblem) -> bool:
    """Exact checker: the extracted answer is the final digit."""
    return response_answer is not None and response_answer.strip() == str(problem.answer)


def signal_tokens(signal: str, count_tokens) -> int:
    """M output tokens it takes to send `signal` in think style: `<think>\\n{signal}\\n</think>`."""
    return count_tokens(f"<think>\n{signal}\n</think>")


def floor_tokens(problem: ChainProblem, count_tokens, light_finishes: int) -> int:
    """The task's floor for one question: M tokens for the essential trace without its last
    `light_finishes` steps (those m completes reliably by itself)."""
    return signal_tokens(essential_signal(problem, drop_last=light_finishes), count_tokens)
