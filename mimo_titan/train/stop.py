"""Graceful stop on SIGTERM / SIGINT: finish the current step, save a checkpoint, exit 0.

A preempting scheduler (SLURM, Kubernetes) sends SIGTERM to every task and kills it some seconds later; Ctrl-C
sends SIGINT to every process of the terminal's foreground group (torchrun and all its ranks), and torchrun
forwards the signal it got to its ranks once more. :class:`GracefulStop` turns the first such signal into a
*request*: the training loop finishes the step it is in, all ranks agree to stop (the request travels in the
step's own all-reduce, so every rank stops after the same step even if the signal reached them at different
times), the loop saves a checkpoint when checkpointing is on, and the process exits 0.

Repeated signals within ``grace_s`` seconds of the first are the same request arriving twice (the terminal's and
torchrun's copies). A signal later than that means the user insists: the previous handler is restored and the
signal re-raised, so the process ends at once (SIGINT as ``KeyboardInterrupt``).

Reference behaviour: torchtitan and Megatron-LM save on a signal before exiting (Megatron's ``--exit-signal-handler``
checks a flag after each iteration and all-reduces it).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

__all__ = ["GracefulStop"]

logger = logging.getLogger("mimo_titan")


class GracefulStop:
    """Records the first SIGTERM / SIGINT as a stop request (see the module docstring).

    Use as a context manager around the training loop; the handlers are installed only in the main thread (Python
    delivers signals there) and restored on exit.

    Args:
        signals: the signals that request a stop.
        grace_s: seconds after the first signal during which repeats are ignored; a later repeat ends the process
            immediately.

    Attributes:
        signal_name: ``"SIGTERM"`` / ``"SIGINT"`` once a stop was requested, else None.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT), grace_s: float = 3.0):
        self.signals = signals
        self.grace_s = grace_s
        self.signal_name: str | None = None
        self._first_at: float | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was requested on this rank."""
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        now = time.monotonic()
        if self._first_at is None:
            self._first_at, self.signal_name = now, sig.name
            logger.info(
                "received %s: stopping after the current step (a checkpoint is saved when checkpointing "
                "is on); send it again after %.0f s to stop at once",
                sig.name,
                self.grace_s,
            )
            return
        if now - self._first_at < self.grace_s:
            return  # the same request again (torchrun forwards the terminal's Ctrl-C)
        logger.info("received %s again: stopping now, without a checkpoint", sig.name)
        self.uninstall()
        os.kill(os.getpid(), signum)

    def install(self) -> GracefulStop:
        """Install the handlers (main thread only; elsewhere a no-op). Returns self."""
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were installed before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous = {}

    def __enter__(self) -> GracefulStop:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
