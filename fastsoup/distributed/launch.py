"""``fastsoup average|greedy|learned`` under torchrun: joining and leaving the process group."""

from __future__ import annotations

import os
import sys

from .._errors import FastsoupError
from .comm import BACKEND_ENV, DEFAULT_TIMEOUT, TIMEOUT_ENV, _timeout, forget, launched

DISTRIBUTED_COMMANDS = ("average", "greedy", "learned")
_CLI_STARTED = False
_CLI_STDOUT: list = []  # stdout of a rank > 0 while the CLI runs (replaced by /dev/null)


def cli_begin(args) -> None:
    """``fastsoup average|greedy|learned`` launched by torchrun: joins the process group (backend
    ``FASTSOUP_DIST_BACKEND``, default gloo), puts ``--device cuda`` on this rank's GPU
    (``cuda:LOCAL_RANK``), splits the CPU threads between the ranks of a node, and shows progress
    bars on rank 0 only."""
    global _CLI_STARTED
    if not launched() or getattr(args, "command", None) not in DISTRIBUTED_COMMANDS:
        return
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if getattr(args, "device", None) == "cuda":
        args.device = f"cuda:{local_rank}"
    if getattr(args, "threads", "absent") is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        args.threads = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if os.environ.get("RANK", "0") != "0":  # rank 0 prints the report and the progress; the others only errors
        if hasattr(args, "no_progress"):
            args.no_progress = True
        _CLI_STDOUT.append(sys.stdout)
        sys.stdout = open(os.devnull, "w")
    if not dist.is_available():
        raise FastsoupError("launched by torchrun, but this build of torch has no torch.distributed")
    if dist.is_initialized():
        return
    backend = os.environ.get(BACKEND_ENV, "gloo")
    if "nccl" in backend:
        import torch

        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=_timeout(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    _CLI_STARTED = True


def cli_end() -> None:
    """Leaves the process group :func:`cli_begin` joined."""
    global _CLI_STARTED
    while _CLI_STDOUT:
        sys.stdout.close()
        sys.stdout = _CLI_STDOUT.pop()
    if _CLI_STARTED:
        _CLI_STARTED = False
        import torch.distributed as dist

        if dist.is_initialized():
            # Every rank done with its last collective before any rank tears the group down: a rank
            # leaving while the other still has gloo work in flight was seen to abort a process
            # at exit ("terminate called without an active exception").
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
        forget()

