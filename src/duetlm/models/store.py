"""Where installed models live and how a spec's name finds them.

The store is `$DUETLM_HOME/models` (else `$XDG_CACHE_HOME/duetlm/models`, else
`~/.cache/duetlm/models`); each model has a folder of its own:

    qwen2.5-coder-1.5b/
      manifest.json                          what was installed, from where, with sizes
      qwen2.5-coder-1.5b-instruct-q4_k_m.gguf  the verified GGUF (llamacpp:)
      hf/                                    the same weights as a Hugging Face folder (hf:, vllm:)

A model counts as installed once its manifest is written, which is the install's last step, so
a folder left by an interrupted install is never taken for a model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from duetlm.errors import ConfigError

MANIFEST = "manifest.json"


def home() -> Path:
    """The root of duetlm's own files (models, downloads in progress)."""
    if os.environ.get("DUETLM_HOME"):
        return Path(os.environ["DUETLM_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "duetlm"


def models_dir() -> Path:
    return home() / "models"


@dataclass(frozen=True)
class InstalledModel:
    """A model in the store, as its manifest describes it."""

    name: str
    folder: Path
    manifest: dict

    @property
    def gguf(self) -> Path:
        return self.folder / self.manifest["gguf"]

    @property
    def hf(self) -> Path | None:
        return self.folder / self.manifest["hf"] if self.manifest.get("hf") else None

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())


def installed() -> list[InstalledModel]:
    """Every installed model, by name."""
    root = models_dir()
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(root.iterdir()):
        manifest = folder / MANIFEST
        if manifest.is_file():
            try:
                data = json.loads(manifest.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise ConfigError(
                    f"{manifest} is not valid JSON ({exc}): remove the folder and install again"
                ) from None
            found.append(InstalledModel(folder.name, folder, data))
    return found


def find(name: str) -> InstalledModel | None:
    folder = models_dir() / name
    return (
        next((m for m in installed() if m.folder == folder), None) if (folder / MANIFEST).is_file() else None
    )


def resolve(name: str, kind: str) -> str | None:
    """The local path a spec's model name stands for: an installed model's HF folder (hf:,
    vllm:) or its GGUF (llamacpp:). None when the name is not a catalog model (a hub id, a
    path); a catalog model that is not installed, or was installed without the form asked
    for, is an error that says what to run."""
    from duetlm.models.catalog import MODELS

    model = find(name)
    if model is None:
        if name in MODELS:
            raise ConfigError(
                f"model {name!r} is not installed (store: {models_dir()}): run `duet models install {name}`"
            )
        return None
    if kind == "llamacpp":
        return str(model.gguf)
    if model.hf is None:
        raise ConfigError(
            f"{name} was installed without its Hugging Face folder, which {kind}: needs: run "
            f"`duet models install {name}` (without --no-hf), or use llamacpp:{name}"
        )
    return str(model.hf)
