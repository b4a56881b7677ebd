"""What a training step rolls out, with every row's place said explicitly.

A step's questions carry their positions in the step's global batch, and every sampled row
carries its question, its signal and its answer index. Scores, advantages and masks are
looked up by those indices, never recovered from a row's offset in a flat question-major
list, so sharding a batch over processes or reordering rows cannot misplace a reward.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch

from duetlm.tasks import Example
from duetlm.train.rollouts.sequences import Sequences


@dataclass(frozen=True)
class StepQuestions:
    """This process's questions of one step. `positions` are their places in the step's
    global batch: the seeds of their samples derive from them, so a question draws the same
    samples whichever process rolls it out."""

    step: int
    examples: list[Example]
    positions: list[int]

    def __len__(self) -> int:
        return len(self.examples)


def sample_seed(seed: int, step: int, role: str, position: int, signal: int = 0, answer: int = 0) -> int:
    """The sampling seed of one rollout: a function of what it is, not of where it runs or
    what is batched with it (so N processes draw what one does, and a resumed run repeats the
    step it lost)."""
    key = f"{seed}:{step}:{role}:{position}:{signal}:{answer}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class RolloutBatch:
    """One model's sampled rows. `question` indexes this process's questions of the step,
    `signal` the question's signals (M's rows: the row's own signal; m's rows: the signal it
    read), `answer` m's answers to that signal (0 on M's rows). `engine_logps` (B, T-1) holds
    the log-probs the rollout engine sampled each token with, aligned with the completion mask
    (NaN where the engine gave none: tokens the trainer inserted, or when not asked for).
    `advantages` (B,) and `old_logps` (B, T-1) are set once the step has scored the rows, and
    with them, when the step uses them, `ref_logps` (B, T-1: the initial M's, for a KL term in
    the loss) and `is_weights` (B, T-1: the rollout correction's)."""

    seqs: Sequences
    question: torch.Tensor  # (B,) long
    signal: torch.Tensor  # (B,) long
    answer: torch.Tensor  # (B,) long
    advantages: torch.Tensor | None = None
    old_logps: torch.Tensor | None = None
    engine_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None

    @staticmethod
    def of(
        seqs: Sequences,
        keys: list[tuple[int, int, int]],
        engine_logps: list[list[float] | None] | None = None,
    ) -> RolloutBatch:
        """Rows in the order of `keys`, each (question, signal, answer), with the engine's
        log-probs of each row's sampled tokens when known."""
        index = torch.tensor(keys, dtype=torch.long).reshape(len(keys), 3)
        aligned = None
        if engine_logps is not None and any(row is not None for row in engine_logps):
            aligned = torch.full(seqs.completion_mask.shape, float("nan"))
            for row, values in enumerate(engine_logps):
                positions = seqs.completion_mask[row].nonzero().flatten()[: len(values or [])]
                if values:
                    aligned[row, positions] = torch.tensor(values[: len(positions)])
        return RolloutBatch(seqs, index[:, 0], index[:, 1], index[:, 2], engine_logps=aligned)

    def __len__(self) -> int:
        return len(self.seqs)

    def with_scores(
        self,
        advantages: torch.Tensor,
        old_logps: torch.Tensor | None,
        ref_logps: torch.Tensor | None = None,
        is_weights: torch.Tensor | None = None,
    ) -> RolloutBatch:
        return replace(
            self, advantages=advantages, old_logps=old_logps, ref_logps=ref_logps, is_weights=is_weights
        )

    def with_seqs(self, seqs: Sequences) -> RolloutBatch:
        return replace(self, seqs=seqs)

    def take(self, rows: torch.Tensor) -> RolloutBatch:
        """The given rows, padding columns none of them uses cut off (`Sequences.take`)."""
        seqs = self.seqs.take(rows)
        width = seqs.completion_mask.shape[1]

        def cut(table: torch.Tensor | None) -> torch.Tensor | None:
            return None if table is None else table[rows, :width]

        return RolloutBatch(
            seqs,
            self.question[rows],
            self.signal[rows],
            self.answer[rows],
            None if self.advantages is None else self.advantages[rows],
            cut(self.old_logps),
            cut(self.engine_logps),
            cut(self.ref_logps),
            cut(self.is_weights),
        )

    def logprob_gap(self, trainer_logps: torch.Tensor) -> float:
        """Largest |engine log-prob − trainer log-prob| over the sampled tokens the engine
        scored (0 up to numerics when the engine holds the trained weights)."""
        if self.engine_logps is None:
            return 0.0
        known = ~torch.isnan(self.engine_logps) & self.seqs.completion_mask.bool()
        if not bool(known.any()):
            return 0.0
        return float((self.engine_logps[known] - trainer_logps[known]).abs().max())

    def question_rows(self) -> list[torch.Tensor]:
        """The rows of each question, questions in index order: GRPO's groups, which the
        update keeps together."""
        return [(self.question == q).nonzero().flatten() for q in torch.unique(self.question).tolist()]

    def grid(self, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Per-row values laid out by index: (Q, S) for M's rows, (Q, S, A) for m's."""
        out = torch.zeros(shape, dtype=values.dtype)
        if len(shape) == 2:
            out[self.question, self.signal] = values
        else:
            out[self.question, self.signal, self.answer] = values
        return out

    def per_row(self, table: torch.Tensor) -> torch.Tensor:
        """A (Q, S) or (Q, S, A) table read at each row's place: (B,)."""
        if table.dim() == 2:
            return table[self.question, self.signal]
        return table[self.question, self.signal, self.answer]
