"""`duet serve`: DUET behind an OpenAI-compatible chat completions endpoint."""

from duetlm.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
