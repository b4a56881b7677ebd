"""Evaluation: methods × questions, graded, aggregated into comparable rows."""

from duetlm.evaluate.compare import MethodSummary, compare_methods

__all__ = ["MethodSummary", "compare_methods"]
