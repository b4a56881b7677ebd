"""Named tasks: a registry of loaders that normalize a benchmark to `Example`s, plus grading.

    load_task("gsm8k")                      # from the Hugging Face hub (datasets)
    load_task("math500", data="test.jsonl") # from a local JSONL / parquet / CSV file
    load_task("builtin")                    # the embedded pair's synthetic task
    load_task("jsonl:my_questions.jsonl")   # any file with `question` and `answer` fields

Each task file says where its data comes from; none ships benchmark questions.
"""

from __future__ import annotations

from duetlm.tasks.registry import TASKS, Example, Task, TaskExamples, grade, load_task

__all__ = ["TASKS", "Example", "Task", "TaskExamples", "grade", "load_task"]
