"""A side channel between the ranks of one job: a client of the job's c10d key-value store.

Both the watchdog (heartbeats) and the error report (who prints the error) need to talk to the other ranks when
the collectives may be unusable: before the process group exists, or while a peer is stuck in one. They use the
rendezvous store that every launch already has: torchrun's agent store (``TORCHELASTIC_USE_AGENT_STORE``), or
the ``TCPStore`` that ``init_process_group`` starts in rank 0 with the ``env://`` method. Each caller opens its
own client connection, so a slow operation of one user never queues behind another's.

Keys live under ``mimo_titan/<run id>/<restart>/``, so a torchrun restart never reads the previous attempt's keys.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")

__all__ = ["job_store", "launch_rank", "launch_world_size", "rank_host", "within", "StoreTimeout"]


class StoreTimeout(TimeoutError):
    """A store call did not return in time: the process hosting the store is stopped or unreachable."""


def within(seconds: float, fn: Callable[[], T]) -> T:
    """``fn()`` with a deadline: run in a daemon thread and waited for at most ``seconds``.

    A TCPStore client's own timeout does not cover every case: against a host that is stopped (``kill -STOP``) or
    gone without closing its sockets, reads and even new connections never return. A call that misses the deadline
    is left behind in its daemon thread (it ends with the process).

    Raises:
        StoreTimeout: ``fn`` did not return within ``seconds``.
        Exception: whatever ``fn`` raised.
    """
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name="mimo_titan-store-call", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise StoreTimeout(f"the job's store did not answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]  # an exception instance
    return box["value"]  # type: ignore[return-value]


def launch_rank() -> int:
    """This process's global rank from the launcher's environment (``RANK``; 0 without a launcher)."""
    return int(os.environ.get("RANK", 0))


def launch_world_size() -> int:
    """The job's world size from the launcher's environment (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def rank_host() -> str:
    """This machine's host name, as recorded in heartbeats (decides whether a stuck peer can be killed here)."""
    return socket.gethostname()


def job_store(timeout_s: float) -> dist.Store | None:
    """A new client of the job's store, with keys prefixed per run and restart; None without one.

    Args:
        timeout_s: seconds an operation (and the connection) may take before it raises.

    Returns:
        A ``PrefixStore`` over a ``TCPStore`` client at ``MASTER_ADDR:MASTER_PORT``, or None for a single-process
        run, a launch without those variables, or a store that cannot be reached within ``timeout_s`` (e.g. the
        ``env://`` store before rank 0 created it).
    """
    if launch_world_size() <= 1 or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    try:
        client = within(
            timeout_s + 2.0,
            lambda: dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                is_master=False,
                timeout=datetime.timedelta(seconds=timeout_s),
                wait_for_workers=False,
            ),
        )
    except (RuntimeError, ValueError, OSError):  # DistStoreError derives from RuntimeError; StoreTimeout from OSError
        return None
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"mimo_titan/{run}/{attempt}/", client)
