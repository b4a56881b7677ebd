"""duetlm: DUET two-stage reasoning (arXiv 2605.01111).

A capable model M thinks and hands its reasoning (the *signal*) to a light model m, which
writes the answer. See `Duet` for inference, `DuetConfig` for every knob.
"""

from duetlm.backends import BackendOptions, load_backend
from duetlm.config import DuetConfig, PromptConfig
from duetlm.errors import BackendError, ConfigError, DuetError, GenerationError, InputError
from duetlm.protocol import Duet, Mode, Problem, SolveResult, parse_mode
from duetlm.usage import ModelUsage, Price, Usage

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BackendOptions",
    "ConfigError",
    "Duet",
    "DuetConfig",
    "DuetError",
    "GenerationError",
    "InputError",
    "Mode",
    "ModelUsage",
    "Price",
    "Problem",
    "PromptConfig",
    "SolveResult",
    "Usage",
    "load_backend",
    "parse_mode",
]
