"""The README and docs/ say what is true: links resolve, and the README's examples that run on
the embedded pair give what it says they give."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
QUESTION_7 = "Start at 7, then +5, *3, -8 (mod 10). What is the result?"
QUESTION_3 = "Start at 3, then +4, *2, -5 (mod 10). What is the result?"


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings (outside code blocks)."""
    found, in_code = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def code_blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_image_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert anchor in anchors(resolved), f"{page.name}: no heading #{anchor} in {resolved.name}"


def test_the_readme_is_a_landing_page():
    assert (ROOT / "README.md").stat().st_size < 10_000


def test_every_design_section_cited_in_the_code_exists():
    sections = {m for m in re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "design.md").read_text(), flags=re.M)}
    cited = set()
    for path in [
        *(ROOT / "src").rglob("*.py"),
        *(ROOT / "bench").glob("*.py"),
        *(ROOT / "tests").glob("*.py"),
    ]:
        cited |= set(re.findall(r"docs/design\.md,? section (\d+)", path.read_text()))
        assert "DESIGN " + "section" not in path.read_text(), path  # the old name of docs/design.md
    assert cited and cited <= sections


def test_the_readme_solve_example_gives_its_answer():
    (block,) = [
        b for b in code_blocks(ROOT / "README.md", "bash") if b.startswith(f'duet solve "{QUESTION_7}')
    ]
    command = shlex.split(block.splitlines()[0])
    assert command[:2] == ["duet", "solve"] and command[2] == QUESTION_7
    duet = Path(sys.executable).with_name("duet")
    done = subprocess.run([str(duet), *command[1:]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = [line.removeprefix("# ") for line in block.splitlines() if line.startswith("# answer")]
    assert expected == ["answer: 8"] and "answer: 8" in done.stdout.splitlines()


@pytest.fixture(scope="module")
def embedded_server():
    from test_serve import start_server

    from duetlm import Duet, DuetConfig, load_backend
    from duetlm.serve import ServeConfig

    config = DuetConfig(signal_max_tokens=384, answer_max_tokens=64)  # `duet serve`'s for the embedded pair
    duet = Duet(load_backend("tiny-M"), load_backend("tiny-m"), config)
    server, thread, url = start_server(duet, ServeConfig())
    yield url
    server.should_exit = True
    thread.join(timeout=30)


def test_the_readme_curl_example_gives_an_answer(embedded_server):
    (block,) = [b for b in code_blocks(ROOT / "README.md", "bash") if "curl" in b]
    command = (
        block[block.index("curl") :].replace("\\\n", " ").replace("http://127.0.0.1:8000", embedded_server)
    )
    done = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert QUESTION_3 in command and "\\\\boxed{9}" in done.stdout


def test_the_readme_client_example_prints_what_it_says(embedded_server):
    (block,) = [b for b in code_blocks(ROOT / "README.md", "python") if "OpenAI(" in b]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(block.replace("http://127.0.0.1:8000", embedded_server), {})
    lines = out.getvalue().splitlines()
    assert "# m's answer: ... \\boxed{9}" in block and lines[0].endswith("\\boxed{9}.")
    assert lines[1] == "3+4=7"  # M's signal, its first line
    assert "'capable'" in lines[-1] and "'light'" in lines[-1]


def test_the_readme_library_example_runs():
    (block,) = [b for b in code_blocks(ROOT / "README.md", "python") if "load_backend" in b]
    scope: dict = {}
    exec(block, scope)
    assert scope["result"].answer == "8" and scope["result"].usage.capable.output_tokens > 0


@pytest.mark.parametrize("page", [p for p in PAGES if code_blocks(p, "toml")], ids=lambda p: p.name)
def test_every_toml_block_in_the_docs_loads(page):
    """A config shown in the docs is one the loader takes: a training config (it names a
    section of TrainConfig) as a TrainConfig, any other as a DuetConfig."""
    from duetlm.config import DuetConfig, tomllib
    from duetlm.train.config import TrainConfig

    for block in code_blocks(page, "toml"):
        data = tomllib.loads(block)
        kind = TrainConfig if set(data) & set(TrainConfig.model_fields) - {"duet"} else DuetConfig
        kind.model_validate(data)
