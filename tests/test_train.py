"""Job-level checks: validation before any process group, several steps equal single-process training, and
the README's train command."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_oracle import AUDIO

from _launch import per_layout_backends, run_ranks
from _tiny import SHARED, tiny_config_dict
from mimo_titan.config import config_from_dict
from mimo_titan.topology import LayoutError, layouts_from_config
from mimo_titan.train.trainer import train, validate_job

ROOT = Path(__file__).resolve().parents[1]
V = lambda off, n, **kw: dict(rank_offset=off, num_ranks=n, **kw)  # noqa: E731
DATA = str(SHARED / "cc12m")


@pytest.mark.parametrize(
    "vision,language,extra,world,match",
    [
        (
            V(0, 2, tp=2),
            V(2, 2, dp_shard=2),
            {"model": {"vision": {"num_heads": 1, "hidden_size": 32}}},
            4,
            r"model.vision.num_heads=1 must be divisible by parallelism.vision.tp=2",
        ),
        (
            V(0, 1),
            V(1, 2, tp=2),
            {"model": {"language": {"vocab_size": 2049}}},
            3,
            r"model.language.vocab_size=2049 must be divisible by parallelism.language.tp=2",
        ),
        (
            V(0, 1),
            V(1, 4, tp=4),
            {},
            5,
            r"model.language.num_kv_heads=2 must be divisible by parallelism.language.tp=4",
        ),
        (
            V(0, 1),
            V(1, 2, tp=2),
            {"model": {"language": {"moe": {"num_experts": 4, "intermediate_size": 8}}}},
            3,
            r"parallelism.language.tp=2 with model.language.moe.num_experts=4: tensor parallelism of MoE layers",
        ),
        (V(0, 1), V(1, 4, dp_replicate=2, tp=2), {}, 5, r"tp=2 with dp_replicate=2 is not supported"),
        (
            V(0, 1),
            V(1, 2, tp=2),
            {"model": {"language": {"tie_word_embeddings": True}}},
            3,
            r"tp=2 with model.language.tie_word_embeddings = true",
        ),
        (  # tied embeddings across pipeline stages are supported, but not with tp
            V(0, 1),
            V(1, 4, pp=2, tp=2),
            {"model": {"language": {"tie_word_embeddings": True}}},
            5,
            r"parallelism.language.tp=2 with model.language.tie_word_embeddings = true is not supported",
        ),
        (
            V(0, 2, cp=2),
            V(2, 2, dp_shard=2),
            {},
            4,
            r"parallelism.vision.cp=2: context parallelism is supported for the "
            r"language module only",
        ),
        (V(0, 1), V(1, 4, dp_replicate=2, cp=2), {}, 5, r"cp=2 with dp_replicate=2 is not supported yet"),
        (
            V(0, 3, pp=3),
            V(3, 1),
            {},
            4,
            r"model.vision.num_layers=2 is smaller than parallelism.vision.pp=3",
        ),
        (V(0, 1), V(1, 3, pp=3), {}, 4, r"num_layers=2 is smaller than parallelism.language.pp=3"),
        (
            V(0, 2, dp_shard=2),
            V(2, 3, dp_shard=3),
            {"training": {"global_batch_size": 4}},
            5,
            r"training\.global_batch_size",
        ),
        (V(0, 2, dp_shard=2), V(2, 2, dp_shard=2), {}, 8, r"--nproc_per_node|world"),
        (
            V(0, 2, dp_shard=2),
            V(2, 2, pp=2),
            {"training": {"microbatches": 1, "global_batch_size": 2}},
            4,
            r"training.microbatches=1 is smaller than parallelism.language.pp=2",
        ),
        (V(0, 1), V(1, 2, dp_shard=2, ep=2), {}, 3, r"ep=2, etp=1 but model.language.moe.num_experts = 0"),
        (
            V(0, 1),
            V(1, 1),
            {"model": {"vision": {"num_channels": 1}}},
            2,
            r"num_channels=1: .* decodes every image as RGB",
        ),
        (
            V(0, 1),
            V(1, 4, dp_shard=4, ep=4),
            {"model": {"language": {"moe": {"num_experts": 6, "intermediate_size": 8}}}},
            5,
            r"parallelism.language.ep=4 must divide model.language.moe.num_experts=6",
        ),
        (
            V(0, 1),
            V(1, 4, dp_shard=4, ep=2, etp=2),
            {"model": {"language": {"moe": {"num_experts": 4, "intermediate_size": 9}}}},
            5,
            r"parallelism.language.etp=2 must divide model.language.moe.intermediate_size=9",
        ),
        (
            V(0, 1),
            V(1, 3, dp_shard=3, ep=2),
            {"model": {"language": {"moe": {"num_experts": 4, "intermediate_size": 8}}}},
            4,
            r"ep",
        ),
    ],
)
def test_validate_job_errors_name_the_field(vision, language, extra, world, match):
    cfg = config_from_dict(tiny_config_dict(vision, language, **extra))
    with pytest.raises(ValueError, match=match):
        validate_job(cfg, world)
    assert not dist.is_initialized()


def test_validate_job_accepts_a_patch_count_tp_does_not_divide():
    """9 patches per image under vision tp = 4: ``apply_tp_vision`` pads the patch sequence to 12."""
    d = tiny_config_dict(V(0, 4, tp=4), V(4, 1), model={"vision": {"patch_size": 8, "image_size": 24, "num_heads": 4}})
    assert validate_job(config_from_dict(d), 5)["vision"].tp == 4
    assert not dist.is_initialized()


def test_validate_job_accepts_tied_embeddings_across_pipeline_stages():
    for language, world in ((V(1, 2, pp=2), 3), (V(1, 12, pp=3, dp_replicate=2, dp_shard=2), 13)):
        d = tiny_config_dict(V(0, 1), language, model={"language": {"tie_word_embeddings": True, "num_layers": 3}})
        d["training"].update(global_batch_size=16, microbatches=4)
        assert validate_job(config_from_dict(d), world)["language"].pp == language["pp"]
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    "seq_len,language,expected",
    [
        (46, V(1, 2, cp=2), 48),  # zigzag: 2 * cp chunks
        (48, V(1, 2, cp=2), 48),
        (50, V(1, 2, tp=2), 50),  # SP: (S / cp) % tp
        (51, V(1, 2, tp=2), 52),
        (50, V(1, 4, cp=2, tp=2), 52),  # lcm(2 cp, cp tp) = 4
        (50, V(1, 12, cp=6, tp=2), 60),  # lcm(12, 12) = 12
        (47, V(1, 1), 47),
    ],
)
def test_sequence_length_is_padded_for_cp_and_sp_not_rejected(seq_len, language, expected):
    from mimo_titan.train.trainer import build_loader, build_processor, padded_seq_len

    cfg = config_from_dict(tiny_config_dict(V(0, 1), language, training={"seq_len": seq_len}))
    validate_job(cfg, 1 + language["num_ranks"])
    assert padded_seq_len(cfg) == expected
    if expected != seq_len:  # the loader builds rows of the rounded length
        batch = next(iter(build_loader(cfg, build_processor(cfg))))
        assert batch.input_ids.shape[1] == expected


def test_train_rejects_a_bad_layout_before_any_process_group(monkeypatch):
    cfg = config_from_dict(tiny_config_dict(V(0, 2, dp_shard=2), V(2, 2, dp_shard=2)))
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(LayoutError):
        train(cfg)
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    "validation,match",
    [
        ({"enable": True}, r"validation.enable = true needs validation shards; set 'validation.data.path'"),
        ({"steps": 0}, r"invalid value 0 for 'validation.steps'.*set 'validation.steps' >= 1, or -1"),
        ({"freq": 0}, r"validation.freq"),
    ],
)
def test_validation_config_errors_name_the_key(validation, match):
    from mimo_titan.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        config_from_dict(tiny_config_dict(V(0, 1), V(1, 1), validation=validation))


def test_validation_shards_without_records_are_refused_before_any_process_group(monkeypatch, tmp_path):
    from mimo_titan.errors import DataError

    (tmp_path / "empty.tar").write_bytes(b"\0" * 1024)  # a tar with no member: no valid record
    val = {"enable": True, "data": {"path": str(tmp_path / "empty.tar")}}
    cfg = config_from_dict(tiny_config_dict(V(0, 1), V(1, 1), validation=val))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DataError, match=r"validation\.data\.path="):
        train(cfg)
    assert not dist.is_initialized()


def _steps_worker(rank, world, device, cfg_dict, steps):
    """Training steps on rank-local batches (media decoded only for this rank's encoder slices, prefetched by the
    loader's thread); each record also lists the images this rank decoded for that step. Every
    ``validation.freq`` steps a validation (forward only) over ``validation.steps`` batches of the validation
    loader, read from its start each time, is added to the step's record."""
    from mimo_titan.train.trainer import (
        build_job,
        build_loader,
        gather_step_metrics,
        media_slices,
        train_step,
        validate,
        validation_loader,
    )

    cfg = config_from_dict(cfg_dict)
    job = build_job(cfg, device)
    loader = build_loader(cfg, job.processor, rank=rank)
    val_loader = validation_loader(cfg, job.processor, rank=rank) if cfg.validation.enable else None
    start = val_loader.state_dict() if val_loader is not None else None
    hist = []
    for _ in range(steps):
        rec = train_step(job, next(loader))
        rec["decoded"], rec["media"] = loader.last_decoded, media_slices(cfg, rank, world)
        if val_loader is not None and job.step % cfg.validation.freq == 0:
            val_loader.load_state_dict(start)
            rec["validation"] = validate(job, [next(val_loader) for _ in range(cfg.validation.steps)])
            rec["val_decoded"] = val_loader.last_decoded
        hist.append(rec)
    loader.close()
    if val_loader is not None:
        val_loader.close()
    keep = cfg.metrics.history_steps  # the job keeps only the newest records
    assert [r["step"] for r in job.history] == list(range(max(1, steps - keep + 1), steps + 1))
    # a logged step's gather: rank r reports r + 1 GiB and waited r / 10 s for its batch
    gather_step_metrics(job, hist[-1], data_wait_s=rank / 10, memory_gib=rank + 1.0)
    return hist


def _validation_cache_worker(rank, world, device, cfg_dict):
    """A training step, then a validation over two batches: what each language stage's pipelining cache still held
    from earlier microbatches whenever a stage started a forward (``(stage index, outputs held)``), what the caches
    hold after the validation, and the validation's progress marks."""
    from mimo_titan.train.trainer import build_job, build_loader, train_step, validate

    cfg = config_from_dict(cfg_dict)
    job = build_job(cfg, device)
    loader = build_loader(cfg, job.processor, rank=rank)
    batch = next(loader)
    train_step(job, batch)
    stages = getattr(job.schedule, "stages", [])
    held: list[tuple[int, int]] = []
    for st in stages:
        st.submod.register_forward_pre_hook(
            lambda m, args, st=st: held.append((st.stage_index, sum(1 for out, _ in st.fwd_cache.values() if out)))
        )
    phases: list[str] = []
    val = validate(job, [batch, next(loader)], progress=phases.append)
    loader.close()
    last = [st.stage_index for st in stages if st.is_last]
    return held, last, [len(st.fwd_cache) for st in stages], phases, val["batches"]


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["lm_pp1_colocated", "lm_pp2"])
def test_validation_keeps_no_logits_of_earlier_microbatches_and_marks_progress_per_batch(layout):
    """torch's forward-only pipelining keeps every microbatch's stage output (the last stage's [b, S, V] logits) until
    the next step; validation drops the last stage's at once and frees every cache when it ends, so it never holds
    more logits than a training step. Each validation batch is a watchdog progress mark (a long validation is not a
    stalled rank)."""
    vision, language, world = {
        "lm_pp1_colocated": (V(0, 1), V(0, 1), 1),
        "lm_pp2": (V(0, 1), V(1, 2, pp=2), 3),
    }[layout]
    d = tiny_config_dict(vision, language, training={"global_batch_size": 8, "microbatches": 4})
    for rank, (held, last, after, phases, batches) in enumerate(run_ranks(_validation_cache_worker, world, d)):
        assert batches == 2 and phases == ["validation batch 1", "validation batch 2"], rank
        assert after == [0] * len(after), rank  # nothing left in the caches
        forwards = [n for index, n in held if index in last]
        assert len(forwards) == (8 if last else 0) and forwards == [0] * len(forwards), (rank, held)


def _reference_losses(cfg, steps):
    """Single-process training on the same loader's batches (``tests/_reference.py``)."""
    return _reference_run(cfg, steps)[0]


def _reference_run(cfg, steps, validation=None):
    """:func:`_reference_losses` and, per step, the images the loader decoded (all of the batch's); with
    ``validation`` (a list) also the validation loss of the reference after every ``validation.freq`` steps, on the
    first ``validation.steps`` batches of ``[validation.data]`` read in order."""
    from _reference import ReferenceTrainer
    from mimo_titan.train.trainer import build_loader, build_processor, validation_loader

    proc = build_processor(cfg)
    loader = build_loader(cfg, proc)
    ref = ReferenceTrainer(cfg, proc.image_token_id)
    losses, images = [], []
    val_batches = None
    if validation is not None:
        val_loader = validation_loader(cfg, proc)
        val_batches = [next(val_loader) for _ in range(cfg.validation.steps)]
        val_loader.close()
    for step in range(1, steps + 1):
        losses.append(ref.step(next(loader))[0])
        images.append(loader.last_decoded)
        if val_batches is not None and step % cfg.validation.freq == 0:
            validation.append(ref.eval_loss(val_batches))
    return losses, images


@pytest.mark.multirank
@pytest.mark.parametrize(
    "layout,backend",
    per_layout_backends({"colocated": 2, "noncolocated_pp2": 4, "moe_aux_free_ep2_pp2": 5, "packed_tp2_cp2": 6}),
)
def test_several_steps_match_single_process_training(layout, backend):
    vision, language, world = {
        "colocated": (V(0, 2, dp_shard=2), V(0, 2, dp_shard=2), 2),
        "noncolocated_pp2": (V(0, 2, dp_shard=2), V(2, 2, pp=2), 4),
        "moe_aux_free_ep2_pp2": (V(0, 1), V(1, 4, pp=2, dp_shard=2, ep=2), 5),
        "packed_tp2_cp2": (V(0, 2, tp=2), V(2, 4, tp=2, cp=2), 6),
    }[layout]
    steps = 4
    moe = {
        "model": {
            "language": {
                "moe": {
                    "num_experts": 4,
                    "top_k": 2,
                    "intermediate_size": 32,
                    "load_balance": "aux_free",
                    "bias_update_rate": 0.05,
                }
            }
        }
    }
    cfg_dict = tiny_config_dict(
        vision,
        language,
        training={"steps": 6},
        lr_schedule={"warmup_steps": 2},
        optimizer={"lr": 3e-3},
        metrics={"history_steps": steps - 1},
        **(moe if layout.startswith("moe") else {}),
        **({"data": {"packing": True}} if layout.startswith("packed") else {}),
        # validation after steps 2 and 4 on two batches of the shard read in order (training shuffles it)
        validation={"enable": True, "freq": 2, "steps": 2, "data": {"path": DATA}},
    )
    cfg = config_from_dict(cfg_dict)
    ref_val: list[float] = []
    ref, images = _reference_run(cfg, steps, validation=ref_val)
    res = run_ranks(_steps_worker, world, cfg_dict, steps, backend=backend)
    for rank_hist in res:
        got = [r["loss"] for r in rank_hist]
        # validation between the steps leaves training exact
        assert got == pytest.approx(ref, abs=1e-4)
        val = [r["validation"] for r in rank_hist if "validation" in r]
        assert [v["loss"] for v in val] == pytest.approx(ref_val, abs=1e-4)
        assert all(v["batches"] == 2 and v["tokens"] > 0 for v in val)
    assert ref[-1] < ref[0] and ref_val[-1] < ref_val[0]  # the held-out loss falls too
    from mimo_titan.train.trainer import media_slices

    for rank, rank_hist in enumerate(res):  # validation decodes rank-local media too: a language rank none
        if not media_slices(cfg, rank, world):
            assert all(r["val_decoded"] == [] for r in rank_hist if "validation" in r)
    # each image of a step is decoded by exactly one vision DP rank (its tp ranks alike) and by no other rank
    for step in range(steps):
        by_dp: dict[int, list] = {}
        for rank_hist in res:
            rec = rank_hist[step]
            (dp,) = [m.dp_rank for m in rec["media"]] or [None]
            if dp is None:
                assert rec["decoded"] == [], "a language-model rank decoded media"
            else:
                assert by_dp.setdefault(dp, rec["decoded"]) == rec["decoded"]
        decoded = [x for part in by_dp.values() for x in part]
        assert sorted(decoded) == sorted(images[step]) and len(by_dp) == vision.get("dp_shard", 1)
    # metrics: each module's memory is the largest of its own ranks (rank r reported r + 1), the data wait the
    # largest of all; its FLOPs those of the flops module (MoE: active parameters) for the step's tokens and images
    last = res[0][-1]
    layouts = {"vision": vision, "language": language}
    for name, m in last["modules"].items():
        assert m["mem_gib"] == layouts[name]["rank_offset"] + layouts[name]["num_ranks"], name
        assert m["ranks"] == [
            layouts[name]["rank_offset"],
            layouts[name]["rank_offset"] + layouts[name]["num_ranks"] - 1,
        ]
    assert last["data_wait_s"] == pytest.approx((world - 1) / 10)
    _check_module_flops(cfg, [r for rank_hist in res for r in rank_hist])


def _check_module_flops(cfg, records: list[dict]) -> None:
    """Each record's per-module FLOPs, throughput and TFLOP/s per rank follow :mod:`mimo_titan.train.flops`."""
    from mimo_titan.train import flops
    from mimo_titan.train.trainer import padded_seq_len

    lm = cfg.model.language
    per_token = flops.lm_flops_per_token(lm, padded_seq_len(cfg))
    for rec in records:
        mods = rec["modules"]
        assert list(mods) == list(cfg.model.modules)
        assert mods["language"]["tokens"] == rec["tokens"] > 0
        assert mods["language"]["flops"] == pytest.approx(rec["tokens"] * per_token)
        vit = cfg.model.vision
        assert mods["vision"]["flops"] == pytest.approx(
            mods["vision"]["items"] * flops.vit_flops_per_image(vit, lm.hidden_size)
        )
        assert mods["vision"]["tokens"] == mods["vision"]["items"] * (vit.image_size // vit.patch_size) ** 2 > 0
        for name, m in mods.items():
            n = getattr(cfg.parallelism, name).num_ranks
            assert m["tokens_per_s"] == pytest.approx(m["tokens"] / rec["step_time_s"])
            assert m["tflops_per_rank"] == pytest.approx(m["flops"] / rec["step_time_s"] / n / 1e12)
            assert m["mfu"] is None  # CPU without metrics.peak_tflops


# debug_colocated: its README command runs (3 steps, the loss falls) in test_checkpoint's
# test_train_command_resumes_with_checkpoint_load_step. debug_moe_ep and debug_tp_cp: their layouts are oracle layouts
# (moe_ep*, lm_tp2*, packed_*); every shipped config is validated and its data read below. debug_noncolocated: the
# launch, logs, metrics, validation and memory estimates checked here are those of debug_vision_audio (also 8 ranks,
# encoders apart from a language model of pp = 2; one 8-rank launch costs ~30 s of the suite on 2 cores), and its
# own layout's pieces, 2 vision DP ranks feeding 3 language DP ranks per pipeline stage, are exercised by the bridge
# (test_bridge: ratio_2to3, fan_out_1to3_pp2; test_bridge_pairing: streamed_ratio_2to3_m4) and oracle (ratio_2to3,
# streamed_lm_pp3_fan_out_1to2) tests.
@pytest.mark.multirank
@pytest.mark.parametrize("config,nproc", [("debug_vision_audio", 8)])
def test_readme_train_command_runs(config, nproc, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "scripts/train.py",
        "--config",
        f"train_configs/{config}.toml",
        "--training.steps=3",
        f"--job.output_dir={tmp_path}",
    ]
    from mimo_titan.config import load_config

    # validation every 2 steps and after the last, on the config's own shard read in order (one global batch)
    shard = load_config(ROOT / "train_configs" / f"{config}.toml").data.path
    validation = ["--validation.enable=true", "--validation.freq=2", f"--validation.data.path={shard}"]
    cmd += validation
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"\] step +\d+ \| loss ([0-9.]+)", log)]
    assert len(losses) == 3 and losses[-1] < losses[0]
    # metrics: the resolved config once; per logged step (log_freq = 1) one line per module and one JSONL record
    cfg = load_config(
        ROOT / "train_configs" / f"{config}.toml", ["--training.steps=3", f"--job.output_dir={tmp_path}", *validation]
    )
    assert log.count("config (resolved): ") == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["loss"] for r in records] == pytest.approx(losses, abs=1e-4)
    val = [(int(s), float(x)) for s, x in re.findall(r"\[rank0\] validation \| step +(\d+) \| loss ([0-9.]+)", log)]
    assert [s for s, _ in val] == [2, 3] and all(math.isfinite(x) for _, x in val)
    logged = [r["validation"] for r in records if "validation" in r]
    assert [v["loss"] for v in logged] == pytest.approx([x for _, x in val], abs=1e-4)
    assert [v["batches"] for v in logged] == [1, 1]
    for name, lay in cfg.parallelism.modules.items():
        unit = {"vit": "patches", "audio": "frames", "decoder": "tokens"}[getattr(cfg.model, name).type]
        lines = re.findall(rf"\[rank0\]   {name}: [0-9,]+ {unit}/s.*TFLOP/s per rank \| MFU n/a \| max mem ", log)
        assert len(lines) == 3, name
        for r in records:  # every rank filled the modules it holds: a memory for every module, its ranks named
            assert r["modules"][name]["mem_gib"] > 0
            assert r["modules"][name]["ranks"] == [lay.rank_offset, lay.rank_offset + lay.num_ranks - 1]
    assert all(r["data_wait_s"] >= 0 and "sample_ids" not in r for r in records)
    _check_module_flops(cfg, records)
    if "audio" in cfg.model.modules:
        assert all(r["modules"]["audio"]["items"] > 0 and r["modules"]["audio"]["flops"] > 0 for r in records)
    # the dry-run planner's per-rank estimate (scripts/plan.py --device cpu) against the measured peak per module. On
    # CPU a rank's peak RSS includes the torch libraries' file pages, whose residency depends on the page cache (the
    # same vision rank measured 0.41 and 0.51 GiB in two venvs of one machine), so the process's runtime is taken
    # from the vision ranks (their model terms are ~2 MB) and every other module's estimate is checked against it.
    from mimo_titan.train.planner import RUNTIME_GIB, plan_job

    plan = plan_job(cfg, nproc, device_type="cpu")
    peak = {name: max(r["modules"][name]["mem_gib"] for r in records) for name in cfg.parallelism.modules}
    runtime = peak["vision"] - (plan.modules["vision"].rank_total_gib - RUNTIME_GIB["cpu"])
    for name in cfg.parallelism.modules:
        estimate = plan.modules[name].rank_total_gib - RUNTIME_GIB["cpu"] + runtime
        assert abs(estimate - peak[name]) <= 0.25 * peak[name], (name, estimate, peak[name], runtime)


@pytest.mark.parametrize("path", sorted((ROOT / "train_configs").glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_config_validates_and_reads_its_data(path):
    """What the launch checks before any process group, for every config in train_configs/: layouts, schedule,
    kernels, tokenizer, and the first global batch of its data."""
    from _tiny import shipped_overrides
    from mimo_titan.config import load_config
    from mimo_titan.train.trainer import build_loader, build_processor, validation_loader

    cfg = load_config(path, shipped_overrides(path))
    layouts = validate_job(
        cfg, max(lay.end for lay in layouts_from_config(cfg.parallelism, cfg.model.language_name).values())
    )
    assert len(layouts) == len(cfg.model.modules)
    world = max(lay.end for lay in layouts.values())
    if cfg.data.packing and cfg.training.seq_len > 4096:  # a 1 M-token batch of the 32-sample shard: its data
        cfg = load_config(path, [*shipped_overrides(path), "--training.seq_len=4096"])  # reads in 1/8 of the rows
    with pytest.MonkeyPatch.context() as mp:  # as rank 0 of the launch: it decodes its own media slice only
        mp.setenv("WORLD_SIZE", str(world))
        loader = build_loader(cfg, build_processor(cfg), rank=0)
    batch = next(loader)
    loader.close()
    assert len(batch) == cfg.training.global_batch_size
    if cfg.validation.enable:  # and its validation data
        val = validation_loader(cfg, build_processor(cfg))
        assert len(next(val)) == cfg.training.global_batch_size
        val.close()


def test_a_model_too_big_for_host_memory_is_refused_before_any_process_group(monkeypatch):
    from mimo_titan.errors import ConfigError
    from mimo_titan.train import trainer

    cfg = config_from_dict(tiny_config_dict(V(0, 1), V(1, 1), model={"language": {"vocab_size": 10**9}}))
    monkeypatch.setattr(trainer, "_mem_available_bytes", lambda: 64 * 2**30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(
        ConfigError,
        match=r"the largest is language.model.embed_tokens.weight \[1000000000, 64\]\); each rank allocates its "
        r"shards .* the 2 rank\(s\) on this machine need 512 GB but 68.7 GB",
    ):
        trainer.check_host_memory(cfg)
    trainer.check_host_memory(config_from_dict(tiny_config_dict(V(0, 1), V(1, 1))))  # the tiny model fits
    assert not dist.is_initialized()


def _stop_worker(rank, world, device, cfg_dict, mode):
    import os
    import signal

    from mimo_titan.checkpoint import CheckpointManager
    from mimo_titan.train.trainer import build_job, build_loader, train, train_step

    cfg = config_from_dict(cfg_dict)
    if mode == "flag_read_at_the_all_reduce":
        job = build_job(cfg, device)
        loader = build_loader(cfg, job.processor)
        phases: list[str] = []
        # rank 1 "receives" the signal during its forward-backward: the flag is read afterwards, in this very step
        rec = train_step(
            job, next(loader), stop_requested=lambda: rank == 1 and "forward-backward" in phases, progress=phases.append
        )
        return rec["stop"], rec["step"]
    save = CheckpointManager.save

    def save_and_get_signalled(self, job, loader):
        out = save(self, job, loader)
        if rank == 1 and job.step == 2:  # a SIGTERM that arrives during the save of step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    CheckpointManager.save = save_and_get_signalled
    hist = train(cfg)
    return [r["step"] for r in hist]


def _stop_in_validation_worker(rank, world, device, cfg_dict):
    import os
    import signal

    from mimo_titan.pipeline.schedule import MimoSchedule
    from mimo_titan.train.trainer import train

    evaluate = MimoSchedule.evaluate
    calls = []

    def evaluate_and_get_signalled(self, batch):
        calls.append(1)
        if rank == 1 and len(calls) == 2:  # a SIGTERM that arrives during the second batch of the first validation
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self, batch)

    MimoSchedule.evaluate = evaluate_and_get_signalled
    hist = train(config_from_dict(cfg_dict))
    return [r["step"] for r in hist], ["validation" in r for r in hist], len(calls)


@pytest.mark.multirank
def test_a_stop_request_during_validation_stops_right_after_it(tmp_path):
    """A SIGTERM that reaches one rank while the ranks validate ends the validation after the batch it arrives in (no
    partial loss is logged), and the run saves that step and stops, rather than after another training step."""
    d = tiny_config_dict(
        V(0, 2, dp_shard=2),
        V(0, 2, dp_shard=2),
        validation={"enable": True, "freq": 2, "steps": 4, "data": {"path": DATA}},
        checkpoint={"enable": True, "interval": 100},
    )
    d["job"]["output_dir"] = str(tmp_path)
    assert run_ranks(_stop_in_validation_worker, 2, d) == [([1, 2], [False, False], 2)] * 2
    from mimo_titan.checkpoint import complete_steps

    assert complete_steps(str(tmp_path / "checkpoint")) == [2]


@pytest.mark.multirank
def test_a_stop_request_counts_in_the_step_or_the_save_it_arrives_in(tmp_path):
    d = tiny_config_dict(V(0, 2, dp_shard=2), V(0, 2, dp_shard=2))
    assert run_ranks(_stop_worker, 2, d, "flag_read_at_the_all_reduce") == [(True, 1), (True, 1)]
    d["checkpoint"] = {"enable": True, "interval": 1}
    d["job"]["output_dir"] = str(tmp_path)
    # the signal reaches rank 1 during the save of step 2: both ranks stop right after that save, not a step later
    assert run_ranks(_stop_worker, 2, d, "save") == [[1, 2], [1, 2]]
    from mimo_titan.checkpoint import complete_steps

    assert complete_steps(str(tmp_path / "checkpoint")) == [1, 2]


def _data_worker(rank, world, device, paths):
    from mimo_titan.errors import DataError
    from mimo_titan.train.trainer import build_loader, build_processor, check_same_data

    d = tiny_config_dict(V(0, 2, dp_shard=2), V(0, 2, dp_shard=2), data={"path": paths[rank]})
    cfg = config_from_dict(d)
    loader = build_loader(cfg, build_processor(cfg))
    try:
        check_same_data(loader, device)
    except DataError as exc:
        return str(exc)
    return None


@pytest.mark.multirank
def test_ranks_that_read_different_records_fail_with_one_data_error(tmp_path):
    import shutil

    from _tiny import SHARED

    shard = SHARED / "cc12m" / "cc12m-train-0000.tar"
    same = str(SHARED / "cc12m")
    assert run_ranks(_data_worker, 2, [same, same]) == [None, None]
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(shard, cut / "a.tar")
    blob = shard.read_bytes()
    (cut / "a.tar").write_bytes(blob[: len(blob) // 2])  # this "machine" sees a shard cut short
    errors = run_ranks(_data_worker, 2, [same, str(cut)])
    assert errors[0] == errors[1] and errors[0] is not None
    assert "the ranks see different data under data.path (rank 0: 1 shard(s), rank 1: 1 shard(s); " in errors[0]


def _val_data_worker(rank, world, device, paths):
    from mimo_titan.errors import DataError

    val = {"enable": True, "data": {"path": paths[rank]}}
    cfg = config_from_dict(tiny_config_dict(V(0, 2, dp_shard=2), V(0, 2, dp_shard=2), validation=val))
    try:
        train(cfg)
    except DataError as exc:
        return str(exc)
    return None


@pytest.mark.multirank
def test_ranks_that_read_different_validation_records_fail_before_training(tmp_path):
    """The validation shards are checked as the training ones: ranks that read different validation data (here one
    shard cut short) would validate a different number of batches with steps = -1 and hang in the validation's
    collectives."""
    shard = SHARED / "cc12m" / "cc12m-train-0000.tar"
    (tmp_path / "a.tar").write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    errors = run_ranks(_val_data_worker, 2, [str(shard), str(tmp_path / "a.tar")])
    assert errors[0] == errors[1] and errors[0] is not None
    assert (
        "the ranks see different data under validation.data.path (rank 0: 1 shard(s), rank 1: 1 shard(s); "
        in (errors[0])
    )
    assert "check that validation.data.path is the same" in errors[0]


@pytest.mark.parametrize(
    "extra,world,match",
    [
        # two encoders of one medium would share the <|image|> placeholder
        (
            dict(
                model={"second": {**tiny_config_dict(V(0, 1), V(1, 1))["model"]["vision"], "type": "vit"}},
                parallelism={"second": V(2, 1)},
            ),
            3,
            r"model\.(vision|second) and model\.(second|vision) both read image",
        ),
        (
            dict(model={"audio": AUDIO}, parallelism={"audio": V(2, 2, tp=2)}),
            4,
            "parallelism.audio.tp=2: tensor parallelism of an encoder of type 'audio'",
        ),
        (
            dict(model={"audio": AUDIO}, parallelism={"audio": V(2, 2, pp=2)}),
            4,
            "parallelism.audio.pp=2: an encoder of type 'audio' cannot be split",
        ),
        (
            dict(
                model={"audio": AUDIO},
                parallelism={"audio": V(2, 1)},
                data={"packing": True},
                training={"seq_len": 120},
            ),
            3,
            "data.packing = true with an audio encoder",
        ),
        # encoders sharing ranks run as one leading stage: same pp
        (
            dict(
                model={"audio": AUDIO},
                parallelism={"vision": V(0, 2, pp=2), "audio": V(0, 2, dp_shard=2), "language": V(2, 1)},
            ),
            3,
            r"encoders \['vision', 'audio'\] share ranks, so they run as one leading pipeline stage",
        ),
    ],
)
def test_encoder_registry_errors_before_any_process_group(extra, world, match):
    from mimo_titan.errors import ConfigError

    cfg = config_from_dict(tiny_config_dict(V(0, 1), V(1, 1), **extra))
    with pytest.raises(ConfigError, match=match):
        validate_job(cfg, world)


def test_audio_without_audio_data_and_without_a_vit_are_refused():
    """An audio encoder whose data carries no clip (the plain CC12M shard has no .wav): a DataError naming
    data.path; an encoder set without a 'vit' (every sample carries an image): a ConfigError."""
    from mimo_titan.errors import ConfigError, DataError
    from mimo_titan.train.trainer import build_loader, build_processor

    cfg = config_from_dict(tiny_config_dict(V(0, 1), V(1, 1), model={"audio": AUDIO}, parallelism={"audio": V(2, 1)}))
    with pytest.raises(DataError, match=r"data.path=.*the model has an audio encoder but none of the first 4 records"):
        build_loader(cfg, build_processor(cfg))
    only_audio = tiny_config_dict(V(0, 1), V(1, 1), model={"speech": AUDIO}, parallelism={"speech": V(0, 1)})
    del only_audio["model"]["vision"], only_audio["parallelism"]["vision"]
    with pytest.raises(ConfigError, match=r"include no 'vit' encoder"):
        build_processor(config_from_dict(only_audio))


def test_validation_steps_minus_one_reads_the_validation_data_once():
    """``validation.steps = -1``: batches until the validation stream wraps (32 records, 12 per batch: 3 batches,
    the last one completed from the start of the stream), read in order, the same ones each validation."""
    from mimo_titan.train.trainer import _validation_batches, build_processor, validation_loader

    val = {"enable": True, "steps": -1, "data": {"path": DATA}}
    cfg = config_from_dict(tiny_config_dict(V(0, 1), V(1, 1), training={"global_batch_size": 12}, validation=val))
    loader = validation_loader(cfg, build_processor(cfg))
    start = loader.state_dict()
    first = [b.sample_ids.tolist() for b in _validation_batches(loader, -1)]
    assert len(first) == 3 and loader.stats["records"] >= 32
    assert [i for ids in first for i in ids] == list(range(36))  # in order, nothing skipped
    loader.load_state_dict(start)
    again = [b.input_ids for b in _validation_batches(loader, 2)]
    loader.load_state_dict(start)
    assert all(torch.equal(a, b.input_ids) for a, b in zip(again, _validation_batches(loader, 2)))
    loader.close()


@pytest.mark.parametrize("batch", [8, 16])
def test_validation_steps_minus_one_on_data_that_fill_the_batches_reads_each_record_once(batch):
    """32 records in batches of 8 (16): the stream is at the end of the data after exactly 4 (2) batches, but it learns
    so only when the next batch reads past it; that batch, wholly a repeat of the first, is not validated."""
    from mimo_titan.train.trainer import _validation_batches, build_processor, validation_loader

    val = {"enable": True, "steps": -1, "data": {"path": DATA}}
    cfg = config_from_dict(tiny_config_dict(V(0, 1), V(1, 1), training={"global_batch_size": batch}, validation=val))
    loader = validation_loader(cfg, build_processor(cfg))
    start = loader.state_dict()
    for _ in range(2):  # the same batches at every validation
        loader.load_state_dict(start)
        keys = [key for _ in _validation_batches(loader, -1) for _, _, key in loader.last_decoded]
        assert len(keys) == 32 and len(set(keys)) == 32, keys  # every record of the shard, once
    loader.close()
