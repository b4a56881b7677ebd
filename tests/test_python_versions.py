"""The package under the other Pythons it claims (requires-python >= 3.10), without torch.

torch for 3.10, 3.12 and 3.13 is a large download, so only what differs between versions
runs there (`tests/compat_check.py`: config files, JSONL, extraction, the serve batcher), in
a virtual environment per interpreter with the pinned pydantic, PyYAML and tomli, kept in
`.venv-compat/` between runs. Interpreters that this machine lacks are skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PINNED = ("pydantic", "PyYAML", "tomli")


def interpreters() -> dict[str, str]:
    found = {}
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for minor in ("3.10", "3.12", "3.13"):
        candidates = sorted(pyenv.glob(f"{minor}.*/bin/python")) if pyenv.is_dir() else []
        path = str(candidates[-1]) if candidates else shutil.which(f"python{minor}")
        if path:
            found[minor] = path
    return found


def pins() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line for line in lines if re.match(rf"({'|'.join(PINNED)})==", line)]


@pytest.mark.slow
@pytest.mark.parametrize("minor", ["3.10", "3.12", "3.13"])
def test_what_differs_runs_under(minor):
    python = interpreters().get(minor)
    if python is None:
        pytest.skip(f"no Python {minor} on this machine")
    venv = ROOT / ".venv-compat" / minor
    if not (venv / "bin" / "python").is_file():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", *pins()],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    done = subprocess.run(
        [str(venv / "bin" / "python"), str(ROOT / "tests" / "compat_check.py")],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT / "src")},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Python {minor}." in done.stdout
