"""Job-level checks: validation before any process group, several steps equal single-process training, and
the README's train command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from _launch import per_layout_backends, run_ranks
from _tiny import tiny_config_dict
from mimo_titan.config import config_from_dict
from mimo_titan.topology import LayoutError
from mimo_titan.train.trainer import train, validate_job

ROOT = Path(__file__).resolve().parents[1]
V = lambda off, n, **kw: dict(rank_offset=off, num_ranks=n, **kw)  # noqa: E731


@pytest.mark.parametrize("vision,language,extra,world,match", [
    (V(0, 2, tp=2), V(2, 2, dp_shard=2), {}, 4, r"parallelism.vision.tp=2: tensor parallelism is not supported yet"),
    (V(0, 2, cp=2), V(2, 2, dp_shard=2), {}, 4, r"parallelism.vision.cp=2: context parallelism is supported for the "
                                                 r"language module only"),
    (V(0, 1), V(1, 2, cp=2), {"training": {"seq_len": 46}}, 3, r"training.seq_len=46 must be divisible by 2 \* "
                                                                r"parallelism.language.cp = 4.*e.g. 48"),
    (V(0, 1), V(1, 4, dp_replicate=2, cp=2), {}, 5, r"cp=2 with dp_replicate=2 is not supported yet"),
    (V(0, 2, pp=2), V(2, 2, dp_shard=2), {}, 4, r"parallelism.vision.pp=2: encoder modules run as one stage"),
    (V(0, 1), V(1, 3, pp=3), {}, 4, r"num_layers=2 is smaller than parallelism.language.pp=3"),
    (V(0, 2, dp_shard=2), V(2, 3, dp_shard=3), {"training": {"global_batch_size": 4}}, 5, r"training\.global_batch_size"),
    (V(0, 2, dp_shard=2), V(2, 2, dp_shard=2), {}, 8, r"--nproc_per_node|world"),
    (V(0, 2, dp_shard=2), V(2, 2, pp=2), {"training": {"microbatches": 1, "global_batch_size": 2}}, 4,
     r"training.microbatches=1 is smaller than parallelism.language.pp=2"),
    (V(0, 1), V(1, 2, dp_shard=2, ep=2), {}, 3, r"ep=2, etp=1 but model.language.moe.num_experts = 0"),
    (V(0, 1), V(1, 4, dp_shard=4, ep=4), {"model": {"language": {"moe": {"num_experts": 6, "intermediate_size": 8}}}},
     5, r"parallelism.language.ep=4 must divide model.language.moe.num_experts=6"),
    (V(0, 1), V(1, 4, dp_shard=4, ep=2, etp=2), {"model": {"language": {"moe": {"num_experts": 4,
                                                                              "intermediate_size": 9}}}},
     5, r"parallelism.language.etp=2 must divide model.language.moe.intermediate_size=9"),
    (V(0, 1), V(1, 3, dp_shard=3, ep=2), {"model": {"language": {"moe": {"num_experts": 4, "intermediate_size": 8}}}},
     4, r"ep"),
])
def test_validate_job_errors_name_the_field(vision, language, extra, world, match):
    cfg = config_from_dict(tiny_config_dict(vision, language, **extra))
    with pytest.raises(ValueError, match=match):
        validate_job(cfg, world)
    assert not dist.is_initialized()


def test_train_rejects_a_bad_layout_before_any_process_group(monkeypatch):
    cfg = config_from_dict(tiny_config_dict(V(0, 2, dp_shard=2), V(2, 2, dp_shard=2)))
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(LayoutError):
        train(cfg)
    assert not dist.is_initialized()


def _steps_worker(rank, world, device, cfg_dict, steps):
    from mimo_titan.data import MimoDataLoader
    from mimo_titan.train.trainer import build_job, train_step

    cfg = config_from_dict(cfg_dict)
    job = build_job(cfg, device)
    loader = MimoDataLoader(cfg.data.path, job.processor, cfg.training.global_batch_size, cfg.training.seq_len,
                            max_images_per_sample=cfg.data.max_images_per_sample, seed=cfg.job.seed)
    return [train_step(job, next(loader)) for _ in range(steps)]


def _reference_losses(cfg, steps):
    """Single-process training on the same loader's batches (``tests/_reference.py``)."""
    from _reference import ReferenceTrainer

    from mimo_titan.data import ImageTextProcessor, MimoDataLoader

    tpi = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
    proc = ImageTextProcessor(cfg.data.tokenizer, cfg.model.vision.image_size, tpi)
    loader = MimoDataLoader(cfg.data.path, proc, cfg.training.global_batch_size, cfg.training.seq_len,
                            max_images_per_sample=cfg.data.max_images_per_sample, seed=cfg.job.seed)
    ref = ReferenceTrainer(cfg, proc.image_token_id)
    return [ref.step(next(loader))[0] for _ in range(steps)]


@pytest.mark.multirank
@pytest.mark.parametrize("layout,backend", per_layout_backends({"colocated": 2, "noncolocated_pp2": 4,
                                                                 "moe_aux_free_ep2_pp2": 5}))
def test_several_steps_match_single_process_training(layout, backend):
    vision, language, world = {
        "colocated": (V(0, 2, dp_shard=2), V(0, 2, dp_shard=2), 2),
        "noncolocated_pp2": (V(0, 2, dp_shard=2), V(2, 2, pp=2), 4),
        "moe_aux_free_ep2_pp2": (V(0, 1), V(1, 4, pp=2, dp_shard=2, ep=2), 5),
    }[layout]
    steps = 4
    moe = {"model": {"language": {"moe": {"num_experts": 4, "top_k": 2, "intermediate_size": 32,
                                          "load_balance": "aux_free", "bias_update_rate": 0.05}}}}
    cfg_dict = tiny_config_dict(vision, language, training={"steps": 6}, lr_schedule={"warmup_steps": 2},
                                optimizer={"lr": 3e-3}, **(moe if layout.startswith("moe") else {}))
    ref = _reference_losses(config_from_dict(cfg_dict), steps)
    res = run_ranks(_steps_worker, world, cfg_dict, steps, backend=backend)
    for rank_hist in res:
        got = [r["loss"] for r in rank_hist]
        assert got == pytest.approx(ref, abs=1e-4)
    assert ref[-1] < ref[0]


@pytest.mark.multirank
@pytest.mark.parametrize("config,nproc", [("debug_colocated", 2), ("debug_noncolocated", 8), ("debug_moe_ep", 8)])
def test_readme_train_command_runs(config, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "scripts/train.py", "--config", f"train_configs/{config}.toml", "--training.steps=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"step +\d+ \| loss ([0-9.]+)", out.stdout + out.stderr)]
    assert len(losses) == 3 and losses[-1] < losses[0]
