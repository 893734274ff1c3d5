"""Checkpoints: exact resume, resharding across layouts, atomic saves, load_step / keep_latest_k, model-only
initialisation, the offline full-state format, ``training.samples``; the checks before any process group (writable
folder, free space, keys and shapes of the checkpoint named by their ``model.*`` setting), the current optimizer /
LR config on resume, and saves refused for NaN / Inf or folder errors."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _launch import run_ranks
from _tiny import tiny_config_dict
from mimo_titan.config import ConfigError, config_from_dict
from mimo_titan.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
V = lambda off, n, **kw: dict(rank_offset=off, num_ranks=n, **kw)  # noqa: E731
MOE = {
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


def _write_training_checkpoint(path: str, cfg, stream: dict, global_batch_size: int | None = None, step: int = 2):
    """A training checkpoint of ``cfg``'s model written in this process (no process group): the weights of a
    fresh model, zero AdamW moments, and the extras :meth:`CheckpointManager.validate` reads."""
    import torch.distributed.checkpoint as dcp

    from mimo_titan.checkpoint.state import split_experts
    from mimo_titan.models.mimo import MimoModel

    model = MimoModel(cfg.model, image_token_id=0)
    params = split_experts({k: v.detach() for k, v in model.named_parameters()})
    gbs = global_batch_size or cfg.training.global_batch_size
    moments = {f"{k}.{m}": torch.zeros_like(v) for k, v in params.items() for m in ("exp_avg", "exp_avg_sq")}
    state = {
        "model": split_experts({k: v.detach() for k, v in model.state_dict().items()}),
        "optimizer": moments,
        "extra": {"train": json.dumps({"step": step, "global_batch_size": gbs}), "dataloader": json.dumps(stream)},
    }
    dcp.save(state, checkpoint_id=path, no_dist=True)


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
@pytest.mark.parametrize("layout", ["noncolocated_pp2", "moe_aux_free_ep2_pp2", "frozen_vision_pp2"])
def test_resume_continues_bit_for_bit(layout, tmp_path):
    vision, language, world, extra = {
        "noncolocated_pp2": (V(0, 2, dp_shard=2), V(2, 2, pp=2), 4, {}),
        # a frozen module's checkpoint holds its weights and no optimizer state
        "frozen_vision_pp2": (V(0, 2, dp_shard=2), V(2, 2, pp=2), 4, {"model": {"vision": {"frozen": True}}}),
        "moe_aux_free_ep2_pp2": (V(0, 1), V(1, 4, pp=2, dp_shard=2, ep=2), 5, MOE),
    }[layout]
    # 12 steps of 4 samples from the 32-record shard: the resume at step 10 (sample 40) is mid-way through the second
    # epoch; steps 11 (weights, data position) and 12 (AdamW moments, LR schedule, MoE biases) follow it
    cfg_dict = tiny_config_dict(
        vision, language, training={"steps": 12}, optimizer={"lr": 3e-3}, lr_schedule={"warmup_steps": 2}, **extra
    )
    straight, first, second = run_ranks(
        _resume_worker, world, cfg_dict, str(tmp_path / "a"), str(tmp_path / "b"), timeout=480
    )[0]
    assert [r["step"] for r in first] == list(range(1, 11)) and [r["step"] for r in second] == [11, 12]
    resumed = first + second
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # exact, fp32 on CPU
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight]
    ids = [i for r in resumed for i in r["sample_ids"]]
    assert ids == [i for r in straight for i in r["sample_ids"]]
    assert ids == list(range(12 * cfg_dict["training"]["global_batch_size"]))  # none skipped, none repeated
    assert straight[-1]["loss"] < straight[0]["loss"]


def _continues(resumed: list[dict], straight: list[dict]) -> None:
    """The steps after a load equal an uninterrupted run's steps 3.. (same samples, loss, norm, LR), and the load
    mattered (the model moved in the first two steps)."""
    for got, want in zip(resumed, straight[2:]):
        assert got["sample_ids"] == want["sample_ids"]
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-4)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
        assert got["lr"] == want["lr"]
    assert abs(straight[2]["loss"] - straight[0]["loss"]) > 1e-2


def _reshard_worker(rank, world, device, cfg_dict, folder, max_steps, load_step=-1):
    from mimo_titan.train.trainer import train

    return train(config_from_dict(_with_ckpt(cfg_dict, folder, interval=2, load_step=load_step)), max_steps=max_steps)


@pytest.mark.multirank
@pytest.mark.parametrize("case", ["dense_dp3_to_tp2dp2_encoder_dp2_to_1", "moe_ep2etp2_to_pp2_ep1"])
def test_checkpoint_reshards_to_another_layout(case, tmp_path):
    """Save after step 2 under one layout, resume under another: steps 3 and 4 equal the saving layout's own (step 3
    checks the weights, step 4 also the resharded AdamW moments and the LR schedule)."""
    (v_save, l_save, w_save), (v_load, l_load, w_load), gbs, extra = {
        "dense_dp3_to_tp2dp2_encoder_dp2_to_1": (
            (V(0, 2, dp_shard=2), V(2, 3, dp_shard=3), 5),
            (V(0, 1), V(1, 4, tp=2, dp_shard=2), 5),
            12,
            {},
        ),
        "moe_ep2etp2_to_pp2_ep1": (
            (V(0, 1), V(1, 4, dp_shard=4, ep=2, etp=2), 5),
            (V(0, 2, dp_shard=2), V(2, 4, pp=2, dp_shard=2), 6),
            16,
            MOE,
        ),
    }[case]
    common = dict(training={"steps": 4, "global_batch_size": gbs, "microbatches": 2}, optimizer={"lr": 3e-3}, **extra)
    saver = tiny_config_dict(v_save, l_save, **common)
    loader = tiny_config_dict(v_load, l_load, **common)
    folder = str(tmp_path / "ckpt")
    # the saving run goes on uninterrupted (saving steps 2 and 4): its steps 3 and 4 are what the resume must equal
    straight = run_ranks(_reshard_worker, w_save, saver, folder, None, timeout=300)[0]
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    resumed = run_ranks(_reshard_worker, w_load, loader, folder, None, 2, timeout=300)[0]  # load_step = 2
    assert [r["step"] for r in resumed] == [3, 4]
    _continues(resumed, straight)


TIED = {"model": {"language": {"tie_word_embeddings": True}}}


@pytest.mark.multirank
def test_tied_embeddings_checkpoint_moves_between_pp2_and_pp1(tmp_path):
    """Tied embeddings under language pp=2 (stage 0's embedding and stage 1's head, kept equal) save the keys of the
    pp=1 model (one tensor under both model keys, AdamW state under the embedding's key), which HF export writes as
    one tensor; a pp=2 checkpoint resumes at pp=1 and that run's checkpoint resumes at pp=2 again: steps 3-6 equal
    those of an uninterrupted pp=2 run."""
    from mimo_titan.checkpoint import load_full_model_state
    from mimo_titan.checkpoint.hf import export_hf, load_hf_dir
    from mimo_titan.checkpoint.state import model_shapes, saved_shapes

    common = dict(training={"steps": 6, "global_batch_size": 4, "microbatches": 2}, optimizer={"lr": 3e-3}, **TIED)
    pp2 = tiny_config_dict(V(0, 1), V(1, 4, pp=2, dp_shard=2), **common)
    pp1 = tiny_config_dict(V(0, 1), V(1, 2, dp_shard=2), **common)
    folder = str(tmp_path / "ckpt")
    straight = run_ranks(_reshard_worker, 5, pp2, folder, None, timeout=300)[0]  # saves steps 2, 4 and 6
    assert [r["step"] for r in straight] == [1, 2, 3, 4, 5, 6]

    cfg = config_from_dict(pp2)
    step2 = os.path.join(folder, "step-2")
    keys = {k for k in saved_shapes(step2) if k.startswith(("model.", "optimizer."))}
    params = model_shapes(cfg.model, parameters_only=True)
    assert "language.lm_head.weight" in model_shapes(cfg.model) and "language.lm_head.weight" not in params
    assert keys == {f"model.{k}" for k in model_shapes(cfg.model)} | {
        f"optimizer.{k}.{m}" for k in params for m in ("step", "exp_avg", "exp_avg_sq")
    }
    full = load_full_model_state(step2, cfg)
    embed, head = full["language.model.embed_tokens.weight"], full["language.lm_head.weight"]
    assert torch.equal(embed, head)
    export_hf(cfg.model, full, str(tmp_path / "hf"), "llama")
    _, hf_state = load_hf_dir(str(tmp_path / "hf" / "language"))
    assert "lm_head.weight" not in hf_state and torch.equal(hf_state["model.embed_tokens.weight"], embed)

    # resumes step 2 (load_step; steps 4 and 6 are set aside), saves step 4
    at_pp1 = run_ranks(_reshard_worker, 3, pp1, folder, 2, 2, timeout=300)[0]
    at_pp2 = run_ranks(_reshard_worker, 5, pp2, folder, None, timeout=300)[0]  # resumes step 4
    resumed = at_pp1 + at_pp2
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    _continues(resumed, straight)


@pytest.mark.multirank
def test_interleaved_chunks_checkpoint_moves_to_1f1b_and_back(tmp_path):
    """Language pp=2 with 2 virtual stages per rank (Interleaved1F1B: rank 0 holds layers 0 and 2, rank 1 layers 1 and
    3) saves the single stage's keys: its step-2 checkpoint resumes under 1F1B (rank 0 layers 0-1) and that run's
    step-4 checkpoint under Interleaved1F1B again: steps 3-6 equal an uninterrupted interleaved run's."""
    common = dict(
        model={"language": {"num_layers": 4}},
        training={"steps": 6, "global_batch_size": 4, "microbatches": 2},
        optimizer={"lr": 3e-3},
    )
    inter = tiny_config_dict(
        V(0, 1), V(1, 2, pp=2), parallelism={"pipeline_schedule": "Interleaved1F1B", "virtual_stages": 2}, **common
    )
    plain = tiny_config_dict(V(0, 1), V(1, 2, pp=2), **common)
    folder = str(tmp_path / "ckpt")
    straight = run_ranks(_reshard_worker, 3, inter, folder, None, timeout=300)[0]  # saves steps 2, 4 and 6
    assert [r["step"] for r in straight] == [1, 2, 3, 4, 5, 6]
    # resumes step 2 (load_step; steps 4 and 6 are set aside), saves step 4
    at_1f1b = run_ranks(_reshard_worker, 3, plain, folder, 2, 2, timeout=300)[0]
    at_inter = run_ranks(_reshard_worker, 3, inter, folder, None, timeout=300)[0]  # resumes step 4
    resumed = at_1f1b + at_inter
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    _continues(resumed, straight)


def _initial_load_worker(rank, world, device, cfg_dict, path):
    from mimo_titan.checkpoint import CheckpointManager
    from mimo_titan.train.trainer import build_job, build_loader

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
                want = want[ep * 2 : (ep + 1) * 2]
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
    assert {k: torch.equal(v, state[k]) for k, v in stack_experts(split_experts(state)).items()} == dict.fromkeys(
        state, True
    )
    save_full_model_state(state, str(tmp_path / "m"))
    keys = dcp.FileSystemReader(str(tmp_path / "m")).read_metadata().state_dict_metadata
    assert "model.language.model.layers.1.mlp.experts.3.w_down" in keys
    assert "model.language.model.layers.1.mlp.experts.w_down" not in keys
    back = load_full_model_state(str(tmp_path / "m"), cfg)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_full_model_state(str(tmp_path), cfg)
    other = tiny_config_dict(V(0, 1), V(0, 1), **MOE)
    other["model"]["language"]["moe"]["intermediate_size"] = 16
    other = config_from_dict(other)
    with pytest.raises(
        CheckpointError,
        match=r"experts.0.w_gate is \[64, 32\] in the checkpoint but \[64, 16\].*"
        r"model.language.moe.intermediate_size",
    ):
        load_full_model_state(str(tmp_path / "m"), other)


# ---------------------------------------------------------------------------------------------- atomic saves
def _atomic_save_worker(rank, world, device, mode, folder, load_step, max_steps):
    """A one-rank training job of the tiny model that saves every step (``keep_latest_k = 2``) and returns ``[step,
    loss]`` per step, or the CheckpointError it raised. Mode ``kill_during_save``: the process SIGKILLs itself in its
    first save once every data file is written, before ``.metadata`` is (it never returns). A forked rank, not a new
    interpreter: it starts without importing torch again."""
    import signal

    from mimo_titan.train.trainer import train

    d = tiny_config_dict(V(0, 1), V(0, 1), training={"steps": 6}, parallelism={"mixed_precision_param": "float32"})
    d["checkpoint"] = {"enable": True, "folder": folder, "interval": 1, "keep_latest_k": 2, "load_step": load_step}
    if mode == "kill_during_save":
        from torch.distributed.checkpoint import filesystem

        def killed(self, metadata, results):  # every data file is written, .metadata is not
            os.kill(os.getpid(), signal.SIGKILL)

        filesystem.FileSystemWriter.finish = killed
    try:
        hist = train(config_from_dict(d), max_steps=max_steps)
    except CheckpointError as exc:
        return str(exc)
    return [[r["step"], r["loss"]] for r in hist]


def _child(mode, folder, load_step=-1, max_steps=2):
    return run_ranks(_atomic_save_worker, 1, mode, folder, load_step, max_steps, timeout=300)[0]


def test_a_save_killed_part_way_never_replaces_the_last_good_checkpoint(tmp_path):
    from mimo_titan.checkpoint import complete_steps
    from mimo_titan.checkpoint.state import load_full_model_state

    folder = str(tmp_path / "ckpt")
    hist = _child("normal", folder, max_steps=3)
    assert [h[0] for h in hist] == [1, 2, 3] and complete_steps(folder) == [2, 3]  # keep_latest_k = 2
    cfg = config_from_dict(tiny_config_dict(V(0, 1), V(0, 1)))
    before = load_full_model_state(os.path.join(folder, "step-3"), cfg)

    # resumes at 3, dies saving step 4: the rank's process ends with SIGKILL before it reports anything
    with pytest.raises(AssertionError, match=r"rank 0 failed:\nprocess died \(exit code -9\) before reporting"):
        _child("kill_during_save", folder, max_steps=1)
    assert complete_steps(folder) == [2, 3]
    assert os.path.isdir(os.path.join(folder, "step-4.partial"))
    assert not os.path.exists(os.path.join(folder, "step-4.partial", ".metadata"))
    after = load_full_model_state(os.path.join(folder, "step-3"), cfg)
    assert all(torch.equal(before[k], after[k]) for k in before)

    hist = _child("normal", folder, max_steps=1)  # resumes from the newest complete one: 3
    assert [h[0] for h in hist] == [4]
    assert complete_steps(folder) == [3, 4] and not os.path.exists(os.path.join(folder, "step-4.partial"))

    hist = _child("normal", folder, load_step=3, max_steps=1)  # an explicit step redoes step 4
    assert [h[0] for h in hist] == [4]
    assert complete_steps(folder) == [3, 4]  # the old step 4 is set aside, not resumed from nor purged
    assert sorted(os.listdir(folder)) == ["config.json", "step-3", "step-4", "step-4.abandoned"]
    assert "checkpoint.load_step=1: no complete checkpoint step-1" in _child("normal", folder, load_step=1)


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


def _command_worker(rank, world, device, argv):
    """A rank of ``scripts/train.py ARGV`` (its config parsing and ``train``); returns the log lines of rank 0."""
    import logging

    from mimo_titan.config import parse_args
    from mimo_titan.train.trainer import train

    os.chdir(ROOT)  # the config's data paths are relative to the repository root
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("mimo_titan")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    train(parse_args(argv))
    return lines


@pytest.mark.multirank
def test_train_command_resumes_with_checkpoint_load_step(tmp_path):
    """The README's train command with ``--checkpoint.*`` overrides: save every step (the loss falls over the 3
    steps: the README command of train_configs/debug_colocated.toml runs), then resume from step 1. Each run leaves
    its resolved config in the folder as config.json, which loads back to the config it ran."""
    from mimo_titan.config import load_config

    config = "train_configs/debug_colocated.toml"
    overrides = [f"--job.output_dir={tmp_path}", "--checkpoint.enable=true", "--checkpoint.interval=1"]
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "scripts/train.py"]
    base += ["--config", config, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(
        [*base, "--training.steps=3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["config.json", "step-1", "step-2", "step-3"]
    saved = tmp_path / "checkpoint" / "config.json"
    ran = load_config(ROOT / config, [*overrides, "--training.steps=3"])
    assert load_config(saved) == ran and ran.checkpoint.enable and ran.training.steps == 3
    # the resume: the same command line's config and train() on 2 ranks forked from the tests' forkserver (new
    # processes without a launcher, that need not import torch again)
    argv = ["--config", config, *overrides, "--training.steps=3", "--checkpoint.load_step=1"]
    log = "\n".join(run_ranks(_command_worker, 2, argv, timeout=300)[0])
    assert "checkpoint: resumed step 1" in log

    def losses(text):  # {step: the logged loss} (4 decimals)
        return {int(m[0]): m[1] for m in re.findall(r"step +(\d+) \| loss (\S+)", text)}

    first_losses = losses(first.stdout + first.stderr)
    assert sorted(first_losses) == [1, 2, 3] and float(first_losses[3]) < float(first_losses[1])
    # new processes, same losses as the first run's steps 2-3
    assert losses(log) == {k: v for k, v in first_losses.items() if k > 1}
    # the second run rewrote it
    assert load_config(saved) == load_config(
        ROOT / config, [*overrides, "--training.steps=3", "--checkpoint.load_step=1"]
    )
    assert sorted(os.listdir(tmp_path / "checkpoint")) == [
        "config.json",
        "step-1",
        "step-2",
        "step-2.abandoned",
        "step-3",
        "step-3.abandoned",
    ]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_bad_checkpoint_settings_fail_before_any_process_group(tmp_path, monkeypatch):
    import torch.distributed as dist

    from mimo_titan.train.trainer import train

    monkeypatch.setenv("WORLD_SIZE", "1")
    d = _with_ckpt(tiny_config_dict(V(0, 1), V(0, 1)), str(tmp_path / "none"), load_step=4)
    with pytest.raises(CheckpointError, match=r"checkpoint.load_step=4: no complete checkpoint step-4 .*none"):
        train(config_from_dict(d))
    d["checkpoint"] = {"initial_load_path": str(tmp_path)}
    with pytest.raises(CheckpointError, match=r"checkpoint.initial_load_path=.* is not a checkpoint directory"):
        train(config_from_dict(d))

    # a checkpoint whose stream or batch size does not fit this run (only its .metadata and extras are read)
    from mimo_titan.train.trainer import build_loader, build_processor

    cfg = config_from_dict(tiny_config_dict(V(0, 1), V(0, 1)))
    stream = build_loader(cfg, build_processor(cfg)).state_dict()
    folder = tmp_path / "saved"
    _write_training_checkpoint(str(folder / "step-2"), cfg, {**stream, "seed": 99}, global_batch_size=8)
    d = _with_ckpt(tiny_config_dict(V(0, 1), V(0, 1)), str(folder))
    with pytest.raises(CheckpointError, match=r"checkpoint has seed=99 but this loader has seed=1234.*start a new"):
        train(config_from_dict(d))
    _write_training_checkpoint(str(folder / "step-3"), cfg, stream, global_batch_size=8)
    del d["training"]["steps"]
    d["training"]["samples"] = 40
    with pytest.raises(
        CheckpointError,
        match=r"training.global_batch_size=4 but step-3 was trained with 8.*"
        r"--training.global_batch_size=8",
    ):
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


# ---------------------------------------------------------------------------------------------- pre-flight
def _manager(tmp_path, folder="checkpoint", output_dir=None):
    from mimo_titan.checkpoint import CheckpointManager

    d = _with_ckpt(tiny_config_dict(V(0, 1), V(0, 1)), folder)
    d["job"]["output_dir"] = str(output_dir or tmp_path / "out")
    return CheckpointManager(config_from_dict(d))


def test_checkpoint_size_estimate_counts_parameters_and_adamw_moments():
    from mimo_titan.checkpoint.manager import checkpoint_size_bytes
    from mimo_titan.models.mimo import MimoModel

    for extra in ({}, MOE):
        cfg = config_from_dict(tiny_config_dict(V(0, 1), V(0, 1), **extra))
        n = sum(p.numel() for p in MimoModel(cfg.model, image_token_id=0).parameters())  # a real CPU model
        assert n > 300_000
        assert checkpoint_size_bytes(cfg) == 3 * 4 * n  # fp32 parameters + exp_avg + exp_avg_sq


def test_preflight_accepts_a_writable_folder_and_leaves_no_probe(tmp_path):
    manager = _manager(tmp_path)
    manager.validate()  # twice: a folder that exists (made by another rank, or an earlier run) is fine
    manager.validate()
    assert os.listdir(tmp_path / "out" / "checkpoint") == []


def test_preflight_rejects_an_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(CheckpointError, match=r"job.output_dir=.*out' is a file, not a directory.*--job.output_dir"):
        _manager(tmp_path).validate()


def test_preflight_rejects_a_folder_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "plain_file"
    blocker.write_text("x")
    folder = str(blocker / "ckpt")  # a folder under a regular file can never be created, even by root
    with pytest.raises(
        CheckpointError,
        match=rf"checkpoint.folder='{re.escape(folder)}': cannot create the folder: "
        r"Not a directory; make it writable, or set --checkpoint.folder",
    ):
        _manager(tmp_path, folder).validate()
    with pytest.raises(CheckpointError, match=r"checkpoint.folder='plain_file' \(under job.output_dir: .*\) is a file"):
        _manager(tmp_path, "plain_file", output_dir=tmp_path).validate()
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(CheckpointError, match=r"cannot write a file in it: Permission denied"):
            _manager(tmp_path, str(ro)).validate()


def test_preflight_rejects_a_file_system_without_room_for_one_checkpoint(tmp_path, monkeypatch):
    import shutil

    from mimo_titan.checkpoint.manager import checkpoint_size_bytes

    manager = _manager(tmp_path)
    need = checkpoint_size_bytes(manager.cfg)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=need // 3))
    with pytest.raises(CheckpointError) as err:
        manager.validate()
    msg = str(err.value)
    assert "checkpoint.folder='checkpoint' (under job.output_dir:" in msg and "set --checkpoint.folder" in msg
    got_need, got_free = map(float, re.search(r"needs ([\d.e+-]+) GB .*, ([\d.e+-]+) GB free", msg).groups())
    assert got_need == pytest.approx(need / 1e9, rel=1e-2) and got_free == pytest.approx(need / 3e9, rel=1e-2)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=need))
    manager.validate()  # exactly enough is enough


# ---------------------------------------------------------------------------------------------- shape check
def _cfg(**model):
    return config_from_dict(tiny_config_dict(V(0, 1), V(0, 1), model=model))


@pytest.mark.parametrize(
    "changed, key, setting",
    [
        (
            {"language": {"intermediate_size": 256}},
            "gate_proj.weight is [128, 64] in the checkpoint but [256, 64]",
            "model.language.intermediate_size (the checkpoint fits 128",
        ),
        (
            {"language": {"vocab_size": 4096}},
            "embed_tokens.weight is [2048, 64] in the checkpoint but [4096, 64]",
            "model.language.vocab_size (the checkpoint fits 2048",
        ),
        (
            {"vision": {"patch_size": 8}},
            "patch_embedding.weight is [32, 3, 16, 16] in the checkpoint but [32, 3, 8, 8]",
            "model.vision.patch_size (the checkpoint fits 16",
        ),
        (
            {"vision": {"image_size": 64}},
            "position_embedding.weight is [4, 32] in the checkpoint but [16, 32]",
            "model.vision.image_size (the checkpoint fits 32",
        ),
        (
            {"language": {"head_dim": 32}},
            "q_proj.weight is [64, 64] in the checkpoint but [128, 64]",
            "model.language.head_dim (the checkpoint fits 16",
        ),
        (
            {"language": {"qk_norm": True}},
            "q_norm.weight [16] is in the configured model but not in the checkpoint",
            "model.language.qk_norm (the checkpoint fits False",
        ),
        (
            {"language": {"num_layers": 1}},
            "layers.1.input_layernorm.weight [64] is in the checkpoint but not in the configured model",
            "model.language.num_layers (the checkpoint fits 2",
        ),
        (
            {"language": {"num_kv_heads": 4}},
            "k_proj.weight is [32, 64] in the checkpoint but [64, 64]",
            "model.language.num_kv_heads (the checkpoint fits 2",
        ),  # (num_heads = 8 fits too: same shapes)
    ],
)
def test_model_mismatch_names_the_setting_behind_a_shape(changed, key, setting):
    """Shapes only (no files): the saved model is the tiny one, the config changes one setting."""
    from mimo_titan.checkpoint.state import model_mismatch, model_shapes

    saved = {f"model.{k}": v for k, v in model_shapes(_cfg().model).items()}
    assert model_mismatch(saved, _cfg().model) is None
    msg = model_mismatch(saved, _cfg(**changed).model)
    assert key in msg and setting in msg, msg


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_checkpoint_of_another_model_is_refused_before_any_process_group(tmp_path, monkeypatch):
    """hidden_size 64 saved, 128 configured: train() raises one CheckpointError before creating a process group."""
    import torch.distributed as dist

    from mimo_titan.train.trainer import build_loader, build_processor, train

    monkeypatch.setenv("WORLD_SIZE", "1")
    saved = _cfg()
    folder = str(tmp_path / "ckpt")
    _write_training_checkpoint(
        os.path.join(folder, "step-2"), saved, build_loader(saved, build_processor(saved)).state_dict()
    )
    d = _with_ckpt(tiny_config_dict(V(0, 1), V(0, 1), model={"language": {"hidden_size": 128}}), folder)
    with pytest.raises(CheckpointError) as err:
        train(config_from_dict(d))
    msg = str(err.value)
    assert not dist.is_initialized()
    assert msg.startswith(f"checkpoint {folder}/step-2 does not fit the configured model: ")
    assert (
        "model.vision.multi_modal_projector.linear_2.weight is [64, 64] in the checkpoint but [128, 64] in the "
        "config; that is set by model.language.hidden_size (the checkpoint fits 64, the config has 128)"
    ) in msg
    assert f"another --checkpoint.folder (this one is {folder})" in msg

    # the same checkpoint under the config it was saved with passes; one holding no optimizer state does not
    from mimo_titan.checkpoint import CheckpointManager, save_full_model_state
    from mimo_titan.models.mimo import MimoModel

    CheckpointManager(config_from_dict(_with_ckpt(tiny_config_dict(V(0, 1), V(0, 1)), folder))).validate()
    save_full_model_state(MimoModel(saved.model, image_token_id=0).state_dict(), os.path.join(folder, "step-3"))
    with pytest.raises(CheckpointError, match=r"step-3 does not fit .*optimizer.vision.*exp_avg is missing"):
        CheckpointManager(config_from_dict(_with_ckpt(tiny_config_dict(V(0, 1), V(0, 1)), folder))).validate()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_model_only_checkpoints_of_another_model_are_refused(tmp_path):
    """``initial_load_path`` and a resumed folder: vocab_size, num_layers (missing keys) and MoE num_experts."""
    from mimo_titan.checkpoint import CheckpointManager, save_full_model_state
    from mimo_titan.models.mimo import MimoModel

    def saved_as(path, cfg_dict):
        save_full_model_state(MimoModel(config_from_dict(cfg_dict).model, image_token_id=0).state_dict(), path)
        return path

    def check(cfg_dict, path):
        d = copy.deepcopy(cfg_dict)
        d["checkpoint"] = {"initial_load_path": path}
        with pytest.raises(CheckpointError) as err:
            CheckpointManager(config_from_dict(d)).validate()
        return str(err.value)

    dense = tiny_config_dict(V(0, 1), V(0, 1))
    path = saved_as(str(tmp_path / "dense"), dense)
    msg = check(tiny_config_dict(V(0, 1), V(0, 1), model={"language": {"vocab_size": 4096}}), path)
    assert msg.startswith(f"checkpoint.initial_load_path='{path}' does not fit the configured model: ")
    assert (
        "model.language.model.embed_tokens.weight is [2048, 64] in the checkpoint but [4096, 64] in the config; "
        "that is set by model.language.vocab_size (the checkpoint fits 2048, the config has 4096)"
    ) in msg
    msg = check(tiny_config_dict(V(0, 1), V(0, 1), model={"language": {"num_layers": 3}}), path)
    assert (
        "model.language.model.layers.2.input_layernorm.weight [64] is in the configured model but not in the "
        "checkpoint; that is set by model.language.num_layers (the checkpoint fits 2, the config has 3)"
    ) in msg
    msg = check(tiny_config_dict(V(0, 1), V(0, 1), **MOE), path)
    assert "layers.0.mlp.gate.weight [4, 64] is in the configured model but not in the checkpoint" in msg
    assert "model.language.moe.num_experts (the checkpoint fits 0, the config has 4)" in msg

    moe8 = tiny_config_dict(V(0, 1), V(0, 1), **MOE)
    moe8["model"]["language"]["moe"]["num_experts"] = 8
    msg = check(moe8, saved_as(str(tmp_path / "moe4"), tiny_config_dict(V(0, 1), V(0, 1), **MOE)))
    assert (
        "model.language.model.layers.0.mlp.gate.weight is [4, 64] in the checkpoint but [8, 64] in the config; "
        "that is set by model.language.moe.num_experts (the checkpoint fits 4, the config has 8)"
    ) in msg


# ---------------------------------------------------------------------------------------------- resume config
def _config_change_worker(rank, world, device, folder):
    import logging

    from mimo_titan.checkpoint import CheckpointManager
    from mimo_titan.train.trainer import build_job, build_loader, train

    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger("mimo_titan")
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    def cfg(lr, warmup, where=folder):
        d = _with_ckpt(
            tiny_config_dict(
                V(0, 1), V(0, 1), training={"steps": 4}, optimizer={"lr": lr}, lr_schedule={"warmup_steps": warmup}
            ),
            where,
            interval=1,
        )
        return config_from_dict(d)

    train(cfg(1e-3, 2), max_steps=2)  # saves steps 1, 2
    lines.clear()
    changed = train(cfg(2e-3, 0), max_steps=1)  # resumes step 2 with another lr and warmup, runs and saves step 3
    changed_lines = list(lines)
    lines.clear()
    same = train(cfg(2e-3, 0))  # resumes step 3 with the config it was saved with: step 4
    same_lines = list(lines)
    # the optimizer itself (not only the logged value) uses the current config after a load
    c = cfg(3e-3, 0)
    job = build_job(c, device)
    CheckpointManager(c).load(job, build_loader(c, job.processor))
    groups = [g for opt in job.optimizers.values() for g in opt.param_groups]
    # a checkpoint written before extra.hparams existed: the saved optimizer values come from its param groups
    real_state = CheckpointManager._state

    def old_state(self, *args, **kwargs):
        state = real_state(self, *args, **kwargs)
        state["extra"].pop("hparams")
        return state

    CheckpointManager._state = old_state
    old = cfg(1e-3, 2, folder + "_old")
    job = build_job(old, device)
    job.step = 2
    CheckpointManager(old).save(job, build_loader(old, job.processor))
    CheckpointManager._state = real_state
    lines.clear()
    c = cfg(3e-3, 0, folder + "_old")
    CheckpointManager(c).load(job, build_loader(c, job.processor))
    return (
        changed,
        changed_lines,
        same,
        same_lines,
        [(g["lr"], g["betas"], g["weight_decay"]) for g in groups],
        [line for line in lines if "config changes" in line],
    )


@pytest.mark.multirank
def test_resume_applies_the_current_optimizer_config_and_says_what_changed(tmp_path):
    from mimo_titan.train.optim import lr_multiplier

    changed, changed_lines, same, same_lines, groups, old_lines = run_ranks(
        _config_change_worker, 1, str(tmp_path / "c"), timeout=300
    )[0]
    assert [r["step"] for r in changed] == [3] and [r["step"] for r in same] == [4]
    assert changed[0]["lr"] == 2e-3 * lr_multiplier(2, 4, 0, "cosine", 0.1)  # the new lr, the new schedule
    assert same[0]["lr"] == 2e-3 * lr_multiplier(3, 4, 0, "cosine", 0.1)
    notes = [line for line in changed_lines if "config changes" in line]
    assert notes == [
        "checkpoint: resuming step 2 with config changes: optimizer.lr 0.001 -> 0.002, "
        "lr_schedule.warmup_steps 2 -> 0 (the current config applies from step 3)"
    ]
    assert not [line for line in same_lines if "config changes" in line]
    assert groups and all(g == (3e-3 * lr_multiplier(4, 4, 0, "cosine", 0.1), (0.9, 0.95), 0.1) for g in groups)
    assert old_lines == [
        "checkpoint: resuming step 2 with config changes: optimizer.lr 0.001 -> 0.003 (the current "
        "config applies from step 3)"
    ]


# ---------------------------------------------------------------------------------------------- refused saves
def _refused_save_worker(rank, world, device, cfg_dict):
    import torch.distributed

    from mimo_titan.checkpoint import CheckpointManager, complete_steps
    from mimo_titan.train.trainer import build_job, build_loader

    cfg = config_from_dict(cfg_dict)
    job = build_job(cfg, device)
    loader = build_loader(cfg, job.processor)
    manager = CheckpointManager(cfg)
    job.step = 1
    manager.save(job, loader)
    out = {}
    if "language" in job.modules:  # rank 1 only: a NaN in one element of one parameter
        p = next(job.modules["language"].parameters())
        with torch.no_grad():
            (p.to_local() if hasattr(p, "to_local") else p).view(-1)[0] = float("nan")
    job.step = 2
    try:
        manager.save(job, loader)
    except CheckpointError as exc:
        out["nan"] = str(exc)
    out["after_nan"] = (complete_steps(manager.folder), sorted(os.listdir(manager.folder)))
    torch.distributed.barrier()  # every rank has looked before rank 0 changes the folder
    if "language" in job.modules:
        with torch.no_grad():
            (p.to_local() if hasattr(p, "to_local") else p).view(-1)[0] = 0.0
    if rank == 0:  # a regular file where rank 0 must rename the new checkpoint to
        open(os.path.join(manager.folder, "step-3"), "w").close()
    job.step = 3
    try:
        manager.save(job, loader)
    except CheckpointError as exc:
        out["commit"] = str(exc)
    out["after_commit"] = complete_steps(manager.folder)
    return out


@pytest.mark.multirank
def test_a_save_refuses_nan_and_reports_folder_errors_on_every_rank(tmp_path):
    folder = str(tmp_path / "c")
    results = run_ranks(_refused_save_worker, 2, _with_ckpt(tiny_config_dict(V(0, 1), V(1, 1)), folder), timeout=300)
    for out in results:  # rank 0 holds no NaN itself: it names rank 1's key
        assert re.fullmatch(
            r"checkpoint: refusing to save step 2: model\.language\.\S+ holds NaN/Inf \(found on rank "
            r"1\); the run diverged — lower optimizer.lr \(now 0.001\), raise lr_schedule.warmup_steps"
            rf" or lower training.max_grad_norm, and resume from step-1, the newest complete "
            rf"checkpoint in {re.escape(folder)}",
            out["nan"],
        ), out["nan"]
        assert out["after_nan"] == ([1], ["step-1"])  # nothing written
        assert out["commit"].startswith(
            f"checkpoint: rank 0 could not commit step-3 to {folder}: [Errno 20] Not a directory"
        )
        assert out["after_commit"] == [1]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_damaged_tied_or_finished_checkpoints_are_refused_before_any_process_group(tmp_path, caplog):
    """Checks of ``validate()`` from the ``.metadata`` alone: a data file lost or cut short; embeddings tied
    differently from the saved run (both directions); a checkpoint past the end of the run."""
    import shutil

    import torch.distributed as dist

    from mimo_titan.checkpoint import CheckpointManager
    from mimo_titan.train.trainer import build_loader, build_processor

    def validate(folder, **model):
        d = _with_ckpt(tiny_config_dict(V(0, 1), V(0, 1), model=model), folder)
        CheckpointManager(config_from_dict(d)).validate()

    saved = _cfg()
    stream = build_loader(saved, build_processor(saved)).state_dict()
    folder = str(tmp_path / "ckpt")
    _write_training_checkpoint(os.path.join(folder, "step-2"), saved, stream)
    validate(folder)
    data = sorted(f for f in os.listdir(os.path.join(folder, "step-2")) if f.endswith(".distcp"))
    assert data  # DCP's data files, named in .metadata

    # a data file cut short, then one lost
    cut = str(tmp_path / "cut")
    shutil.copytree(folder, cut)
    victim = os.path.join(cut, "step-2", data[0])
    with open(victim, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError, match=rf"step-2 is damaged: its data file {data[0]} has 1000 bytes but its "):
        validate(cut)
    os.remove(victim)
    with pytest.raises(CheckpointError, match=rf"step-2 is damaged: its data file {data[0]} is missing .*load_step"):
        validate(cut)

    # saved untied, configured tied: the lm_head's AdamW state has no parameter left to go to
    with pytest.raises(
        CheckpointError,
        match=r"optimizer.language.lm_head.weight.exp_avg is in the checkpoint .*"
        r"set model.language.tie_word_embeddings as in the saved run",
    ):
        validate(folder, language={"tie_word_embeddings": True})
    tied = str(tmp_path / "tied")
    tied_cfg = config_from_dict(tiny_config_dict(V(0, 1), V(0, 1), model={"language": {"tie_word_embeddings": True}}))
    _write_training_checkpoint(os.path.join(tied, "step-2"), tied_cfg, stream)
    with pytest.raises(CheckpointError, match=r"lm_head.weight.exp_avg is missing .*tie_word_embeddings as in the"):
        validate(tied)

    # past the end of the run: an error; exactly at the end: fine (resumed, nothing left to train)
    with pytest.raises(CheckpointError, match=r"step-2 in .* is past the end of this run \(training.steps=1\)"):
        CheckpointManager(
            config_from_dict(_with_ckpt(tiny_config_dict(V(0, 1), V(0, 1), training={"steps": 1}), folder))
        ).validate()
    CheckpointManager(
        config_from_dict(_with_ckpt(tiny_config_dict(V(0, 1), V(0, 1), training={"steps": 2}), folder))
    ).validate()
    assert not dist.is_initialized()


def _tied_load_worker(rank, world, device, cfg_dict):
    try:
        return _initial_load_worker(rank, world, device, cfg_dict, None)
    except CheckpointError as exc:
        return str(exc)


@pytest.mark.multirank
def test_untied_weights_are_never_loaded_silently_into_a_tied_model(tmp_path):
    """Same keys and shapes either way, so only the values tell: a checkpoint whose head differs from its embedding
    is refused under ``tie_word_embeddings = true`` (on every rank); one whose two matrices are equal loads."""
    from mimo_titan.checkpoint import save_full_model_state
    from mimo_titan.models.mimo import MimoModel

    d = tiny_config_dict(V(0, 2, dp_shard=2), V(0, 2, dp_shard=2), model={"language": {"tie_word_embeddings": True}})
    untied = MimoModel(config_from_dict(tiny_config_dict(V(0, 1), V(0, 1))).model, image_token_id=0).state_dict()
    save_full_model_state(untied, str(tmp_path / "untied"))
    d["checkpoint"] = {"initial_load_path": str(tmp_path / "untied")}
    errors = run_ranks(_tied_load_worker, 2, d)
    assert errors[0] == errors[1] and "differs from language.model.embed_tokens.weight" in errors[0]
    assert "set model.language.tie_word_embeddings = false" in errors[0]
    tied = dict(untied)
    tied["language.lm_head.weight"] = tied["language.model.embed_tokens.weight"]
    save_full_model_state(tied, str(tmp_path / "tied"))
    d["checkpoint"] = {"initial_load_path": str(tmp_path / "tied")}
    loaded = run_ranks(_tied_load_worker, 2, d)[0]
    torch.testing.assert_close(loaded["language.model.embed_tokens.weight"], tied["language.lm_head.weight"])
