"""Tests for mimo_titan.topology: layout validation, rank roles and per-module meshes."""

from __future__ import annotations

import json
import os
import traceback
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from mimo_titan.topology import (
    EXPERT_MESH_DIMS,
    MESH_DIMS,
    LayoutError,
    ModuleLayout,
    Placement,
    RankRole,
    Topology,
    build_topology,
    layouts_from_config,
    rank_role,
    validate_layouts,
)


def _layouts(*mods: ModuleLayout) -> dict[str, ModuleLayout]:
    return {m.name: m for m in mods}


def debug_layout() -> dict[str, ModuleLayout]:
    """vision: ranks 0-1 (dp_shard=2); language: ranks 2-7 (pp=2, dp_shard=3)."""
    return _layouts(
        ModuleLayout("vision", rank_offset=0, num_ranks=2, dp_shard=2),
        ModuleLayout("language", rank_offset=2, num_ranks=6, pp=2, dp_shard=3, is_language=True),
    )


def colocated_layout() -> dict[str, ModuleLayout]:
    return _layouts(
        ModuleLayout("vision", rank_offset=0, num_ranks=2, dp_shard=2),
        ModuleLayout("language", rank_offset=0, num_ranks=2, dp_shard=2, is_language=True),
    )


def hsdp_tp_layout() -> dict[str, ModuleLayout]:
    """vision: ranks 0-3 HSDP (2x2); language: ranks 4-7 dp_shard=2 x tp=2."""
    return _layouts(
        ModuleLayout("vision", rank_offset=0, num_ranks=4, dp_replicate=2, dp_shard=2),
        ModuleLayout("language", rank_offset=4, num_ranks=4, dp_shard=2, tp=2, is_language=True),
    )


def moe_colocated_layout() -> dict[str, ModuleLayout]:
    """Both modules on ranks 0-7 with pp=2.

    language: dp_shard=4, ep=2, etp=1 -> edp=2.  vision: dp_shard=2, tp=2, ep=2, etp=2 -> edp=1.
    """
    return _layouts(
        ModuleLayout("vision", 0, 8, pp=2, dp_shard=2, tp=2, ep=2, etp=2),
        ModuleLayout("language", 0, 8, pp=2, dp_shard=4, ep=2, is_language=True),
    )


# --------------------------------------------------------------------------------------
# ModuleLayout arithmetic
# --------------------------------------------------------------------------------------


def test_module_layout_properties():
    lay = debug_layout()["language"]
    assert lay.dp == 3
    assert lay.shape == (2, 1, 3, 1, 1)
    assert lay.sizes == {"pp": 2, "dp_replicate": 1, "dp_shard": 3, "cp": 1, "tp": 1}
    assert lay.ranks == range(2, 8)
    assert lay.end == 8
    assert MESH_DIMS == ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def test_module_layout_coordinate_and_dp_rank():
    lay = debug_layout()["language"]
    assert lay.coordinate(1) is None
    assert lay.coordinate(8) is None
    assert lay.coordinate(2) == {"pp": 0, "dp_replicate": 0, "dp_shard": 0, "cp": 0, "tp": 0}
    assert lay.coordinate(4) == {"pp": 0, "dp_replicate": 0, "dp_shard": 2, "cp": 0, "tp": 0}
    assert lay.coordinate(6) == {"pp": 1, "dp_replicate": 0, "dp_shard": 1, "cp": 0, "tp": 0}
    assert [lay.dp_rank(r) for r in range(9)] == [None, None, 0, 1, 2, 0, 1, 2, None]
    assert lay.stage_ranks(0) == [2, 3, 4]
    assert lay.stage_ranks(1) == [5, 6, 7]
    with pytest.raises(ValueError, match="stage 2 out of range"):
        lay.stage_ranks(2)

    # 16 ranks at offset 2: pp=2, dp_replicate=2, dp_shard=2, tp=2. Rank 13 is local 11.
    big = ModuleLayout("lm", 2, 16, pp=2, dp_replicate=2, dp_shard=2, tp=2)
    assert big.coordinate(13) == {"pp": 1, "dp_replicate": 0, "dp_shard": 1, "cp": 0, "tp": 1}
    assert big.dp_rank(13) == 1
    assert big.dp_rank(17) == 3  # local 15: dp_replicate 1, dp_shard 1
    assert big.group_ranks("pp", 13) == [5, 13]
    assert big.group_ranks("tp", 13) == [12, 13]
    assert big.group_ranks(("dp_replicate", "dp_shard"), 13) == [11, 13, 15, 17]
    assert big.stage_ranks(1) == list(range(10, 18))


def test_module_layout_cp_coordinate():
    lay = ModuleLayout("lm", 0, 8, dp_shard=2, cp=2, tp=2)
    # local 5 = dp_shard 1 (5//4), cp 0 ((5//2)%2), tp 1.
    assert lay.coordinate(5) == {"pp": 0, "dp_replicate": 0, "dp_shard": 1, "cp": 0, "tp": 1}
    assert lay.group_ranks("cp", 5) == [5, 7]
    assert lay.group_ranks(("dp_shard", "cp"), 5) == [1, 3, 5, 7]


def test_expert_grid_ep2_etp1():
    lay = moe_colocated_layout()["language"]
    assert EXPERT_MESH_DIMS == ("pp", "edp", "ep", "etp")
    assert lay.stage_size == 4
    assert lay.edp == 2
    assert lay.expert_shape == (2, 2, 2, 1)
    assert lay.expert_sizes == {"pp": 2, "edp": 2, "ep": 2, "etp": 1}
    # Stage 0 = ranks 0-3 re-read as (edp, ep, etp) with etp fastest.
    assert [lay.expert_coordinate(r) for r in range(4)] == [
        {"pp": 0, "edp": 0, "ep": 0, "etp": 0},
        {"pp": 0, "edp": 0, "ep": 1, "etp": 0},
        {"pp": 0, "edp": 1, "ep": 0, "etp": 0},
        {"pp": 0, "edp": 1, "ep": 1, "etp": 0},
    ]
    assert lay.expert_coordinate(6) == {"pp": 1, "edp": 1, "ep": 0, "etp": 0}
    assert lay.expert_coordinate(8) is None
    expected = {  # rank: (ep group, edp group)
        0: ([0, 1], [0, 2]),
        1: ([0, 1], [1, 3]),
        2: ([2, 3], [0, 2]),
        3: ([2, 3], [1, 3]),
        4: ([4, 5], [4, 6]),
        5: ([4, 5], [5, 7]),
        6: ([6, 7], [4, 6]),
        7: ([6, 7], [5, 7]),
    }
    for r, (ep, edp) in expected.items():
        assert lay.expert_group_ranks("ep", r) == ep, r
        assert lay.expert_group_ranks("edp", r) == edp, r
        assert lay.expert_group_ranks("etp", r) == [r], r
        # The expert pp group is the dense pp group.
        assert lay.expert_group_ranks("pp", r) == lay.group_ranks("pp", r), r
    assert lay.expert_group_ranks(("edp", "ep"), 5) == [4, 5, 6, 7]
    assert lay.expert_group_ranks("ep", 9) is None
    with pytest.raises(ValueError, match=r"unknown expert mesh dims \['tp'\]"):
        lay.expert_group_ranks("tp", 0)


def test_expert_grid_ep2_etp2():
    lay = moe_colocated_layout()["vision"]
    assert (lay.stage_size, lay.edp, lay.expert_shape) == (4, 1, (2, 1, 2, 2))
    assert [lay.expert_coordinate(r) for r in (4, 5, 6, 7)] == [
        {"pp": 1, "edp": 0, "ep": 0, "etp": 0},
        {"pp": 1, "edp": 0, "ep": 0, "etp": 1},
        {"pp": 1, "edp": 0, "ep": 1, "etp": 0},
        {"pp": 1, "edp": 0, "ep": 1, "etp": 1},
    ]
    expected = {  # rank: (etp group, ep group)
        0: ([0, 1], [0, 2]),
        1: ([0, 1], [1, 3]),
        2: ([2, 3], [0, 2]),
        3: ([2, 3], [1, 3]),
        5: ([4, 5], [5, 7]),
        6: ([6, 7], [4, 6]),
    }
    for r, (etp, ep) in expected.items():
        assert lay.expert_group_ranks("etp", r) == etp, r
        assert lay.expert_group_ranks("ep", r) == ep, r
        assert lay.expert_group_ranks("edp", r) == [r], r
    # Here the etp groups coincide with the dense tp groups.
    assert all(lay.expert_group_ranks("etp", r) == lay.group_ranks("tp", r) for r in range(8))


def test_expert_grid_with_offset():
    # 16 ranks at offset 2, stage = 2*2*2 = 8, ep=4 -> edp=2. Rank 13: local 11, stage 1, s = 3.
    big = ModuleLayout("lm", 2, 16, pp=2, dp_replicate=2, dp_shard=2, tp=2, ep=4)
    assert big.edp == 2
    assert big.expert_coordinate(13) == {"pp": 1, "edp": 0, "ep": 3, "etp": 0}
    assert big.expert_group_ranks("ep", 13) == [10, 11, 12, 13]
    assert big.expert_group_ranks("edp", 13) == [13, 17]
    assert big.expert_group_ranks("pp", 13) == [5, 13]
    # A dense module's expert grid: ep = etp = 1, edp spans the stage.
    dense = debug_layout()["language"]
    assert dense.expert_shape == (2, 3, 1, 1)
    assert dense.expert_group_ranks("edp", 6) == [5, 6, 7]
    assert dense.expert_group_ranks("ep", 6) == [6]


@pytest.mark.parametrize(
    "lay",
    [
        ModuleLayout("a", 0, 8, pp=2, dp_shard=4, ep=2),
        ModuleLayout("b", 3, 16, pp=2, dp_replicate=2, dp_shard=2, tp=2, ep=2, etp=2),
        ModuleLayout("c", 1, 12, dp_shard=3, cp=2, tp=2, ep=3, etp=2),
        ModuleLayout("d", 0, 8, dp_shard=8, ep=8),
        ModuleLayout("e", 5, 6, pp=3, tp=2, etp=2),
    ],
    ids=lambda lay: lay.name,
)
def test_expert_grid_brute_force(lay):
    """An independent definition: a stage's i-th rank has (edp, ep, etp) = unravel(i, (edp, ep, etp))."""
    lay.validate()
    assert lay.edp * lay.ep * lay.etp * lay.pp == lay.num_ranks
    coords = {}
    for stage in range(lay.pp):
        for i, r in enumerate(lay.stage_ranks(stage)):
            want = {
                "pp": stage,
                "edp": i // (lay.ep * lay.etp),
                "ep": (i // lay.etp) % lay.ep,
                "etp": i % lay.etp,
            }
            assert lay.expert_coordinate(r) == want, r
            coords[r] = want
    for dims in ("pp", "edp", "ep", "etp", ("ep", "etp"), ("edp", "ep", "etp")):
        dims_t = (dims,) if isinstance(dims, str) else dims
        for r in lay.ranks:
            kept = [d for d in EXPERT_MESH_DIMS if d not in dims_t]
            same = [q for q in lay.ranks if all(coords[q][d] == coords[r][d] for d in kept)]
            assert lay.expert_group_ranks(dims, r) == same, (dims, r)
    # ep x etp x edp partitions every stage: the (ep, etp, edp) groups are exactly the stage.
    for stage in range(lay.pp):
        r = lay.stage_ranks(stage)[0]
        assert lay.expert_group_ranks(("edp", "ep", "etp"), r) == lay.stage_ranks(stage)


# --------------------------------------------------------------------------------------
# validate_layouts: valid layouts
# --------------------------------------------------------------------------------------


def test_validate_debug_non_colocated():
    assert validate_layouts(debug_layout(), 8) is Placement.NON_COLOCATED


def test_validate_colocated():
    assert validate_layouts(colocated_layout(), 2) is Placement.COLOCATED


def test_validate_hsdp_tp():
    assert validate_layouts(hsdp_tp_layout(), 8) is Placement.NON_COLOCATED


def test_validate_single_module_is_colocated():
    lay = _layouts(ModuleLayout("language", 0, 4, dp_shard=4, is_language=True))
    assert validate_layouts(lay, 4) is Placement.COLOCATED


def test_validate_order_independent_of_offsets():
    # Language first in layout order, at the higher offset.
    lay = _layouts(
        ModuleLayout("language", 2, 6, pp=2, dp_shard=3, is_language=True),
        ModuleLayout("vision", 0, 2, dp_shard=2),
    )
    assert validate_layouts(lay, 8) is Placement.NON_COLOCATED


# --------------------------------------------------------------------------------------
# validate_layouts: one test per error
# --------------------------------------------------------------------------------------


def _with(name: str, **changes) -> dict[str, ModuleLayout]:
    """debug_layout() with fields of module ``name`` replaced."""
    import dataclasses

    lays = debug_layout()
    lays[name] = dataclasses.replace(lays[name], **changes)
    return lays


def test_error_empty():
    with pytest.raises(LayoutError, match="no module layouts given"):
        validate_layouts({}, 8)


def test_error_key_name_mismatch():
    lays = debug_layout()
    lays["vit"] = lays.pop("vision")
    with pytest.raises(LayoutError, match="registered under 'vit' but its name is 'vision'"):
        validate_layouts(lays, 8)


def test_error_non_int_field():
    with pytest.raises(LayoutError, match=r"module 'language': pp='2' must be an int"):
        validate_layouts(_with("language", pp="2"), 8)


def test_error_degree_below_one():
    with pytest.raises(
        LayoutError,
        match=r"module 'vision': parallel degree tp=0 must be >= 1; set parallelism.vision.tp = 1",
    ):
        validate_layouts(_with("vision", tp=0), 8)


def test_error_num_ranks_below_one():
    with pytest.raises(LayoutError, match=r"module 'vision': num_ranks=0 must be >= 1"):
        validate_layouts(_with("vision", num_ranks=0), 8)


def test_error_negative_rank_offset():
    with pytest.raises(LayoutError, match=r"module 'language': rank_offset=-1 is negative"):
        validate_layouts(_with("language", rank_offset=-1), 8)


def test_error_ep_below_one():
    with pytest.raises(
        LayoutError,
        match=(
            r"module 'language': expert-parallel degree ep=0 must be >= 1; "
            r"set parallelism.language.ep = 1 for no expert-parallel split"
        ),
    ):
        validate_layouts(_with("language", ep=0), 8)


def test_error_etp_below_one():
    with pytest.raises(
        LayoutError,
        match=(
            r"module 'vision': expert tensor-parallel degree etp=-1 must be >= 1; "
            r"set parallelism.vision.etp = 1"
        ),
    ):
        validate_layouts(_with("vision", etp=-1), 8)


def test_error_ep_does_not_divide_stage():
    # language stage = dp_shard 3: ep=2 leaves edp = 3/2.
    with pytest.raises(
        LayoutError,
        match=(
            r"module 'language': ep\*etp = 2\*1 = 2 does not divide the ranks per pipeline stage, "
            r"dp_replicate\*dp_shard\*cp\*tp = 1\*3\*1\*1 = 3 \(edp = 3/\(ep\*etp\) must be an int\); "
            r"with etp=1 set parallelism.language.ep to one of \[1, 3\]"
        ),
    ):
        validate_layouts(_with("language", ep=2), 8)


def test_error_ep_times_etp_does_not_divide_stage():
    # stage = 2*2*2 = 8 ranks, etp=2 divides it, but ep*etp = 16 does not: ep must divide 8/2 = 4.
    lays = _layouts(
        ModuleLayout("vision", 0, 8, dp_replicate=2, dp_shard=2, tp=2, ep=8, etp=2),
        ModuleLayout("language", 8, 1, is_language=True),
    )
    with pytest.raises(
        LayoutError,
        match=(
            r"module 'vision': ep\*etp = 8\*2 = 16 does not divide .* = 2\*2\*1\*2 = 8 .*"
            r"with etp=2 set parallelism.vision.ep to one of \[1, 2, 4\]"
        ),
    ):
        validate_layouts(lays, 9)


def test_error_etp_does_not_divide_stage():
    with pytest.raises(
        LayoutError,
        match=(
            r"module 'vision': etp=4 does not divide the ranks per pipeline stage, "
            r"dp_replicate\*dp_shard\*cp\*tp = 1\*2\*1\*1 = 2; set parallelism.vision.etp to one of \[1, 2\]"
        ),
    ):
        validate_layouts(_with("vision", etp=4), 8)


def test_ep_on_any_module_is_valid_layout():
    # Whether the model has MoE layers is not a topology concern: ep=3 on the debug LM is a valid layout.
    assert validate_layouts(_with("language", ep=3), 8) is Placement.NON_COLOCATED
    assert validate_layouts(_with("vision", ep=2), 8) is Placement.NON_COLOCATED
    assert validate_layouts(_with("vision", etp=2), 8) is Placement.NON_COLOCATED


def test_error_product_with_dp_shard_suggestion():
    # num_ranks 8 but 2*1*3*1*1 = 6: dp_shard=4 would fit.
    with pytest.raises(
        LayoutError,
        match=(
            r"module 'language': degree product pp\*dp_replicate\*dp_shard\*cp\*tp = 2\*1\*3\*1\*1 = 6 "
            r"!= num_ranks=8; set dp_shard=4 to fill num_ranks=8, or set num_ranks=6"
        ),
    ):
        validate_layouts(_with("language", num_ranks=8), 10)


def test_error_product_without_dp_shard_suggestion():
    # num_ranks 7 is not a multiple of pp=2: no dp_shard fits.
    with pytest.raises(
        LayoutError,
        match=r"= 6 != num_ranks=7; change the degrees so that their product is 7, or set num_ranks=6",
    ):
        validate_layouts(_with("language", num_ranks=7), 9)


def test_error_range_past_world_size():
    with pytest.raises(
        LayoutError,
        match=r"module 'language': ranks \[2, 8\) .* reach past world_size=6; .*--nproc_per_node=8",
    ):
        validate_layouts(debug_layout(), 6)


def test_error_partial_overlap():
    lays = _layouts(
        ModuleLayout("vision", 0, 4, dp_shard=4),
        ModuleLayout("language", 2, 6, pp=2, dp_shard=3, is_language=True),
    )
    with pytest.raises(
        LayoutError,
        match=r"modules 'vision' ranks \[0, 4\) and 'language' ranks \[2, 8\) partially overlap",
    ):
        validate_layouts(lays, 8)


def test_error_gap():
    lays = _layouts(
        ModuleLayout("vision", 0, 2, dp_shard=2),
        ModuleLayout("language", 4, 4, dp_shard=4, is_language=True),
    )
    with pytest.raises(LayoutError, match=r"ranks \[2-3\] are not covered by any module"):
        validate_layouts(lays, 8)


def test_error_gap_at_start():
    lays = _layouts(
        ModuleLayout("vision", 1, 2, dp_shard=2),
        ModuleLayout("language", 3, 1, is_language=True),
    )
    with pytest.raises(LayoutError, match=r"ranks \[0\] are not covered by any module"):
        validate_layouts(lays, 4)


def test_error_no_language_module():
    with pytest.raises(LayoutError, match=r"no module has is_language=True"):
        validate_layouts(_with("language", is_language=False), 8)


def test_error_two_language_modules():
    with pytest.raises(LayoutError, match=r"more than one module has is_language=True \(\['vision', 'language'\]\)"):
        validate_layouts(_with("vision", is_language=True), 8)


def test_error_world_size_mismatch():
    # The layout covers 6 ranks, torchrun launched 8.
    lays = _layouts(
        ModuleLayout("vision", 0, 2, dp_shard=2),
        ModuleLayout("language", 2, 4, pp=2, dp_shard=2, is_language=True),
    )
    with pytest.raises(
        LayoutError,
        match=(
            r"world_size mismatch: the layouts cover 6 ranks \[0, 6\) but world_size=8; "
            r"launch with --nproc_per_node=6 .*or grow the modules' num_ranks"
        ),
    ):
        validate_layouts(lays, 8)


def test_mixed_placement():
    """Two encoders share ranks 0-1, the language model has its own: a mixed placement."""
    from mimo_titan.topology.layout import Placement

    lays = _layouts(
        ModuleLayout("vision", 0, 2, dp_shard=2),
        ModuleLayout("audio", 0, 2, dp_shard=2),
        ModuleLayout("language", 2, 2, dp_shard=2, is_language=True),
    )
    assert validate_layouts(lays, 4) is Placement.MIXED


def test_error_order_first_failure_wins():
    # Both ep and the product are wrong: the product check (2) runs before the expert-grid check (3),
    # and the ep >= 1 check (1) before both.
    with pytest.raises(LayoutError, match=r"degree product .* != num_ranks=7"):
        validate_layouts(_with("language", ep=2, num_ranks=7), 9)
    with pytest.raises(LayoutError, match=r"expert-parallel degree ep=0 must be >= 1"):
        validate_layouts(_with("language", ep=0, num_ranks=7), 9)


# --------------------------------------------------------------------------------------
# rank_role
# --------------------------------------------------------------------------------------


def test_rank_role_debug_layout():
    lays = debug_layout()
    r0 = rank_role(lays, 0)
    assert isinstance(r0, RankRole)
    assert r0.placement is Placement.NON_COLOCATED
    assert r0.modules == ("vision",)
    assert dict(r0.coordinates["vision"]) == {"pp": 0, "dp_replicate": 0, "dp_shard": 0, "cp": 0, "tp": 0}
    assert r0.holds("vision") and not r0.holds("language")
    assert r0.is_first_stage("vision") and r0.is_last_stage("vision")
    assert r0.dp_rank("vision") == 0
    assert r0.language == "language"
    with pytest.raises(ValueError, match=r"rank 0 does not hold module 'language'"):
        r0.pp_stage("language")

    assert rank_role(lays, 1).dp_rank("vision") == 1

    expected = {  # rank -> (stage, first, last, dp_rank)
        2: (0, True, False, 0),
        3: (0, True, False, 1),
        4: (0, True, False, 2),
        5: (1, False, True, 0),
        6: (1, False, True, 1),
        7: (1, False, True, 2),
    }
    for rank, (stage, first, last, dpr) in expected.items():
        role = rank_role(lays, rank, 8)
        assert role.modules == ("language",)
        assert role.pp_stage("language") == stage
        assert role.is_first_stage("language") is first
        assert role.is_last_stage("language") is last
        assert role.dp_rank("language") == dpr
        assert role.dp_size("language") == 3
        assert role.coordinates["language"]["dp_shard"] == dpr
    with pytest.raises(ValueError, match=r"rank=8 is outside \[0, world_size=8\)"):
        rank_role(lays, 8)


def test_rank_role_colocated():
    for rank in (0, 1):
        role = rank_role(colocated_layout(), rank)
        assert role.placement is Placement.COLOCATED
        assert role.modules == ("vision", "language")
        assert role.dp_rank("vision") == rank
        assert role.dp_rank("language") == rank
        assert role.is_first_stage("language") and role.is_last_stage("language")
        assert role.language == "language"


def test_rank_role_hsdp():
    role = rank_role(hsdp_tp_layout(), 2)
    assert role.modules == ("vision",)
    assert dict(role.coordinates["vision"]) == {"pp": 0, "dp_replicate": 1, "dp_shard": 0, "cp": 0, "tp": 0}
    assert role.dp_rank("vision") == 2
    role = rank_role(hsdp_tp_layout(), 7)
    assert dict(role.coordinates["language"]) == {"pp": 0, "dp_replicate": 0, "dp_shard": 1, "cp": 0, "tp": 1}
    assert role.dp_rank("language") == 1


def test_rank_role_expert_coordinates():
    lays = moe_colocated_layout()
    role = rank_role(lays, 5)
    assert role.placement is Placement.COLOCATED
    assert dict(role.expert_coordinates("language")) == {"pp": 1, "edp": 0, "ep": 1, "etp": 0}
    assert dict(role.expert_coordinates("vision")) == {"pp": 1, "edp": 0, "ep": 0, "etp": 1}
    assert role.ep_rank("language") == 1 and role.ep_rank("vision") == 0
    role = rank_role(debug_layout(), 0)
    assert dict(role.expert_coordinates("vision")) == {"pp": 0, "edp": 0, "ep": 0, "etp": 0}
    with pytest.raises(ValueError, match=r"rank 0 does not hold module 'language'"):
        role.expert_coordinates("language")


def test_rank_role_invalid_layout_raises():
    with pytest.raises(LayoutError, match=r"ep\*etp = 3\*1 = 3 does not divide"):
        rank_role(_with("vision", ep=3), 0)


# --------------------------------------------------------------------------------------
# layouts_from_config
# --------------------------------------------------------------------------------------


def _ns(**kw):
    base = dict(pp=1, dp_replicate=1, dp_shard=1, cp=1, tp=1, ep=1, etp=1)
    base.update(kw)
    return SimpleNamespace(**base)


def test_layouts_from_config_duck_typed():
    cfg = SimpleNamespace(
        language=_ns(rank_offset=2, num_ranks=6, pp=2, dp_shard=3),
        vision=_ns(rank_offset=0, num_ranks=2, dp_shard=2),
    )
    lays = layouts_from_config(cfg)
    assert list(lays) == ["vision", "language"]
    assert lays == debug_layout()
    assert lays["language"].is_language and not lays["vision"].is_language


def test_layouts_from_config_missing_section():
    with pytest.raises(LayoutError, match=r"no 'vision' section"):
        layouts_from_config(SimpleNamespace(language=_ns(rank_offset=0, num_ranks=1)))


def test_layouts_from_config_real_config_classes():
    config = pytest.importorskip("mimo_titan.config")
    if not hasattr(config, "ModuleParallelism") or not hasattr(config, "ParallelismConfig"):
        pytest.skip("mimo_titan.config has no ModuleParallelism/ParallelismConfig yet")
    cfg = config.ParallelismConfig(  # the language table first: the language module still comes last
        modules={
            "language": config.ModuleParallelism(rank_offset=2, num_ranks=6, pp=2, dp_shard=3),
            "vision": config.ModuleParallelism(rank_offset=0, num_ranks=2, dp_shard=2),
        }
    )
    assert layouts_from_config(cfg) == debug_layout()
    assert list(layouts_from_config(cfg)) == ["vision", "language"]
    cfg = config.ParallelismConfig(
        modules={
            "vision": config.ModuleParallelism(rank_offset=0, num_ranks=8, pp=2, dp_shard=2, tp=2, ep=2, etp=2),
            "language": config.ModuleParallelism(rank_offset=0, num_ranks=8, pp=2, dp_shard=4, ep=2),
        }
    )
    assert layouts_from_config(cfg) == moe_colocated_layout()


# --------------------------------------------------------------------------------------
# build_topology with the fake backend (one process, any rank)
# --------------------------------------------------------------------------------------


@pytest.fixture
def fake_pg():
    """Returns init(rank, world_size) that starts a fake default group; destroys it afterwards."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def init(rank: int, world_size: int) -> None:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)

    yield init
    if dist.is_initialized():
        dist.destroy_process_group()


def _pg_ranks(group) -> list[int]:
    return dist.get_process_group_ranks(group)


def test_build_debug_layout_rank3(fake_pg):
    fake_pg(3, 8)
    topo = build_topology(debug_layout(), 8, 3, "cpu")
    assert isinstance(topo, Topology)
    assert topo.placement is Placement.NON_COLOCATED
    assert topo.role.modules == ("language",)
    assert list(topo.meshes) == ["vision", "language"]

    lm = topo.mesh("language")
    assert lm.mesh_dim_names == MESH_DIMS
    assert lm.mesh.tolist() == [[[[[2]], [[3]], [[4]]]], [[[[5]], [[6]], [[7]]]]]
    assert lm.get_coordinate() == (0, 0, 1, 0, 0)
    assert lm["pp"].mesh.tolist() == [3, 6]
    assert lm["tp"].mesh.tolist() == [3]
    assert topo.dp_mesh("language").mesh.tolist() == [[2, 3, 4]]
    assert topo.dp_mesh("language").mesh_dim_names == ("dp_replicate", "dp_shard")
    assert _pg_ranks(topo.pp_group("language")) == [3, 6]
    assert dist.get_rank(topo.pp_group("language")) == 0
    assert _pg_ranks(topo.dp_group("language")) == [2, 3, 4]
    assert dist.get_rank(topo.dp_group("language")) == 1
    assert topo.submesh("language", "dp_shard", "tp").mesh.tolist() == [[2], [3], [4]]

    # Rank 3 does not hold the vision module: its mesh exists, but has no coordinate.
    vis = topo.mesh("vision")
    assert vis.mesh.tolist() == [[[[[0]], [[1]]]]]
    assert vis.get_coordinate() is None
    for accessor in (topo.dp_mesh, topo.pp_group, topo.dp_group):
        with pytest.raises(RuntimeError, match=r"rank 3, which is not one of module 'vision' ranks \[0, 2\)"):
            accessor("vision")
    with pytest.raises(KeyError, match="unknown module 'audio'"):
        topo.mesh("audio")


def test_build_debug_layout_rank6_and_rank1(fake_pg):
    fake_pg(6, 8)
    topo = build_topology(debug_layout(), 8, 6, "cpu")
    assert topo.mesh("language").get_coordinate() == (1, 0, 1, 0, 0)
    assert _pg_ranks(topo.pp_group("language")) == [3, 6]
    assert dist.get_rank(topo.pp_group("language")) == 1  # stage index
    assert topo.dp_mesh("language").mesh.tolist() == [[5, 6, 7]]
    assert _pg_ranks(topo.dp_group("language")) == [5, 6, 7]
    dist.destroy_process_group()

    fake_pg(1, 8)
    topo = build_topology(debug_layout(), 8, 1, "cpu")
    assert topo.role.modules == ("vision",)
    assert topo.mesh("vision").get_coordinate() == (0, 0, 1, 0, 0)
    assert topo.dp_mesh("vision").mesh.tolist() == [[0, 1]]
    assert _pg_ranks(topo.pp_group("vision")) == [1]
    assert _pg_ranks(topo.dp_group("vision")) == [0, 1]
    assert topo.mesh("language").get_coordinate() is None


def test_build_colocated(fake_pg):
    fake_pg(1, 2)
    topo = build_topology(colocated_layout(), 2, 1, "cpu")
    assert topo.placement is Placement.COLOCATED
    assert topo.role.modules == ("vision", "language")
    for name in ("vision", "language"):
        assert topo.mesh(name).mesh.tolist() == [[[[[0]], [[1]]]]]
        assert topo.mesh(name).get_coordinate() == (0, 0, 1, 0, 0)
        assert topo.dp_mesh(name).mesh.tolist() == [[0, 1]]
        assert _pg_ranks(topo.dp_group(name)) == [0, 1]
    # Each module has its own mesh. A mesh dim spanning the whole world reuses the default group
    # (DeviceMesh behaviour), so here both modules' dp groups are the world group.
    assert topo.mesh("vision") is not topo.mesh("language")
    assert topo.dp_group("vision") is dist.group.WORLD
    assert topo.dp_group("language") is dist.group.WORLD


def test_build_hsdp_and_tp(fake_pg):
    fake_pg(2, 8)
    topo = build_topology(hsdp_tp_layout(), 8, 2, "cpu")
    dpm = topo.dp_mesh("vision")
    assert dpm.mesh.tolist() == [[0, 1], [2, 3]]
    assert dpm["dp_replicate"].mesh.tolist() == [0, 2]
    assert dpm["dp_shard"].mesh.tolist() == [2, 3]
    assert _pg_ranks(topo.group("vision", "dp_replicate")) == [0, 2]
    assert _pg_ranks(topo.dp_group("vision")) == [0, 1, 2, 3]  # flattened dp group
    assert dist.get_rank(topo.dp_group("vision")) == topo.role.dp_rank("vision") == 2
    dist.destroy_process_group()

    fake_pg(5, 8)
    topo = build_topology(hsdp_tp_layout(), 8, 5, "cpu")
    lm = topo.mesh("language")
    assert lm.mesh.tolist() == [[[[[4, 5]], [[6, 7]]]]]
    assert lm.get_coordinate() == (0, 0, 0, 0, 1)
    assert topo.submesh("language", "tp").mesh.tolist() == [4, 5]
    assert _pg_ranks(topo.group("language", "tp")) == [4, 5]
    assert topo.dp_mesh("language").mesh.tolist() == [[5, 7]]
    assert _pg_ranks(topo.dp_group("language")) == [5, 7]
    assert topo.submesh("language", "dp_shard", "tp").mesh.tolist() == [[4, 5], [6, 7]]


def test_build_pp_hsdp_tp(fake_pg):
    lays = _layouts(
        ModuleLayout("vision", 0, 2, dp_shard=2),
        ModuleLayout("language", 2, 16, pp=2, dp_replicate=2, dp_shard=2, tp=2, is_language=True),
    )
    fake_pg(13, 18)
    topo = build_topology(lays, 18, 13, "cpu")
    lm = topo.mesh("language")
    assert lm.get_coordinate() == (1, 0, 1, 0, 1)
    assert lm.mesh.tolist() == [
        [[[[2, 3]], [[4, 5]]], [[[6, 7]], [[8, 9]]]],
        [[[[10, 11]], [[12, 13]]], [[[14, 15]], [[16, 17]]]],
    ]
    assert topo.dp_mesh("language").mesh.tolist() == [[11, 13], [15, 17]]
    assert _pg_ranks(topo.dp_group("language")) == [11, 13, 15, 17]
    assert dist.get_rank(topo.dp_group("language")) == 1
    assert _pg_ranks(topo.pp_group("language")) == [5, 13]
    assert _pg_ranks(topo.group("language", "tp")) == [12, 13]


def test_build_expert_meshes_colocated(fake_pg):
    fake_pg(5, 8)
    topo = build_topology(moe_colocated_layout(), 8, 5, "cpu")
    assert list(topo.expert_meshes) == ["vision", "language"]

    lm = topo.expert_mesh("language")
    assert lm.mesh_dim_names == EXPERT_MESH_DIMS
    assert lm.mesh.tolist() == [[[[0], [1]], [[2], [3]]], [[[4], [5]], [[6], [7]]]]
    assert lm.get_coordinate() == (1, 0, 1, 0)
    assert _pg_ranks(topo.ep_group("language")) == [4, 5]
    assert dist.get_rank(topo.ep_group("language")) == 1
    assert _pg_ranks(topo.etp_group("language")) == [5]
    edp = topo.edp_mesh("language")
    assert edp.mesh_dim_names == ("edp",)
    assert edp.mesh.tolist() == [5, 7]
    assert _pg_ranks(edp.get_group()) == [5, 7]
    # The dense mesh is unchanged.
    dense = topo.mesh("language").mesh.flatten().tolist()
    assert topo.mesh("language").mesh.shape == (2, 1, 4, 1, 1) and dense == list(range(8))

    vis = topo.expert_mesh("vision")
    assert vis.mesh.tolist() == [[[[0, 1], [2, 3]]], [[[4, 5], [6, 7]]]]
    assert vis.get_coordinate() == (1, 0, 0, 1)
    assert _pg_ranks(topo.etp_group("vision")) == [4, 5]
    assert _pg_ranks(topo.ep_group("vision")) == [5, 7]
    assert topo.edp_mesh("vision").mesh.tolist() == [5]
    assert _pg_ranks(topo.group("vision", "tp")) == [4, 5]


def test_build_expert_meshes_non_member(fake_pg):
    # Debug layout with ep=3 on the language module (stage of 3 ranks -> edp=1); rank 0 holds only vision.
    fake_pg(0, 8)
    topo = build_topology(_with("language", ep=3), 8, 0, "cpu")
    lm = topo.expert_mesh("language")
    assert lm.mesh.tolist() == [[[[2], [3], [4]]], [[[5], [6], [7]]]]
    assert lm.get_coordinate() is None
    for accessor in (topo.ep_group, topo.etp_group, topo.edp_mesh):
        with pytest.raises(RuntimeError, match=r"rank 0, which is not one of module 'language' ranks \[2, 8\)"):
            accessor("language")
    with pytest.raises(KeyError, match="unknown module 'audio'"):
        topo.expert_mesh("audio")
    # Dense vision module: a trivial expert grid (ep = etp = 1, edp = dp_shard).
    assert topo.expert_mesh("vision").mesh.tolist() == [[[[0]], [[1]]]]
    assert _pg_ranks(topo.ep_group("vision")) == [0]
    assert topo.edp_mesh("vision").mesh.tolist() == [0, 1]
    dist.destroy_process_group()

    fake_pg(6, 8)
    topo = build_topology(_with("language", ep=3), 8, 6, "cpu")
    assert topo.expert_mesh("language").get_coordinate() == (1, 0, 1, 0)
    assert _pg_ranks(topo.ep_group("language")) == [5, 6, 7]
    assert topo.edp_mesh("language").mesh.tolist() == [6]


def test_build_validates_before_any_group(fake_pg):
    # Without a default group, a bad layout still reports the LayoutError (validation runs first).
    assert not dist.is_initialized()
    with pytest.raises(LayoutError, match=r"ep\*etp = 3\*1 = 3 does not divide"):
        build_topology(_with("vision", ep=3), 8, 0, "cpu")


def test_build_requires_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"needs the default process group"):
        build_topology(debug_layout(), 8, 0, "cpu")


def test_build_world_size_and_rank_mismatch(fake_pg):
    fake_pg(0, 4)
    lays = _layouts(ModuleLayout("language", 0, 8, dp_shard=8, is_language=True))
    with pytest.raises(RuntimeError, match=r"default process group has 4 ranks but .*world_size=8"):
        build_topology(lays, 8, 0, "cpu")
    lays = _layouts(ModuleLayout("language", 0, 4, dp_shard=4, is_language=True))
    with pytest.raises(RuntimeError, match=r"rank mismatch: .* rank 0 but .*rank=1"):
        build_topology(lays, 4, 1, "cpu")


# --------------------------------------------------------------------------------------
# Real multi-rank run: 8 gloo processes
# --------------------------------------------------------------------------------------

_WORLD = 8


def _multirank_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Builds the debug and HSDP/TP topologies on gloo and records what it sees."""
    torch.set_num_threads(1)
    result: dict = {"rank": rank}
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)

        topo = build_topology(debug_layout(), world_size, rank, "cpu")
        (name,) = topo.role.modules
        result["debug"] = {
            "module": name,
            "coord": list(topo.mesh(name).get_coordinate()),
            "role_coord": dict(topo.role.coordinates[name]),
            "dp_ranks": dist.get_process_group_ranks(topo.dp_group(name)),
            "pp_ranks": dist.get_process_group_ranks(topo.pp_group(name)),
        }
        for key, group in (("dp_sum", topo.dp_group(name)), ("pp_sum", topo.pp_group(name))):
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=group)
            result["debug"][key] = t.item()
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=topo.dp_mesh(name).get_group("dp_shard"))
        result["debug"]["dp_mesh_sum"] = t.item()

        # A second topology in the same job: HSDP (flattened dp group) and TP.
        topo2 = build_topology(hsdp_tp_layout(), world_size, rank, "cpu")
        (name2,) = topo2.role.modules
        sums = {}
        for key, group in (
            ("dp", topo2.dp_group(name2)),
            ("dp_replicate", topo2.dp_mesh(name2).get_group("dp_replicate")),
            ("tp", topo2.group(name2, "tp")),
        ):
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=group)
            sums[key] = t.item()
        result["hsdp"] = {"module": name2, "sums": sums, "dp_rank": dist.get_rank(topo2.dp_group(name2))}

        # A third one: both modules colocated on all 8 ranks with expert parallelism.
        topo3 = build_topology(moe_colocated_layout(), world_size, rank, "cpu")
        moe = {}
        for name3 in topo3.role.modules:
            got: dict = {
                "ep_rank": dist.get_rank(topo3.ep_group(name3)),
                "coord": list(topo3.expert_mesh(name3).get_coordinate()),
            }
            for key, group in (
                ("ep", topo3.ep_group(name3)),
                ("etp", topo3.etp_group(name3)),
                ("edp", topo3.edp_mesh(name3).get_group()),
            ):
                got[key + "_ranks"] = dist.get_process_group_ranks(group)
                t = torch.tensor([float(rank)])
                dist.all_reduce(t, group=group)
                got[key + "_sum"] = t.item()
            moe[name3] = got
        result["moe"] = moe

        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        result["error"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.multirank
def test_multirank_gloo_debug_topology(tmp_path):
    import torch.multiprocessing as mp

    # The parent only hosts the TCP store (no process group, no torch ops on tensors).
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("forkserver")
    # Import torch once in the fork server so that the 8 workers fork from it instead of each
    # importing torch (no effect if this process already started its fork server).
    ctx.set_forkserver_preload(["torch", "torch.distributed", "mimo_titan.topology"])
    procs = [ctx.Process(target=_multirank_worker, args=(r, _WORLD, master.port, str(tmp_path))) for r in range(_WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for i in hung:
        procs[i].terminate()
        procs[i].join(5)
    assert not hung, f"ranks {hung} did not finish within 120 s"

    results = {}
    for r in range(_WORLD):
        with open(tmp_path / f"rank{r}.json") as f:
            results[r] = json.load(f)
    errors = {r: res["error"] for r, res in results.items() if "error" in res}
    assert not errors, errors
    assert [p.exitcode for p in procs] == [0] * _WORLD

    expected_debug = {
        # rank: (module, coord, dp ranks, pp ranks, dp sum, pp sum)
        0: ("vision", [0, 0, 0, 0, 0], [0, 1], [0], 1.0, 0.0),
        1: ("vision", [0, 0, 1, 0, 0], [0, 1], [1], 1.0, 1.0),
        2: ("language", [0, 0, 0, 0, 0], [2, 3, 4], [2, 5], 9.0, 7.0),
        3: ("language", [0, 0, 1, 0, 0], [2, 3, 4], [3, 6], 9.0, 9.0),
        4: ("language", [0, 0, 2, 0, 0], [2, 3, 4], [4, 7], 9.0, 11.0),
        5: ("language", [1, 0, 0, 0, 0], [5, 6, 7], [2, 5], 18.0, 7.0),
        6: ("language", [1, 0, 1, 0, 0], [5, 6, 7], [3, 6], 18.0, 9.0),
        7: ("language", [1, 0, 2, 0, 0], [5, 6, 7], [4, 7], 18.0, 11.0),
    }
    for r, (module, coord, dp_ranks, pp_ranks, dp_sum, pp_sum) in expected_debug.items():
        got = results[r]["debug"]
        assert got["module"] == module, r
        assert got["coord"] == coord, r
        assert list(got["role_coord"].values()) == coord, r
        assert got["dp_ranks"] == dp_ranks, r
        assert got["pp_ranks"] == pp_ranks, r
        assert got["dp_sum"] == dp_sum, r
        assert got["dp_mesh_sum"] == dp_sum, r
        assert got["pp_sum"] == pp_sum, r

    expected_hsdp = {
        # rank: (module, sum over dp, sum over dp_replicate, sum over tp, dp rank)
        0: ("vision", 6.0, 2.0, 0.0, 0),
        1: ("vision", 6.0, 4.0, 1.0, 1),
        2: ("vision", 6.0, 2.0, 2.0, 2),
        3: ("vision", 6.0, 4.0, 3.0, 3),
        4: ("language", 10.0, 4.0, 9.0, 0),
        5: ("language", 12.0, 5.0, 9.0, 0),
        6: ("language", 10.0, 6.0, 13.0, 1),
        7: ("language", 12.0, 7.0, 13.0, 1),
    }
    for r, (module, dp, dp_rep, tp, dp_rank) in expected_hsdp.items():
        got = results[r]["hsdp"]
        assert got["module"] == module, r
        assert got["sums"] == {"dp": dp, "dp_replicate": dp_rep, "tp": tp}, r
        assert got["dp_rank"] == dp_rank, r

    # Colocated MoE layout. language: pp=2, dp_shard=4, ep=2 -> ep groups {0,1},{2,3},{4,5},{6,7},
    # edp groups {0,2},{1,3},{4,6},{5,7}. vision: pp=2, dp_shard=2, tp=2, ep=2, etp=2 -> etp groups
    # {0,1},{2,3},..., ep groups {0,2},{1,3},{4,6},{5,7}, edp = the rank alone.
    pairs = {0: 1, 1: 0, 2: 3, 3: 2, 4: 5, 5: 4, 6: 7, 7: 6}  # neighbour in stage
    across = {0: 2, 1: 3, 2: 0, 3: 1, 4: 6, 5: 7, 6: 4, 7: 5}  # two apart in stage
    for r in range(_WORLD):
        got = results[r]["moe"]
        assert sorted(got) == ["language", "vision"], r
        lm, vis = got["language"], got["vision"]
        assert lm["ep_ranks"] == sorted([r, pairs[r]]) and lm["ep_sum"] == r + pairs[r], r
        assert lm["edp_ranks"] == sorted([r, across[r]]) and lm["edp_sum"] == r + across[r], r
        assert lm["etp_ranks"] == [r] and lm["etp_sum"] == r, r
        assert lm["ep_rank"] == r % 2 and lm["coord"] == [r // 4, (r % 4) // 2, r % 2, 0], r
        assert vis["etp_ranks"] == sorted([r, pairs[r]]) and vis["etp_sum"] == r + pairs[r], r
        assert vis["ep_ranks"] == sorted([r, across[r]]) and vis["ep_sum"] == r + across[r], r
        assert vis["edp_ranks"] == [r] and vis["edp_sum"] == r, r
        assert vis["ep_rank"] == (r % 4) // 2 and vis["coord"] == [r // 4, 0, (r % 4) // 2, r % 2], r


def test_build_context_parallel_groups(fake_pg):
    """cp > 1: FSDP shards over dp_shard x cp (the dp_cp mesh); tokens are split over the same ranks; cp groups."""
    layouts = {
        "vision": ModuleLayout("vision", 0, 1),
        # ranks 1..8: pp=2 x dp_shard=2 x cp=2 -> stage 0 = 1..4, stage 1 = 5..8; cp pairs (1,2) (3,4) (5,6) (7,8)
        "language": ModuleLayout("language", 1, 8, pp=2, dp_shard=2, cp=2, is_language=True),
    }
    fake_pg(6, 9)
    topo = build_topology(layouts, 9, 6, "cpu")
    assert topo.role.coordinates["language"] == {"pp": 1, "dp_replicate": 0, "dp_shard": 0, "cp": 1, "tp": 0}
    assert topo.fsdp_mesh("language").mesh.tolist() == [5, 6, 7, 8]
    assert topo.fsdp_mesh("language").mesh_dim_names == ("dp_cp",)
    assert _pg_ranks(topo.token_group("language")) == [5, 6, 7, 8]
    assert _pg_ranks(topo.cp_group("language")) == [5, 6]
    assert _pg_ranks(topo.dp_group("language")) == [6, 8]  # data slices: same dp index on both cp ranks
    assert topo.role.dp_rank("language") == 0
    for accessor in (topo.fsdp_mesh, topo.token_group, topo.cp_group):
        with pytest.raises(RuntimeError, match="not one of module 'vision' ranks"):
            accessor("vision")


def test_without_context_parallelism_fsdp_mesh_is_the_dp_mesh(fake_pg):
    fake_pg(3, 8)
    topo = build_topology(debug_layout(), 8, 3, "cpu")
    assert topo.fsdp_mesh("language").mesh.tolist() == topo.dp_mesh("language").mesh.tolist() == [[2, 3, 4]]
    assert _pg_ranks(topo.token_group("language")) == [2, 3, 4]
    assert _pg_ranks(topo.cp_group("language")) == [3]


def test_build_embedding_groups_pair_first_and_last_stage(fake_pg):
    """Tied embeddings: one 2-rank group per first-stage rank, paired with the last-stage rank of the same
    (dp_replicate, dp_shard, cp, tp) coordinate; every rank creates the same number of groups (members or not)."""
    lays = _layouts(
        ModuleLayout("vision", 0, 2, dp_shard=2),
        ModuleLayout("language", 2, 12, pp=3, dp_replicate=2, dp_shard=2, is_language=True),
    )
    groups_made = set()
    for rank in (0, 3, 7, 13):
        fake_pg(rank, 14)
        topo = build_topology(lays, 14, rank, "cpu", tied_embeddings=["language"])
        groups_made.add(dist.distributed_c10d._world.group_count)  # the global counter group names come from
        group = topo.embedding_group("language")
        if rank in (3, 13):  # stage 0 rank 3 pairs with rank 11, stage 2 rank 13 with rank 5
            partner = {3: 11, 13: 5}[rank]
            assert _pg_ranks(group) == sorted([rank, partner])
            lm = topo.mesh("language")
            here = lm.get_coordinate()
            there = next(c.tolist() for c in torch.nonzero(lm.mesh == partner))
            assert here[1:] == tuple(there[1:]) and {here[0], there[0]} == {0, 2}
        else:  # a middle stage, a vision rank
            assert group is None
        with pytest.raises(KeyError, match="module 'vision' has no embedding group"):
            topo.embedding_group("vision")
        dist.destroy_process_group()
    assert len(groups_made) == 1

    fake_pg(3, 14)
    with pytest.raises(KeyError, match=r"tied_embeddings=\['language'\] or its pp is 1"):
        build_topology(lays, 14, 3, "cpu").embedding_group("language")
    dist.destroy_process_group()
    fake_pg(3, 14)
    with pytest.raises(LayoutError, match="tied_embeddings names unknown modules"):
        build_topology(lays, 14, 3, "cpu", tied_embeddings=["audio"])
