"""More layouts of frozen modules / trainable globs, encoder pipeline stages and tied embeddings.

One-step oracle layouts: a glob that freezes part of an FSDP unit, encoder pp=2 with HSDP / LM cp / one
microbatch / packing / samples without images / colocated + frozen / a frozen encoder prefetching 5 of 6
microbatches, a frozen LM with tied embeddings across pp=2. Then the cases that were wrong:

- experts under ep > 1 stay frozen (``parallel.ep`` slices keep ``requires_grad``);
- encoder pp > 1 where an early stage has nothing to train but a later one does (LLaVA stage 1,
  ``trainable = ["projector"]``): the stages before the first trainable one run no backward;
- a ``training.trainable`` glob such as ``experts.w_gate`` fits the run's own checkpoint (whose keys name one
  expert each).
"""

from __future__ import annotations

import json
import os

import pytest
import test_oracle as O
import torch
from test_oracle import MOE_LM, PACKED, V

from _launch import run_ranks
from _tiny import first_global_batch, tiny_config_dict

NEW = {
    # a glob that freezes part of every FSDP unit: only the norms train (FSDP2 reduce-scatters a partial group)
    "trainable_norms_only_fsdp": (
        4,
        V(0, 2, dp_shard=2),
        V(2, 2, dp_shard=2),
        {"training": {"trainable": ["norm"]}},
        (),
    ),
    "enc_pp2_hsdp": (6, V(0, 4, pp=2, dp_replicate=2), V(4, 2, dp_shard=2), {"training": {"microbatches": 2}}, ()),
    "enc_pp2_lm_cp2": (4, V(0, 2, pp=2), V(2, 2, cp=2), {"training": {"microbatches": 2}}, ()),
    "enc_pp2_mb1": (3, V(0, 2, pp=2), V(2, 1), {"training": {"microbatches": 1}}, ()),
    "enc_pp2_packing": (
        3,
        V(0, 2, pp=2),
        V(2, 1),
        {**PACKED, "training": {**PACKED["training"], "microbatches": 2}},
        (),
    ),
    # dropped enc_pp2_moe_ep2_streamed: test_oracle encoder_pp2_moe_ep2_colocated_batch + moe_encoder_ep2_aux_free
    "enc_pp2_dp2_microbatch_without_images": (
        6,
        V(0, 4, pp=2, dp_shard=2),
        V(4, 2, dp_shard=2),
        {"training": {"microbatches": 2}},
        (0, 1),
    ),
    "enc_pp2_colocated_frozen": (
        2,
        V(0, 2, pp=2),
        V(0, 2, pp=2),
        {"model": {"vision": {"frozen": True}}, "training": {"microbatches": 2}},
        (),
    ),
    "enc_pp2_frozen_prefetch5_m6": (
        5,
        V(0, 4, pp=2, dp_shard=2),
        V(4, 1),
        {
            "model": {"vision": {"frozen": True, "prefetch_microbatches": 5}},
            "training": {"global_batch_size": 12, "microbatches": 6},
        },
        (3,),
    ),
    "frozen_lm_tied_pp2": (
        3,
        V(0, 1),
        V(1, 2, pp=2),
        {"model": {"language": {"tie_word_embeddings": True, "frozen": True}}, "training": {"microbatches": 2}},
        (),
    ),
    # dropped lm_pp2_only_head_trains (first LM stage trains nothing): test_oracle only_the_last_lm_stage_trains_pp2
    "enc_pp2_only_first_stage_trains": (
        3,
        V(0, 2, pp=2),
        V(2, 1),
        {"training": {"trainable": ["embeddings"], "microbatches": 2}},
        (),
    ),
}
XFAIL = {
    # LLaVA stage 1 with encoder stages: stage 0 has nothing to train, the projector on stage 1 does
    "enc_pp2_projector_only": (
        3,
        V(0, 2, pp=2),
        V(2, 1),
        {"training": {"trainable": ["projector"], "microbatches": 2}},
        (),
    ),
}
O.LAYOUTS.update(NEW)
O.LAYOUTS.update(XFAIL)


@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(NEW))
def test_one_step_matches_single_process(layout):
    O._check_one_step(layout, "gloo")


@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(XFAIL))
def test_encoder_stage_without_trainable_parameters(layout):
    O._check_one_step(layout, "gloo")


def _expert_worker(rank, world, device, cfg_dict):
    from mimo_titan.config import config_from_dict
    from mimo_titan.train.trainer import build_job, canonical_named_parameters, train_step

    cfg = config_from_dict(cfg_dict)
    job = build_job(cfg, device)
    local = lambda p: (p.to_local() if hasattr(p, "to_local") else p).detach().clone()  # noqa: E731
    before = {n: local(p) for n, p in canonical_named_parameters(job) if "experts" in n}
    train_step(job, first_global_batch(cfg, job.processor))
    return {
        n: (p.requires_grad, any(p in o.state for o in job.optimizers.values()), torch.equal(local(p), before[n]))
        for n, p in canonical_named_parameters(job)
        if "experts" in n
    }


@pytest.mark.multirank
def test_frozen_experts_under_ep_stay_frozen():
    d = tiny_config_dict(
        V(0, 1),
        V(1, 2, dp_shard=2, ep=2),
        model={"language": {**MOE_LM["model"]["language"], "frozen": True}},
    )
    for rank, res in enumerate(run_ranks(_expert_worker, 3, d)[1:], start=1):
        for name, (requires_grad, has_state, unchanged) in res.items():
            assert not requires_grad and not has_state and unchanged, f"rank {rank} {name}"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_checkpoint_of_expert_glob_run_fits(tmp_path):
    import torch.distributed.checkpoint as dcp

    from mimo_titan.checkpoint import CheckpointManager
    from mimo_titan.checkpoint.state import split_experts
    from mimo_titan.config import config_from_dict
    from mimo_titan.models.mimo import MimoModel
    from mimo_titan.train.freeze import is_trainable
    from mimo_titan.train.trainer import build_loader, build_processor

    d = tiny_config_dict(V(0, 1), V(0, 1), training={"trainable": ["experts.w_gate"]}, **MOE_LM)
    folder = str(tmp_path / "ckpt")
    d["checkpoint"] = {"enable": True, "folder": folder}
    cfg = config_from_dict(d)
    model = MimoModel(cfg.model, image_token_id=0)
    # what a run saves: AdamW moments of the parameters that train (decided by the model's stacked names)
    trained = {k: v.detach() for k, v in model.named_parameters() if is_trainable(cfg, k)}
    assert trained and all("experts.w_gate" in k for k in trained)
    moments = {
        f"{k}.{m}": torch.zeros_like(v) for k, v in split_experts(trained).items() for m in ("exp_avg", "exp_avg_sq")
    }
    loader = build_loader(cfg, build_processor(cfg))
    state = {
        "model": split_experts({k: v.detach() for k, v in model.state_dict().items()}),
        "optimizer": moments,
        "extra": {
            "train": json.dumps({"step": 2, "global_batch_size": 4}),
            "dataloader": json.dumps(loader.state_dict()),
        },
    }
    dcp.save(state, checkpoint_id=os.path.join(folder, "step-2"), no_dist=True)
    CheckpointManager(cfg).validate(loader)
