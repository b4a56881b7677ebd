"""Every way duetlm answers a question: one `Method` per kind, registered by name
(`registry`). The built-in ones are the modules imported below; adding one is a module that
calls `register` and a line here (or, outside duetlm, any import that runs its `register`)."""

from duetlm.methods import alone, settle, two_stage  # noqa: F401  (each registers its methods)
from duetlm.methods.base import Method
from duetlm.methods.registry import (
    REGISTRY,
    MethodEntry,
    Mode,
    forms,
    method_for,
    method_help,
    method_table,
    parse_mode,
    register,
    unregister,
)

__all__ = [
    "REGISTRY",
    "Method",
    "MethodEntry",
    "Mode",
    "forms",
    "method_for",
    "method_help",
    "method_table",
    "parse_mode",
    "register",
    "unregister",
]
