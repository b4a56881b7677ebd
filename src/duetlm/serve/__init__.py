"""`duet serve`: DUET behind an OpenAI-compatible chat completions endpoint.

The app needs fastapi (the `serve` extra); it is imported when first asked for, so the
batcher and schemas import without it.
"""

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str):
    if name in __all__:
        from duetlm.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'duetlm.serve' has no attribute {name!r}")
