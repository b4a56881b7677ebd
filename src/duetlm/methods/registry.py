"""Every way duetlm answers a question, registered once by name.

A method is named `KIND` or `KIND@B` (B a token budget): `duet`, `duet@256`, `M-alone`,
`m-alone`, `M@256`, `settle`, `M-settle`. `parse_mode` reads a name into a `Mode`,
`method_for` gives the `Method` that runs it, and `method_help` is the one list of them the CLI
and the server show. A new method is one module that calls `register` (and, to ship with
duetlm, one import line in `duetlm.methods`; from a package of its own, an entry point in the
group `duetlm.methods` naming that module, which is imported the first time methods are looked
up): the protocol facade, the evaluator, the server and the CLI look it up here and never
branch on a name.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from duetlm.errors import InputError

if TYPE_CHECKING:
    from duetlm.methods.base import Method


@dataclass(frozen=True)
class Mode:
    """A method's name, parsed: its kind and, for the budgeted ones, the budget B."""

    kind: str
    budget: int | None = None

    def __str__(self) -> str:
        return f"{self.kind}@{self.budget}" if self.budget is not None else self.kind


@dataclass(frozen=True)
class MethodEntry:
    """One registered method: its kind, how it takes a budget, what it does (the help line),
    and how to build it for a parsed `Mode`."""

    kind: str
    help: str
    build: Callable[[Mode], Method]
    budget: Literal["none", "optional", "required"] = "none"
    order: int = 100  # where it is listed (help, docs): the protocol first, then its baselines

    @property
    def forms(self) -> list[str]:
        return {
            "none": [self.kind],
            "optional": [self.kind, f"{self.kind}@B"],
            "required": [f"{self.kind}@B"],
        }[self.budget]


logger = logging.getLogger(__name__)
PLUGIN_GROUP = "duetlm.methods"
REGISTRY: dict[str, MethodEntry] = {}
_plugins_loaded = False


def load_plugins() -> None:
    """Import every module that an installed package names in the `duetlm.methods` entry point
    group (its import registers its methods); once per process. A plugin that fails to import
    is named in a warning and left out, so that one broken package does not stop every command."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for point in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            point.load()
        except Exception as exc:  # a third party's import error, whatever its type
            logger.warning("the method plugin %s (%s) did not load: %s", point.name, point.value, exc)


_NAME = re.compile(r"^(?P<kind>[A-Za-z][\w-]*?)(?:@(?P<budget>-?\d+))?$")


def register(entry: MethodEntry) -> MethodEntry:
    """Add a method (a kind registered twice is an error: two methods would answer to one name)."""
    if entry.kind in REGISTRY and REGISTRY[entry.kind] != entry:
        raise ValueError(f"a method {entry.kind!r} is registered already")
    REGISTRY[entry.kind] = entry
    return entry


def unregister(kind: str) -> None:
    REGISTRY.pop(kind, None)


def parse_mode(text: str | Mode) -> Mode:
    """A method's name as a `Mode`; anything else is an error listing the methods."""
    if isinstance(text, Mode):
        return text
    load_plugins()
    match = _NAME.match(text or "")
    entry = REGISTRY.get(match.group("kind")) if match else None
    budget = int(match.group("budget")) if match and match.group("budget") is not None else None
    if entry is not None:
        if budget is None and entry.budget != "required":
            return Mode(entry.kind)
        if budget is not None and budget > 0 and entry.budget != "none":
            return Mode(entry.kind, budget)
    raise InputError(f"unknown mode {text!r}: use {', '.join(forms())} with B a positive token budget")


def method_for(mode: str | Mode) -> Method:
    """The method that runs a name."""
    parsed = parse_mode(mode)
    return REGISTRY[parsed.kind].build(parsed)


def entries() -> list[MethodEntry]:
    load_plugins()
    return sorted(REGISTRY.values(), key=lambda entry: entry.order)


def forms() -> list[str]:
    return [form for entry in entries() for form in entry.forms]


def method_help(lead: str) -> str:
    """One help line listing every registered method's forms."""
    return f"{lead}: {', '.join(forms())} (B: a token budget)."


def method_table() -> list[tuple[str, str]]:
    """(forms, what it does) for every method, for docs and `--help`."""
    return [(" / ".join(entry.forms), entry.help) for entry in entries()]
