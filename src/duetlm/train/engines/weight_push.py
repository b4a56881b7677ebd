"""Trained weights to the rollout engines after every update, in bounded memory.

The weights travel one whole tensor at a time (`parallel.full_tensors`: a gather per tensor
under FSDP, cast to the engine's dtype before it, so the gather moves half the bytes under
bf16), never as a whole model on any process. An engine in this process takes them as they
come (`WeightPush.tensors`); engines in processes of their own (vLLM's workers) read them
from a copy staged once per node (`WeightPush.staged`): the node's local rank 0 writes
buckets of `push_bucket_mb` as safetensors files into the staging folder, every engine of
the node reads that one copy, and the folder goes once they all have. The staging folder is
checked before step 0 (`staging_folder`): /dev/shm when it holds a copy (Docker gives it
64 MB unless told otherwise), else the system's temporary folder, else a clear error that
names `staging_dir`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from duetlm.errors import ConfigError
from duetlm.train.modeling.distributed import Runtime
from duetlm.train.modeling.parallel import full_tensors

logger = logging.getLogger(__name__)

SHM = Path("/dev/shm")


def tied_embeddings(lm: torch.nn.Module) -> bool:
    config = getattr(lm, "config", None) or lm.get_base_model().config
    return bool(getattr(config, "tie_word_embeddings", False))


def weight_bytes(lm: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of one copy of the model's weights in `dtype` (tied output layer counted once),
    from the global shapes: nothing is gathered."""
    tied = tied_embeddings(lm)
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name, tensor in base.state_dict().items():
        if "lora_" in name or (tied and name.replace(".base_layer.", ".") == "lm_head.weight"):
            continue
        total += tensor.numel() * (size if tensor.is_floating_point() else tensor.element_size())
    return total


class Stager:
    """Writes the staged copies of one node (only its local rank 0 writes) and counts them."""

    def __init__(self, runtime: Runtime, folder: Path, run_key: str, bucket_bytes: int) -> None:
        self.runtime, self.folder, self.bucket_bytes = runtime, folder, bucket_bytes
        self.run_key = run_key
        self.copies = 0  # staged copies this process wrote

    @contextlib.contextmanager
    def stage(self, name: str, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[Path]:
        """A folder holding the weights, readable by every engine of this node until the
        block ends. A collective: every process must enter it, in the same order."""
        runtime = self.runtime
        folder = self.folder / f"duetlm-{self.run_key}-node{runtime.node}-{name}"  # nodes may share a folder
        leader = runtime.node_leader
        if leader:
            shutil.rmtree(folder, ignore_errors=True)  # a killed run's leftovers
            folder.mkdir(parents=True)
        bucket: dict[str, torch.Tensor] = {}
        filled, shards = 0, 0
        for key, tensor in tensors:  # every process iterates: the gathers are collectives
            if not leader:
                continue
            bucket[key] = tensor.contiguous().cpu()
            filled += bucket[key].numel() * bucket[key].element_size()
            if filled >= self.bucket_bytes:
                shards = _write_shard(folder, shards, bucket)
                bucket, filled = {}, 0
        if leader:
            if bucket or not shards:
                _write_shard(folder, shards, bucket)
            self.copies += 1
        runtime.barrier()  # the copy is whole before any engine reads it
        try:
            yield folder
        finally:
            runtime.barrier()  # every engine of the node has read it
            if leader:
                shutil.rmtree(folder, ignore_errors=True)


def _write_shard(folder: Path, index: int, tensors: dict[str, torch.Tensor]) -> int:
    from safetensors.torch import save_file

    save_file(tensors, str(folder / f"weights-{index:05d}.safetensors"))
    return index + 1


def staged_weights(folder: str | Path, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """A staged copy's tensors, one file at a time (what an engine worker iterates)."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("weights-*.safetensors")):
        with safe_open(str(path), framework="pt", device=device) as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield key, handle.get_tensor(key)


def folder_weights(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """A Hugging Face model folder's tensors, one file at a time, under their own names."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield key, handle.get_tensor(key)


class WeightPush:
    """One trained model's weights after an update, offered to its engine."""

    def __init__(self, name: str, lm: torch.nn.Module, stager: Stager | None) -> None:
        self.name, self.lm, self.stager = name, lm, stager
        self.tied = tied_embeddings(lm)
        self.seconds = 0.0

    def tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Whole tensors, one at a time, in `dtype` (a collective under FSDP)."""
        started = time.perf_counter()
        yield from full_tensors(self.lm, self.tied, dtype)
        self.seconds += time.perf_counter() - started

    @contextlib.contextmanager
    def staged(self, dtype: torch.dtype | None = None) -> Iterator[Path]:
        """The node's staged copy, in `dtype` (a collective)."""
        if self.stager is None:
            raise ConfigError(
                f"{self.name}: this engine reads staged weights, but no staging folder was set up"
            )
        started = time.perf_counter()
        with self.stager.stage(self.name, self.tensors(dtype)) as folder:
            yield folder
        self.seconds = time.perf_counter() - started


def run_key(out: str | Path) -> str:
    """A name for this run's staged copies, the same on every process of it."""
    return hashlib.blake2b(str(Path(out).resolve()).encode(), digest_size=6).hexdigest()


def staging_folder(choice: str | None, needed: int, runtime: Runtime) -> Path:
    """Where the node leaders stage pushed weights, checked for room for one copy (`needed`
    bytes) on every node. A collective: every process gets the same answer or error."""
    verdict: tuple[str | None, str | None] = (None, None)
    if runtime.node_leader:
        verdict = _pick_folder(choice, needed)
    verdicts = runtime.all_objects(verdict)
    errors = [error for _, error in verdicts if error]
    if errors:
        raise ConfigError(errors[0])
    folder = next(path for path, _ in verdicts if path)
    return Path(folder)


def _pick_folder(choice: str | None, needed: int) -> tuple[str | None, str | None]:
    margin = int(needed * 1.05) + (64 << 20)
    if choice is not None:
        path = Path(choice).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return None, f"staging_dir = {choice!r} cannot be created ({exc})"
        free = shutil.disk_usage(path).free
        if free < margin:
            return None, (
                f"staging_dir = {choice!r} has {free / 1e9:.2f} GB free, and one staged copy of the weights "
                f"needs {margin / 1e9:.2f} GB: free space there or set staging_dir to a larger folder"
            )
        return str(path), None
    candidates = [SHM] if SHM.is_dir() else []
    candidates.append(Path(tempfile.gettempdir()))
    for index, path in enumerate(candidates):
        free = shutil.disk_usage(path).free
        if free >= margin:
            if index > 0 and SHM.is_dir():
                logger.warning(
                    "/dev/shm has %.2f GB free and a staged copy of the weights needs %.2f GB: staging in %s "
                    "instead (slower; give the container more shared memory, e.g. docker --shm-size)",
                    shutil.disk_usage(SHM).free / 1e9,
                    margin / 1e9,
                    path,
                )
            return str(path), None
    return None, (
        f"no folder holds a staged copy of the weights ({margin / 1e9:.2f} GB): "
        + ", ".join(f"{p} has {shutil.disk_usage(p).free / 1e9:.2f} GB free" for p in candidates)
        + "; set staging_dir to a folder with room (or enlarge /dev/shm, e.g. docker --shm-size)"
    )
