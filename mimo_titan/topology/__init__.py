"""Per-module rank layouts and DeviceMeshes (the HyperCommGrid replacement).

``layout`` is pure Python (validation, rank arithmetic); ``mesh`` builds one
torch DeviceMesh per module over that module's rank range, plus a second
(``pp, edp, ep, etp``) expert mesh over the same ranks for MoE layers.
"""

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
from mimo_titan.topology.mesh import Topology, build_topology, layouts_from_config

__all__ = [
    "EXPERT_MESH_DIMS",
    "MESH_DIMS",
    "LayoutError",
    "ModuleLayout",
    "Placement",
    "RankRole",
    "Topology",
    "build_topology",
    "layouts_from_config",
    "rank_role",
    "validate_layouts",
]
