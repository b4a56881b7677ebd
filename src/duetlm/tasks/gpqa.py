"""GPQA-Diamond (Rein et al. 2023): 198 graduate-level multiple-choice questions.

Never shipped: its authors ask that the questions not be published in plain text. Read from a
local CSV of the official release (`gpqa_diamond.csv`: Question, Correct Answer, Incorrect
Answer 1-3) or from the gated hub dataset Idavidrein/gpqa (config gpqa_diamond) that a user
has access to. The four options are shuffled with a seed (recorded in each example's meta),
so the gold letter is uniform over A-D.
"""

from __future__ import annotations

import random
from pathlib import Path

from duetlm.tasks.fields import read_text
from duetlm.tasks.registry import Example, Task, TaskExamples, hub_rows, read_rows, register

HUB = ("Idavidrein/gpqa", "gpqa_diamond", "train")
LETTERS = "ABCD"


def normalize(location: str, row: dict, index: int, seed: int) -> Example:
    question = read_text(location, row, "Question", "question")
    correct = read_text(location, row, "Correct Answer", "answer")
    wrong = [read_text(location, row, f"Incorrect Answer {i}", "choices") for i in (1, 2, 3)]
    options = [correct, *wrong]
    random.Random(f"{seed}:{index}").shuffle(options)
    gold = LETTERS[options.index(correct)]
    ident = str(row.get("Record ID") or index)
    return Example(ident, question.strip(), gold, tuple(options), meta={"shuffle_seed": seed})


def load(data=None, seed: int = 0, split: str | None = None) -> TaskExamples:
    rows = (
        read_rows(Path(data))
        if data is not None
        else hub_rows(HUB[0], HUB[1], split or HUB[2], "gpqa_diamond")
    )
    source = str(data) if data is not None else HUB[0]
    return TaskExamples(
        "gpqa_diamond", [normalize(loc, row, i, seed) for i, (loc, row) in enumerate(rows)], source
    )


register(Task("gpqa_diamond", hub=HUB, description="GPQA-Diamond", multiple_choice=True, loader=load))
