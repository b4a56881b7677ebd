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

import logging
from collections.abc import Callable
from pathlib import Path

from duetlm.errors import ConfigError

logger = logging.getLogger(__name__)

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


EMBEDDED_BUDGETS = {"signal_max_tokens": 384, "answer_max_tokens": 64, "forced_answer_max_tokens": 24}
"""Token budgets that fit the embedded models' 512 positions: builtin prompts take at most 53
tokens, so M-alone's 384 + 64 leaves room; the longest M trace is about 250 tokens, and M's
write-up (`Last step 8+9=7. The result is \\boxed{7}.`) about 15, which M@B's forced answer
budget of 24 allows. (The general defaults, 4,096 + 1,024 + 128, are for real reasoning
models.)"""


def budget_defaults(*specs: str) -> dict[str, int]:
    """The default budgets for a run of these model specs: the embedded pair's when every
    model is embedded, else none (DuetConfig's own)."""
    return dict(EMBEDDED_BUDGETS) if specs and all(s.strip() in EMBEDDED for s in specs) else {}


def family_of(spec: str) -> str | None:
    """The catalog family of the model a spec names (`hf:qwen2.5-coder-1.5b` and
    `llamacpp:qwen2.5-coder-1.5b` alike), or None for any other model."""
    from duetlm.models.catalog import MODELS

    _, sep, rest = spec.strip().partition(":")
    name = rest if sep else spec.strip()
    return MODELS[name].family if name in MODELS else None


def config_defaults(capable: str = "tiny-M", light: str = "tiny-m", *more: str):
    """The DuetConfig a run of these models gets when it names no config file: the embedded
    pair's budgets when every model is embedded; the settings of M's family when M is a
    catalog model (its signal style, prompts and budgets: `catalog.FAMILY_DEFAULTS`); else
    DuetConfig's own defaults. A family's settings are logged once, so that a run says what
    it chose."""
    from duetlm.config import DuetConfig
    from duetlm.models.catalog import FAMILY_DEFAULTS

    budgets = budget_defaults(capable, light, *more)
    if budgets:
        return DuetConfig(**budgets)
    family = family_of(capable)
    if family in FAMILY_DEFAULTS:
        defaults = FAMILY_DEFAULTS[family]
        logger.info("%s: the %s family's defaults (%s): %s", capable, family, defaults.why, defaults.settings)
        return DuetConfig.model_validate(defaults.settings)
    return DuetConfig()


def with_model_defaults(settings):
    """A run's settings (a dict before validation) given the DuetConfig its models default to
    (`config_defaults`) when it names none; anything else as it is."""
    from duetlm.config import DuetConfig

    if not isinstance(settings, dict) or "duet" in settings:
        return settings
    config = config_defaults(settings.get("capable", "tiny-M"), settings.get("light", "tiny-m"))
    return settings if config == DuetConfig() else settings | {"duet": config.model_dump()}
