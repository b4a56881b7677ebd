"""Every way duetlm answers a question, named once.

`METHODS` lists each method's form and what it runs; the CLI's help, the docs' table and the
mode parser read it from here."""

from __future__ import annotations

METHODS: dict[str, str] = {
    "duet": "M writes the signal, m answers from it",
    "M-alone": "M thinks and answers by itself",
    "m-alone": "m thinks and answers by itself",
    "duet@B": "duet with M's signal cut at B tokens",
    "M@B": "M alone with a thinking budget of B tokens",
    "settle": "duet, M stopped once m's answers probed from its reasoning so far agree",
    "M-settle": "M alone, stopped once its own probed answers agree",
}


def method_help(lead: str) -> str:
    """A one-line help text listing every method's form."""
    return f"{lead}: {', '.join(METHODS)} (B: a token budget)."
