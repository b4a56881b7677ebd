"""The builtin task's generator, splits, traces and checker."""

from __future__ import annotations

import random

import pytest

from duetlm.tasks import builtin
from duetlm.tasks.builtin import ChainProblem


def test_generation_is_deterministic():
    assert builtin.generate(50, "test", seed=3) == builtin.generate(50, "test", seed=3)
    assert builtin.generate(50, "test", seed=3) != builtin.generate(50, "test", seed=4)


def test_splits_are_disjoint_and_labelled():
    test = {p.question for p in builtin.generate(500, "test")}
    train = {p.question for p in builtin.generate(2000, "train")}
    assert not test & train
    assert len(test) == 500 and len(train) == 2000
    assert all(p.split == "test" for p in builtin.generate(100, "test"))


@pytest.mark.parametrize(("low", "high"), [(3, 3), (3, 10), (7, 10)])
def test_difficulty_knob(low, high):
    steps = {len(p.ops) for p in builtin.generate(200, "train", min_steps=low, max_steps=high)}
    assert steps <= set(range(low, high + 1)) and min(steps) == low and max(steps) == high


@pytest.mark.parametrize("bad", [{"split": "dev"}, {"min_steps": 2}, {"min_steps": 5, "max_steps": 4}])
def test_bad_generator_arguments(bad):
    with pytest.raises(ValueError):
        builtin.generate(5, **({"split": "test"} | bad))


def test_arithmetic_and_essential_trace():
    problem = ChainProblem(7, (("+", 5), ("*", 3), ("-", 8), ("+", 9)))
    assert problem.values == [7, 2, 6, 8, 7]
    assert problem.answer == 7
    assert builtin.essential_signal(problem) == "7+5=2\n2*3=6\n6-8=8\n8+9=7"
    assert builtin.essential_signal(problem, drop_last=2) == "7+5=2\n2*3=6"
    assert builtin.essential_signal(problem, drop_last=9) == ""


def test_traces_hold_every_essential_step_in_order_plus_redundancy():
    rng = random.Random(0)
    for problem in builtin.generate(100, "train"):
        lines = builtin.reasoning_lines(problem, rng, redundancy=2.0)
        assert [line for line, essential in lines if essential] == problem.essential_lines
        for line, essential in lines:
            if not essential:
                assert line.startswith(("check ", "so far "))
    target = builtin.capable_target(problem, rng, 1.5)
    assert target.startswith("<think>\n") and target.endswith(
        f"</think>\n\nLast step {problem.essential_lines[-1]}. The result is \\boxed{{{problem.answer}}}."
    )


def test_redundancy_zero_gives_the_essential_trace():
    problem = builtin.generate(1, "test")[0]
    lines = builtin.reasoning_lines(problem, random.Random(0), redundancy=0.0)
    assert "\n".join(line for line, _ in lines) == builtin.essential_signal(problem)


def test_checker():
    problem = ChainProblem(1, (("+", 5), ("*", 5), ("+", 6)))
    assert builtin.check("6", problem)
    assert builtin.check(" 6 ", problem)
    assert not builtin.check("7", problem)
    assert not builtin.check(None, problem)
