"""Choosing between the Triton kernels and the plain-torch references: one switch for the whole process.

Every public op takes ``backend=None`` (the process-wide choice below) or an explicit name:

- ``"auto"``: Triton on CUDA tensors, the torch reference elsewhere;
- ``"triton"``: the Triton kernels always; on CPU they run in Triton's interpreter, which must be active when
  the kernels are *decorated*, i.e. ``TRITON_INTERPRET=1`` set before ``kernels`` is imported;
- ``"torch"``: the references always.

The process-wide choice is, in order: the environment variable ``MIMO_TITAN_KERNELS`` (so a launcher can force
it for every rank), then :func:`set_backend` (mimo_titan calls it with the config key ``kernels.backend``), then
``"auto"``. Importing ``kernels`` with ``MIMO_TITAN_KERNELS=triton`` on a machine without CUDA sets
``TRITON_INTERPRET=1`` first, so the forced kernels run on CPU too.

Triton receives raw pointers: an input must be a plain tensor with storage. A tensor subclass without storage
(an unwaited ``AsyncCollectiveTensor`` from ``torch.distributed._functional_collectives``, whose ``data_ptr()``
is 0) would reach the kernel as a null pointer on CUDA; :func:`use_triton` refuses it with an error that says to
wait on the collective first.
"""

from __future__ import annotations

import os

import torch

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "set_backend",
    "get_backend",
    "interpreter_active",
    "use_triton",
    "check_backend",
    "dispatch_counts",
    "reset_dispatch_counts",
]

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "MIMO_TITAN_KERNELS"

_configured = "auto"
_dispatched = {"triton": 0, "torch": 0}  # ops dispatched per implementation since the last reset


def dispatch_counts() -> dict[str, int]:
    """How many kernel ops ran on each implementation (``{"triton": n, "torch": m}``) in this process since the
    last :func:`reset_dispatch_counts`: lets a test prove that training really took the Triton path."""
    return dict(_dispatched)


def reset_dispatch_counts() -> None:
    """Zero the counters of :func:`dispatch_counts`."""
    for k in _dispatched:
        _dispatched[k] = 0


def _checked(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def prepare_interpreter() -> None:
    """With ``MIMO_TITAN_KERNELS=triton`` and no CUDA device, set ``TRITON_INTERPRET=1`` (if unset) so that the
    kernels decorated next run in Triton's interpreter. Called by ``kernels/__init__`` before any kernel exists."""
    if os.environ.get(ENV_VAR, "").strip().lower() == "triton" and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreter_active() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET`` truthy when the kernels were
    decorated; this module is imported right before them)."""
    return _INTERPRET


def set_backend(name: str) -> None:
    """Set the process-wide backend (``kernels.backend`` of a config); ``MIMO_TITAN_KERNELS`` still wins.

    Raises:
        ValueError: ``name`` is not one of :data:`BACKENDS`.
    """
    global _configured
    _configured = _checked(name, "kernels.backend")


def get_backend() -> str:
    """The process-wide backend: ``MIMO_TITAN_KERNELS`` if set, else :func:`set_backend`'s, else ``"auto"``.

    Raises:
        ValueError: ``MIMO_TITAN_KERNELS`` holds an unknown name.
    """
    env = os.environ.get(ENV_VAR, "").strip().lower()
    return _checked(env, f"environment variable {ENV_VAR}") if env else _configured


def check_backend(device_type: str, backend: str | None = None) -> str:
    """Fail early (before any data reaches a kernel) when ``backend`` cannot run on ``device_type``.

    Args:
        device_type: ``"cuda"`` or ``"cpu"``: where the op's tensors will live.
        backend: a name of :data:`BACKENDS`, or None for :func:`get_backend`.

    Returns:
        The backend that ops on such tensors will run: ``"triton"`` or ``"torch"``.

    Raises:
        ValueError: unknown backend, or ``"triton"`` on CPU while the kernels were not decorated for the
            interpreter.
    """
    name = _checked(backend, "backend") if backend is not None else get_backend()
    if name == "auto":
        return "triton" if device_type == "cuda" else "torch"
    if name == "triton" and device_type != "cuda" and not _INTERPRET:
        explicit = os.environ.get("TRITON_INTERPRET")
        why = (
            f"TRITON_INTERPRET={explicit!r} turned it off; unset it or set TRITON_INTERPRET=1"
            if explicit is not None
            else f"set TRITON_INTERPRET=1 (or {ENV_VAR}=triton) in the environment before Python starts"
        )
        raise ValueError(
            f"the Triton kernels were asked for on {device_type} ({ENV_VAR} / kernels.backend = 'triton') but "
            f"Triton's interpreter was off when the kernels were imported: {why}, or use kernels.backend = 'auto'"
        )
    return name


def use_triton(backend: str | None, x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether an op on ``tensors`` (the first decides the device) runs its Triton kernel.

    Args:
        backend: a name of :data:`BACKENDS`, or None for the process-wide :func:`get_backend`.
        x, others: the op's tensor inputs (None entries of ``others`` are skipped).

    Raises:
        ValueError: unknown backend; ``"triton"`` on a CPU tensor without the interpreter; a Triton input that is
            a tensor subclass without storage (e.g. an unwaited collective output).
    """
    if check_backend("cuda" if x.is_cuda else "cpu", backend) == "torch":
        _dispatched["torch"] += 1
        return False
    for t in (x, *others):
        # exact types: an FSDP-sharded nn.Parameter is a DTensor subclass, and isinstance(Parameter) accepts it too
        if t is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise ValueError(
                f"a Triton kernel got a {type(t).__name__}, which has no storage of its own (data_ptr() = "
                f"{t.data_ptr()}); wait on the collective that produced it (funcol.wait_tensor) before the kernel"
            )
    _dispatched["triton"] += 1
    return True


def _interpret_from_env() -> bool:
    try:
        from triton import knobs  # triton >= 3.4 reads TRITON_INTERPRET through its knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # pragma: no cover - older triton
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


prepare_interpreter()
_INTERPRET = _interpret_from_env()
