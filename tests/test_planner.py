"""The dry-run planner (scripts/plan.py, mimo_titan.train.planner): every shipped config plans without a process
group; its sharding arithmetic and activation model are checked against the real modules."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from mimo_titan.config import load_config
from mimo_titan.train.planner import _decoder_act_per_token, _encoder_act_per_token, plan_job

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "train_configs").glob("*.toml"))


def _world(cfg) -> int:
    return max(m.rank_offset + m.num_ranks for m in cfg.parallelism.modules.values())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_plans_and_its_ranks_tile_the_world(path):
    from _tiny import shipped_overrides

    cfg = load_config(path, shipped_overrides(path))
    plan = plan_job(cfg, _world(cfg)).to_json()
    assert plan["world_size"] == _world(cfg)
    assert set(plan["modules"]) == set(cfg.model.modules)
    covered = sorted(r for m in plan["modules"].values() for r in range(m["ranks"][0], m["ranks"][1] + 1))
    assert set(covered) == set(range(plan["world_size"]))
    assert sum(m["params"] for m in plan["modules"].values()) == plan["params_total"]
    for name, m in plan["modules"].items():
        assert {"params", "ranks", "mem_per_rank_gib", "flops_per_step"} <= set(m), name
        assert 0 < m["params_per_rank"] <= m["params"] and m["mem_per_rank_gib"] > 0


def test_fsdp_shares_and_optimizer_bytes_follow_the_layout():
    cfg = load_config(
        ROOT / "train_configs/debug_noncolocated.toml",
        ["--parallelism.language.pp=1", "--parallelism.language.dp_shard=6"],
    )
    one = plan_job(cfg, 8, device_type="cpu").modules
    lm = one["language"]
    assert lm.params_per_rank == math.ceil(lm.params / 6)
    gib = 2**30
    assert lm.mem_breakdown_gib["weights"] == pytest.approx(4 * lm.params / 6 / gib)
    assert lm.mem_breakdown_gib["optimizer"] == pytest.approx(8 * lm.params / 6 / gib)
    frozen = plan_job(
        load_config(ROOT / "train_configs/debug_noncolocated.toml", ['--training.trainable=["vision"]']),
        8,
        device_type="cpu",
    ).modules["language"]
    assert frozen.mem_breakdown_gib["optimizer"] == 0 and frozen.mem_breakdown_gib["grads"] == 0
    # pp = 2 holds about half the parameters per stage: the worst stage (embedding or head side) rounds up
    two = plan_job(load_config(ROOT / "train_configs/debug_noncolocated.toml"), 8, device_type="cpu").modules
    assert two["language"].params_per_rank < lm.params_per_rank * 2 * 0.75


def test_microbatches_in_flight_follow_the_schedule_and_frozen_encoders_save_nothing():
    path = ROOT / "train_configs/debug_noncolocated.toml"

    def vision(*overrides):
        return plan_job(load_config(path, list(overrides)), 8, device_type="cpu").modules["vision"]

    assert vision().microbatches_in_flight == 2  # streamed, 1F1B: the LM's pp (1 encoder stage left) capped by M = 2
    assert vision("--training.microbatches=4", "--training.global_batch_size=24").microbatches_in_flight == 3  # pp + 1
    assert (
        vision(
            "--training.microbatches=4", "--training.global_batch_size=24", "--parallelism.pipeline_schedule=GPipe"
        ).microbatches_in_flight
        == 4
    )
    assert (
        vision(
            "--training.microbatches=4", "--training.global_batch_size=24", "--parallelism.module_schedule=GPipe"
        ).microbatches_in_flight
        == 4
    )
    frozen = vision("--training.microbatches=4", "--training.global_batch_size=24", "--model.vision.frozen=true")
    assert frozen.microbatches_in_flight == 0 and frozen.mem_breakdown_gib["optimizer"] == 0
    assert (
        frozen.mem_breakdown_gib["activations"]
        < vision("--training.microbatches=4", "--training.global_batch_size=24").mem_breakdown_gib["activations"]
    )


def test_moe_blocks_gather_only_this_ranks_experts():
    cfg = load_config(ROOT / "train_configs/debug_moe_ep.toml")
    ep2 = plan_job(cfg, 8, device_type="cpu").modules["language"].mem_breakdown_gib["fsdp_gather"]
    ep1 = (
        plan_job(
            load_config(ROOT / "train_configs/debug_moe_ep.toml", ["--parallelism.language.ep=1"]), 8, device_type="cpu"
        )
        .modules["language"]
        .mem_breakdown_gib["fsdp_gather"]
    )
    assert ep2 < 0.75 * ep1


def test_a_data_path_that_matches_nothing_is_refused_by_the_plan():
    from mimo_titan.errors import DataError

    cfg = load_config(ROOT / "train_configs/debug_colocated.toml", ["--data.path=../shared/data/nope/*.tar"])
    with pytest.raises(DataError, match=r"data\.path"):
        plan_job(cfg, 2)


def _saved_bytes(module, *args) -> int:
    """Bytes of the (non-parameter, non-input) tensors autograd saves for the backward of ``module(*args)``."""
    skip = {p.untyped_storage().data_ptr() for p in module.parameters()}
    skip |= {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*args)
    return sum(seen.values())


def test_activation_model_matches_what_autograd_saves():
    from mimo_titan.models.decoder import DecoderLayer, rope_cos_sin
    from mimo_titan.models.vit import ViTBlock

    cfg = load_config(ROOT / "train_configs/debug_noncolocated.toml")
    lm = cfg.model.language
    b, s = 2, 64
    x = torch.randn(b, s, lm.hidden_size, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(s), lm.hidden_size // lm.num_heads, lm.rope_theta, torch.float32)
    measured = _saved_bytes(DecoderLayer(lm, 0), x, cos, sin)
    assert _decoder_act_per_token(lm, 4) * b * s == pytest.approx(measured, rel=0.1)

    vis = cfg.model.vision
    p = (vis.image_size // vis.patch_size) ** 2
    x = torch.randn(3, p, vis.hidden_size, requires_grad=True)
    measured = _saved_bytes(ViTBlock(vis.hidden_size, vis.num_heads, vis.intermediate_size, vis.norm_eps), x)
    assert _encoder_act_per_token(vis, 4) * 3 * p == pytest.approx(measured, rel=0.1)


def test_plan_script_writes_json_and_names_a_bad_field(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import plan as plan_script
    finally:
        sys.path.pop(0)
    out = tmp_path / "plan.json"
    args = ["--config", str(ROOT / "train_configs/debug_tp_cp.toml")]
    assert plan_script.main([*args, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["world_size"] == 8 and set(data["modules"]) == {"vision", "language"}
    printed = capsys.readouterr()
    assert "language" in printed.out and "mem/rank GiB" in printed.out
    assert plan_script.main([*args, "--world-size", "6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "world" in err.lower() and "Traceback" not in err
    # an override reaches the plan: a frozen language model has no optimizer state
    assert plan_script.main([*args, "--json", str(out), "--model.language.frozen=true"]) == 0
    assert json.loads(out.read_text())["modules"]["language"]["mem_breakdown_gib"]["optimizer"] == 0


def test_params_per_rank_is_the_exact_share_rounded_up():
    """An 8B language model's parameters over dp_shard = 24 are a whole number per rank (8,190,735,360 / 24): the
    rounded-up share must not pick up a float error (341,280,641 after the ModuleParamTable refactor; plan_job said
    341,280,640 before it)."""
    from mimo_titan.checkpoint.state import meta_model

    lay = ["--parallelism.{m}.rank_offset=0", "--parallelism.{m}.num_ranks=24", "--parallelism.{m}.dp_shard=24"]
    cfg = load_config(
        ROOT / "train_configs/siglip_qwen3_8b_64gpu.toml",
        [x.format(m=m) for m in ("vision", "language") for x in lay]
        + ["--parallelism.language.pp=1", "--parallelism.language.tp=1", "--training.global_batch_size=192"],
    )
    model = meta_model(cfg.model)
    plan = plan_job(cfg, 24)
    for name, m in plan.modules.items():
        numel = sum(p.numel() for p in getattr(model, name).parameters())
        assert m.params_per_rank == -(-numel // 24), (name, numel)
    assert sum(p.numel() for p in model.language.parameters()) % 24 == 0
