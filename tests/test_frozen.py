"""Frozen modules and ``training.trainable``: what trains, what errors, and frozen weights over several steps.

The one-step equality with the single-process reference (frozen encoder streamed / colocated batch / inline,
projector-only training, frozen language model) lives in ``tests/test_oracle.py``; the resume of a run with a
frozen encoder in ``tests/test_checkpoint.py``.
"""

from __future__ import annotations

import pytest
import torch

from _launch import run_ranks
from _tiny import tiny_config_dict
from mimo_titan.config import config_from_dict
from mimo_titan.errors import ConfigError
from mimo_titan.train.freeze import is_trainable, module_trainable
from mimo_titan.train.trainer import validate_job

V = lambda off, n, **kw: dict(rank_offset=off, num_ranks=n, **kw)  # noqa: E731


def _cfg(**sections):
    return config_from_dict(tiny_config_dict(V(0, 1), V(1, 1), **sections))


def test_trainable_globs_select_parameters_by_full_name():
    cfg = _cfg(training={"trainable": ["projector"]})
    assert is_trainable(cfg, "vision.projector.linear_1.weight")
    assert not is_trainable(cfg, "vision.vision_model.encoder.layers.0.mlp.fc1.weight")
    assert not is_trainable(cfg, "language.model.layers.0.mlp.gate_proj.weight")
    assert module_trainable(cfg, "vision") and not module_trainable(cfg, "language")
    frozen = _cfg(model={"vision": {"frozen": True}}, training={"trainable": ["projector", "layers.1"]})
    assert not is_trainable(frozen, "vision.projector.linear_1.weight")  # frozen = true wins over a glob
    assert is_trainable(frozen, "language.model.layers.1.self_attn.q_proj.weight")
    assert not module_trainable(frozen, "vision")


@pytest.mark.parametrize(
    "sections,match",
    [
        ({"training": {"trainable": ["projektor"]}}, "'projektor' matches no parameter"),
        ({"model": {"vision": {"frozen": True}, "language": {"frozen": True}}}, "nothing would train"),
        (
            {"model": {"language": {"frozen": True}}, "training": {"trainable": ["language.model.norm"]}},
            "nothing would train",
        ),
    ],
)
def test_bad_freezing_fails_before_any_process_group(sections, match):
    with pytest.raises(ConfigError, match=match):
        validate_job(_cfg(**sections), 2)


def _frozen_worker(rank, world, device, cfg_dict, steps):
    from torch.distributed.tensor import DTensor

    from mimo_titan.train.trainer import build_job, build_loader, canonical_named_parameters, train_step

    cfg = config_from_dict(cfg_dict)
    job = build_job(cfg, device)
    loader = build_loader(cfg, job.processor)
    recs = [train_step(job, next(loader)) for _ in range(steps)]
    params = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
        for n, p in canonical_named_parameters(job)
        if n.startswith("vision.")
    }
    return [r["loss"] for r in recs], params, sorted(job.optimizers)


@pytest.mark.multirank
def test_a_frozen_encoder_stays_bit_identical_and_the_run_matches_the_reference():
    """Vision frozen on ranks of its own (streamed, prefetch 2 of 4 microbatches), LM pp=2: 3 steps equal the
    single-process reference's losses, the encoder's weights are bit-identical to their initial values and the
    encoder ranks hold no optimizer."""
    from _reference import ReferenceTrainer
    from mimo_titan.models import MimoModel
    from mimo_titan.train.trainer import build_loader, build_processor

    cfg_dict = tiny_config_dict(
        V(0, 2, dp_shard=2),
        V(2, 2, pp=2),
        model={"vision": {"frozen": True}},
        training={"steps": 3, "global_batch_size": 8, "microbatches": 4},
        optimizer={"lr": 3e-3},
    )
    cfg = config_from_dict(cfg_dict)
    proc = build_processor(cfg)
    loader = build_loader(cfg, proc)
    ref = ReferenceTrainer(cfg, proc.image_token_id)
    ref_losses = [ref.step(next(loader))[0] for _ in range(3)]
    init = MimoModel(cfg.model, proc.image_token_id)
    init.init_weights(cfg.job.seed)
    initial = {n: p.detach() for n, p in init.named_parameters() if n.startswith("vision.")}

    results = run_ranks(_frozen_worker, 4, cfg_dict, 3)
    for rank, (losses, params, optimizers) in enumerate(results):
        assert losses == pytest.approx(ref_losses, abs=1e-4), f"rank {rank}"
        assert "vision" not in optimizers, f"rank {rank}"
        if rank < 2:  # the encoder ranks
            assert params.keys() == initial.keys()
            for n, p in params.items():
                assert torch.equal(p, initial[n]), f"rank {rank}: frozen {n} changed"
    assert ref_losses[-1] < ref_losses[0]
