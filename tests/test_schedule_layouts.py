"""More layouts of the cross-module schedule (streamed / inline / whole batch) against the single-process reference:
one step (the oracle of ``tests/test_oracle.py``), three steps, and the no-gradient error."""

from __future__ import annotations

import pytest
import test_oracle
from test_oracle import PACKED, V

from _launch import per_layout_backends

PROBES = {
    # dropped probe_streamed_pp2_m2_fan_out (streamed, pp2, M == pp, fan-out): test_oracle tied_lm_pp2_dp2 (same)
    # one microbatch, pp = 1
    "probe_streamed_pp1_m1": (2, V(0, 1), V(1, 1), {"training": {"global_batch_size": 4, "microbatches": 1}}, ()),
    # encoder ranks whose samples have no image in some microbatches only (dummy encodes interleave with backwards)
    "probe_streamed_fan_in_4to2_pp2_partial_images": (
        8,
        V(0, 4, dp_shard=4),
        V(4, 4, pp=2, dp_shard=2),
        {"training": {"global_batch_size": 16, "microbatches": 4}},
        (0, 5, 10, 11, 15),
    ),
    # dropped probe_streamed_pp2_cp2_tp2: probe_streamed_packed_pp2_cp2 + test_oracle lm_pp2_tp2_cp2_colocated
    # packed rows, pp = 2, cp = 2, streamed, steady state
    "probe_streamed_packed_pp2_cp2": (
        5,
        V(0, 1),
        V(1, 4, pp=2, cp=2),
        {**PACKED, "training": {**PACKED["training"], "microbatches": 4}},
        (),
    ),
    # MoE encoder with ep in streamed mode, pp = 2 steady state
    "probe_streamed_moe_encoder_ep2_pp2": (
        4,
        V(0, 2, dp_shard=2, ep=2),
        V(2, 2, pp=2),
        {
            "model": {
                "vision": {
                    "moe": {
                        "num_experts": 2,
                        "top_k": 1,
                        "intermediate_size": 32,
                        "first_layer": 1,
                        "aux_loss_coeff": 0.5,
                    }
                }
            },
            "training": {"global_batch_size": 8, "microbatches": 4},
        },
        (1, 6),
    ),
    # colocated batch mode with pp = 2 (ranks hold the encoder and LM stage 1), M = 4
    "probe_colocated_batch_pp2_m4": (
        4,
        V(0, 4, dp_shard=4),
        V(0, 4, pp=2, dp_shard=2),
        {"training": {"global_batch_size": 16, "microbatches": 4}},
        (),
    ),
    # inline with tp = 2 / cp = 2 / M = 1 / fan-out
    "probe_inline_tp2": (
        2,
        V(0, 2, dp_shard=2),
        V(0, 2, tp=2),
        {"parallelism": {"colocated_encoders": "inline"}},
        (1,),
    ),
    "probe_inline_m1": (
        2,
        V(0, 2, dp_shard=2),
        V(0, 2, dp_shard=2),
        {"parallelism": {"colocated_encoders": "inline"}, "training": {"microbatches": 1}},
        (),
    ),
    # dropped probe_streamed_moe_lm_pp2_ep2_m4: test_oracle moe_pp2_ep2_noncolocated (same layout, M = 2)
}
test_oracle.LAYOUTS.update(PROBES)


@pytest.mark.multirank
@pytest.mark.parametrize("layout,backend", per_layout_backends({k: v[0] for k, v in PROBES.items()}))
def test_probe_one_step(layout, backend):
    test_oracle._check_one_step(layout, backend)


MULTI = {
    # dropped streamed_fan_in_pp2_m4: probe_streamed_fan_in_4to2_pp2_partial_images + test_train noncolocated_pp2
    "inline_cp2_m2": (
        2,
        V(0, 2, dp_shard=2),
        V(0, 2, cp=2),
        {"training": {"steps": 6}, "parallelism": {"colocated_encoders": "inline"}},
    ),
    # module GPipe over an LM GPipe pipeline: merges module_gpipe_pp2 and streamed_pp2_gpipe_m4 (same layout)
    "module_gpipe_pp2_gpipe": (
        4,
        V(0, 2, dp_shard=2),
        V(2, 2, pp=2),
        {
            "training": {"global_batch_size": 8, "microbatches": 4, "steps": 6},
            "parallelism": {"module_schedule": "GPipe", "pipeline_schedule": "GPipe"},
        },
    ),
}


@pytest.mark.multirank
@pytest.mark.parametrize("layout,backend", per_layout_backends({k: v[0] for k, v in MULTI.items()}))
def test_probe_three_steps(layout, backend):
    from test_train import _reference_losses, _steps_worker

    from _launch import run_ranks
    from _tiny import tiny_config_dict
    from mimo_titan.config import config_from_dict

    world, vision, language, extra = MULTI[layout]
    cfg_dict = tiny_config_dict(vision, language, lr_schedule={"warmup_steps": 0}, optimizer={"lr": 3e-3}, **extra)
    steps = 3
    ref = _reference_losses(config_from_dict(cfg_dict), steps)
    res = run_ranks(_steps_worker, world, cfg_dict, steps, backend=backend)
    for rank, hist in enumerate(res):
        assert [r["loss"] for r in hist] == pytest.approx(ref, abs=1e-4), f"rank {rank}"
        assert [r["grad_norm"] for r in hist] == pytest.approx([h["grad_norm"] for h in res[0]], rel=1e-6)


def _no_image_grad_worker(rank, world, device, cfg_dict):
    import mimo_titan.models.mimo as mm
    from _tiny import first_global_batch
    from mimo_titan.config import config_from_dict
    from mimo_titan.train.trainer import build_job, train_step

    orig = mm.merge_image_embeddings
    mm.merge_image_embeddings = lambda t, ids, d, tok: orig(t, ids, d.detach(), tok)  # the LM drops the gradient
    cfg = config_from_dict(cfg_dict)
    job = build_job(cfg, device)
    train_step(job, first_global_batch(cfg, job.processor))


@pytest.mark.multirank
@pytest.mark.parametrize(
    "colocated_encoders",
    [
        "batch",
        "inline",
    ],
)
def test_no_image_gradient_is_reported_in_every_colocated_mode(colocated_encoders):
    """MimoSchedule.step documents a RuntimeError when the LM produced no gradient for some microbatch's image
    embeddings, in inline mode too (right after the microbatch's backward)."""
    from _launch import run_ranks
    from _tiny import tiny_config_dict

    cfg = tiny_config_dict(
        V(0, 2, dp_shard=2), V(0, 2, dp_shard=2), parallelism={"colocated_encoders": colocated_encoders}
    )
    with pytest.raises(AssertionError, match="produced no gradient for the vision embeddings"):
        run_ranks(_no_image_grad_worker, 2, cfg, timeout=120)
