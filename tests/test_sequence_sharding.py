"""Per-rank shard content of the language stage's input under SP only, CP only, CP + SP and CP + THD (+ SP).

Each rank runs the first language stage of a tiny model with the context- and tensor-parallel plans applied and
records what enters the decoder: the embeddings (after the image merge, the CP shard and the SP scatter), the
positions and document ids. The expected content is written here from the definitions, with plain indexing of
the full single-process tensors: zigzag = chunks ``r`` and ``2·cp − 1 − r`` of ``2·cp`` (of every document for
THD), then SP = the ``tp_rank``-th of ``tp`` equal slices of the CP shard (embeddings only). The labels' shard
(``cp_shard_rows``, used by the loss) is checked the same way: CP-sharded, never SP-scattered.

The ``sp_only`` launch also runs a tiny ViT with 9 patches per image under TP = 2 on each of its tp groups (the patch
sequence padded to 10, the padded key masked): its output ``[N, 9, H]`` and every parameter gradient equal the
single-process encoder's (fp32, 1e-5).
"""

from __future__ import annotations

import pytest
import torch

from _launch import run_ranks
from _tiny import first_global_batch, tiny_config_dict

V = lambda off, n, **kw: dict(rank_offset=off, num_ranks=n, **kw)  # noqa: E731

CASES = {  # name: (language layout on 4 colocated ranks, packed)
    "sp_only": (V(0, 4, dp_shard=2, tp=2), False),
    "cp_only": (V(0, 4, dp_shard=2, cp=2), False),
    "cp2_sp2": (V(0, 4, cp=2, tp=2), False),
    "cp2_sp2_thd": (V(0, 4, cp=2, tp=2), True),
    "cp4_thd": (V(0, 4, cp=4), True),
}


def _cfg(case):
    from mimo_titan.config import config_from_dict

    language, packed = CASES[case]
    extra = {"data": {"packing": True, "max_images_per_sample": 2}, "training": {"seq_len": 120}} if packed else {}
    return config_from_dict(tiny_config_dict(V(0, 4, dp_shard=4), language, **extra))


def _padded_vit(seed=0):
    """A tiny encoder whose patch count (12 // 4) ** 2 = 9 tp = 2 does not divide, random (non-zero) biases and
    norms, and its input: pixels ``[3, 3, 12, 12]`` and the output weights ``[3, 9, 8]`` of a linear loss."""
    from mimo_titan.config import VisionModelConfig
    from mimo_titan.models.vit import VisionEncoder

    cfg = VisionModelConfig(
        image_size=12,
        patch_size=4,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        intermediate_size=32,
        projector_intermediate_size=32,
    )
    torch.manual_seed(seed)
    enc = VisionEncoder(cfg, out_dim=8)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    g = torch.Generator().manual_seed(seed + 1)
    return enc, torch.randn(3, 3, 12, 12, generator=g), torch.randn(3, 9, 8, generator=g)


def _padded_vit_tp(tp_mesh):
    """Output and full gradients of :func:`_padded_vit` under ``apply_tp_vision`` on ``tp_mesh``."""
    from torch.distributed.tensor import DTensor

    from mimo_titan.parallel.tp import apply_tp_vision

    enc, pixels, w = _padded_vit()
    apply_tp_vision(enc, tp_mesh)
    out = enc(pixels)
    (out * w).sum().backward()
    grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for n, p in enc.named_parameters()}
    return {"out": out.detach(), "grads": grads}


def _shard_worker(rank, world, device, case):
    from mimo_titan.data.sharding import local_batch
    from mimo_titan.models import LanguageStage, MimoModel
    from mimo_titan.models.mimo import cp_shard_rows, scatter_image_embeddings
    from mimo_titan.parallel.cp import apply_cp
    from mimo_titan.parallel.tp import apply_tp_language
    from mimo_titan.topology import build_topology, layouts_from_config
    from mimo_titan.train.trainer import build_processor

    cfg = _cfg(case)
    topo = build_topology(layouts_from_config(cfg.parallelism), world, rank, "cpu")
    lay, coord = topo.layouts["language"], topo.role.coordinates["language"]
    proc = build_processor(cfg)
    full = MimoModel(cfg.model, proc.image_token_id)
    full.init_weights(0)
    stage = LanguageStage(full.language, proc.image_token_id)
    if lay.cp > 1:
        apply_cp(stage, topo.cp_group("language"), lay.cp, coord["cp"])
    if lay.tp > 1:
        apply_tp_language(stage, topo.tp_mesh("language"))
    seen = {}
    stage.language.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update({k: v for k, v in kwargs.items() if v is not None}), with_kwargs=True
    )
    batch = local_batch(first_global_batch(cfg, proc), 1, coord["dp_shard"], lay.dp)
    with torch.no_grad():
        dense = scatter_image_embeddings(
            full.vision(batch.pixel_values).flatten(0, 1), batch.input_ids, proc.image_token_id
        )
        kw = {"position_ids": batch.position_ids, "doc_ids": batch.doc_ids} if cfg.data.packing else {}
        stage(batch.input_ids, dense, **kw)
    labels = cp_shard_rows(batch.labels, lay.cp, coord["cp"], batch.doc_ids if cfg.data.packing else None)
    vit = _padded_vit_tp(topo.tp_mesh("language")) if case == "sp_only" else None
    return {"coord": dict(coord), "labels": labels, "vit": vit, **seen}


def _zigzag_index(lengths: list[int], cp: int, r: int) -> list[int]:
    """Token indices (in a row) that CP rank ``r`` keeps: chunks r and 2cp-1-r of every document, in order."""
    out, start = [], 0
    for n in lengths:
        c = n // (2 * cp)
        for k in (r, 2 * cp - 1 - r):
            out.extend(range(start + k * c, start + (k + 1) * c))
        start += n
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("case", list(CASES))
def test_rank_holds_its_shard(case):
    from mimo_titan.data.sharding import local_batch
    from mimo_titan.models import MimoModel
    from mimo_titan.models.mimo import merge_image_embeddings, scatter_image_embeddings
    from mimo_titan.train.trainer import build_processor

    cfg = _cfg(case)
    proc = build_processor(cfg)
    gbatch = first_global_batch(cfg, proc)
    full = MimoModel(cfg.model, proc.image_token_id)
    full.init_weights(0)
    language, packed = CASES[case]
    cp, tp = language.get("cp", 1), language.get("tp", 1)
    dp = language.get("dp_shard", 1)
    if packed:
        assert max(len(s) for s in gbatch.sample_ids) >= 2  # rows really hold several documents

    results = run_ranks(_shard_worker, 4, case)
    seen = set()
    for res in results:
        c = res["coord"]
        b = local_batch(gbatch, 1, c["dp_shard"], dp)
        with torch.no_grad():
            dense = scatter_image_embeddings(
                full.vision(b.pixel_values).flatten(0, 1), b.input_ids, proc.image_token_id
            )
            embeds = merge_image_embeddings(full.language.embed(b.input_ids), b.input_ids, dense, proc.image_token_id)
        S = b.input_ids.shape[1]
        for row in range(len(b)):
            lengths = torch.diff(b.cu_seqlens[row]).tolist() if packed else [S]
            idx = _zigzag_index(lengths, cp, c["cp"]) if cp > 1 else list(range(S))
            n = len(idx) // tp
            sp_idx = idx[c["tp"] * n : (c["tp"] + 1) * n]
            torch.testing.assert_close(res["inputs_embeds"][row], embeds[row, sp_idx], atol=0, rtol=0)
            assert res["labels"][row].tolist() == b.labels[row, idx].tolist()  # CP-sharded, not SP-scattered
            if packed:
                assert res["position_ids"][row].tolist() == b.position_ids[row, idx].tolist()
                assert res["doc_ids"][row].tolist() == b.doc_ids[row, idx].tolist()
            else:
                assert res["position_ids"].tolist() == idx
            seen.add((c["dp_shard"], row, c["cp"], c["tp"]))
    assert len(seen) == 4 * len(gbatch) // dp  # every (row, cp, tp) shard reported once
    if case == "sp_only":
        _check_padded_vit([res["vit"] for res in results])


def _check_padded_vit(results):
    enc, pixels, w = _padded_vit()
    out = enc(pixels)
    (out * w).sum().backward()
    assert out.shape == (3, 9, 8)  # exactly P rows per image: one per LM placeholder
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["out"], out.detach(), atol=1e-5, rtol=0, msg=f"rank {rank} output")
        assert set(res["grads"]) == {n for n, _ in enc.named_parameters()}
        for name, p in enc.named_parameters():
            torch.testing.assert_close(res["grads"][name], p.grad, atol=1e-5, rtol=0, msg=f"rank {rank} {name}")
