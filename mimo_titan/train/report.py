"""One clean error for a multi-rank job: printed once, by the lowest rank that raised it; every rank exits non-zero.

Without this, a config mistake under ``torchrun --nproc_per_node=8`` prints the same traceback eight times (204
lines for a one-line :class:`~mimo_titan.errors.LayoutError`), and a failed checkpoint write on one rank buries its
cause under the other ranks' follow-on errors.

:func:`run_main` wraps the entry point of ``scripts/train.py``:

- a :class:`~mimo_titan.errors.UserError` (config, layout, data, checkpoint, a diverged run) is printed as one
  message, ``[rank0] ConfigError: <what, where, how to fix>``, without a traceback;
- any other exception keeps its traceback, printed once;
- the ranks agree on who prints through the job's store (:mod:`~mimo_titan.train.coordination`): the first rank
  to claim the report prints, and lower ranks claim first (a rank waits ``0.1 s × min(rank, 10)`` before it
  tries), so when every rank raises the same error, rank 0 prints it. The others print nothing. Without a
  reachable store (a single process, or a plain ``env://`` launch that failed before rank 0 started its store)
  every failing rank prints;
- every failing rank exits with status 1; torchrun then ends the ranks that did not fail.

torchrun adds its own summary of the failed ranks after the message (``ChildFailedError``); that part belongs to
the launcher.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable

from mimo_titan.errors import UserError
from mimo_titan.train.coordination import job_store, launch_rank, launch_world_size

__all__ = ["run_main", "report_failure", "format_failure", "EXIT_FAILURE"]

#: exit status of a rank that failed (user error or unexpected exception)
EXIT_FAILURE = 1


def format_failure(exc: BaseException, rank: int) -> str:
    """The text printed for ``exc`` on ``rank``: one line for a :class:`UserError`, else the full traceback."""
    if isinstance(exc, UserError):
        return f"[rank{rank}] {type(exc).__name__}: {exc}"
    return f"[rank{rank}] " + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()


def _claim_report(rank: int) -> bool:
    """Whether this rank prints the job's error: True if it won the claim, or if there is no store to claim in."""
    store = job_store(timeout_s=3.0)
    if store is None:
        return True
    time.sleep(0.1 * min(rank, 10))  # lower ranks claim first
    try:
        return store.compare_set("error_reporter", "", str(rank)) == str(rank).encode()
    except Exception:  # noqa: BLE001 - a store that fails now cannot arbitrate: report here
        return True


def report_failure(exc: BaseException, *, rank: int | None = None, world_size: int | None = None) -> bool:
    """Print ``exc`` (:func:`format_failure`) unless another rank of the job already reports an error.

    Returns:
        Whether this rank printed it.
    """
    rank = launch_rank() if rank is None else rank
    world_size = launch_world_size() if world_size is None else world_size
    if world_size > 1 and not _claim_report(rank):
        return False
    print(format_failure(exc, rank), file=sys.stderr, flush=True)
    return True


def run_main(main: Callable[[], object]) -> int:
    """Run ``main()`` and turn any exception into one report (module docstring) and exit status 1.

    Returns:
        0 when ``main`` returned, :data:`EXIT_FAILURE` after an exception. ``SystemExit`` passes through.
    """
    try:
        main()
        return 0
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure is reported once, KeyboardInterrupt included
        report_failure(exc)
        return EXIT_FAILURE
