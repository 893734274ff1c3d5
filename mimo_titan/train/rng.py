"""Per-module, per-rank random seeds and a named-stream RNG tracker (Megatron-style).

Parallel training needs several random streams per rank, each shared by exactly
the ranks that must draw the same numbers (Megatron-LM's
``tensor_parallel.random``: ``model_parallel_cuda_manual_seed`` and
``CudaRNGStatesTracker``):

* ``"default"``: equal on all ranks of one pipeline stage of one module (all its
  dp / cp / tp / ep ranks): e.g. dropout on replicated activations, or
  initialising weights that are replicated / sharded *after* init.
* ``"tensor"``: differs between the tp ranks of a stage: dropout on tensor-parallel
  (sharded) activations, init of weights created already tp-sharded.
* ``"expert"``: differs between the ep ranks and the etp ranks of a stage, equal
  over edp: init of (and dropout inside) the local experts, so that experts on
  different ep ranks never share a stream but expert replicas over edp agree.

Every stream also differs between pipeline stages (like Megatron's ``seed + 100 *
pp_rank``) and between the modules of a MIMO model (vision / language). The seeds
come from :func:`module_seeds`; :class:`RNGTracker` holds one generator per stream
and switches the global torch RNG to a stream inside ``with tracker.fork(name):``.
There is no global tracker: the trainer owns one instance per module.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["SEED_STREAMS", "STREAM_COORDS", "RNGTracker", "module_seeds"]

#: Stream names returned by :func:`module_seeds`.
SEED_STREAMS: tuple[str, ...] = ("default", "tensor", "expert")

#: For each stream, the rank coordinates its seed depends on (besides ``base_seed`` and
#: ``module_index``). Any other coordinate (dp_replicate, dp_shard, cp, edp, ...) is ignored.
STREAM_COORDS: Mapping[str, tuple[str, ...]] = {
    "default": ("pp",),
    "tensor": ("pp", "tp"),
    "expert": ("pp", "ep", "etp"),
}

_REQUIRED_COORDS: tuple[str, ...] = ("pp", "tp", "ep", "etp")
_MIX_TAG = "mimo_titan.rng.v1"
_SEED_MASK = (1 << 63) - 1


def _check_int(value: Any, what: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what}={value!r} must be an int")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what}={value} must be >= {minimum}")
    return value


def _mix(*parts: tuple[str, int] | str) -> int:
    """A 63-bit seed from an ordered tuple of labelled ints: SHA-256 of their text.

    ``parts`` are rendered as ``"name=value"`` (or a bare tag) joined by ``"|"``;
    the first 8 bytes of the SHA-256 digest, big-endian, masked to 63 bits, are
    the seed. Deterministic across processes, Python versions and platforms
    (unlike ``hash()``), and collision-resistant for any inputs.
    """
    text = "|".join(p if isinstance(p, str) else f"{p[0]}={p[1]}" for p in parts)
    digest = hashlib.sha256(text.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") & _SEED_MASK


def module_seeds(base_seed: int, module_index: int, coords: Mapping[str, int]) -> dict[str, int]:
    """Seeds of the ``default``, ``tensor`` and ``expert`` streams of one rank in one module.

    Each seed is ``_mix(tag, stream, base_seed, module_index, *coords)``: the
    SHA-256 of the text ``"mimo_titan.rng.v1|<stream>|base=<base_seed>|module=<module_index>"``
    followed by ``"|<dim>=<coord>"`` for each dim of :data:`STREAM_COORDS` ``[stream]``
    in that order, truncated to its first 8 bytes (big-endian) and masked to 63
    bits. So:

    * ``default`` depends on ``base_seed``, ``module_index`` and ``pp`` only;
    * ``tensor`` additionally on ``tp``;
    * ``expert`` on ``base_seed``, ``module_index``, ``pp``, ``ep`` and ``etp``
      (equal over ``edp``, dp, cp and tp);

    and distinct streams / coordinates give distinct seeds (up to SHA-256
    collisions). Megatron-LM instead adds fixed offsets (``seed + 100*pp``,
    ``+ 2718 + tp``, ``+ 1024 + 100*ep + etp``), which can collide for large
    degrees; hashing cannot.

    Args:
        base_seed: the run's seed (``[job] seed``); any int.
        module_index: the module's index in layout order (0 = vision, 1 =
            language for ``layouts_from_config``); >= 0.
        coords: the rank's coordinates in the module; must contain ``pp``,
            ``tp``, ``ep`` and ``etp`` (ints >= 0); other keys are ignored. E.g.
            ``{**role.coordinates[name], **role.expert_coordinates(name)}`` from
            :class:`mimo_titan.topology.RankRole`.

    Returns:
        ``{"default": s0, "tensor": s1, "expert": s2}``, each in ``[0, 2**63)``
        (valid for ``torch.manual_seed`` / ``Generator.manual_seed``).

    Raises:
        TypeError: a seed, index or coordinate is not an int (bools rejected).
        ValueError: ``module_index`` or a coordinate is negative, or a required
            coordinate is missing.
    """
    _check_int(base_seed, "base_seed")
    _check_int(module_index, "module_index", 0)
    missing = [d for d in _REQUIRED_COORDS if d not in coords]
    if missing:
        raise ValueError(
            f"module_seeds: coords {dict(coords)} lack {missing}; pass the rank's dense and expert "
            "coordinates, e.g. {**role.coordinates[name], **role.expert_coordinates(name)}"
        )
    for d in _REQUIRED_COORDS:
        _check_int(coords[d], f"coords[{d!r}]", 0)
    out: dict[str, int] = {}
    for stream in SEED_STREAMS:
        parts: list[tuple[str, int] | str] = [_MIX_TAG, stream, ("base", base_seed), ("module", module_index)]
        parts.extend((d, coords[d]) for d in STREAM_COORDS[stream])
        out[stream] = _mix(*parts)
    return out


class RNGTracker:
    """Named random streams, each a torch.Generator state, entered with :meth:`fork`.

    A re-implementation of Megatron-LM's ``CudaRNGStatesTracker`` for CPU and
    CUDA: each stream keeps a CPU generator (and, with ``cuda=True``, a CUDA
    generator for the current device) seeded once by :meth:`add`. Inside
    ``with tracker.fork(name):`` the *global* torch RNG (``torch.rand``,
    ``nn.init``, dropout, ...) draws from that stream; on exit the stream keeps
    its advanced state and the global RNG gets back exactly the state it had
    before the ``with``. Code outside any fork is untouched.

    Example::

        seeds = module_seeds(cfg.job.seed, 1, {**role.coordinates["language"],
                                               **role.expert_coordinates("language")})
        rng = RNGTracker(seeds)
        with rng.fork("expert"):
            init_local_experts(model)      # differs across ep ranks, equal over edp

    Args:
        seeds: optional ``{stream: seed}`` to :meth:`add` at construction (e.g. the
            result of :func:`module_seeds`).
        cuda: also track the CUDA RNG of the current device; defaults to
            ``torch.cuda.is_available()``. Pass False for a CPU-only run on a
            CUDA machine to avoid initialising CUDA.

    Raises:
        ValueError: duplicate stream name or seed (see :meth:`add`).
    """

    def __init__(self, seeds: Mapping[str, int] | None = None, *, cuda: bool | None = None) -> None:
        self._cuda = torch.cuda.is_available() if cuda is None else bool(cuda)
        self._seeds: dict[str, int] = {}
        self._cpu: dict[str, torch.Generator] = {}
        self._gpu: dict[str, torch.Generator] = {}
        self._active: list[str] = []
        for name, seed in (seeds or {}).items():
            self.add(name, seed)

    @property
    def cuda(self) -> bool:
        """Whether CUDA RNG states are tracked too."""
        return self._cuda

    @property
    def names(self) -> tuple[str, ...]:
        """Stream names, in the order they were added."""
        return tuple(self._seeds)

    def seed(self, name: str) -> int:
        """The seed stream ``name`` was created with.

        Raises:
            KeyError: unknown stream.
        """
        self._check_name(name)
        return self._seeds[name]

    def _check_name(self, name: str) -> None:
        if name not in self._seeds:
            raise KeyError(f"unknown RNG stream '{name}'; streams: {list(self._seeds)} (add it with .add())")

    def add(self, name: str, seed: int) -> None:
        """Creates stream ``name`` with generators seeded by ``seed``.

        Args:
            name: stream name, e.g. ``"tensor"``.
            seed: an int in ``[-2**63, 2**64)`` (torch's seed range).

        Raises:
            ValueError: ``name`` already exists, or another stream already uses
                ``seed`` (two streams with one seed would draw identical numbers;
                Megatron raises here too).
            TypeError: ``seed`` is not an int.
        """
        _check_int(seed, f"seed of stream '{name}'")
        if name in self._seeds:
            raise ValueError(f"RNG stream '{name}' already exists; use a new name or a new tracker")
        for other, s in self._seeds.items():
            if s == seed:
                raise ValueError(
                    f"seed {seed} of RNG stream '{name}' is already used by stream '{other}'; "
                    "give each stream its own seed (module_seeds does)"
                )
        cpu = torch.Generator(device="cpu")
        cpu.manual_seed(seed)
        if self._cuda:
            gpu = torch.Generator(device="cuda")
            gpu.manual_seed(seed)
            self._gpu[name] = gpu
        self._cpu[name] = cpu
        self._seeds[name] = seed

    @contextlib.contextmanager
    def fork(self, name: str) -> Iterator[None]:
        """Runs the ``with`` body with the global torch RNG set to stream ``name``.

        On entry saves the global CPU (and current CUDA device's) RNG state and
        loads the stream's; on exit (also on an exception) stores the advanced
        global state back into the stream and restores the saved one. Forks of
        *different* streams nest.

        Args:
            name: an existing stream.

        Raises:
            KeyError: unknown stream.
            RuntimeError: ``name`` is already being forked (a nested fork of the
                same stream would replay its numbers).
        """
        self._check_name(name)
        if name in self._active:
            raise RuntimeError(
                f"RNG stream '{name}' is already forked (nested fork of the same stream would repeat its "
                "random numbers); use the outer fork's context"
            )
        outer_cpu = torch.get_rng_state()
        device = torch.cuda.current_device() if self._cuda else None
        outer_gpu = torch.cuda.get_rng_state(device) if device is not None else None
        torch.set_rng_state(self._cpu[name].get_state())
        if device is not None:
            torch.cuda.set_rng_state(self._gpu[name].get_state(), device)
        self._active.append(name)
        try:
            yield
        finally:
            self._active.remove(name)
            self._cpu[name].set_state(torch.get_rng_state())
            torch.set_rng_state(outer_cpu)
            if device is not None and outer_gpu is not None:  # outer_gpu is saved iff there is a device
                self._gpu[name].set_state(torch.cuda.get_rng_state(device))
                torch.cuda.set_rng_state(outer_gpu, device)

    def state_dict(self) -> dict[str, Any]:
        """The streams' seeds and current states (copies), for checkpoints.

        Returns:
            ``{"seeds": {name: int}, "cpu": {name: uint8 tensor}, "cuda": {name:
            uint8 tensor}}``; ``"cuda"`` is present only when :attr:`cuda`. The
            states differ per rank: when saving with DCP, store them under a
            rank-specific key.

        Raises:
            RuntimeError: called inside a :meth:`fork` (the forked stream's
                state lives in the global RNG then).
        """
        self._check_not_forked("state_dict")
        out: dict[str, Any] = {
            "seeds": dict(self._seeds),
            "cpu": {n: g.get_state().clone() for n, g in self._cpu.items()},
        }
        if self._cuda:
            out["cuda"] = {n: g.get_state().clone() for n, g in self._gpu.items()}
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replaces all streams by those of a :meth:`state_dict`.

        CUDA states in ``state`` are ignored when this tracker does not track
        CUDA.

        Args:
            state: a dict produced by :meth:`state_dict`.

        Raises:
            ValueError: ``state`` lacks ``"seeds"``/``"cpu"``, a stream's CPU
                state, or (with :attr:`cuda`) its CUDA state.
            RuntimeError: called inside a :meth:`fork`.
        """
        self._check_not_forked("load_state_dict")
        for key in ("seeds", "cpu"):
            if key not in state:
                raise ValueError(f"RNG tracker state has no '{key}' entry; pass RNGTracker.state_dict() output")
        seeds = dict(state["seeds"])
        cpu_states = state["cpu"]
        gpu_states = state.get("cuda") or {}
        for name in seeds:
            if name not in cpu_states:
                raise ValueError(f"RNG tracker state has no CPU state for stream '{name}'")
            if self._cuda and name not in gpu_states:
                raise ValueError(
                    f"RNG tracker state has no CUDA state for stream '{name}' (saved without CUDA?); "
                    "construct the tracker with cuda=False to load a CPU-only state"
                )
        fresh = RNGTracker(seeds, cuda=self._cuda)
        for name in seeds:
            fresh._cpu[name].set_state(cpu_states[name].clone())
            if self._cuda:
                fresh._gpu[name].set_state(gpu_states[name].clone())
        self._seeds, self._cpu, self._gpu = fresh._seeds, fresh._cpu, fresh._gpu

    def _check_not_forked(self, what: str) -> None:
        if self._active:
            raise RuntimeError(f"RNGTracker.{what}() called inside fork('{self._active[-1]}'); call it outside")
