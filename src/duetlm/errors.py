"""The project's exception hierarchy.

Every failure a user can cause or meet is one of these four kinds, so the CLI maps them to one
message style and the server to one table of HTTP status codes, instead of each call site
deciding how to report.
"""

from __future__ import annotations


class DuetError(Exception):
    """Base class: anything raised on purpose by duetlm."""


class ConfigError(DuetError, ValueError):
    """A setting, model spec or option is invalid; nothing has run yet."""


class InputError(DuetError, ValueError):
    """A question, file or request is malformed; the message names what and where."""


class BackendError(DuetError, RuntimeError):
    """A model could not be loaded or a server could not be reached or refused the call."""


class GenerationError(DuetError, RuntimeError):
    """A model ran but its output cannot be used (e.g. the server returned no choices)."""
