"""Layout-independent init (mimo_titan.models.init) without any process group: a shard drawn on its own equals the
same slice of the full tensor; a meta-device pipeline stage materialised and initialised alone equals its part of
``MimoModel.init_weights``."""

from __future__ import annotations

import functools

import pytest
import torch

from _tiny import BASE
from mimo_titan.config import config_from_dict
from mimo_titan.models import MimoModel
from mimo_titan.models import init as minit
from mimo_titan.models.mimo import full_model_key
from mimo_titan.pipeline.stages import split_language_model, split_vision_encoder

NORMAL = minit.InitRule("trunc_normal", 0.02)


def _full(shape, seed=11):
    return minit.fill_box(torch.empty(shape), NORMAL, seed, shape, (0,) * len(shape))


@pytest.fixture
def small_blocks(monkeypatch):
    """8 elements per block: every shard below crosses block boundaries (blocks of 2 rows for [10, 4])."""
    monkeypatch.setattr(minit, "BLOCK_NUMEL", 8)


def test_shards_equal_the_slices_of_the_full_tensor(small_blocks):
    shape = (10, 4)
    full = _full(shape)
    assert minit.block_rows(shape) == 2
    # FSDP Shard(0) over 3 ranks (torch.chunk sizes 4 / 4 / 2)
    for rows in torch.arange(10).chunk(3):
        r0, n = int(rows[0]), len(rows)
        shard = minit.fill_box(torch.empty(n, 4), NORMAL, 11, shape, (r0, 0))
        assert torch.equal(shard, full[r0 : r0 + n]), r0
    # TP column split (RowwiseParallel: Shard(1)) over 2, then FSDP Shard(0) over 3 of each TP shard
    for c0 in (0, 2):
        for rows in torch.arange(10).chunk(3):
            r0, n = int(rows[0]), len(rows)
            shard = minit.fill_box(torch.empty(n, 2), NORMAL, 11, shape, (r0, c0))
            assert torch.equal(shard, full[r0 : r0 + n, c0 : c0 + 2]), (r0, c0)
    # experts [E=4, H=3, I=6] under ep=2 x etp=2: rank (ep 1, etp 1) holds experts 2-3, width 3-5; FSDP over edp=2
    experts = _full((4, 3, 6), seed=5)
    for e0 in (2, 3):
        shard = minit.fill_box(torch.empty(1, 3, 3), NORMAL, 5, (4, 3, 6), (e0, 0, 3))
        assert torch.equal(shard, experts[e0 : e0 + 1, :, 3:6])
    # constants, an empty shard, a box outside the tensor
    assert torch.equal(minit.fill_box(torch.empty(2, 4), minit.InitRule("ones"), 0, shape, (8, 0)), torch.ones(2, 4))
    assert minit.fill_box(torch.empty(0, 4), NORMAL, 11, shape, (10, 0)).shape == (0, 4)
    with pytest.raises(ValueError, match="outside a tensor of shape"):
        minit.fill_box(torch.empty(3, 4), NORMAL, 11, shape, (8, 0))


def test_statistics_and_seeds():
    t = _full((512, 512))
    assert abs(float(t.std()) - 0.02 * 0.88) < 1e-3  # a normal truncated at 2 std keeps 88 % of its std
    assert float(t.abs().max()) <= 0.04 and abs(float(t.mean())) < 1e-4
    assert not torch.equal(t, _full((512, 512), seed=12))
    assert minit.tensor_seed(3, "language.lm_head.weight") == minit.tensor_seed(3, "language.lm_head.weight")
    assert minit.tensor_seed(3, "a") != minit.tensor_seed(4, "a")


def _cfg(tied: bool):
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    lang = {**BASE["model"]["language"], "num_layers": 3, "tie_word_embeddings": tied}
    d["model"] = {"vision": {**BASE["model"]["vision"], "num_layers": 3}, "language": lang}
    d["parallelism"] = {"vision": {"rank_offset": 0, "num_ranks": 1}, "language": {"rank_offset": 0, "num_ranks": 1}}
    return config_from_dict(d)


@pytest.mark.parametrize("tied", [False, True])
def test_meta_stages_materialised_alone_equal_the_full_init(tied, monkeypatch):
    """Each pipeline stage split from a meta-device model, ``to_empty`` and initialised on its own (what one rank
    does), equals the same tensors of the single-process init; the last stage's tied head copy equals the embedding."""
    monkeypatch.setattr(minit, "BLOCK_NUMEL", 4096)  # the [2048, 64] embedding in 32 blocks
    cfg = _cfg(tied)
    ref = MimoModel(cfg.model, 1998)
    ref.init_weights(cfg.job.seed)
    want = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    with torch.device("meta"):
        meta = MimoModel(cfg.model, 1998)
    seeds = minit.module_init_seeds(cfg.job.seed, ["vision", "language"])
    checked = set()
    for pp in (2, 3):
        for stage in range(pp):
            for name, part in (
                ("language", split_language_model(meta.language, pp, stage)),
                ("vision", split_vision_encoder(meta.vision, pp, stage)),
            ):
                assert all(t.is_meta for t in part.parameters())
                part.to_empty(device="cpu")
                minit.init_module_(part, seeds[name], functools.partial(full_model_key, name))
                for key, t in [*part.named_parameters(), *part.named_buffers()]:
                    key = full_model_key(name, key)
                    if tied and key == "language.lm_head.weight":
                        key = "language.model.embed_tokens.weight"
                    assert torch.equal(t, want[key]), (pp, stage, key)
                    checked.add(key)
    assert checked == set(want)
