"""The cross-module schedule's orders and its analytical model (pure Python), the schedule keys' validation, and
the schedule benchmark end to end (its numbers are checked for sense, not speed)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from _tiny import tiny_config_dict
from mimo_titan.config import config_from_dict
from mimo_titan.errors import ConfigError
from mimo_titan.pipeline.order import (
    Stage,
    encoder_warmup,
    gpipe_order,
    mimo_timeline,
    one_f_one_b_order,
    simulate,
    stage_order,
)
from mimo_titan.pipeline.schedule import schedule_mode
from mimo_titan.train.trainer import validate_job

ROOT = Path(__file__).resolve().parents[1]
V = lambda off, n, **kw: dict(rank_offset=off, num_ranks=n, **kw)  # noqa: E731


def test_one_f_one_b_order_warms_up_then_alternates():
    assert one_f_one_b_order(4, 2) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3), ("B", 2), ("B", 3)]
    assert one_f_one_b_order(2, 5) == gpipe_order(2)  # warm-up capped at M
    # torch.distributed.pipelining.Schedule1F1B: stage i of pp warms up with pp - i forwards
    assert stage_order("1F1B", 6, 3, 0)[:4] == [("F", 0), ("F", 1), ("F", 2), ("B", 0)]
    assert stage_order("1F1B", 6, 3, 2)[:3] == [("F", 0), ("B", 0), ("F", 1)]
    with pytest.raises(ValueError, match="outside"):
        stage_order("1F1B", 4, 2, 2)


@pytest.mark.parametrize("schedule", ["1F1B", "GPipe"])
def test_uniform_pipeline_takes_m_plus_t_minus_1_slots(schedule):
    """T equal stages, M microbatches: (M + T - 1) · (f + b) under both schedules (the textbook bubble)."""
    T, M, f, b = 3, 8, 1.0, 2.0
    stages = [
        Stage(f"s{i}", stage_order(schedule, M, T, i), f, b, inputs=(f"s{i - 1}",) if i else ()) for i in range(T)
    ]
    t = simulate(stages)
    assert t.step_s == pytest.approx((M + T - 1) * (f + b))
    assert t.busy_fraction("s0") == pytest.approx(M * (f + b) / ((M + T - 1) * (f + b)))


@pytest.mark.parametrize("pp,M", [(1, 4), (2, 8), (4, 8)])
def test_streamed_encoder_hides_behind_the_language_model(pp, M):
    """An encoder faster than a language stage costs only its first forward and last backward when it streams
    (3·e + 3·l·(M + pp − 1)), but its whole batch twice when it runs first (3·M·e + 3·l·(M + pp − 1))."""
    e, lm = 0.010, 0.030
    streamed = mimo_timeline(
        mode="streamed", lm_schedule="1F1B", lm_pp=pp, microbatches=M, encoder_forward_s=e, lm_forward_s=lm
    )
    first = mimo_timeline(
        mode="whole_batch", lm_schedule="1F1B", lm_pp=pp, microbatches=M, encoder_forward_s=e, lm_forward_s=lm
    )
    assert streamed.step_s == pytest.approx(3 * e + 3 * lm * (M + pp - 1))
    assert first.step_s == pytest.approx(3 * M * e + 3 * lm * (M + pp - 1))
    assert streamed.busy_fraction("encoder") > first.busy_fraction("encoder")


@pytest.mark.parametrize("schedule", ["1F1B", "GPipe"])
def test_encoder_stages_are_leading_stages_of_one_pipeline(schedule):
    """Two encoder stages and two language stages, all as fast: the uniform 4-stage pipeline's (M + 3) (f + b)."""
    t = mimo_timeline(
        mode="streamed",
        lm_schedule=schedule,
        lm_pp=2,
        microbatches=8,
        encoder_forward_s=1.0,
        lm_forward_s=1.0,
        encoder_pp=2,
    )
    assert t.step_s == pytest.approx((8 + 3) * 3.0)
    assert encoder_warmup("1F1B", 2, 8, encoder_stages_left=2) == 4


def test_colocated_inline_and_batch_serialise_the_modules():
    kw = dict(lm_schedule="1F1B", lm_pp=1, microbatches=4, encoder_forward_s=1.0, lm_forward_s=3.0, colocated=True)
    for mode in ("inline", "whole_batch"):
        assert mimo_timeline(mode=mode, **kw).step_s == pytest.approx(4 * 3 * (1.0 + 3.0))
    with pytest.raises(ValueError, match="inline"):
        mimo_timeline(mode="inline", **{**kw, "lm_pp": 2})


def test_encoder_warmup_below_the_language_models_deadlocks():
    """Why the encoder's warm-up follows the language schedule: under GPipe the first language stage runs every
    forward before its first backward, so an encoder that waits for a gradient after pp + 1 forwards would hang."""
    M = 4
    assert encoder_warmup("GPipe", 2, M) == M and encoder_warmup("1F1B", 2, M) == 3
    enc = Stage("enc", one_f_one_b_order(M, 3), 1, 2)
    lm = [Stage("l0", gpipe_order(M), 1, 2, inputs=("enc",)), Stage("l1", gpipe_order(M), 1, 2, inputs=("l0",))]
    with pytest.raises(ValueError, match="deadlocks"):
        simulate([enc, *lm])
    enc.order = one_f_one_b_order(M, encoder_warmup("GPipe", 2, M))
    assert math.isfinite(simulate([enc, *lm]).step_s)


def test_schedule_mode():
    assert schedule_mode(colocated=False, module_schedule="1F1B", colocated_encoders="batch") == "streamed"
    assert schedule_mode(colocated=False, module_schedule="GPipe", colocated_encoders="batch") == "whole_batch"
    assert schedule_mode(colocated=True, module_schedule="1F1B", colocated_encoders="batch") == "whole_batch"
    assert schedule_mode(colocated=True, module_schedule="1F1B", colocated_encoders="inline") == "inline"


@pytest.mark.parametrize(
    "vision,language,par,match",
    [
        (V(0, 1), V(1, 1), {"colocated_encoders": "inline"}, "have ranges of their own"),
        (V(0, 2, dp_shard=2), V(0, 2, pp=2), {"colocated_encoders": "inline"}, "pp = 1"),
        (
            V(0, 2, dp_shard=2),
            V(0, 2, dp_shard=2),
            {"colocated_encoders": "inline", "module_schedule": "GPipe"},
            "GPipe",
        ),
        (V(0, 2, pp=2), V(0, 2, dp_shard=2), {"colocated_encoders": "inline"}, "vision.pp > 1"),
    ],
)
def test_inline_encoders_need_a_colocated_single_stage_layout(vision, language, par, match):
    cfg = config_from_dict(tiny_config_dict(vision, language, parallelism=par))
    world = max(v["rank_offset"] + v["num_ranks"] for v in (vision, language))
    with pytest.raises(ConfigError, match=match):
        validate_job(cfg, world)


def test_module_schedule_key_is_checked():
    d = tiny_config_dict(V(0, 1), V(1, 1), parallelism={"module_schedule": "ZeroBubble"})
    with pytest.raises(ConfigError, match="module_schedule"):
        config_from_dict(d)


def test_bench_schedule_runs_the_real_schedule(tmp_path):
    """3 ranks (encoder | LM pp=2), 4 microbatches: the JSON has every figure, no measured step beats its
    analytical time (sleeps cannot be shortened), and every rank's busy fraction is a fraction."""
    cfg = tiny_config_dict(V(0, 1), V(1, 2, pp=2))
    toml = tmp_path / "bench.toml"
    toml.write_text(_to_toml(cfg))
    out = tmp_path / "bench.json"
    sys.path.insert(0, str(ROOT / "scripts"))  # also for the spawned ranks, which import the script by name
    try:
        import bench_schedule

        res = bench_schedule.main(
            ["--config", str(toml), "--encoder-ms", "5", "--lm-ms", "15", "--microbatches", "4", "--steps", "2",
             "--warmup", "1", "--json", str(out)]
        )  # fmt: skip
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["mode"] == "streamed"
    assert res["measured_s"] >= 0.98 * res["analytical_s"]
    assert res["encoder_first_s"] >= 0.98 * res["encoder_first_analytical_s"]
    assert res["analytical_s"] == pytest.approx(3 * 0.005 + 3 * 0.015 * (4 + 2 - 1), abs=1e-4)
    assert set(res["busy_fraction_per_rank"]) == {0, 1, 2}
    assert all(0 < f <= 1.0 for f in res["busy_fraction_per_rank"].values())


def _to_toml(d: dict, prefix: str = "") -> str:
    scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in d.items() if isinstance(v, dict)}
    lines = [f"[{prefix}]"] if prefix and scalars else []
    lines += [f"{k} = {json.dumps(v)}" for k, v in scalars.items()]
    for k, v in tables.items():
        lines.append(_to_toml(v, f"{prefix}.{k}" if prefix else k))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "vision,match",
    [
        (V(0, 4, pp=4), "model.vision.num_layers=2 is smaller than parallelism.vision.pp=4"),
        (V(0, 4, pp=2, tp=2), "pp=2 with tp=2 is not supported for an encoder"),
    ],
)
def test_bad_encoder_stages_fail_before_any_process_group(vision, match):
    cfg = config_from_dict(tiny_config_dict(vision, V(4, 1)))
    with pytest.raises(ConfigError, match=match):
        validate_job(cfg, 5)
