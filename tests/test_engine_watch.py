"""An engine ends when its trainer dies, and never before, in each process layout vLLM uses
(duetlm.train.engines.watch): real processes stand in for the trainer, vLLM's engine core and
its worker, and the worker (or the core, or the trainer itself) runs the watch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from duetlm.train.engines.watch import engine_top, process_stat

# the trainer: starts the engine in a layout and prints every pid; the engine's processes sleep
TRAINER = r"""
import os, subprocess, sys, time
from duetlm.train.engines.watch import watch_owner
layout, trainer = sys.argv[1], os.getpid()
WORKER = "import sys, time; from duetlm.train.engines.watch import watch_owner; " \
         "print(watch_owner(int(sys.argv[1]), 0.1), flush=True); time.sleep(600)"
if layout == "in-process":
    print("watching", watch_owner(trainer, 0.1), flush=True)
    print("pids", trainer, flush=True)
else:
    code = WORKER if layout == "uni" else (
        "import subprocess, sys, time; "
        f"w = subprocess.Popen([sys.executable, '-c', {WORKER!r}, sys.argv[1]], stdout=sys.stdout); "
        "print('worker', w.pid, flush=True); time.sleep(600)"
    )
    core = subprocess.Popen([sys.executable, "-c", code, str(trainer)], stdout=subprocess.PIPE, text=True)
    lines = [core.stdout.readline().strip()]
    if layout == "mp":
        lines.append(core.stdout.readline().strip())
    print("watching", lines[-1], flush=True)
    worker = [int(l.split()[1]) for l in lines if l.startswith("worker")]
    print("pids", trainer, core.pid, *worker, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    return process_stat(pid) is not None


@pytest.mark.parametrize("layout", ["mp", "uni", "in-process"])
def test_the_engine_ends_with_its_trainer_and_not_before(layout):
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, layout], stdout=subprocess.PIPE, text=True)
    try:
        watching = trainer.stdout.readline().split()[-1]
        pids = [int(p) for p in trainer.stdout.readline().split()[1:]]
        engine = pids[1:]
        assert watching == ("False" if layout == "in-process" else "True")
        time.sleep(2.0)  # twenty rounds of the watch
        assert trainer.poll() is None, f"the watch killed its own trainer ({layout})"
        assert all(alive(pid) for pid in engine)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in engine) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in engine), f"an engine process outlived its trainer ({layout})"
    finally:
        trainer.kill()


def test_the_engine_top_is_the_trainers_child_on_the_chain():
    me = os.getpid()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert engine_top(me, child.pid) == child.pid
        assert engine_top(me, me) is None  # in the trainer's own process: nothing to end
        assert engine_top(child.pid, me) is None  # the trainer is no ancestor
    finally:
        child.kill()
