"""The embedded default model pair that ships inside the package.

Names usable wherever a model spec is expected (`--capable tiny-M`):
    tiny-M   the capable model M, trained by supervised learning on full reasoning traces
    tiny-m   the light model m, trained to finish from a partial signal
    duet-M   tiny-M after joint DUET training (shorter signals)
    duet-m   tiny-m after the same joint training (used to the shorter signals)
They are small models trained on the synthetic builtin task only; their numbers are never
results on real LLMs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from duetlm.errors import ConfigError

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def _asset(name: str) -> Callable[[], Path]:
    def locate() -> Path:
        path = ASSETS / name
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"the embedded model {name!r} is not in this installation ({path}); "
                "rebuild it with `duet pretrain-pair` or pass --capable/--light explicitly"
            )
        return path

    return locate


EMBEDDED: dict[str, Callable[[], Path]] = {
    "tiny-M": _asset("tiny-M"),
    "tiny-m": _asset("tiny-m"),
    "duet-M": _asset("duet-M"),
    "duet-m": _asset("duet-m"),
}
