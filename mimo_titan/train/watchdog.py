"""Watchdog: a rank that stops making progress ends the whole job, with a message that names it.

Without it a stopped rank (``kill -STOP``, a hung driver, a livelocked loop) leaves every other rank waiting in a
collective until the process-group timeout (gloo's default: 30 minutes), and then each of them fails with a
timeout that does not say which rank was at fault.

Mechanism (one daemon thread per rank, beside the training loop):

- **Heartbeat.** Every ``interval_s`` (``timeout_s / 20``, within 0.2-10 s) the thread writes this rank's record to
  the job's store (:mod:`~mimo_titan.train.coordination`): the wall time, the pid and host, and
  the last *progress mark* the training loop set with :meth:`Watchdog.progress` (step and phase, e.g. ``step 12:
  forward-backward``) with its time. The thread beats even while the main thread waits in a collective, so a
  stale heartbeat means the whole process stopped.
- **Judgement.** Only a rank whose own progress has stalled looks at the others (so a healthy job reads nothing).
  After ``timeout_s - 2 · interval_s`` without progress it names the culprit: the ranks whose heartbeat is older
  than ``max(timeout_s / 2, 3 · interval_s)`` (stopped or dead), else the ranks that passed fewer progress marks
  than the others (stuck in their own code while the others wait for them), else all ranks (a deadlock, or a rank
  hung inside the same phase as the others wait in: then every stalled rank prints where its main thread is, which
  shows the hung one).
- **Verdict.** The first rank to claim the job's report in the store prints it (one message for the whole job, and
  the errors that follow on other ranks stay silent, :mod:`~mimo_titan.train.report`); every
  stalled rank kills the culprits that run on its own host (``SIGKILL``; a stopped process never handles anything
  gentler) and exits with :data:`EXIT_STUCK`. Under torchrun the agent then ends the remaining ranks.

So the job ends within about ``timeout_s`` of the stall. ``timeout_s`` is ``training.collective_timeout_s``: the
longest any phase between two progress marks may take (a step, a checkpoint save, building the job); the process
group's own timeout is set a little longer (:func:`process_group_timeout`) as the backstop.

Reference semantics: torch's NCCL watchdog / ``TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC`` and torchelastic's health
checks; this version works on gloo and names the rank and its module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable

from mimo_titan.train.coordination import job_store, rank_host, within
from mimo_titan.train.report import claim_job_report

__all__ = ["Watchdog", "EXIT_STUCK", "process_group_timeout", "heartbeat_interval"]

logger = logging.getLogger("mimo_titan")

#: exit code of a rank ended by the watchdog
EXIT_STUCK = 3


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between heartbeats for a watchdog timeout of ``timeout_s``: ``timeout_s / 20`` within 0.2-10 s."""
    return min(10.0, max(0.2, timeout_s / 20))


def process_group_timeout(timeout_s: float) -> float:
    """The process group's collective timeout (seconds) for a watchdog timeout of ``timeout_s``: later than the
    watchdog's verdict (``timeout_s + max(30, timeout_s / 4)``), so the watchdog reports the culprit first and the
    collective timeout is only the backstop."""
    return timeout_s + max(30.0, timeout_s / 4)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie, dead but not yet reaped by its launcher, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


class Watchdog:
    """Heartbeats plus judgement of stalled ranks (see the module docstring).

    Args:
        rank / world_size: this rank and the job's size.
        timeout_s: seconds without progress after which the job ends (``training.collective_timeout_s``).
        describe: ``rank -> text`` naming a rank's module(s) and place, e.g. ``"language pp stage 1, dp 2"``.
        store: the store to use (tests); None opens a client of the job's store at :meth:`start`.
        on_verdict: called with the message instead of exiting (tests); None exits the process.

    The main thread calls :meth:`progress` at every phase boundary of the training loop.
    """

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        timeout_s: float,
        describe: Callable[[int], str],
        store=None,
        on_verdict: Callable[[str], None] | None = None,
    ):
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.interval_s = heartbeat_interval(self.timeout_s)
        self.describe = describe
        self.store = store
        self.on_verdict = on_verdict
        self._seq = 0
        self._phase, self._step = "starting", 0
        self._progress_wall = time.time()
        self._progress_mono = time.monotonic()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by progress(): publish the new mark soon
        self._min_gap = min(self.interval_s, 2.0)
        # deadline of one store call (a stopped store host never answers, whatever the client's timeout)
        self._call_s = max(2.0, min(30.0, self.timeout_s / 4))
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------- main thread
    def progress(self, phase: str, step: int | None = None) -> None:
        """Mark progress: the loop entered ``phase`` (at ``step``). Every rank must pass the same marks in the same
        order (they count: a rank with fewer marks than the others is the one they wait for). Cheap: a few
        attribute writes and two clock reads; the thread publishes the new mark within ``min(interval_s, 2 s)``."""
        self._seq += 1
        self._phase = phase
        if step is not None:
            self._step = step
        self._progress_wall = time.time()
        self._progress_mono = time.monotonic()
        self._wake.set()

    def start(self) -> Watchdog:
        """Publish the first heartbeat and start the thread (no-op for a single rank or without a store)."""
        if self.world_size <= 1:
            return self
        if self.store is None:
            self.store = job_store(timeout_s=max(5.0, min(60.0, self.timeout_s / 2)))
        if self.store is None:
            logger.warning(
                "watchdog: the job's store cannot be reached; stuck ranks end the job only through the "
                "process-group timeout"
            )
            return self
        within(self._call_s, self._publish)
        self._thread = threading.Thread(target=self._run, name="mimo_titan-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, done: bool = True) -> None:
        """Stop the thread; with ``done`` (a rank that finished its run) mark it done, so it is never judged stuck.
        A rank that stops because it failed passes ``done=False``: it is not finished, and its peers may name it."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s + 5)
            self._thread = None
        if done and self.store is not None and self.world_size > 1:
            with contextlib.suppress(Exception):  # the store may already be gone at exit
                within(self._call_s, lambda: self._publish(done=True))

    def lost_ranks(self) -> list[str]:
        """The other ranks that are gone, for a failure message: a rank on this host whose process no longer exists
        (killed, crashed), or any rank whose heartbeat is older than three intervals. Each as ``"rank r (<where>,
        pid p on host)"``; empty without a store or when all look alive."""
        if self.store is None:
            return []
        try:
            records = within(self._call_s, self._records)
        except Exception:  # noqa: BLE001 - the store may be gone with the rank that hosted it
            return []
        now, host, lost = time.time(), rank_host(), []
        for r, rec in records.items():
            if r == self.rank or rec is None or rec["done"]:
                continue
            gone = now - rec["wall"] > 3 * self.interval_s or (rec["host"] == host and not _alive(rec["pid"]))
            if gone:
                lost.append(
                    f"rank {r} ({self.describe(r)}, pid {rec['pid']} on {rec['host']}; its last heartbeat, "
                    f"{now - rec['wall']:.0f} s ago, was at step {rec['step']}, {rec['phase']})"
                )
        return lost

    # ----------------------------------------------------------------------------------- thread
    def _record(self, done: bool = False) -> dict:
        return {
            "wall": time.time(),
            "pid": os.getpid(),
            "host": rank_host(),
            "done": done,
            "phase": self._phase,
            "step": self._step,
            "seq": self._seq,
            "progress_wall": self._progress_wall,
        }

    def _publish(self, done: bool = False) -> None:
        self.store.set(f"hb/{self.rank}", json.dumps(self._record(done)))

    def _records(self) -> dict[int, dict | None]:
        """Every rank's last heartbeat (None: it never published one)."""
        keys = [f"hb/{r}" for r in range(self.world_size)]
        if self.store.check(keys):  # the usual case: one round trip for the existence check
            present = list(range(self.world_size))
        else:
            present = [r for r in range(self.world_size) if self.store.check([keys[r]])]
        values = self.store.multi_get([keys[r] for r in present]) if present else []
        out: dict[int, dict | None] = dict.fromkeys(range(self.world_size))
        for r, v in zip(present, values):
            out[r] = json.loads(v)
        return out

    def _run(self) -> None:
        last_answer = time.monotonic()
        store_lost_after = max(3 * self.interval_s, min(60.0, self.timeout_s / 2))
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)  # a heartbeat every interval, or soon after a progress mark
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                within(self._call_s, self._publish)
                last_answer = time.monotonic()
                stalled = time.monotonic() - self._progress_mono
                if stalled >= self.timeout_s - 2 * self.interval_s:
                    records = within(self._call_s, self._records)
                    message, culprits = self.judge(records, now=time.time(), stalled_s=stalled)
                    if message is not None:
                        self._end_job(message, culprits)
                        return
            except Exception as exc:  # noqa: BLE001 - a store that stopped answering is itself a verdict
                silent = time.monotonic() - last_answer
                if silent >= store_lost_after:
                    self._end_job(
                        f"watchdog: the job's store has not answered rank {self.rank} for {silent:.0f} s "
                        f"({type(exc).__name__}: {exc}): the process hosting it (torchrun's agent, or rank 0 without "
                        "torchrun) is stopped or gone, so nobody can stop or restart this job any more; ending it",
                        [],
                    )
                    return
                self._stop.wait(self.interval_s)  # back off: one try per interval while it is away
            self._stop.wait(self._min_gap)  # at most one heartbeat per min_gap, however often progress is marked

    def judge(self, records: dict[int, dict | None], *, now: float, stalled_s: float) -> tuple[str | None, list]:
        """The verdict for this rank, stalled for ``stalled_s`` seconds, given every rank's heartbeat.

        Returns:
            ``(message, culprits)``: the message naming the stuck rank(s) with their module and last progress, and
            the culprits' records as ``(rank, record)``; ``(None, [])`` when nobody can be blamed yet.
        """
        stale_after = max(self.timeout_s / 2, 3 * self.interval_s)
        frozen = [
            (r, rec)
            for r, rec in records.items()
            if r != self.rank and (rec is None or (not rec["done"] and now - rec["wall"] >= stale_after))
        ]
        limit = f"training.collective_timeout_s={self.timeout_s:g}"
        if frozen:
            parts = []
            for r, rec in frozen[:8]:
                if rec is None:
                    parts.append(f"rank {r} ({self.describe(r)}) never sent a heartbeat")
                else:
                    parts.append(
                        f"rank {r} ({self.describe(r)}) stopped responding {now - rec['wall']:.0f} s ago "
                        f"(no heartbeat; last progress: step {rec['step']}, {rec['phase']}; pid "
                        f"{rec['pid']} on {rec['host']})"
                    )
            more = f" and {len(frozen) - 8} more" if len(frozen) > 8 else ""
            return (
                f"watchdog: {'; '.join(parts)}{more}. Rank {self.rank} waited {stalled_s:.0f} s for it "
                f"({limit}); ending the job",
                frozen,
            )
        live = [(r, rec) for r, rec in records.items() if rec is not None and not rec["done"]]
        if not live:
            return None, []
        oldest = min(rec["progress_wall"] for _, rec in live)
        if now - oldest < self.timeout_s - 2 * self.interval_s:
            return None, []
        # every rank passes the same progress marks in the same order: the ranks with fewer marks are the ones the
        # others wait for
        last = max(rec["seq"] for _, rec in live)
        behind = [(r, rec) for r, rec in live if rec["seq"] < last]
        if not behind:
            _, rec0 = live[0]
            return (
                f"watchdog: all {len(live)} ranks made no progress for {now - oldest:.0f} s, all at step "
                f"{rec0['step']}, {rec0['phase']}, and every heartbeat is alive: a deadlock or a collective that "
                f"never completes ({limit}; if this phase legitimately takes longer, raise it); ending the job",
                [],
            )
        text = "; ".join(
            f"rank {r} ({self.describe(r)}) made no progress for {now - rec['progress_wall']:.0f} s "
            f"(last: step {rec['step']}, {rec['phase']}; pid {rec['pid']} on {rec['host']})"
            for r, rec in behind[:8]
        )
        text += f" and {len(behind) - 8} more" if len(behind) > 8 else ""
        return (
            f"watchdog: {text}; the other ranks wait for it ({limit}; if that phase legitimately takes longer, raise "
            "it); ending the job",
            behind,
        )

    def _print_main_stack(self) -> None:
        frame = sys._current_frames().get(threading.main_thread().ident or -1)
        if frame is None:
            return
        stack = "".join(traceback.format_stack(frame)).rstrip()
        print(
            f"[rank{self.rank}] watchdog: main thread of rank {self.rank} at the verdict:\n{stack}",
            file=sys.stderr,
            flush=True,
        )

    def _end_job(self, message: str, culprits: list) -> None:
        try:
            # the one report of the job: later errors stay silent
            claimed = within(self._call_s, lambda: claim_job_report(self.store, self.rank))
        except Exception:  # noqa: BLE001 - without the store, report it here
            claimed = True
        if claimed:
            print(f"[rank{self.rank}] {message}", file=sys.stderr, flush=True)
        unnamed = not culprits
        if unnamed or any(r == self.rank for r, _ in culprits):
            # nobody could be named from the heartbeats (all ranks in the same phase), or this rank is the one
            # behind: where its main thread is tells which rank hangs and in what
            self._print_main_stack()
        host = rank_host()
        for r, rec in culprits:
            if rec is not None and r != self.rank and rec.get("host") == host:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(rec["pid"], signal.SIGKILL)
        if self.on_verdict is not None:
            self.on_verdict(message)
            return
        if unnamed:  # give the other stalled ranks (the hung one among them) time to print their stacks too
            time.sleep(2 * self.interval_s + 1.0)
        os._exit(EXIT_STUCK)
