"""The questions of a run: training ones in a fresh order every pass, held-out evaluation ones,
and no question in both."""

from __future__ import annotations

import logging
import random

from duetlm.errors import ConfigError
from duetlm.tasks import Example, load_task
from duetlm.train.config import TrainConfig
from duetlm.train.rollouts.batch import StepQuestions

logger = logging.getLogger(__name__)


def normalized(question: str) -> str:
    return " ".join(question.lower().split())


class TrainingData:
    """`examples` to train on (the evaluation set's questions removed), `evaluation` (the
    first `evaluation.questions` of the held-out set) and `held_out` (all of it, normalized)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        every_held_out = self._held_out_examples()
        self.held_out = {normalized(e.question) for e in every_held_out}
        self.evaluation = self._evaluation_examples()
        self.examples = self._training_examples()
        self.training_questions = {normalized(e.question) for e in self.examples}
        self._order: tuple[int, list[int]] = (-1, [])  # (pass over the data, its order)

    def _evaluation_examples(self) -> list[Example]:
        cfg = self.cfg
        if cfg.data.eval_task is None:  # the builtin task's test split
            return list(load_task("builtin", split="test", n=cfg.evaluation.questions))
        examples = list(load_task(cfg.data.eval_task, cfg.data.eval_data, split=cfg.data.eval_split))
        return examples[: cfg.evaluation.questions]

    def _held_out_examples(self) -> list[Example]:
        cfg = self.cfg
        if cfg.data.eval_task is None:
            return list(load_task("builtin", split="test", n=max(cfg.evaluation.questions, 1000)))
        return list(load_task(cfg.data.eval_task, cfg.data.eval_data, split=cfg.data.eval_split))

    def _training_examples(self) -> list[Example]:
        cfg, data = self.cfg, self.cfg.data
        if data.task == "builtin":
            n = max(cfg.steps * cfg.objective.questions_per_step, 1000)
            examples = list(load_task("builtin", split=data.split or "train", n=n, seed=cfg.seed))
        else:
            examples = list(load_task(data.task, data.data, fields=data.fields or None, split=data.split))
        kept = [e for e in examples if normalized(e.question) not in self.held_out]
        if len(kept) < len(examples):
            logger.warning(
                "dropped %d training questions that the evaluation set also holds", len(examples) - len(kept)
            )
        if not kept:
            raise ConfigError(
                f"task {data.task}: no training question is left once the evaluation set is removed"
            )
        return kept

    def is_training_question(self, question: str) -> bool:
        key = normalized(question)
        return key in self.training_questions and key not in self.held_out

    def questions(self, step: int, position: int, rank: int, world: int) -> StepQuestions:
        """This process's share of the batch that starts at data `position`. The position is
        global; each pass over the data has its own order, from the seed and the pass number
        (so resuming repeats it)."""
        n, examples = self.cfg.objective.questions_per_step, self.examples
        batch = []
        for offset in range(n):
            epoch, index = divmod(position + offset, len(examples))
            if self._order[0] != epoch:
                order = list(range(len(examples)))
                random.Random(f"{self.cfg.seed}:epoch:{epoch}").shuffle(order)
                self._order = (epoch, order)
            batch.append(examples[self._order[1][index]])
        positions = list(range(rank, n, world))
        return StepQuestions(step, [batch[p] for p in positions], positions)
