"""The trainer's processes: where each one sits and the few collectives the step needs.

`torchrun` (or `accelerate launch`, which runs torchrun's launcher) starts one process per
device and sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and GROUP_RANK (the node);
across nodes its own flags (`--nnodes`, `--node_rank`, `--rdzv_endpoint`) do the rest. The
process group is ours, not accelerate's: accelerate never enables FSDP on a CPU, and the
trainer's FSDP2 strategy must run on the CPUs of the test machines over gloo as it runs on
GPUs over NCCL. Collectives time out after `dist_timeout_s`, so a rank that waits for a
peer that will never come fails with an error instead of hanging.
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    """This process's place in the run. `node` counts torchrun's nodes; `local_rank` is the
    rank within the node (the one that stages weights for its node is local rank 0)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    node: int = 0
    nodes: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    grouped: bool = False  # a process group exists (several processes, or FSDP in one)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def node_leader(self) -> bool:
        return self.local_rank == 0

    # --- collectives: every rank must call each one, in the same order --------------------

    def _reduce(self, value, op) -> float:
        tensor = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1)
        if self.grouped and self.world > 1:
            tensor = tensor.to(self.collective_device)
            dist.all_reduce(tensor, op=op)
        return float(tensor.item())

    def sum(self, value) -> float:
        return self._reduce(value, dist.ReduceOp.SUM)

    def max(self, value) -> float:
        return self._reduce(value, dist.ReduceOp.MAX)

    def barrier(self) -> None:
        if self.grouped and self.world > 1:
            dist.barrier()

    def all_objects(self, value) -> list:
        """Every rank's `value`, in rank order (small picklable objects only)."""
        if not (self.grouped and self.world > 1):
            return [value]
        out: list = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    @property
    def collective_device(self) -> torch.device:
        """NCCL reduces tensors on the GPU; gloo on the CPU."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self, finished: bool = True) -> None:
        """End the process group. After a normal finish every process first waits for the
        others, so none tears its connections down while a peer is still inside the last
        collective (a gloo process has been seen to abort in that teardown on a loaded machine).
        After an error there is no wait: a peer that failed would never arrive."""
        if self.grouped and dist.is_initialized():
            if finished:
                self.barrier()
            dist.destroy_process_group()
            self.grouped = False


def die_with_launcher() -> None:
    """Under torchrun, end this process when its launcher dies. torchrun starts each process in
    a session of its own, so a `kill -9` of torchrun (a scheduler's, the OOM killer's) would
    leave them running on, writing checkpoints into a folder that a resumed run then shares.
    Linux only (prctl's parent-death signal); elsewhere a no-op."""
    import ctypes
    import signal
    import sys

    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        logger.warning("cannot ask to end with the launcher (prctl unavailable)")
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os._exit(1)


def start_runtime(device: torch.device, timeout_s: float, need_group: bool = False) -> Runtime:
    """This process's Runtime; starts the process group when torchrun launched several
    processes, or when `need_group` (FSDP needs one even in a single process).

    On a GPU each process takes the device of its local rank; NCCL carries tensors and gloo
    the objects (`cpu:gloo,cuda:nccl`). On a CPU gloo carries both."""
    die_with_launcher()
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    node = int(env.get("GROUP_RANK", str(rank // max(local_world, 1))))
    nodes = int(env.get("GROUP_WORLD_SIZE", str(max(world // max(local_world, 1), 1))))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    runtime = Runtime(rank, world, local_rank, local_world, node, nodes, device)
    if world == 1 and not need_group:
        return runtime
    if dist.is_initialized():  # started by a caller (a test, a notebook)
        runtime.grouped = True
        return runtime
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if world == 1:  # one process: a group of one, through a file nobody else reads
        handle, path = tempfile.mkstemp(prefix="duetlm-group-")
        os.close(handle)
        os.unlink(path)
        dist.init_process_group(backend, init_method=f"file://{path}", rank=0, world_size=1, timeout=timeout)
    else:
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    runtime.grouped = True
    logger.info(
        "process %d of %d (node %d of %d, local rank %d), %s, collectives time out after %.0f s",
        rank,
        world,
        node,
        nodes,
        local_rank,
        device,
        timeout_s,
    )
    return runtime
