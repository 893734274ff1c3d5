"""Run a function on N ranks for multi-rank tests: gloo on CPU, NCCL on CUDA (one GPU per rank).

Ranks are forked from a forkserver that has imported torch but run no torch op, so forking is safe and fast
(the pytest parent may have run torch ops; a plain fork of it could deadlock in OpenMP). Every launch has a
timeout: a hang becomes a test failure with each rank's traceback, never a stuck CI.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import socket
import time
import traceback

import pytest
import torch

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "torch.distributed", "mimo_titan.train.trainer"])


def backends(world_size: int):
    """pytest params: gloo always; nccl (marked ``nccl``) when at least ``world_size`` CUDA devices exist."""
    have = torch.cuda.is_available() and torch.cuda.device_count() >= world_size
    return [
        pytest.param("gloo", id="gloo"),
        pytest.param(
            "nccl",
            id="nccl",
            marks=[pytest.mark.nccl, pytest.mark.skipif(not have, reason=f"needs {world_size} CUDA devices")],
        ),
    ]


def per_layout_backends(worlds: dict[str, int]) -> list:
    """``(layout, backend)`` pytest params: every layout on gloo, and on NCCL when its own world size fits the GPUs."""
    return [
        pytest.param(name, *b.values, marks=b.marks, id=f"{b.id}-{name}")
        for name, world in worlds.items()
        for b in backends(world)
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, backend, queue, args):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    try:
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        # as in production (mimo_titan.train.trainer.init_distributed): NCCL gets device_id (eager communicators)
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, device_id=device if backend == "nccl" else None
        )
        result = fn(rank, world_size, device, *args)
        dist.barrier()
        dist.destroy_process_group()
        queue.put((rank, True, pickle.dumps(result)))  # bytes: tensors must not travel as shared-memory fds
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 240.0) -> list:
    """Run ``fn(rank, world_size, device, *args)`` on ``world_size`` ranks; return the results by rank.

    ``fn`` must be a module-level function (it is pickled). Raises AssertionError with every failing rank's
    traceback, or on timeout.
    """
    queue = _CTX.Queue()
    port = _free_port()
    procs = [
        _CTX.Process(target=_worker, args=(fn, r, world_size, port, backend, queue, args), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size and not errors:
            try:
                rank, ok, payload = queue.get(timeout=1.0)
                (results if ok else errors)[rank] = pickle.loads(payload) if ok else payload
                continue
            except queue_mod.Empty:
                pass
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
            if dead:
                errors.update({r: f"process died (exit code {procs[r].exitcode}) before reporting" for r in dead})
            elif time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for ranks {sorted(set(range(world_size)) - set(results))}"
                )
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():  # a rank inside train() takes SIGTERM as a request to stop after its step
                p.kill()
                p.join(5)
    if errors:
        raise AssertionError("".join(f"\n--- rank {r} failed:\n{e}" for r, e in sorted(errors.items())))
    return [results[r] for r in range(world_size)]
