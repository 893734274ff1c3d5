"""The oracle: one distributed optimizer step equals one single-process step on the same global batch.

For each layout (colocated, non-colocated equal DP, fan-in, fan-out, a non-dividing DP ratio, LM pp=2, HSDP):
the loss (1e-4), the global gradient norm before clipping (1e-4 relative; AdamW's first update is nearly
invariant to a gradient scale, so this is what catches a wrong reduction) and every updated parameter (1e-3,
fp32) equal those of a plain ``MimoModel`` + cross-entropy + ``clip_grad_norm_`` + ``AdamW`` in this process.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _launch import backends, run_ranks
from _tiny import first_global_batch, tiny_config_dict

V = lambda off, n, **kw: dict(rank_offset=off, num_ranks=n, **kw)  # noqa: E731

LAYOUTS = {
    # name: (world, vision layout, language layout, extra config sections)
    "colocated_dp2": (2, V(0, 2, dp_shard=2), V(0, 2, dp_shard=2), {}),
    "equal_dp_2to2_hsdp": (4, V(0, 2, dp_shard=2), V(2, 2, dp_replicate=2), {}),
    "fan_in_4to2": (6, V(0, 4, dp_shard=4), V(4, 2, dp_shard=2),
                    {"training": {"global_batch_size": 8}, "data": {"max_images_per_sample": 2}}),
    "fan_out_1to3": (4, V(0, 1), V(1, 3, dp_shard=3),
                     {"training": {"global_batch_size": 6}, "data": {"max_images_per_sample": 2}}),
    "ratio_2to3": (5, V(0, 2, dp_shard=2), V(2, 3, dp_shard=3),
                   {"training": {"global_batch_size": 12}, "data": {"max_images_per_sample": 2}}),
    "lm_pp2_dp2_gpipe": (5, V(0, 1), V(1, 4, pp=2, dp_shard=2),
                         {"training": {"global_batch_size": 8, "microbatches": 4},
                          "parallelism": {"pipeline_schedule": "GPipe"}}),
    "lm_pp2_1f1b_clip": (4, V(0, 2, dp_shard=2), V(2, 2, pp=2),
                         {"training": {"max_grad_norm": 0.05, "microbatches": 2}}),
}


def _oracle_worker(rank, world, device, cfg_dict):
    from torch.distributed.tensor import DTensor

    from mimo_titan.config import config_from_dict
    from mimo_titan.train.trainer import build_job, canonical_named_parameters, train_step

    cfg = config_from_dict(cfg_dict)
    job = build_job(cfg, device)
    rec = train_step(job, first_global_batch(cfg, job.processor))
    params = {}
    for name, p in canonical_named_parameters(job):
        full = p.full_tensor() if isinstance(p, DTensor) else p
        params[name] = full.detach().cpu()
    return {"loss": rec["loss"], "grad_norm": rec["grad_norm"], "params": params}


def _reference_step(cfg):
    from mimo_titan.data import ImageTextProcessor
    from mimo_titan.models import MimoModel

    tpi = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
    proc = ImageTextProcessor(cfg.data.tokenizer, cfg.model.vision.image_size, tpi)
    batch = first_global_batch(cfg, proc)
    model = MimoModel(cfg.model, proc.image_token_id)
    model.init_weights(cfg.job.seed)
    logits = model(batch.input_ids, batch.pixel_values)
    labels = batch.labels.flatten()
    loss = F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=-100, reduction="sum") / (labels != -100).sum()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.max_grad_norm)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas),
                            eps=cfg.optimizer.eps, weight_decay=cfg.optimizer.weight_decay)
    opt.step()
    return loss.item(), norm.item(), {n: p.detach() for n, p in model.named_parameters()}, batch


@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", backends(6))
def test_one_step_matches_single_process(layout, backend):
    from mimo_titan.config import config_from_dict

    world, vision, language, extra = LAYOUTS[layout]
    cfg_dict = tiny_config_dict(vision, language, **extra)
    cfg = config_from_dict(cfg_dict)
    ref_loss, ref_norm, ref_params, batch = _reference_step(cfg)
    if cfg.data.max_images_per_sample > 1:  # the layout really moves a variable number of image tokens per sample
        assert len(set(batch.images_per_sample.tolist())) > 1
    results = run_ranks(_oracle_worker, world, cfg_dict, backend=backend)

    seen = set()
    for rank, res in enumerate(results):
        assert res["loss"] == pytest.approx(ref_loss, abs=1e-4), f"rank {rank}"
        assert res["grad_norm"] == pytest.approx(ref_norm, rel=1e-4), f"rank {rank}"
        for name, p in res["params"].items():
            torch.testing.assert_close(p, ref_params[name], atol=1e-3, rtol=0, msg=f"rank {rank} {name}")
            seen.add(name)
    assert seen == set(ref_params), f"parameters never checked: {sorted(set(ref_params) - seen)}"
    # the step really changed the weights (the comparison is not between two untouched inits)
    from mimo_titan.models import MimoModel
    init = MimoModel(cfg.model, 1998)
    init.init_weights(cfg.job.seed)
    moved = sum(float((p.detach() - ref_params[n]).abs().max()) > 1e-5 for n, p in init.named_parameters())
    assert moved > len(ref_params) // 2
