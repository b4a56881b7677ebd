"""The `duet` command line: a thin face over the library (docs/design.md section 3).

One module per group of commands, each registering on `duetlm.cli.app.app`; what they share
(option types, the backend options of M and m, the DuetConfig of a run) is in `options`.
Errors of the library (`DuetError`) are printed as one red line with exit code 2, never as a
traceback.
"""

from __future__ import annotations

from duetlm.cli import evaluate, models, serve, solve, train  # noqa: F401  (each registers its commands)
from duetlm.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    app()
