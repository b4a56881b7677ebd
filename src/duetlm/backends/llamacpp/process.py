"""The llama.cpp server process: `python -m duetlm.backends.llamacpp.process --model F.gguf ...`.

It loads the GGUF into xllamacpp's server (llama.cpp's own HTTP server, continuous batching
over `--parallel` slots), prints one JSON line with the address it listens on, and serves until
its parent goes: the parent holds the other end of this process's stdin, so the read below
returns when the parent closes it or dies, however it dies; a parent that changed (this
process re-parented) ends it too, for the case where a forked child of the parent still holds
the pipe.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="duetlm.backends.llamacpp.process")
    parser.add_argument("--model", required=True)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--ctx-per-slot", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    return parser.parse_args(argv)


def watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    parent = os.getppid()
    threading.Thread(target=watch_parent, args=(parent,), daemon=True).start()
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.n_parallel = args.parallel
    params.n_ctx = args.parallel * args.ctx_per_slot  # split evenly: every slot holds ctx_per_slot
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    # threads wait for work asleep, not spinning: a spinning wait takes cores the machine's other
    # work needs (the other model's server, the trainer), and one descheduled thread then holds
    # every other at the next barrier
    params.cpuparams.poll = int(os.environ.get("DUETLM_LLAMACPP_POLL", "0"))
    params.cpuparams_batch.poll = params.cpuparams.poll
    params.hostnames = [args.host]
    params.port = args.port
    params.verbosity = 1
    params.warmup = False
    server = xllamacpp.Server(params)
    sys.stdout.write(json.dumps({"url": server.listening_address, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    sys.stdin.read()  # returns at EOF: the parent closed the pipe or died
    os._exit(0)  # the server's threads are not joined: the process is done


if __name__ == "__main__":
    main()
