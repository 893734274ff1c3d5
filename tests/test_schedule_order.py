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
    interleaved_order,
    interleaved_rounds,
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


# (pp, virtual_stages, microbatches) torch's ScheduleInterleaved1F1B accepts, M a multiple of pp or not
INTERLEAVED = [(2, 2, 2), (2, 2, 4), (2, 2, 6), (2, 2, 8), (2, 3, 6), (3, 2, 3), (3, 2, 6), (3, 2, 9), (4, 2, 4),
               (4, 2, 6), (4, 2, 8), (4, 2, 12), (4, 3, 8)]  # fmt: skip


def _torch_interleaved_order(M: int, pp: int, v: int, rank: int):
    """Rank ``rank``'s compute actions as torch 2.13's ScheduleInterleaved1F1B plans them (no process group)."""
    from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B

    s = object.__new__(ScheduleInterleaved1F1B)  # only the attributes the planning reads
    s.pp_group_size, s.n_local_stages, s._n_microbatches = pp, v, M
    s.number_of_rounds = max(1, M // pp)
    s.microbatches_per_round = M // s.number_of_rounds
    kind = {"FORWARD": "F", "FULL_BACKWARD": "B"}
    return [
        (a.stage_index, (kind[a.computation_type.name], a.microbatch_index))
        for a in s._calculate_single_rank_operations(rank)
        if a is not None
    ]


@pytest.mark.parametrize("pp,v,M", INTERLEAVED)
def test_interleaved_order_is_torchs(pp, v, M):
    for rank in range(pp):
        assert interleaved_order(M, pp, v, rank) == _torch_interleaved_order(M, pp, v, rank), f"rank {rank}"
    # every chunk runs each microbatch's forward and backward once, in microbatch order
    for k in range(pp * v):
        order = stage_order("Interleaved1F1B", M, pp * v, k, v)
        assert [a for a in order if a[0] == "F"] == [("F", m) for m in range(M)]
        assert [a for a in order if a[0] == "B"] == [("B", m) for m in range(M)]


def test_interleaved_order_example_and_errors():
    fmt = " ".join(f"{k}{s}.{m}" for s, (k, m) in interleaved_order(4, 2, 2, 0))
    assert fmt == "F0.0 F0.1 F2.0 F2.1 F0.2 B2.0 F0.3 B2.1 F2.2 B0.0 F2.3 B0.1 B2.2 B2.3 B0.2 B0.3"
    with pytest.raises(ValueError, match=r"microbatches=5 .* max\(1, microbatches // pp\) = 2.*e.g. 4 or 6"):
        interleaved_rounds(5, 2)
    assert interleaved_rounds(6, 4) == 1  # torch's flexible rounds: 6 microbatches in one round of pp = 4
    with pytest.raises(ValueError, match="needs the Interleaved1F1B schedule"):
        stage_order("1F1B", 4, 4, 0, virtual_stages=2)


def _interleaved_pipeline(pp, v, M, warmups, e=1.0, lm=2.0):
    """Encoder stages (one per warm-up, the last one feeding the bridge) leading pp language ranks of v chunks each,
    every rank playing torch's interleaved order."""
    names = [f"enc.{j}" for j in range(len(warmups))]
    encs = [
        Stage(n, one_f_one_b_order(M, w), e, 2 * e, inputs=(names[j - 1],) if j else ())
        for j, (n, w) in enumerate(zip(names, warmups))
    ]
    chunks = [
        Stage(f"lm.{k}", stage_order("Interleaved1F1B", M, pp * v, k, v), lm / v, 2 * lm / v,
              inputs=(f"lm.{k - 1}",) if k else (names[-1],), worker=f"rank{k % pp}")
        for k in range(pp * v)
    ]  # fmt: skip
    orders = {f"rank{r}": [(f"lm.{k}", a) for k, a in interleaved_order(M, pp, v, r)] for r in range(pp)}
    return simulate([*encs, *chunks], orders)


@pytest.mark.parametrize("pp,v,M", INTERLEAVED)
def test_interleaved_encoder_warmup_never_deadlocks(pp, v, M):
    """The warm-up is the forwards of chunk 0 that rank 0 runs before its first backward of chunk 0; with it the
    encoder (one stage, or two) never waits for a gradient while the language model waits for a forward, and with
    one forward less it does (unless the warm-up is the whole batch: nothing left to wait for)."""
    w = encoder_warmup("Interleaved1F1B", pp, M, 1, v)
    chunk0 = [a for s, a in interleaved_order(M, pp, v, 0) if s == 0]
    assert w == chunk0.index(("B", 0))
    assert math.isfinite(_interleaved_pipeline(pp, v, M, [w]).step_s)
    w2 = encoder_warmup("Interleaved1F1B", pp, M, 2, v)
    assert w2 == min(M, w + 1)
    assert math.isfinite(_interleaved_pipeline(pp, v, M, [w2, w]).step_s)
    if w < M:
        with pytest.raises(ValueError, match="deadlocks"):
            _interleaved_pipeline(pp, v, M, [w - 1])
    t = mimo_timeline(
        mode="streamed",
        lm_schedule="Interleaved1F1B",
        lm_pp=pp,
        microbatches=M,
        encoder_forward_s=1.0,
        lm_forward_s=2.0,
        virtual_stages=v,
        encoder_pp=2,
    )
    assert math.isfinite(t.step_s)


@pytest.mark.parametrize("pp,v,M", [(2, 2, 8), (4, 2, 8), (3, 3, 9), (4, 2, 6)])
def test_interleaved_bubble_shrinks_by_the_virtual_stages(pp, v, M):
    """A streamed encoder faster than a language rank: 3·e + 3·l·M + 3·l·(pp − 1) / v (Narayanan et al. 2021: the
    bubble of 1F1B divided by v), against 3·e + 3·l·(M + pp − 1) for 1F1B; module GPipe and colocated batch mode
    also take the interleaved language step."""
    e, lm = 0.010, 0.030
    kw = dict(lm_pp=pp, microbatches=M, encoder_forward_s=e, lm_forward_s=lm)
    inter = mimo_timeline(mode="streamed", lm_schedule="Interleaved1F1B", virtual_stages=v, **kw)
    plain = mimo_timeline(mode="streamed", lm_schedule="1F1B", **kw)
    assert inter.step_s == pytest.approx(3 * e + 3 * lm * M + 3 * lm * (pp - 1) / v)
    assert plain.step_s == pytest.approx(3 * e + 3 * lm * (M + pp - 1))
    for colocated in (False, True):
        first = mimo_timeline(
            mode="whole_batch", lm_schedule="Interleaved1F1B", virtual_stages=v, colocated=colocated, **kw
        )
        assert first.step_s == pytest.approx(3 * M * e + 3 * lm * M + 3 * lm * (pp - 1) / v)


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


INTERLEAVED_PAR = {"pipeline_schedule": "Interleaved1F1B", "virtual_stages": 2}


@pytest.mark.parametrize(
    "language,sections,match",
    [
        (
            V(1, 2, pp=2),
            {"parallelism": {"virtual_stages": 2}},
            r"virtual_stages=2 needs parallelism.pipeline_schedule",
        ),
        (V(1, 1), {"parallelism": INTERLEAVED_PAR}, r"needs parallelism.language.pp >= 2 \(got 1\)"),
        (
            V(1, 2, pp=2),
            {"parallelism": {"pipeline_schedule": "Interleaved1F1B"}},
            r"needs parallelism.virtual_stages >= 2 .*got 1",
        ),
        (V(1, 2, pp=2), {"parallelism": INTERLEAVED_PAR}, r"num_layers=2 is smaller than .* 2 × 2 = 4"),
        (
            V(1, 2, pp=2),
            {
                "parallelism": INTERLEAVED_PAR,
                "model": {"language": {"num_layers": 4}},
                "training": {"global_batch_size": 10, "microbatches": 5},
            },
            r"training.microbatches=5 .*Interleaved1F1B.*e.g. 4 or 6",
        ),
    ],
)
def test_interleaved_needs_pp_chunks_layers_and_microbatches(language, sections, match):
    cfg = config_from_dict(tiny_config_dict(V(0, 1), language, **sections))
    with pytest.raises(ConfigError, match=match):
        validate_job(cfg, 1 + language["num_ranks"])


def test_interleaved_refuses_inline_encoders_and_accepts_a_good_layout():
    ok = dict(parallelism=INTERLEAVED_PAR, model={"language": {"num_layers": 4}}, training={"microbatches": 2})
    validate_job(config_from_dict(tiny_config_dict(V(0, 1), V(1, 2, pp=2), **ok)), 3)
    inline = {**ok, "parallelism": {**INTERLEAVED_PAR, "colocated_encoders": "inline"}}
    cfg = config_from_dict(tiny_config_dict(V(0, 2, dp_shard=2), V(0, 2, pp=2), **inline))
    with pytest.raises(ConfigError, match="colocated_encoders='inline' with pipeline_schedule='Interleaved1F1B'"):
        validate_job(cfg, 2)


def test_module_schedule_key_is_checked():
    d = tiny_config_dict(V(0, 1), V(1, 1), parallelism={"module_schedule": "ZeroBubble"})
    with pytest.raises(ConfigError, match="module_schedule"):
        config_from_dict(d)


def _forked_bench_worker(*args):
    """A rank of ``scripts/bench_schedule.py`` forked from the tests' forkserver (torch already imported there)."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    import bench_schedule

    bench_schedule._worker(*args)


@pytest.mark.parametrize("schedule,v,start", [("1F1B", 1, "spawn"), ("Interleaved1F1B", 2, "forkserver")])
def test_bench_schedule_runs_the_real_schedule(tmp_path, monkeypatch, schedule, v, start):
    """3 ranks (encoder | LM pp=2, or 2 chunks per rank under Interleaved1F1B), 4 microbatches: the JSON has every
    figure, no measured step beats its analytical time (sleeps cannot be shortened), and every rank's busy fraction
    is a fraction. The script spawns its ranks (new interpreters that import the script by name): the 1F1B case runs
    them so; the Interleaved1F1B case forks them from the tests' forkserver instead, which saves each rank the
    import of torch (the rank's code is the same)."""
    cfg = tiny_config_dict(V(0, 1), V(1, 2, pp=2), model={"language": {"num_layers": 4}})
    toml = tmp_path / "bench.toml"
    toml.write_text(_to_toml(cfg))
    out = tmp_path / "bench.json"
    sys.path.insert(0, str(ROOT / "scripts"))  # also for the spawned ranks, which import the script by name
    try:
        import bench_schedule

        if start == "forkserver":
            from types import SimpleNamespace

            from _launch import _CTX

            monkeypatch.setattr(bench_schedule, "mp", SimpleNamespace(get_context=lambda method: _CTX))
            monkeypatch.setattr(bench_schedule, "_worker", _forked_bench_worker)
        res = bench_schedule.main(
            ["--config", str(toml), "--encoder-ms", "5", "--lm-ms", "15", "--microbatches", "4", "--steps", "2",
             "--warmup", "1", "--json", str(out), "--schedule", schedule, f"--parallelism.virtual_stages={v}"]
        )  # fmt: skip
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["mode"] == "streamed"
    assert res["measured_s"] >= 0.98 * res["analytical_s"]
    assert res["encoder_first_s"] >= 0.98 * res["encoder_first_analytical_s"]
    # the bubble: (pp - 1) / v microbatch-times of a language rank
    assert res["analytical_s"] == pytest.approx(3 * 0.005 + 3 * 0.015 * (4 + (2 - 1) / v), abs=1e-4)
    assert res["stage_of_rank"][1] == ("language.0+2" if v == 2 else "language.0")
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
