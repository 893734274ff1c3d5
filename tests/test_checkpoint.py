"""Checkpoints: exact resume, resharding across layouts, atomic saves, load_step / keep_latest_k, model-only
initialisation, the offline full-state format, and ``training.samples``."""

from __future__ import annotations

import copy
import json
import re
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _launch import run_ranks
from _tiny import tiny_config_dict
from mimo_titan.config import ConfigError, config_from_dict

ROOT = Path(__file__).resolve().parents[1]
V = lambda off, n, **kw: dict(rank_offset=off, num_ranks=n, **kw)  # noqa: E731
MOE = {"model": {"language": {"moe": {"num_experts": 4, "top_k": 2, "intermediate_size": 32,
                                      "load_balance": "aux_free", "bias_update_rate": 0.05}}}}


def _with_ckpt(cfg_dict: dict, folder: str, **keys) -> dict:
    d = copy.deepcopy(cfg_dict)
    d["checkpoint"] = {"enable": True, "folder": folder, **keys}
    return d


def _resume_worker(rank, world, device, cfg_dict, folder_a, folder_b):
    from mimo_titan.train.trainer import train

    straight = train(config_from_dict(_with_ckpt(cfg_dict, folder_a, interval=10)))
    cfg_b = config_from_dict(_with_ckpt(cfg_dict, folder_b, interval=10))
    first = train(cfg_b, max_steps=10)  # "preempted" after step 10, which it saved
    second = train(cfg_b)  # a new job: resumes from step-10
    return straight, first, second


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["noncolocated_pp2", "moe_aux_free_ep2_pp2"])
def test_resume_continues_bit_for_bit(layout, tmp_path):
    vision, language, world, extra = {
        "noncolocated_pp2": (V(0, 2, dp_shard=2), V(2, 2, pp=2), 4, {}),
        "moe_aux_free_ep2_pp2": (V(0, 1), V(1, 4, pp=2, dp_shard=2, ep=2), 5, MOE),
    }[layout]
    cfg_dict = tiny_config_dict(vision, language, training={"steps": 20}, optimizer={"lr": 3e-3},
                                lr_schedule={"warmup_steps": 2}, **extra)
    straight, first, second = run_ranks(_resume_worker, world, cfg_dict, str(tmp_path / "a"), str(tmp_path / "b"),
                                        timeout=480)[0]
    assert [r["step"] for r in first] == list(range(1, 11)) and [r["step"] for r in second] == list(range(11, 21))
    resumed = first + second
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # exact, fp32 on CPU
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight]
    ids = [i for r in resumed for i in r["sample_ids"]]
    assert ids == [i for r in straight for i in r["sample_ids"]]
    assert ids == list(range(20 * cfg_dict["training"]["global_batch_size"]))  # none skipped, none repeated
    assert straight[-1]["loss"] < straight[0]["loss"]


def _reshard_worker(rank, world, device, cfg_dict, folder, max_steps):
    from mimo_titan.train.trainer import train

    return train(config_from_dict(_with_ckpt(cfg_dict, folder, interval=2)), max_steps=max_steps)


@pytest.mark.multirank
@pytest.mark.parametrize("case", ["dense_dp3_to_tp2dp2_encoder_dp2_to_1", "moe_ep2etp2_to_pp2_ep1"])
def test_checkpoint_reshards_to_another_layout(case, tmp_path):
    """Save after step 2 under one layout, resume under another: steps 3 and 4 equal the saving layout's own (step 3
    checks the weights, step 4 also the resharded AdamW moments and the LR schedule)."""
    (v_save, l_save, w_save), (v_load, l_load, w_load), gbs, extra = {
        "dense_dp3_to_tp2dp2_encoder_dp2_to_1": ((V(0, 2, dp_shard=2), V(2, 3, dp_shard=3), 5),
                                                 (V(0, 1), V(1, 4, tp=2, dp_shard=2), 5), 12, {}),
        "moe_ep2etp2_to_pp2_ep1": ((V(0, 1), V(1, 4, dp_shard=4, ep=2, etp=2), 5),
                                   (V(0, 2, dp_shard=2), V(2, 4, pp=2, dp_shard=2), 6), 16, MOE),
    }[case]
    common = dict(training={"steps": 4, "global_batch_size": gbs, "microbatches": 2}, optimizer={"lr": 3e-3},
                  **extra)
    saver = tiny_config_dict(v_save, l_save, **common)
    loader = tiny_config_dict(v_load, l_load, **common)
    folder = str(tmp_path / "ckpt")
    straight = run_ranks(_reshard_worker, w_save, saver, str(tmp_path / "straight"), None, timeout=300)[0]
    saved = run_ranks(_reshard_worker, w_save, saver, folder, 2, timeout=300)[0]
    assert [r["step"] for r in saved] == [1, 2]
    resumed = run_ranks(_reshard_worker, w_load, loader, folder, None, timeout=300)[0]
    assert [r["step"] for r in resumed] == [3, 4]
    for got, want in zip(resumed, straight[2:]):
        assert got["sample_ids"] == want["sample_ids"]
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-4)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
        assert got["lr"] == want["lr"]
    assert abs(straight[2]["loss"] - straight[0]["loss"]) > 1e-2  # the load matters: the model has moved


def _initial_load_worker(rank, world, device, cfg_dict, path):
    from mimo_titan.checkpoint import CheckpointManager
    from mimo_titan.train.trainer import build_job, build_loader, canonical_named_parameters

    cfg = config_from_dict(cfg_dict)
    job = build_job(cfg, device)
    assert CheckpointManager(cfg).load(job, build_loader(cfg, job.processor)) is False  # weights only
    from mimo_titan.models.mimo import full_model_key

    out = {}
    for module_name, module in job.modules.items():
        for key, v in module.state_dict().items():
            out[full_model_key(module_name, key)] = v.full_tensor() if hasattr(v, "full_tensor") else v.clone()
    return out


@pytest.mark.multirank
def test_initial_load_path_fills_every_layout_from_a_full_state(tmp_path):
    """A model-only checkpoint written in one process (as ``convert_hf.py import`` does) loads into EP + ETP + FSDP
    shards; the gathered parameters equal it exactly. Experts are compared by global index."""
    from mimo_titan.checkpoint import save_full_model_state
    from mimo_titan.checkpoint.state import EXPERT_WEIGHTS
    from mimo_titan.models.mimo import MimoModel

    cfg_dict = tiny_config_dict(V(0, 1), V(1, 4, dp_shard=4, ep=2, etp=2), training={"global_batch_size": 8}, **MOE)
    path = str(tmp_path / "init")
    cfg_dict["checkpoint"] = {"initial_load_path": path}
    cfg = config_from_dict(cfg_dict)
    full = MimoModel(cfg.model, image_token_id=0)
    full.init_weights(seed=777)  # not the job's seed: the job's own init would not match
    state = full.state_dict()
    for k in state:
        if k.endswith("e_score_correction_bias"):
            state[k] = torch.randn_like(state[k])
    save_full_model_state(state, path)
    results = run_ranks(_initial_load_worker, 5, cfg_dict, path, timeout=300)
    seen = set()
    for rank, held in enumerate(results):
        ep, etp = divmod(rank - 1, 2)  # language ranks 1-4 form the expert grid (edp=1, ep=2, etp=2), etp fastest
        for name, value in held.items():
            want = state[name]
            weight = name.rsplit(".", 1)[-1]
            if weight in EXPERT_WEIGHTS:  # this rank's 2 experts and its half of the width I
                want = want[ep * 2:(ep + 1) * 2]
                width_dim = 2 if weight in ("w_gate", "w_up") else 1
                half = want.shape[width_dim] // 2
                want = want.narrow(width_dim, etp * half, half)
            assert torch.equal(value, want), name
            seen.add(name)
    assert seen == set(state)


def test_full_model_state_round_trips_offline(tmp_path):
    """``save_full_model_state`` → ``load_full_model_state`` in one process, experts stored one key per expert."""
    import torch.distributed.checkpoint as dcp

    from mimo_titan.checkpoint import load_full_model_state, save_full_model_state
    from mimo_titan.checkpoint.state import split_experts, stack_experts
    from mimo_titan.models.mimo import MimoModel

    cfg = config_from_dict(tiny_config_dict(V(0, 1), V(0, 1), **MOE))
    full = MimoModel(cfg.model, image_token_id=0)
    full.init_weights(seed=3)
    state = {k: v.clone() for k, v in full.state_dict().items()}
    assert {k: torch.equal(v, state[k]) for k, v in stack_experts(split_experts(state)).items()} == \
        {k: True for k in state}
    save_full_model_state(state, str(tmp_path / "m"))
    keys = dcp.FileSystemReader(str(tmp_path / "m")).read_metadata().state_dict_metadata
    assert "model.language.model.layers.1.mlp.experts.3.w_down" in keys
    assert "model.language.model.layers.1.mlp.experts.w_down" not in keys
    back = load_full_model_state(str(tmp_path / "m"), cfg)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        load_full_model_state(str(tmp_path), cfg)


# ---------------------------------------------------------------------------------------------- atomic saves
_CHILD = textwrap.dedent("""
    import os, signal, sys, json
    sys.path.insert(0, {tests!r})
    from _tiny import tiny_config_dict
    from mimo_titan.config import config_from_dict
    from mimo_titan.train.trainer import train

    mode, folder, port = sys.argv[1], sys.argv[2], sys.argv[3]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    d = tiny_config_dict(dict(rank_offset=0, num_ranks=1), dict(rank_offset=0, num_ranks=1),
                         training={{"steps": 6}}, parallelism={{"mixed_precision_param": "float32"}})
    d["checkpoint"] = {{"enable": True, "folder": folder, "interval": 1, "keep_latest_k": 2,
                       "load_step": int(sys.argv[4])}}
    if mode == "kill_during_save":
        from torch.distributed.checkpoint import filesystem
        def killed(self, metadata, results):  # every data file is written, .metadata is not
            os.kill(os.getpid(), signal.SIGKILL)
        filesystem.FileSystemWriter.finish = killed
    hist = train(config_from_dict(d), max_steps=int(sys.argv[5]))
    print("HIST" + json.dumps([[r["step"], r["loss"]] for r in hist]))
""")


def _child(tmp_path, mode, folder, load_step=-1, max_steps=2):
    import socket

    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=str(ROOT / "tests")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), mode, folder, str(port), str(load_step), str(max_steps)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    hist = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("HIST")]
    return proc, (hist[0] if hist else None)


def test_a_save_killed_part_way_never_replaces_the_last_good_checkpoint(tmp_path):
    from mimo_titan.checkpoint import complete_steps
    from mimo_titan.checkpoint.state import load_full_model_state

    folder = str(tmp_path / "ckpt")
    proc, hist = _child(tmp_path, "normal", folder, max_steps=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [h[0] for h in hist] == [1, 2, 3] and complete_steps(folder) == [2, 3]  # keep_latest_k = 2
    cfg = config_from_dict(tiny_config_dict(V(0, 1), V(0, 1)))
    before = load_full_model_state(os.path.join(folder, "step-3"), cfg)

    proc, hist = _child(tmp_path, "kill_during_save", folder, max_steps=1)  # resumes at 3, dies saving step 4
    assert proc.returncode == -9 and hist is None
    assert complete_steps(folder) == [2, 3]
    assert os.path.isdir(os.path.join(folder, "step-4.partial"))
    assert not os.path.exists(os.path.join(folder, "step-4.partial", ".metadata"))
    after = load_full_model_state(os.path.join(folder, "step-3"), cfg)
    assert all(torch.equal(before[k], after[k]) for k in before)

    proc, hist = _child(tmp_path, "normal", folder, max_steps=1)  # resumes from the newest complete one: 3
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [h[0] for h in hist] == [4]
    assert complete_steps(folder) == [3, 4] and not os.path.exists(os.path.join(folder, "step-4.partial"))

    proc, hist = _child(tmp_path, "normal", folder, load_step=3, max_steps=1)  # an explicit step redoes step 4
    assert proc.returncode == 0 and [h[0] for h in hist] == [4]
    assert complete_steps(folder) == [3, 4]  # the old step 4 is set aside, not resumed from nor purged
    assert sorted(os.listdir(folder)) == ["step-3", "step-4", "step-4.abandoned"]
    proc, _ = _child(tmp_path, "normal", folder, load_step=1)
    assert proc.returncode != 0 and "checkpoint.load_step=1: no complete checkpoint step-1" in proc.stderr


# ---------------------------------------------------------------------------------------------- samples budget
def test_training_samples_sets_the_number_of_steps():
    d = tiny_config_dict(V(0, 1), V(0, 1))
    del d["training"]["steps"]
    d["training"]["samples"] = 10  # global_batch_size 4 -> 3 steps (the last one rounds the budget up)
    cfg = config_from_dict(d)
    assert cfg.training.total_steps == 3
    d["training"]["samples"] = 12
    assert config_from_dict(d).training.total_steps == 3
    d["training"]["steps"] = 5
    with pytest.raises(ConfigError, match=r"training.samples.*remove one of 'training.steps' and 'training.samples'"):
        config_from_dict(d)
    del d["training"]["steps"], d["training"]["samples"]
    with pytest.raises(ConfigError, match=r"training.steps.*set 'training.steps'.*or 'training.samples'"):
        config_from_dict(d)


def _samples_worker(rank, world, device, cfg_dict):
    from mimo_titan.train.trainer import train

    return train(config_from_dict(cfg_dict))


@pytest.mark.multirank
def test_training_samples_budget_runs_that_many_lm_samples():
    d = tiny_config_dict(V(0, 1), V(1, 2, dp_shard=2), lr_schedule={"warmup_steps": 0, "decay": "linear"})
    del d["training"]["steps"]
    d["training"]["samples"] = 12
    hist = run_ranks(_samples_worker, 3, d, timeout=300)[0]
    assert [r["step"] for r in hist] == [1, 2, 3]
    assert sum(len(r["sample_ids"]) for r in hist) == 12
    # the LR schedule spans the 3 steps: linear decay from lr to min_lr_ratio * lr over total_steps = 3
    lr, lo = d["optimizer"]["lr"], 0.1
    assert [r["lr"] for r in hist] == pytest.approx([lr * (1 - (1 - lo) * s / 3) for s in range(3)])


@pytest.mark.multirank
def test_train_command_resumes_with_checkpoint_load_step(tmp_path):
    """The README's train command with ``--checkpoint.*`` overrides: save every step, then resume from step 1."""
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "scripts/train.py",
            "--config", "train_configs/debug_colocated.toml", f"--job.output_dir={tmp_path}",
            "--checkpoint.enable=true", "--checkpoint.interval=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(base + ["--training.steps=3"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["step-1", "step-2", "step-3"]
    again = subprocess.run(base + ["--training.steps=3", "--checkpoint.load_step=1"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "checkpoint: resumed step 1" in log

    def losses(text):  # {step: the logged loss} (4 decimals)
        return {int(m[0]): m[1] for m in re.findall(r"step +(\d+) \| loss (\S+)", text)}

    # new processes, same losses as the first run's steps 2-3
    assert losses(log) == {k: v for k, v in losses(first.stdout + first.stderr).items() if k > 1}
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["step-1", "step-2", "step-2.abandoned", "step-3",
                                                           "step-3.abandoned"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_bad_checkpoint_settings_fail_before_any_process_group(tmp_path, monkeypatch):
    import torch.distributed as dist

    from mimo_titan.train.trainer import train

    monkeypatch.setenv("WORLD_SIZE", "1")
    d = _with_ckpt(tiny_config_dict(V(0, 1), V(0, 1)), str(tmp_path / "none"), load_step=4)
    with pytest.raises(FileNotFoundError, match=r"checkpoint.load_step=4: no complete checkpoint step-4 .*none"):
        train(config_from_dict(d))
    d["checkpoint"] = {"initial_load_path": str(tmp_path)}
    with pytest.raises(FileNotFoundError, match=r"checkpoint.initial_load_path=.* is not a checkpoint directory"):
        train(config_from_dict(d))

    # a checkpoint whose stream or batch size does not fit this run (only its extras are read before the group)
    import torch.distributed.checkpoint as dcp

    from mimo_titan.train.trainer import build_loader, build_processor

    cfg = config_from_dict(tiny_config_dict(V(0, 1), V(0, 1)))
    stream = build_loader(cfg, build_processor(cfg)).state_dict()
    folder = tmp_path / "saved"
    extra = {"train": json.dumps({"step": 2, "global_batch_size": 8}), "dataloader": json.dumps({**stream, "seed": 99})}
    dcp.save({"extra": extra}, checkpoint_id=str(folder / "step-2"), no_dist=True)
    d = _with_ckpt(tiny_config_dict(V(0, 1), V(0, 1)), str(folder))
    with pytest.raises(ValueError, match=r"checkpoint has seed=99 but this loader has seed=1234.*start a new"):
        train(config_from_dict(d))
    extra["dataloader"] = json.dumps(stream)
    dcp.save({"extra": extra}, checkpoint_id=str(folder / "step-3"), no_dist=True)
    del d["training"]["steps"]
    d["training"]["samples"] = 40
    with pytest.raises(ValueError, match=r"training.global_batch_size=4 but step-3 was trained with 8.*"
                                         r"--training.global_batch_size=8"):
        train(config_from_dict(d))
    assert not dist.is_initialized()


def _rng_worker(rank, world, device, cfg_dict):
    from mimo_titan.checkpoint import CheckpointManager
    from mimo_titan.train.trainer import build_job, build_loader

    cfg = config_from_dict(cfg_dict)
    job = build_job(cfg, device)
    loader = build_loader(cfg, job.processor)
    for tracker in job.rng.values():  # advance every stream by a rank- and stream-dependent amount
        for i, stream in enumerate(tracker.names):
            with tracker.fork(stream):
                torch.rand(rank + i + 1)
    manager = CheckpointManager(cfg)
    job.step = 1
    manager.save(job, loader)
    want = {}
    for name, tracker in job.rng.items():
        for stream in tracker.names:
            with tracker.fork(stream):
                want[name, stream] = torch.rand(4)
    fresh = build_job(cfg, device)
    assert manager.load(fresh, build_loader(cfg, fresh.processor))
    got = {}
    for name, tracker in fresh.rng.items():
        for stream in tracker.names:
            with tracker.fork(stream):
                got[name, stream] = torch.rand(4)
    return want, got


@pytest.mark.multirank
def test_rng_streams_resume_per_rank_and_module(tmp_path):
    cfg_dict = _with_ckpt(tiny_config_dict(V(0, 2, dp_shard=2), V(2, 1)), str(tmp_path / "c"))
    results = run_ranks(_rng_worker, 3, cfg_dict, timeout=300)
    for want, got in results:
        assert want.keys() == got.keys() and want
        assert all(torch.equal(want[k], got[k]) for k in want)
    _, stream = next(iter(results[0][0]))
    assert not torch.equal(results[0][0]["vision", stream], results[1][0]["vision", stream])  # per rank: they differ
