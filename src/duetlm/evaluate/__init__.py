"""Evaluation: methods × tasks × samples into a resumable store, then tables and plots."""

from duetlm.evaluate.report import REPORT_KEYS, load_summaries, markdown, plot
from duetlm.evaluate.runner import EvalConfig, run_eval

__all__ = ["REPORT_KEYS", "EvalConfig", "load_summaries", "markdown", "plot", "run_eval"]
