"""bf16 mixed precision (the CUDA default): layouts agree with each other and with the fp32 reference.

On CPU/gloo the same code path runs with bf16 parameters and fp32 gradient reduction; on a machine with a CUDA
device the NCCL variant runs the colocated 1-GPU job, which is what a single lent GPU can check.
"""

from __future__ import annotations

import pytest

from _launch import backends, run_ranks
from _tiny import tiny_config_dict

V = lambda off, n, **kw: dict(rank_offset=off, num_ranks=n, **kw)  # noqa: E731
BF16 = {"parallelism": {"mixed_precision_param": "bfloat16", "mixed_precision_reduce": "float32"}}


def _step_worker(rank, world, device, cfg_dict):
    from _tiny import first_global_batch
    from mimo_titan.config import config_from_dict
    from mimo_titan.train.trainer import build_job, train_step

    cfg = config_from_dict(cfg_dict)
    job = build_job(cfg, device)
    batch = first_global_batch(cfg, job.processor)
    return [train_step(job, batch)["loss"] for _ in range(2)]


def _fp32_losses():
    cfg = tiny_config_dict(V(0, 1), V(0, 1))
    return run_ranks(_step_worker, 1, cfg)[0]


@pytest.mark.multirank
def test_bf16_layouts_agree_and_track_fp32():
    fp32 = _fp32_losses()
    runs = {
        "colocated_dp2": run_ranks(_step_worker, 2, tiny_config_dict(V(0, 2, dp_shard=2), V(0, 2, dp_shard=2), **BF16)),
        "noncolocated_pp2": run_ranks(_step_worker, 4, tiny_config_dict(V(0, 2, dp_shard=2), V(2, 2, pp=2), **BF16)),
    }
    first = runs["colocated_dp2"][0]
    for name, res in runs.items():
        for rank_losses in res:
            assert rank_losses == pytest.approx(first, rel=2e-3), name  # bf16 rounding differs with the reduction order
            assert rank_losses == pytest.approx(fp32, rel=3e-2), name
    assert first[1] < first[0]  # the same batch twice: the bf16 step lowered its loss


@pytest.mark.multirank
@pytest.mark.parametrize("backend", [b for b in backends(1) if b.id == "nccl"])
def test_single_gpu_bf16_step(backend):
    cfg = tiny_config_dict(V(0, 1), V(0, 1), parallelism={"mixed_precision_param": "auto"})
    losses = run_ranks(_step_worker, 1, cfg, backend=backend)[0]
    assert losses[1] < losses[0]
