"""Per-module rank layouts and their validation (pure Python, no process groups).

A MIMO model is made of modules (a vision encoder, a language model, ...). Each
module owns a contiguous range of global ranks, ``[rank_offset, rank_offset +
num_ranks)``, and factors that range into a 5-D grid whose dimensions are, from
slowest- to fastest-varying, :data:`MESH_DIMS` = ``(pp, dp_replicate, dp_shard,
cp, tp)``. This follows the semantics of Megatron-LM's ``HyperCommGrid`` (one grid
per module, placed by ``rank_offset`` and ``num_ranks``, ranks enumerated in
row-major order over the grid dims with the last dim varying fastest), expressed
with the dimension names torchtitan uses for its DeviceMesh.

Two modules are either *colocated* (identical rank ranges) or *non-colocated*
(disjoint rank ranges); partially overlapping ranges are rejected.

Expert parallelism (MoE) does not add ranks: inside each pipeline stage, the
``dp_replicate * dp_shard * cp * tp`` ranks of the stage are re-read as a 3-D
expert grid ``(edp, ep, etp)`` with ``etp`` fastest, where ``etp * ep * edp``
equals the stage size and ``edp`` (expert data parallelism) is derived. The
module's expert grid is thus ``(pp, edp, ep, etp)`` = :data:`EXPERT_MESH_DIMS`
over the *same* ranks as its dense grid, as in Megatron-LM's expert
``RankGenerator`` (orders ``tp-cp-dp-pp`` for dense and ``tp-ep-dp-pp`` for
expert layers, with ``expert_tensor_parallel_size`` as the expert ``tp``).
Dense ranks ``[4, 5, 6, 7]`` of a stage with ``dp_shard=2, tp=2`` become, with
``ep=2, etp=1``, two ep groups ``[4, 5]`` and ``[6, 7]`` and edp groups ``[4, 6]``
and ``[5, 7]``.

Everything here runs before any process group exists, so a bad layout fails fast
with a :class:`LayoutError` that names the module, the field and a fix.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mimo_titan.errors import LayoutError

__all__ = [
    "EXPERT_MESH_DIMS",
    "MESH_DIMS",
    "LayoutError",
    "ModuleLayout",
    "Placement",
    "RankRole",
    "rank_role",
    "validate_layouts",
]

#: Mesh dimension names, slowest- to fastest-varying (row-major rank order).
MESH_DIMS: tuple[str, ...] = ("pp", "dp_replicate", "dp_shard", "cp", "tp")

#: Expert-grid dimension names, slowest- to fastest-varying: pipeline stage, expert
#: data parallel (derived), expert parallel, expert tensor parallel.
EXPERT_MESH_DIMS: tuple[str, ...] = ("pp", "edp", "ep", "etp")

_DEGREE_FIELDS: tuple[str, ...] = (*MESH_DIMS, "ep", "etp")


class Placement(enum.Enum):
    """How the modules' rank ranges relate to each other.

    Attributes:
        COLOCATED: every module uses the same rank range (the ranks run all
            modules, one after the other). A single-module layout is COLOCATED.
        NON_COLOCATED: the modules' rank ranges are pairwise disjoint and
            together tile ``[0, world_size)``.
        MIXED: some modules share a range, others have their own (e.g. two
            encoders on the same ranks, the language model apart).
    """

    COLOCATED = "colocated"
    NON_COLOCATED = "non_colocated"
    MIXED = "mixed"


def _fmt_ranks(ranks: list[int]) -> str:
    """Formats a sorted list of ranks compactly, e.g. ``[0-3, 6]``."""
    parts: list[str] = []
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return "[" + ", ".join(parts) + "]"


@dataclass(frozen=True)
class ModuleLayout:
    """The rank range and parallel degrees of one module.

    The module occupies global ranks ``[rank_offset, rank_offset + num_ranks)``,
    arranged as a grid of shape ``(pp, dp_replicate, dp_shard, cp, tp)`` in
    row-major order (``tp`` fastest), as in Megatron-LM's ``HyperCommGrid``.
    The same ranks also form the expert grid :attr:`expert_shape` =
    ``(pp, edp, ep, etp)`` (``etp`` fastest) used by MoE layers; see the module
    docstring. Construction does not validate; call :func:`validate_layouts`
    (or :meth:`validate`) before relying on the rank arithmetic.

    Attributes:
        name: module name (the key under which it appears in a layouts mapping).
        rank_offset: first global rank of the module (>= 0).
        num_ranks: number of ranks; must equal ``pp*dp_replicate*dp_shard*cp*tp``.
        pp: pipeline-parallel degree.
        dp_replicate: replicated data-parallel degree (the "replicate" dim of HSDP).
        dp_shard: sharded data-parallel degree (FSDP).
        cp: context-parallel degree.
        tp: tensor-parallel degree.
        ep: expert-parallel degree (experts are split over ``ep`` ranks of a
            stage). ``ep * etp`` must divide ``dp_replicate*dp_shard*cp*tp``.
            Whether the module's model actually has MoE layers is not checked
            here (with a dense model the expert grid is simply unused).
        etp: expert tensor-parallel degree (each expert's weights split over
            ``etp`` ranks); independent of ``tp``, as in Megatron-LM.
        is_language: True for the (single) language-model module.
    """

    name: str
    rank_offset: int
    num_ranks: int
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1
    etp: int = 1
    is_language: bool = False

    # ---- derived sizes -------------------------------------------------------------

    @property
    def dp(self) -> int:
        """Total data-parallel degree, ``dp_replicate * dp_shard``."""
        return self.dp_replicate * self.dp_shard

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """Grid shape in :data:`MESH_DIMS` order: ``(pp, dp_replicate, dp_shard, cp, tp)``."""
        return (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)

    @property
    def sizes(self) -> dict[str, int]:
        """Grid sizes keyed by dimension name, in :data:`MESH_DIMS` order."""
        return dict(zip(MESH_DIMS, self.shape))

    @property
    def ranks(self) -> range:
        """Global ranks of the module, ``range(rank_offset, rank_offset + num_ranks)``."""
        return range(self.rank_offset, self.rank_offset + self.num_ranks)

    @property
    def end(self) -> int:
        """One past the module's last global rank, ``rank_offset + num_ranks``."""
        return self.rank_offset + self.num_ranks

    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage, ``dp_replicate * dp_shard * cp * tp``."""
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def edp(self) -> int:
        """Expert data-parallel degree, ``stage_size // (ep * etp)`` (derived).

        Each expert's weights are replicated (or FSDP-sharded) over ``edp`` ranks.
        """
        return self.stage_size // (self.ep * self.etp)

    @property
    def expert_shape(self) -> tuple[int, int, int, int]:
        """Expert grid shape in :data:`EXPERT_MESH_DIMS` order: ``(pp, edp, ep, etp)``."""
        return (self.pp, self.edp, self.ep, self.etp)

    @property
    def expert_sizes(self) -> dict[str, int]:
        """Expert grid sizes keyed by dimension name, in :data:`EXPERT_MESH_DIMS` order."""
        return dict(zip(EXPERT_MESH_DIMS, self.expert_shape))

    # ---- rank arithmetic -----------------------------------------------------------

    def coordinate(self, rank: int) -> dict[str, int] | None:
        """Grid coordinate of a global rank.

        Args:
            rank: a global rank.

        Returns:
            ``{dim: index}`` for every dim in :data:`MESH_DIMS` (row-major unravel
            of ``rank - rank_offset`` over :attr:`shape`), or None if ``rank`` is
            not one of the module's ranks.
        """
        if rank not in self.ranks:
            return None
        local = rank - self.rank_offset
        coords: dict[str, int] = {}
        for dim, size in zip(reversed(MESH_DIMS), reversed(self.shape)):
            coords[dim] = local % size
            local //= size
        return {dim: coords[dim] for dim in MESH_DIMS}

    def dp_rank(self, rank: int) -> int | None:
        """Data-parallel rank of a global rank (flattened over dp_replicate x dp_shard).

        Args:
            rank: a global rank.

        Returns:
            ``dp_replicate_coord * dp_shard + dp_shard_coord`` in ``[0, dp)``, or
            None if ``rank`` is not one of the module's ranks.
        """
        c = self.coordinate(rank)
        if c is None:
            return None
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    def stage_ranks(self, stage: int) -> list[int]:
        """Global ranks of one pipeline stage.

        Args:
            stage: pipeline stage index in ``[0, pp)``.

        Returns:
            The ``num_ranks // pp`` global ranks whose ``pp`` coordinate is
            ``stage``, ascending (row-major over the remaining dims).

        Raises:
            ValueError: ``stage`` is out of range.
        """
        if not 0 <= stage < self.pp:
            raise ValueError(f"module '{self.name}': stage {stage} out of range [0, {self.pp})")
        per_stage = self.num_ranks // self.pp
        start = self.rank_offset + stage * per_stage
        return list(range(start, start + per_stage))

    def group_ranks(self, dims: tuple[str, ...] | str, rank: int) -> list[int] | None:
        """Global ranks that share every coordinate of ``rank`` except along ``dims``.

        This is the member list of the (possibly flattened) process group over
        ``dims`` that contains ``rank``, e.g. ``group_ranks("pp", r)`` is r's
        pipeline group and ``group_ranks(("dp_replicate", "dp_shard"), r)`` its
        data-parallel group.

        Args:
            dims: one dim name or a tuple of dim names from :data:`MESH_DIMS`.
            rank: a global rank.

        Returns:
            The group's global ranks in row-major order over ``dims`` (which is
            ascending), or None if ``rank`` is not one of the module's ranks.
        """
        dims = (dims,) if isinstance(dims, str) else tuple(dims)
        unknown = [d for d in dims if d not in MESH_DIMS]
        if unknown:
            raise ValueError(f"unknown mesh dims {unknown}; known: {MESH_DIMS}")
        c = self.coordinate(rank)
        if c is None:
            return None
        strides = self._strides()
        base = rank - sum(c[d] * strides[d] for d in dims)
        out = [base]
        for d in MESH_DIMS:  # row-major over the requested dims
            if d in dims:
                out = [r + i * strides[d] for r in out for i in range(self.sizes[d])]
        return sorted(out)

    def _strides(self) -> dict[str, int]:
        return _row_major_strides(MESH_DIMS, self.shape)

    def expert_coordinate(self, rank: int) -> dict[str, int] | None:
        """Expert-grid coordinate of a global rank.

        The stage's ranks, in the module's dense (row-major) order, are re-read
        as a row-major ``(edp, ep, etp)`` grid with ``etp`` fastest (Megatron-LM's
        expert grid): with ``s`` the rank's index inside its stage,
        ``etp = s % etp``, ``ep = (s // etp) % ep``, ``edp = s // (etp * ep)``.

        Args:
            rank: a global rank.

        Returns:
            ``{dim: index}`` for every dim in :data:`EXPERT_MESH_DIMS`, or None if
            ``rank`` is not one of the module's ranks.
        """
        if rank not in self.ranks:
            return None
        local = rank - self.rank_offset
        coords: dict[str, int] = {}
        for dim, size in zip(reversed(EXPERT_MESH_DIMS), reversed(self.expert_shape)):
            coords[dim] = local % size
            local //= size
        return {dim: coords[dim] for dim in EXPERT_MESH_DIMS}

    def expert_group_ranks(self, dims: tuple[str, ...] | str, rank: int) -> list[int] | None:
        """Global ranks that share every expert-grid coordinate of ``rank`` except ``dims``.

        E.g. ``expert_group_ranks("ep", r)`` is r's expert-parallel group (the
        ranks among which the experts are split and tokens are exchanged by
        all-to-all), ``expert_group_ranks("edp", r)`` the ranks holding the same
        experts (gradient reduction / FSDP of expert weights), and
        ``expert_group_ranks(("ep", "etp"), r)`` the ranks that together hold
        one full copy of all experts.

        Args:
            dims: one dim name or a tuple of dim names from :data:`EXPERT_MESH_DIMS`.
            rank: a global rank.

        Returns:
            The group's global ranks, ascending, or None if ``rank`` is not one
            of the module's ranks.

        Raises:
            ValueError: an unknown dim name.
        """
        dims = (dims,) if isinstance(dims, str) else tuple(dims)
        unknown = [d for d in dims if d not in EXPERT_MESH_DIMS]
        if unknown:
            raise ValueError(f"unknown expert mesh dims {unknown}; known: {EXPERT_MESH_DIMS}")
        c = self.expert_coordinate(rank)
        if c is None:
            return None
        strides = _row_major_strides(EXPERT_MESH_DIMS, self.expert_shape)
        sizes = self.expert_sizes
        base = rank - sum(c[d] * strides[d] for d in dims)
        out = [base]
        for d in EXPERT_MESH_DIMS:
            if d in dims:
                out = [r + i * strides[d] for r in out for i in range(sizes[d])]
        return sorted(out)

    # ---- validation ----------------------------------------------------------------

    def validate(self) -> None:
        """Checks this module on its own (checks 1-3 of :func:`validate_layouts`).

        Raises:
            LayoutError: a degree, ``num_ranks`` or ``rank_offset`` is not a valid
                int; the degrees' product differs from ``num_ranks``; or ``etp`` /
                ``ep * etp`` does not divide the ranks per pipeline stage.
        """
        n = self.name
        # 1. types and ranges
        for f in ("rank_offset", "num_ranks", *_DEGREE_FIELDS):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int):
                raise LayoutError(f"module '{n}': {f}={v!r} must be an int; set parallelism.{n}.{f} to an integer")
        if self.rank_offset < 0:
            raise LayoutError(
                f"module '{n}': rank_offset={self.rank_offset} is negative; "
                f"set parallelism.{n}.rank_offset to the module's first global rank (>= 0)"
            )
        if self.num_ranks < 1:
            raise LayoutError(
                f"module '{n}': num_ranks={self.num_ranks} must be >= 1; "
                f"set parallelism.{n}.num_ranks to the number of ranks the module runs on"
            )
        for f in MESH_DIMS:
            v = getattr(self, f)
            if v < 1:
                raise LayoutError(
                    f"module '{n}': parallel degree {f}={v} must be >= 1; "
                    f"set parallelism.{n}.{f} = 1 to disable that dimension"
                )
        for f, what in (("ep", "expert-parallel"), ("etp", "expert tensor-parallel")):
            v = getattr(self, f)
            if v < 1:
                raise LayoutError(
                    f"module '{n}': {what} degree {f}={v} must be >= 1; "
                    f"set parallelism.{n}.{f} = 1 for no {what} split (a dense or unsplit MoE module)"
                )
        # 2. degrees must factor num_ranks
        product = math.prod(self.shape)
        if product != self.num_ranks:
            expr = "*".join(MESH_DIMS)
            vals = "*".join(str(s) for s in self.shape)
            others = product // self.dp_shard
            if self.num_ranks % others == 0:
                hint = (
                    f"set dp_shard={self.num_ranks // others} to fill num_ranks={self.num_ranks}, "
                    f"or set num_ranks={product}"
                )
            else:
                hint = f"change the degrees so that their product is {self.num_ranks}, or set num_ranks={product}"
            raise LayoutError(
                f"module '{n}': degree product {expr} = {vals} = {product} != num_ranks={self.num_ranks}; "
                f"{hint} in parallelism.{n}"
            )
        # 3. the expert grid (edp, ep, etp) must factor each stage's ranks
        stage = self.stage_size
        stage_expr = f"dp_replicate*dp_shard*cp*tp = {self.dp_replicate}*{self.dp_shard}*{self.cp}*{self.tp} = {stage}"
        if stage % self.etp != 0:
            raise LayoutError(
                f"module '{n}': etp={self.etp} does not divide the ranks per pipeline stage, "
                f"{stage_expr}; set parallelism.{n}.etp to one of {_divisors(stage)}"
            )
        if stage % (self.ep * self.etp) != 0:
            valid = _divisors(stage // self.etp)
            raise LayoutError(
                f"module '{n}': ep*etp = {self.ep}*{self.etp} = {self.ep * self.etp} does not divide "
                f"the ranks per pipeline stage, {stage_expr} (edp = {stage}/(ep*etp) must be an int); "
                f"with etp={self.etp} set parallelism.{n}.ep to one of {valid}"
            )


def _row_major_strides(dims: tuple[str, ...], shape: tuple[int, ...]) -> dict[str, int]:
    """Row-major strides (last dim fastest) keyed by dim name."""
    strides: dict[str, int] = {}
    s = 1
    for dim, size in zip(reversed(dims), reversed(shape)):
        strides[dim] = s
        s *= size
    return strides


def _divisors(n: int) -> list[int]:
    """Positive divisors of ``n``, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_layouts(layouts: Mapping[str, ModuleLayout], world_size: int) -> Placement:
    """Validates a set of module layouts against the launched world size.

    Checks, in this order (each failure has its own message):

    1. every degree (pp, dp_replicate, dp_shard, cp, tp, ep, etp) and
       ``num_ranks`` is an int >= 1 and ``rank_offset`` >= 0 (and each mapping key
       equals its layout's ``name``);
    2. ``pp*dp_replicate*dp_shard*cp*tp == num_ranks``;
    3. ``etp``, then ``ep * etp``, divides the ranks per stage
       ``dp_replicate*dp_shard*cp*tp`` (so ``edp`` is an int). ``ep > 1`` on a
       module whose model has no MoE layers is not a layout error (the model
       code decides what to do with an unused expert grid);
    4. no module range reaches past ``world_size``;
    5. any two ranges are disjoint or identical (colocated);
    6. the ranges leave no gap below the highest covered rank;
    7. exactly one module has ``is_language=True``;
    8. the ranges cover exactly ``world_size`` ranks;
    9. the placement: colocated, non-colocated, or mixed (some ranges shared).

    Args:
        layouts: module name -> layout, in the order the modules are built.
        world_size: number of launched ranks (``torchrun --nproc_per_node * nnodes``).

    Returns:
        :attr:`Placement.COLOCATED` if all modules share one rank range (also for
        a single module), :attr:`Placement.NON_COLOCATED` if all ranges are
        pairwise disjoint, :attr:`Placement.MIXED` otherwise.

    Raises:
        LayoutError: the first failed check, naming the module, field and fix.
    """
    if not layouts:
        raise LayoutError("no module layouts given; define at least parallelism.language")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise LayoutError(f"world_size={world_size!r} must be an int >= 1")
    for key, lay in layouts.items():
        if not isinstance(lay, ModuleLayout):
            raise LayoutError(f"module '{key}': expected a ModuleLayout, got {type(lay).__name__}")
        if lay.name != key:
            raise LayoutError(
                f"module '{key}': layout is registered under '{key}' but its name is '{lay.name}'; "
                f"make the mapping key equal to ModuleLayout.name"
            )
    # 1-3: per module (types/ranges, product, expert grid).
    for lay in layouts.values():
        lay.validate()

    mods = list(layouts.values())
    # 4: inside the world.
    covered = max(lay.end for lay in mods)
    for lay in mods:
        if lay.end > world_size:
            raise LayoutError(
                f"module '{lay.name}': ranks [{lay.rank_offset}, {lay.end}) "
                f"(rank_offset={lay.rank_offset} + num_ranks={lay.num_ranks}) reach past "
                f"world_size={world_size}; the layouts need {covered} ranks: launch with "
                f"--nproc_per_node={covered} (x nnodes) or reduce parallelism.{lay.name}.num_ranks/rank_offset"
            )
    # 5: disjoint or identical.
    for i, a in enumerate(mods):
        for b in mods[i + 1 :]:
            same = (a.rank_offset, a.num_ranks) == (b.rank_offset, b.num_ranks)
            overlap = a.rank_offset < b.end and b.rank_offset < a.end
            if overlap and not same:
                raise LayoutError(
                    f"modules '{a.name}' ranks [{a.rank_offset}, {a.end}) and '{b.name}' ranks "
                    f"[{b.rank_offset}, {b.end}) partially overlap; rank ranges must be disjoint "
                    f"(non-colocated) or identical (colocated): change parallelism.{b.name}.rank_offset/num_ranks"
                )
    # 6: no gap below the highest covered rank.
    seen: set[int] = set()
    for lay in mods:
        seen.update(lay.ranks)
    holes = [r for r in range(covered) if r not in seen]
    if holes:
        spans = ", ".join(
            f"'{lay.name}' [{lay.rank_offset}, {lay.end})" for lay in sorted(mods, key=lambda m: m.rank_offset)
        )
        raise LayoutError(
            f"ranks {_fmt_ranks(holes)} are not covered by any module (ranges: {spans}); "
            f"the modules' rank ranges must tile [0, world_size): adjust rank_offset/num_ranks so they are contiguous"
        )
    # 7: exactly one language module.
    lang = [lay.name for lay in mods if lay.is_language]
    if not lang:
        raise LayoutError(
            f"no module has is_language=True (modules: {[m.name for m in mods]}); "
            f"mark exactly one module as the language model"
        )
    if len(lang) > 1:
        raise LayoutError(
            f"more than one module has is_language=True ({lang}); mark exactly one module as the language model"
        )
    # 8: cover exactly world_size.
    if covered != world_size:
        raise LayoutError(
            f"world_size mismatch: the layouts cover {covered} ranks [0, {covered}) but world_size={world_size}; "
            f"launch with --nproc_per_node={covered} (x nnodes), or grow the modules' num_ranks "
            f"(and degrees) to cover {world_size} ranks"
        )
    # 9: placement.
    ranges = {(lay.rank_offset, lay.num_ranks) for lay in mods}
    if len(ranges) == 1:
        return Placement.COLOCATED
    if len(ranges) == len(mods):
        return Placement.NON_COLOCATED
    return Placement.MIXED


@dataclass(frozen=True)
class RankRole:
    """What one global rank does: which modules it holds and where it sits in each.

    Built by :func:`rank_role`; pure data, no process groups.

    Attributes:
        rank: the global rank.
        placement: placement of the whole layout set.
        modules: names of the modules this rank holds, in layout order (one
            module when non-colocated, all of them when colocated).
        coordinates: module name -> ``{dim: index}`` over :data:`MESH_DIMS`, for
            each held module.
        layouts: all module layouts (name -> layout), in layout order.
    """

    rank: int
    placement: Placement
    modules: tuple[str, ...]
    coordinates: Mapping[str, Mapping[str, int]]
    layouts: Mapping[str, ModuleLayout] = field(repr=False)

    def holds(self, name: str) -> bool:
        """Returns True if this rank holds module ``name``."""
        return name in self.modules

    def _coord(self, name: str) -> Mapping[str, int]:
        if name not in self.coordinates:
            raise ValueError(f"rank {self.rank} does not hold module '{name}' (it holds {list(self.modules)})")
        return self.coordinates[name]

    def pp_stage(self, name: str) -> int:
        """Pipeline stage index of this rank in module ``name``.

        Raises:
            ValueError: this rank does not hold ``name``.
        """
        return self._coord(name)["pp"]

    def is_first_stage(self, name: str) -> bool:
        """True if this rank is on pipeline stage 0 of ``name``.

        Raises:
            ValueError: this rank does not hold ``name``.
        """
        return self.pp_stage(name) == 0

    def is_last_stage(self, name: str) -> bool:
        """True if this rank is on the last pipeline stage (``pp - 1``) of ``name``.

        Raises:
            ValueError: this rank does not hold ``name``.
        """
        return self.pp_stage(name) == self.layouts[name].pp - 1

    def dp_rank(self, name: str) -> int:
        """Data-parallel rank in ``name``: ``dp_replicate_coord * dp_shard + dp_shard_coord``.

        Raises:
            ValueError: this rank does not hold ``name``.
        """
        c = self._coord(name)
        return c["dp_replicate"] * self.layouts[name].dp_shard + c["dp_shard"]

    def dp_size(self, name: str) -> int:
        """Data-parallel degree (``dp_replicate * dp_shard``) of module ``name``."""
        return self.layouts[name].dp

    def expert_coordinates(self, name: str) -> Mapping[str, int]:
        """This rank's expert-grid coordinate in ``name``: ``{pp, edp, ep, etp}``.

        See :meth:`ModuleLayout.expert_coordinate`. ``pp`` equals
        ``coordinates[name]["pp"]``.

        Raises:
            ValueError: this rank does not hold ``name``.
        """
        self._coord(name)
        c = self.layouts[name].expert_coordinate(self.rank)
        assert c is not None
        return MappingProxyType(c)

    def ep_rank(self, name: str) -> int:
        """Expert-parallel rank in ``name`` (index of this rank's expert shard), in ``[0, ep)``.

        Raises:
            ValueError: this rank does not hold ``name``.
        """
        return self.expert_coordinates(name)["ep"]

    @property
    def language(self) -> str:
        """Name of the language module (the one with ``is_language=True``)."""
        return next(n for n, lay in self.layouts.items() if lay.is_language)

    def describe(self) -> str:
        """Where this rank sits, for messages: each held module with its coordinates along the dims whose size is
        above 1, e.g. ``"language pp 1, dp_shard 2"`` or ``"vision dp_shard 0; language dp_shard 0"``
        (colocated)."""
        parts = []
        for name in self.modules:
            lay, c = self.layouts[name], self.coordinates[name]
            dims = [f"{d} {c[d]}" for d in MESH_DIMS if getattr(lay, d) > 1]
            parts.append(f"{name} {', '.join(dims)}" if dims else name)
        return "; ".join(parts)


def rank_role(layouts: Mapping[str, ModuleLayout], rank: int, world_size: int | None = None) -> RankRole:
    """Computes the role of one global rank (pure; no process groups).

    Args:
        layouts: module name -> layout, in layout order.
        rank: the global rank, in ``[0, world_size)``.
        world_size: launched world size; defaults to the number of ranks the
            layouts cover.

    Returns:
        The rank's :class:`RankRole`.

    Raises:
        LayoutError: the layouts are invalid (see :func:`validate_layouts`).
        ValueError: ``rank`` is outside ``[0, world_size)``.
    """
    if world_size is None:
        world_size = max((lay.end for lay in layouts.values()), default=0)
    placement = validate_layouts(layouts, world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r} is outside [0, world_size={world_size})")
    coords: dict[str, Mapping[str, int]] = {}
    for name, lay in layouts.items():
        c = lay.coordinate(rank)
        if c is not None:
            coords[name] = MappingProxyType(c)
    return RankRole(
        rank=rank,
        placement=placement,
        modules=tuple(coords),
        coordinates=MappingProxyType(coords),
        layouts=MappingProxyType(dict(layouts)),
    )
