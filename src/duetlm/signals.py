"""Where M's signal ends, and how m is handed it: one `SignalStyle` per `signal_style`
(docs/design.md section 1).

- `think`: M reasons inside think tags and is stopped at the close tag; the thinking is the
  signal, and m's turn starts with it inside the tags (`prompts.light_prefill`).
- `answer`: for models that reason and answer in one turn without tags (Qwen2.5-Instruct,
  most chat models): M is stopped at its answer marker (`prompts.answer_markers`: `\\boxed`,
  "the final answer is", ...), its reasoning so far is the signal, and m continues that text
  and writes the answer (`prompts.answer_prefill`).
- `sketch`: M is asked for a solution sketch without the answer; its whole output is the
  signal.

The style is also the one place that decides whether M *closed* its signal (reached the close
tag or a marker). An M that ends its turn without doing so did not hand anything over: its
whole answer became the signal, nothing was saved, and m may just copy M's answer. Such
results are flagged `open_signal` and `Duet` says so (a model without think tags run in the
`think` style is the usual cause).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from duetlm.backends.base import GenerationResult

if TYPE_CHECKING:
    from duetlm.config import DuetConfig


def split_thinking(text: str, think_open: str, think_close: str) -> tuple[str | None, str]:
    """(thinking, rest) of a reasoning model's output. thinking is None when the close tag never
    came; the open tag is optional because some chat templates write it into the prompt."""
    head, closed, rest = text.partition(think_close)
    if not closed:
        return None, text
    _, opened, after_open = head.partition(think_open)
    return (after_open if opened else head).strip(), rest.strip()


def signal_from_stage1(text: str, think_open: str) -> str:
    """The signal in a stage-1 output that was stopped at the close tag (or cut by the budget):
    everything after the open tag, whitespace stripped."""
    _, opened, after = text.partition(think_open)
    return (after if opened else text).strip()


def first_marker(text: str, markers: tuple[str, ...]) -> int | None:
    """Where the earliest answer marker starts in `text`, or None."""
    found = [index for index in (text.find(m) for m in markers if m) if index >= 0]
    return min(found) if found else None


@dataclass(frozen=True)
class SignalStyle:
    """How one style delimits the signal. `config` is the DuetConfig it reads its templates from."""

    config: DuetConfig

    @property
    def name(self) -> str:
        return self.config.signal_style

    @property
    def sketch(self) -> bool:
        return self.name == "sketch"

    def stops(self) -> tuple[str, ...]:
        """Where M's first stage stops (besides its end of turn and its budget)."""
        prompts = self.config.prompts
        if self.name == "think":
            return (prompts.think_close,)
        if self.name == "answer":
            return tuple(prompts.answer_markers)
        return ()

    def signal(self, result: GenerationResult) -> str:
        """The signal in a first-stage result."""
        if "reasoning" in result.extra:  # a server that parses thinking out of the content
            return str(result.extra["reasoning"]).strip()
        if self.name == "think":
            return signal_from_stage1(result.text, self.config.prompts.think_open)
        return result.text.strip()

    def closed(self, result: GenerationResult) -> bool:
        """Whether M ended its signal where this style says a signal ends (the close tag, an
        answer marker), rather than by ending its turn or running out of budget."""
        if "reasoning" in result.extra:
            return True  # the server found the close tag itself
        if self.name == "sketch":
            return result.finish_reason in ("eos", "stop")
        return result.finish_reason == "stop" and result.stop_string in self.stops()

    def open_signal(self, result: GenerationResult) -> bool:
        """M ended its turn without closing its signal: it handed its whole answer over."""
        return not self.closed(result) and result.finish_reason != "length" and not self.sketch

    def prefill(self, signal: str) -> str:
        """m's turn, started with the signal; m continues it and writes the answer."""
        prompts = self.config.prompts
        template = prompts.answer_prefill if self.name == "answer" else prompts.light_prefill
        return template.replace("{signal}", signal)

    def close(self, signal: str) -> str:
        """A turn started with a signal and closed so that the answer must come at once: a
        settle probe, and M@B's turn after its budget cut the thinking."""
        prompts = self.config.prompts
        if self.name == "answer":
            return prompts.answer_close.replace("{signal}", signal)
        return prompts.light_prefill.replace("{signal}", signal)

    def budget_close(self, signal: str) -> str:
        """M@B: M's own turn after its thinking was cut at the budget (budget forcing)."""
        if self.name == "answer":
            return self.close(signal)
        return self.config.prompts.budget_close.replace("{signal}", signal)

    def reasoning_in(self, text: str) -> str | None:
        """The reasoning inside a whole answer of M (M-alone's text): what M would have handed
        over at the hand-over point. None when the answer holds no hand-over point (no close
        tag; no answer marker), so that nothing is taken for a signal that M never closed."""
        prompts = self.config.prompts
        if self.name == "answer":
            at = first_marker(text, tuple(prompts.answer_markers))
            return text[:at].strip() if at is not None else None
        thinking, _ = split_thinking(text, prompts.think_open, prompts.think_close)
        return thinking

    def as_written(self, signal: str) -> str:
        """The signal as M wrote it, tags included: what M's output tokens up to the hand-over
        spell (for counting the tokens of a cut)."""
        if self.name == "think":
            prompts = self.config.prompts
            return f"{prompts.think_open}\n{signal}\n{prompts.think_close}"
        return signal


def style_of(config: DuetConfig) -> SignalStyle:
    return SignalStyle(config)
