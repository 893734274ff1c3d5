"""One clean error for a multi-rank job: printed once, by the lowest rank that raised it; every rank exits non-zero.

Without this, a config mistake under ``torchrun --nproc_per_node=8`` prints the same traceback eight times (204
lines for a one-line :class:`~mimo_titan.errors.LayoutError`), and a failed checkpoint write on one rank buries its
cause under the other ranks' follow-on errors.

:func:`run_main` wraps the entry point of ``scripts/train.py``:

- a :class:`~mimo_titan.errors.UserError` (config, layout, data, checkpoint, a diverged run) is printed as one
  message, ``[rank0] ConfigError: <what, where, how to fix>``, without a traceback;
- any other exception keeps its traceback, printed once;
- the ranks agree on who prints through the job's store (:mod:`~mimo_titan.train.coordination`): every failing
  rank records its priority in ``lowest_failed`` (an atomic minimum): its rank for a user error, ``world_size +
  rank`` for any other exception (a follow-on error, such as a peer's closed connection, must not hide the user
  error that caused it); rank 0 with a user error prints at once, and any other failing rank waits up to
  :data:`DEFER_S` seconds for a lower priority to appear (ranks start at slightly different times, so the same
  config error reaches them at different moments) before it prints. So the lowest rank that raised a user error
  prints, or, without one, the lowest rank that raised, and the others print nothing. Without a reachable store
  (a single process, or a plain ``env://`` launch that failed before rank 0 started its store) every failing rank
  prints;
- every failing rank exits with status 1; torchrun then ends the ranks that did not fail.

torchrun adds its own summary of the failed ranks after the message (``ChildFailedError``); that part belongs to
the launcher.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable

from mimo_titan.errors import UserError
from mimo_titan.train.coordination import StoreTimeout, job_store, launch_rank, launch_world_size, within

__all__ = [
    "run_main",
    "report_failure",
    "format_failure",
    "claim_job_report",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "DEFER_S",
]

#: exit status of a rank that failed (user error or unexpected exception)
EXIT_FAILURE = 1
#: exit status after a repeated Ctrl-C stopped the run at once (128 + SIGINT, as a shell reports it)
EXIT_INTERRUPTED = 130
#: seconds a failing rank other than 0 waits for a lower rank to fail as well before it prints its own error
DEFER_S = 5.0


def format_failure(exc: BaseException, rank: int) -> str:
    """The text printed for ``exc`` on ``rank``: one line for a :class:`UserError`, else the full traceback."""
    if isinstance(exc, UserError):
        return f"[rank{rank}] {type(exc).__name__}: {exc}"
    return f"[rank{rank}] " + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()


def _record_failure(store, rank: int) -> None:
    """Lower the store's ``lowest_failed`` to ``rank`` (a report priority; an atomic minimum built on
    compare-and-set)."""
    while True:
        current = store.get("lowest_failed") if store.check(["lowest_failed"]) else b""
        if current and int(current) <= rank:
            return
        if int(store.compare_set("lowest_failed", current, str(rank))) <= rank:
            return


def claim_job_report(store, rank: int) -> bool:
    """Claim the one report of the job for ``rank`` right away (the watchdog's verdict uses it); False when a report
    was already claimed. Later failures of other ranks (a peer that exits breaks their collectives) then stay
    silent."""
    _record_failure(store, -1)
    return store.compare_set("error_reporter", "", str(rank)) == str(rank).encode()


def _claim_report(rank: int, priority: int) -> bool:
    """Whether this rank prints the job's error (module docstring): the failing rank of the lowest ``priority`` does,
    unless the job's report was claimed already; True as well when there is no store to agree through."""
    store = job_store(timeout_s=3.0)
    if store is None:
        return True
    try:
        if store.check(["error_reporter"]):
            return False
        _record_failure(store, priority)
        deadline = time.monotonic() + DEFER_S
        while priority > 0 and time.monotonic() < deadline:
            if int(store.get("lowest_failed")) < priority:
                return False
            time.sleep(0.1)
        if int(store.get("lowest_failed")) < priority:
            return False
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
    if world_size > 1:
        try:  # bounded: a stopped store host never answers, and the error must still be printed
            priority = rank if isinstance(exc, UserError) else world_size + rank
            claimed = within(DEFER_S + 10.0, lambda: _claim_report(rank, priority))
        except StoreTimeout:
            claimed = True
        if not claimed:
            return False
    print(format_failure(exc, rank), file=sys.stderr, flush=True)
    return True


def run_main(main: Callable[[], object]) -> int:
    """Run ``main()`` and turn any exception into one report (module docstring) and exit status 1.

    While the report is agreed on and printed, SIGTERM and SIGINT are ignored: when one rank fails, torchrun
    sends SIGTERM to the others at once, and the rank that must print the job's error may be one of them. (torchrun
    still kills a rank that has not exited 30 s later.)

    Returns:
        0 when ``main`` returned, :data:`EXIT_FAILURE` after an exception, :data:`EXIT_INTERRUPTED` after a
        ``KeyboardInterrupt`` (a repeated Ctrl-C: stopped at once, nothing to report). ``SystemExit`` passes through.
    """
    try:
        main()
        return 0
    except SystemExit:
        raise
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseException as exc:  # noqa: BLE001 - every failure is reported once
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            report_failure(exc)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return EXIT_FAILURE
