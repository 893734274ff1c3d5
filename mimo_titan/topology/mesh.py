"""One torch DeviceMesh per module, each over its own rank range.

This replaces Megatron-LM's ``HyperCommGrid`` (a grid of ``num_ranks`` ranks
starting at ``rank_offset``, dims ordered slowest to fastest) with a 5-D
:class:`~torch.distributed.device_mesh.DeviceMesh` per module whose dims are
:data:`~mimo_titan.topology.layout.MESH_DIMS` = ``(pp, dp_replicate, dp_shard,
cp, tp)``; size-1 dims are kept so every module's mesh has the same dim names.

Each module also gets a second, 4-D *expert* mesh over the same ranks, dims
:data:`~mimo_titan.topology.layout.EXPERT_MESH_DIMS` = ``(pp, edp, ep, etp)``
(Megatron-LM's expert grid: a stage's ranks re-read as ``(edp, ep, etp)`` with
``etp`` fastest). It is built for every module, MoE or dense (then ``ep = etp =
1`` and ``edp`` spans the whole stage), so the expert accessors work uniformly;
for a dense module its groups are simply never used.

Process groups are created collectively: every rank builds every module's mesh
(members or not), plus any flattened data-parallel groups, then the module's
expert mesh, module by module in layout order, and last the 2-rank embedding
groups of weights tied across a module's pipeline (:meth:`Topology.embedding_group`).
The resulting :class:`Topology` holds all groups; there is no module-level state.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from mimo_titan.topology.layout import (
    EXPERT_MESH_DIMS,
    MESH_DIMS,
    LayoutError,
    ModuleLayout,
    Placement,
    RankRole,
    rank_role,
    validate_layouts,
)

__all__ = ["Topology", "build_topology", "layouts_from_config"]

_DP_DIMS = ("dp_replicate", "dp_shard")
DP_CP_MESH_DIMS = ("pp", "dp_cp", "tp")
_CONFIG_FIELDS = ("rank_offset", "num_ranks", "pp", "dp_replicate", "dp_shard", "cp", "tp", "ep", "etp")


@dataclass
class Topology:
    """All modules' device meshes as seen from one rank.

    Built by :func:`build_topology`. ``meshes`` holds a mesh for *every* module
    on every rank; on a rank that is not a member of a module the mesh object
    exists (``mesh.get_coordinate()`` is None) but cannot be sliced, so the
    accessors below raise there.

    Attributes:
        layouts: module name -> layout, in layout (build) order.
        world_size: global world size.
        placement: COLOCATED or NON_COLOCATED.
        role: this rank's :class:`RankRole`.
        meshes: module name -> 5-D DeviceMesh of shape
            ``(pp, dp_replicate, dp_shard, cp, tp)`` over the module's ranks.
        dp_groups: module name -> this rank's flattened data-parallel group
            (``dp_replicate x dp_shard``), or None where the rank is not a member.
        expert_meshes: module name -> 4-D DeviceMesh of shape
            ``(pp, edp, ep, etp)`` (:data:`EXPERT_MESH_DIMS`) over the module's
            ranks (the same ranks as ``meshes[name]``).
    """

    layouts: dict[str, ModuleLayout]
    world_size: int
    placement: Placement
    role: RankRole
    meshes: dict[str, DeviceMesh]
    dp_groups: dict[str, ProcessGroup | None] = field(default_factory=dict, repr=False)
    expert_meshes: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)
    dp_cp_meshes: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)  # modules with cp > 1
    # modules with tied first / last stage weights -> this rank's 2-rank embedding group (None: holds no copy)
    embedding_groups: dict[str, ProcessGroup | None] = field(default_factory=dict, repr=False)

    @property
    def rank(self) -> int:
        """This process's global rank."""
        return self.role.rank

    def _check_module(self, name: str) -> None:
        if name not in self.layouts:
            raise KeyError(f"unknown module '{name}'; modules: {list(self.layouts)}")

    def _check_member(self, name: str, what: str) -> None:
        self._check_module(name)
        if not self.role.holds(name):
            lay = self.layouts[name]
            raise RuntimeError(
                f"{what}('{name}') called on rank {self.rank}, which is not one of module "
                f"'{name}' ranks [{lay.rank_offset}, {lay.end}); guard with topology.role.holds('{name}')"
            )

    def mesh(self, name: str) -> DeviceMesh:
        """The module's full 5-D mesh, dims :data:`MESH_DIMS`.

        Returned on every rank; on non-member ranks only whole-mesh queries
        (``.mesh``, ``.shape``, ``get_coordinate()`` -> None) work.

        Raises:
            KeyError: unknown module name.
        """
        self._check_module(name)
        return self.meshes[name]

    def submesh(self, name: str, *dims: str) -> DeviceMesh:
        """A slice of the module's mesh over ``dims`` (in :data:`MESH_DIMS` order).

        Slicing creates no process group (it reuses the mesh's dim groups).

        Args:
            name: module name.
            *dims: one or more names from :data:`MESH_DIMS`, in ascending order.

        Returns:
            The submesh containing this rank, shape ``(size(d) for d in dims)``.

        Raises:
            KeyError: unknown module name.
            RuntimeError: this rank is not a member of the module.
        """
        self._check_member(name, "submesh")
        return self.meshes[name][dims if len(dims) != 1 else dims[0]]

    def dp_mesh(self, name: str) -> DeviceMesh:
        """This rank's 2-D ``(dp_replicate, dp_shard)`` submesh, for FSDP2/HSDP.

        Shape ``(dp_replicate, dp_shard)``; size-1 dims are kept (pass it to
        ``fully_shard(mesh=...)``: dim 0 replicates, dim 1 shards).

        Raises:
            KeyError: unknown module name.
            RuntimeError: this rank is not a member of the module.
        """
        self._check_member(name, "dp_mesh")
        return self.meshes[name][_DP_DIMS]

    def fsdp_mesh(self, name: str) -> DeviceMesh:
        """The mesh FSDP shards module ``name`` over: :meth:`dp_mesh` when ``cp == 1``, else the 1-D ``dp_cp`` mesh
        (``dp_shard x cp`` ranks: parameters are replicated across CP ranks, so their gradients are summed over
        dp and cp, as torchtitan's ``dp_shard_cp``).

        Raises:
            RuntimeError: this rank is not a member of the module.
        """
        self._check_member(name, "fsdp_mesh")
        if self.layouts[name].cp == 1:
            return self.dp_mesh(name)
        return self.dp_cp_meshes[name]["dp_cp"]

    def tp_mesh(self, name: str) -> DeviceMesh:
        """This rank's 1-D ``("tp",)`` submesh, for tensor-parallel plans.

        Sliced from the same root mesh as :meth:`fsdp_mesh` (the ``dp_cp`` mesh when ``cp > 1``), as FSDP2
        requires for 2-D FSDP x TP.

        Raises:
            RuntimeError: this rank is not a member of the module.
        """
        self._check_member(name, "tp_mesh")
        if self.layouts[name].cp == 1:
            return self.meshes[name]["tp"]
        return self.dp_cp_meshes[name]["tp"]

    def token_group(self, name: str) -> ProcessGroup:
        """The group whose ranks hold different tokens of a microbatch: dp (x cp when ``cp > 1``).

        Raises:
            RuntimeError: this rank is not a member of the module.
        """
        self._check_member(name, "token_group")
        if self.layouts[name].cp == 1:
            return self.dp_group(name)
        return self.dp_cp_meshes[name].get_group("dp_cp")

    def cp_group(self, name: str) -> ProcessGroup:
        """This rank's context-parallel group in ``name`` (``cp`` ranks).

        Raises:
            RuntimeError: this rank is not a member of the module.
        """
        self._check_member(name, "cp_group")
        return self.meshes[name].get_group("cp")

    def dp_group(self, name: str) -> ProcessGroup:
        """This rank's flattened data-parallel group (``dp_replicate x dp_shard`` ranks).

        Its size is ``layouts[name].dp`` and ``dist.get_rank(group)`` equals
        ``role.dp_rank(name)``. Use it for e.g. loss / token-count reductions.

        Raises:
            KeyError: unknown module name.
            RuntimeError: this rank is not a member of the module.
        """
        self._check_member(name, "dp_group")
        group = self.dp_groups[name]
        assert group is not None
        return group

    def pp_group(self, name: str) -> ProcessGroup:
        """This rank's pipeline group in module ``name`` (``pp`` ranks).

        ``dist.get_rank(group)`` is this rank's stage index.

        Raises:
            KeyError: unknown module name.
            RuntimeError: this rank is not a member of the module.
        """
        self._check_member(name, "pp_group")
        return self.meshes[name].get_group("pp")

    def group(self, name: str, dim: str) -> ProcessGroup:
        """This rank's process group along one mesh dim of module ``name``.

        Raises:
            KeyError: unknown module name or dim.
            RuntimeError: this rank is not a member of the module.
        """
        if dim not in MESH_DIMS:
            raise KeyError(f"unknown mesh dim '{dim}'; dims: {MESH_DIMS}")
        self._check_member(name, "group")
        return self.meshes[name].get_group(dim)

    def embedding_group(self, name: str) -> ProcessGroup | None:
        """This rank's *embedding group* in module ``name`` (Megatron-LM's term): the 2 ranks, one on the first
        and one on the last pipeline stage with the same ``(dp_replicate, dp_shard, cp, tp)`` coordinate, that
        hold the two copies of a weight tied across the pipeline (the language model's input embedding and
        output head). Their FSDP / TP shards of it correspond, so summing their local gradient shards over this
        group gives each the gradient of the single tied tensor.

        Returns:
            The group, or None on a rank that holds no copy (a middle stage, or a rank outside the module).

        Raises:
            KeyError: unknown module name, or the topology was built without tied weights for ``name``
                (``build_topology(..., tied_embeddings=[name])``, which needs ``pp > 1``).
        """
        self._check_module(name)
        if name not in self.embedding_groups:
            raise KeyError(
                f"module '{name}' has no embedding group: build_topology was not given tied_embeddings=['{name}'] "
                f"or its pp is 1 (pp={self.layouts[name].pp})"
            )
        return self.embedding_groups[name]

    # ---- expert (MoE) grid ---------------------------------------------------------

    def expert_mesh(self, name: str) -> DeviceMesh:
        """The module's 4-D expert mesh, dims :data:`EXPERT_MESH_DIMS` = ``(pp, edp, ep, etp)``.

        Same ranks as :meth:`mesh`, re-read as Megatron-LM's expert grid
        (``etp`` fastest inside each stage). Returned on every rank; on
        non-member ranks only whole-mesh queries work (``get_coordinate()`` is
        None there).

        Raises:
            KeyError: unknown module name.
        """
        self._check_module(name)
        return self.expert_meshes[name]

    def ep_group(self, name: str) -> ProcessGroup:
        """This rank's expert-parallel group in ``name`` (``ep`` ranks).

        The ranks over which the module's experts are split; token dispatch and
        combine all-to-alls run on it. ``dist.get_rank(group)`` is this rank's
        ``ep`` coordinate. Size 1 when ``ep == 1``.

        Raises:
            KeyError: unknown module name.
            RuntimeError: this rank is not a member of the module.
        """
        self._check_member(name, "ep_group")
        return self.expert_meshes[name].get_group("ep")

    def etp_group(self, name: str) -> ProcessGroup:
        """This rank's expert tensor-parallel group in ``name`` (``etp`` ranks).

        The ranks that split each local expert's weights. Size 1 when ``etp == 1``.

        Raises:
            KeyError: unknown module name.
            RuntimeError: this rank is not a member of the module.
        """
        self._check_member(name, "etp_group")
        return self.expert_meshes[name].get_group("etp")

    def edp_mesh(self, name: str) -> DeviceMesh:
        """This rank's 1-D ``("edp",)`` expert data-parallel submesh.

        Shape ``(edp,)``: the ranks that hold the same expert shard (same pp,
        ep and etp coordinates). Use it to FSDP-shard / reduce the expert
        weights' gradients (the dense weights use :meth:`dp_mesh`).

        Raises:
            KeyError: unknown module name.
            RuntimeError: this rank is not a member of the module.
        """
        self._check_member(name, "edp_mesh")
        return self.expert_meshes[name]["edp"]


def _flat_dp_rank_lists(lay: ModuleLayout) -> list[list[int]]:
    """Member lists of every flattened dp group of ``lay``, in row-major order of (pp, cp, tp)."""
    out: list[list[int]] = []
    for r in lay.ranks:
        c = lay.coordinate(r)
        assert c is not None
        if c["dp_replicate"] == 0 and c["dp_shard"] == 0:
            ranks = lay.group_ranks(_DP_DIMS, r)
            assert ranks is not None
            out.append(ranks)
    return out


def _embedding_rank_pairs(lay: ModuleLayout) -> list[list[int]]:
    """``[first-stage rank, last-stage rank]`` with the same ``(dp_replicate, dp_shard, cp, tp)`` coordinate, for
    every rank of the first stage in rank order (the mesh's ranks are ``arange`` in ``MESH_DIMS`` order, ``pp``
    slowest, so the partner is ``pp - 1`` stage sizes further)."""
    stage = lay.num_ranks // lay.pp
    last = (lay.pp - 1) * stage
    return [[r, r + last] for r in range(lay.rank_offset, lay.rank_offset + stage)]


def build_topology(
    layouts: Mapping[str, ModuleLayout],
    world_size: int,
    rank: int,
    device_type: str,
    tied_embeddings: Collection[str] = (),
) -> Topology:
    """Validates the layouts and builds every module's DeviceMesh.

    Collective: every rank of the default group must call this with the same
    ``layouts``. Each module's mesh is ``DeviceMesh(device_type,
    arange(rank_offset, rank_offset + num_ranks).view(pp, dp_replicate,
    dp_shard, cp, tp), mesh_dim_names=MESH_DIMS)``, built on every rank in layout
    order (DeviceMesh creates its sub-groups with ``new_group``, which all ranks
    must call in the same sequence). Right after each module's mesh, if both
    ``dp_replicate > 1`` and ``dp_shard > 1``, one flattened dp group per
    ``(pp, cp, tp)`` coordinate is created with ``dist.new_group`` on every rank
    (``DeviceMesh._flatten`` cannot be called on non-member ranks, whose slicing
    raises); otherwise the dp group is the mesh's ``dp_shard`` (or
    ``dp_replicate``) group and no extra group is created. Then, still for the
    same module and on every rank, its expert mesh ``DeviceMesh(device_type,
    arange(rank_offset, rank_offset + num_ranks).view(pp, edp, ep, etp),
    mesh_dim_names=EXPERT_MESH_DIMS)`` is built, for every module (dense ones
    included, with ``ep = etp = 1``): no new ranks, four more mesh dims' worth
    of groups per module. Last, for each module of ``tied_embeddings`` with
    ``pp > 1`` (in layout order), one 2-rank *embedding group* per rank of its
    first stage, paired with the last-stage rank of the same ``(dp_replicate,
    dp_shard, cp, tp)`` coordinate (:meth:`Topology.embedding_group`), again
    with ``new_group`` on every rank.

    Args:
        layouts: module name -> layout, in build order.
        world_size: expected global world size.
        rank: this process's global rank.
        device_type: DeviceMesh device type ("cpu", "cuda", ...).
        tied_embeddings: modules whose first and last pipeline stage hold copies of one
            weight (the language model with ``model.language.tie_word_embeddings``); a
            module with ``pp = 1`` gets no group (its one stage holds the one tensor).

    Returns:
        The :class:`Topology` for this rank.

    Raises:
        LayoutError: the layouts are invalid, or ``tied_embeddings`` names an unknown
            module (raised before any group is created).
        RuntimeError: the default process group is not initialised, or its world
            size / rank differ from ``world_size`` / ``rank``.
    """
    placement = validate_layouts(layouts, world_size)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "build_topology needs the default process group: call "
            "torch.distributed.init_process_group(...) first (e.g. launch with torchrun)"
        )
    if dist.get_world_size() != world_size:
        raise RuntimeError(
            f"world size mismatch: the default process group has {dist.get_world_size()} ranks "
            f"but build_topology was given world_size={world_size}"
        )
    if dist.get_rank() != rank:
        raise RuntimeError(
            f"rank mismatch: the default process group says rank {dist.get_rank()} "
            f"but build_topology was given rank={rank}"
        )
    unknown = [n for n in tied_embeddings if n not in layouts]
    if unknown:
        raise LayoutError(f"tied_embeddings names unknown modules {unknown}; modules: {list(layouts)}")
    role = rank_role(layouts, rank, world_size)

    meshes: dict[str, DeviceMesh] = {}
    dp_groups: dict[str, ProcessGroup | None] = {}
    expert_meshes: dict[str, DeviceMesh] = {}
    dp_cp_meshes: dict[str, DeviceMesh] = {}
    for name, lay in layouts.items():
        ranks = torch.arange(lay.rank_offset, lay.end, dtype=torch.int).view(lay.shape)
        mesh = DeviceMesh(device_type, ranks, mesh_dim_names=MESH_DIMS)
        meshes[name] = mesh
        member = rank in lay.ranks
        if lay.dp_replicate > 1 and lay.dp_shard > 1:
            mine: ProcessGroup | None = None
            for group_ranks in _flat_dp_rank_lists(lay):
                pg = dist.new_group(ranks=group_ranks, group_desc=f"{name}_dp")
                if rank in group_ranks:
                    mine = pg
            dp_groups[name] = mine
        elif member:
            dim = "dp_replicate" if lay.dp_shard == 1 else "dp_shard"
            dp_groups[name] = mesh.get_group(dim)
        else:
            dp_groups[name] = None
        expert_ranks = torch.arange(lay.rank_offset, lay.end, dtype=torch.int).view(lay.expert_shape)
        expert_meshes[name] = DeviceMesh(device_type, expert_ranks, mesh_dim_names=EXPERT_MESH_DIMS)
        if lay.cp > 1:  # dp x cp flattened (adjacent dims, same rank order): FSDP and token-statistics group
            dp_cp_ranks = torch.arange(lay.rank_offset, lay.end, dtype=torch.int).view(lay.pp, lay.dp * lay.cp, lay.tp)
            dp_cp_meshes[name] = DeviceMesh(device_type, dp_cp_ranks, mesh_dim_names=DP_CP_MESH_DIMS)
    embedding_groups: dict[str, ProcessGroup | None] = {}
    for name, lay in layouts.items():  # after every mesh, so the group sequence is the same on every rank
        if name not in tied_embeddings or lay.pp == 1:
            continue
        embedding_groups[name] = None
        for pair in _embedding_rank_pairs(lay):
            pg = dist.new_group(ranks=pair, group_desc=f"{name}_embedding")
            if rank in pair:
                embedding_groups[name] = pg

    return Topology(
        layouts=dict(layouts),
        world_size=world_size,
        placement=placement,
        role=role,
        meshes=meshes,
        dp_groups=dp_groups,
        expert_meshes=expert_meshes,
        dp_cp_meshes=dp_cp_meshes,
        embedding_groups=embedding_groups,
    )


def layouts_from_config(parallelism_cfg: Any, language: str = "language") -> dict[str, ModuleLayout]:
    """Builds the module layouts from a parallelism config.

    Args:
        parallelism_cfg: an object (e.g. ``mimo_titan.config.ParallelismConfig``) with a ``modules`` mapping of
            module name to its layout table, or (duck-typed) attributes ``vision`` and ``language``; each table has
            ``rank_offset, num_ranks, pp, dp_replicate, dp_shard, cp, tp, ep, etp`` (e.g. ``ModuleParallelism``).
        language: the name of the language module (``cfg.model.language_name``).

    Returns:
        ``{name: ModuleLayout}``: the encoders in the config's order, then the language module (with
        ``is_language=True``); every rank builds the meshes in this order. Not validated: call
        :func:`validate_layouts`.

    Raises:
        LayoutError: a module section or field is missing.
    """
    sections = getattr(parallelism_cfg, "modules", None)
    if sections is None:
        sections = {n: getattr(parallelism_cfg, n, None) for n in ("vision", "language")}
    if sections.get(language) is None:
        raise LayoutError(f"parallelism config has no '{language}' section; add [parallelism.{language}]")
    names = [n for n in sections if n != language] + [language]
    out: dict[str, ModuleLayout] = {}
    for name in names:
        sec = sections[name]
        if sec is None:
            raise LayoutError(f"parallelism config has no '{name}' section; add [parallelism.{name}]")
        missing = [f for f in _CONFIG_FIELDS[:2] if not hasattr(sec, f)]
        if missing:
            raise LayoutError(f"module '{name}': missing {missing}; set parallelism.{name}.{missing[0]}")
        kwargs = {f: getattr(sec, f) for f in _CONFIG_FIELDS if hasattr(sec, f)}
        out[name] = ModuleLayout(name=name, is_language=(name == language), **kwargs)
    return out
