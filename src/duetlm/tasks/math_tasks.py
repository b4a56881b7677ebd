"""Free-form math benchmarks, graded with math-verify.

| task | hub default | fields | reference |
| --- | --- | --- | --- |
| gsm8k | openai/gsm8k (main, test), 1319 | question, answer ending "#### N" | Cobbe et al. 2021 |
| math500 | HuggingFaceH4/MATH-500 (test), 500 | problem, answer | Lightman et al. 2023 |
| aime24 | HuggingFaceH4/aime_2024 (train), 30 | problem, answer | AIME 2024 I and II |
| aime25 | math-ai/aime25 (test), 30 | problem, answer | AIME 2025 I and II |
| amc23 | math-ai/amc23 (test), 40 | problem/question, answer (a float: 27.0) | AMC 2023 |
| math_train | DigitalLearningGmbH/MATH-lighteval (train), 7500 | problem, gold boxed in solution | Hendrycks et al. 2021 |
| jsonl | (a user file) | question, answer (optional id, choices) | |

Any of them reads a differently laid out copy with a field mapping (`duetlm.tasks.fields`).
Each example keeps metadata for `duet report --by`: MATH's `level` and `subject`, the
contests' `year`.
"""

from __future__ import annotations

from dataclasses import replace

from duetlm.tasks.fields import FieldMap
from duetlm.tasks.registry import Task, register

COMPETITION = FieldMap(question="problem|question", answer="answer")
MATH_META = (("level", "level"), ("subject", "subject|type"))

register(
    Task(
        "gsm8k",
        FieldMap(answer="####:answer", id="id"),
        ("openai/gsm8k", "main", "test"),
        "grade-school math word problems",
    )
)
register(
    Task(
        "math500",
        replace(COMPETITION, meta=MATH_META),
        ("HuggingFaceH4/MATH-500", None, "test"),
        "MATH-500 competition problems",
    )
)
for name, hub, year in (
    ("aime24", ("HuggingFaceH4/aime_2024", None, "train"), 2024),
    ("aime25", ("math-ai/aime25", None, "test"), 2025),
    ("amc23", ("math-ai/amc23", None, "test"), 2023),
):
    register(Task(name, COMPETITION, hub, f"{name[:-2].upper()} {year}", constants=(("year", year),)))
register(
    Task(
        "math_train",
        FieldMap(question="problem", answer="boxed:solution", meta=MATH_META),
        ("DigitalLearningGmbH/MATH-lighteval", None, "train"),
        "MATH's 7,500 training problems (for training; MATH-500 comes from its test set)",
    )
)
register(Task("jsonl", FieldMap(choices="choices?"), None, "a user file with question and answer fields"))
