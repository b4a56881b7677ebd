"""Methods are a registry: a new one is a module of its own, seen by `duet eval`, the CLI's
help and the server without another file changed; what a method needs from a backend is
refused when it starts, from what the backend declares."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import openai
import pytest
from test_serve import start_server

from conftest import QUESTIONS
from duetlm.backends.openai import OpenAIBackend
from duetlm.config import DuetConfig, SettleConfig
from duetlm.errors import BackendError
from duetlm.methods import forms, method_for, parse_mode, unregister
from duetlm.protocol import Duet
from duetlm.serve import ServeConfig

PLUGIN = '''
"""A method from a package of its own: m answers alone, under another name."""
from duetlm.methods.alone import Alone
from duetlm.methods.registry import MethodEntry, Mode, register


class LightFirst(Alone):
    def __init__(self, mode: Mode) -> None:
        super().__init__(Mode("m-alone"))
        self.mode = mode


register(MethodEntry("m-first", "m answers alone (a method a plugin registered)", LightFirst))
'''


@pytest.fixture
def plugin(tmp_path):
    """A package on a path of its own: its module and its entry point in `duetlm.methods`."""
    (tmp_path / "throwaway_method.py").write_text(textwrap.dedent(PLUGIN))
    info = tmp_path / "throwaway_method-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: throwaway-method\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[duetlm.methods]\nm-first = throwaway_method\n")
    return tmp_path


def run_duet(plugin_path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(plugin_path), "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "duetlm.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_a_plugin_method_reaches_the_help_eval_and_the_server(
    plugin, tmp_path, capable_backend, light_backend
):
    helped = run_duet(plugin, "eval", "--help")
    assert helped.returncode == 0 and "m-first" in helped.stdout
    out = tmp_path / "run"
    done = run_duet(
        plugin, "eval", "--task", "builtin", "--limit", "2", "--methods", "m-first,M-alone", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted({row["method"] for row in rows}) == ["M-alone", "m-first"]
    first = [row for row in rows if row["method"] == "m-first"]
    assert all(
        row["usage"]["capable"]["output_tokens"] == 0 and row["usage"]["light"]["output_tokens"] > 0
        for row in first
    )

    sys.path.insert(0, str(plugin))
    try:
        import throwaway_method  # noqa: F401  (registers m-first in this process)

        assert "m-first" in forms()
        duet = Duet(capable_backend, light_backend, DuetConfig(signal_max_tokens=80, answer_max_tokens=40))
        server, thread, url = start_server(duet, ServeConfig())
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            reply = client.chat.completions.create(
                model="duet",
                messages=[{"role": "user", "content": QUESTIONS[0]}],
                extra_body={"duet": {"mode": "m-first"}},
            )
            usage = reply.usage.model_extra["duet"]
            assert reply.model_extra["duet"]["mode"] == "m-first"
            assert usage["capable"]["output_tokens"] == 0 and usage["light"]["output_tokens"] > 0
        finally:
            server.should_exit = True
            thread.join(timeout=30)
    finally:
        unregister("m-first")
        sys.path.remove(str(plugin))
        sys.modules.pop("throwaway_method", None)


def test_every_built_in_method_answers_to_its_name():
    assert forms() == ["duet", "duet@B", "M-alone", "m-alone", "M@B", "settle", "M-settle"]
    for name in ("duet", "duet@64", "M-alone", "m-alone", "M@64", "settle", "M-settle"):
        assert str(method_for(name)) == name == str(parse_mode(name))


def test_settle_min_prob_over_an_openai_server_is_refused_before_any_work():
    """An OpenAI-compatible server's replies carry no log-probabilities that duetlm reads, so
    `min_prob` could never hold: settle would probe to M's end and settle nothing. Refused at
    once, though the backend has a `tokenizer` attribute (nothing listens at its URL: no request
    is ever sent)."""
    light = OpenAIBackend("m", "http://127.0.0.1:9/v1", max_retries=0)
    config = DuetConfig(settle=SettleConfig(min_prob=0.9))
    duet = Duet(light, light, config)
    with pytest.raises(BackendError, match=r"settle with settle.min_prob needs per-token log-probabilities"):
        duet.solve("What is 2+2?", "settle")
