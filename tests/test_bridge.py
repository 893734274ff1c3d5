"""Bridge routing (pure) and image-text pairing across real module meshes (multi-rank).

The pairing test sends, for every image token, a row that encodes which sample and image it came from (its
sample id, image index, token index and the image's pixel checksum as the *encoder* ranks see them) and checks
on the language ranks that every placeholder of every sample received the rows of that sample's own images (as
the *language* ranks see them in their copy of the global batch). Gradients travel back and must equal the
rows' own transform.
"""

from __future__ import annotations

import pytest
import torch

from _launch import per_layout_backends, run_ranks
from _tiny import first_global_batch, tiny_config_dict
from mimo_titan.pipeline.bridge import Route, module_rank, plan_routes
from mimo_titan.topology import ModuleLayout


def test_routes_two_to_three():
    assert plan_routes(6, 2, 3) == (
        Route(0, 0, 0, 2),
        Route(0, 1, 2, 3),
        Route(1, 1, 3, 4),
        Route(1, 2, 4, 6),
    )


@pytest.mark.parametrize("mb,src,dst", [(4, 4, 2), (3, 1, 3), (6, 2, 3), (6, 3, 2), (12, 4, 6), (5, 5, 1)])
def test_routes_cover_each_sample_once(mb, src, dst):
    routes = plan_routes(mb, src, dst)
    covered = [s for r in routes for s in range(r.start, r.end)]
    assert covered == list(range(mb))
    for r in routes:  # a route never crosses a DP range boundary on either side
        assert r.start // (mb // src) == (r.end - 1) // (mb // src) == r.src_dp
        assert r.start // (mb // dst) == (r.end - 1) // (mb // dst) == r.dst_dp


def test_routes_reject_non_dividing_microbatch():
    with pytest.raises(ValueError):
        plan_routes(4, 3, 2)


def test_module_rank_follows_mesh_order():
    lay = ModuleLayout("language", rank_offset=2, num_ranks=6, pp=2, dp_shard=3, is_language=True)
    assert [module_rank(lay, 0, d) for d in range(3)] == [2, 3, 4]
    assert [module_rank(lay, 1, d) for d in range(3)] == [5, 6, 7]
    assert all(
        lay.coordinate(module_rank(lay, p, d))["pp"] == p and lay.dp_rank(module_rank(lay, p, d)) == d
        for p in range(2)
        for d in range(3)
    )


def _tag_rows(batch, tokens_per_image):
    """``[n_image_tokens, 4]``: (sample_id, image index in sample, token index, pixel checksum) per image token."""
    rows, img = [], 0
    for b in range(len(batch)):
        for j in range(int(batch.images_per_sample[b])):
            checksum = float(batch.pixel_values[img].double().sum())
            for t in range(tokens_per_image):
                rows.append([float(batch.sample_ids[b]), j, t, checksum])
            img += 1
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)


def _pairing_worker(rank, world, device, cfg_dict):
    from mimo_titan.config import config_from_dict
    from mimo_titan.data import ImageTextProcessor, local_batch
    from mimo_titan.pipeline.bridge import Bridge, cp_owner, image_row_cp_ranks
    from mimo_titan.topology import build_topology
    from mimo_titan.train.trainer import validate_job

    cfg = config_from_dict(cfg_dict)
    layouts = validate_job(cfg, world)
    topo = build_topology(layouts, world, rank, device.type)
    role = topo.role
    tpi = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
    proc = ImageTextProcessor(cfg.data.tokenizer, cfg.model.vision.image_size, tpi)
    batch = first_global_batch(cfg, proc)
    M = cfg.training.microbatches
    S = len(batch) // M
    bridge = Bridge(layouts["vision"], layouts["language"], S, tpi, 4, torch.float64, device, rank)
    ims = lambda m: batch.images_per_sample[m * S : (m + 1) * S]  # noqa: E731
    cp = layouts["language"].cp
    row_cp = [
        image_row_cp_ranks(batch.input_ids[m * S : (m + 1) * S], proc.image_token_id, cp) if cp > 1 else None
        for m in range(M)
    ]
    sent, received, cp_rank = {}, 0, None
    if role.holds("vision"):  # every encoder tp rank calls (tp rank 0 sends)
        dp = role.dp_rank("vision")
        local = local_batch(batch, M, dp, layouts["vision"].dp)
        b = len(local) // M
        for m in range(M):
            sent[m] = _tag_rows(local.slice(m * b, (m + 1) * b), tpi).to(device)
            bridge.send_forward(m, dp, sent[m], ims(m), row_cp[m])
    if role.holds("language") and role.is_first_stage("language"):
        dp, c = role.dp_rank("language"), role.coordinates["language"]["cp"]
        cp_rank = c
        local = local_batch(batch, M, dp, layouts["language"].dp)
        b = len(local) // M
        for m in range(M):
            mb = local.slice(m * b, (m + 1) * b)
            rows = bridge.recv_forward(m, dp, ims(m), c, row_cp[m]).cpu()
            # exactly the rows whose placeholders lie in this CP rank's zigzag shard, in order
            mine = (cp_owner(*mb.input_ids.shape, cp) == c)[mb.input_ids == proc.image_token_id]
            torch.testing.assert_close(rows, _tag_rows(mb, tpi)[mine], rtol=0, atol=0)
            if role.coordinates["language"]["tp"] == 0:
                received += rows.shape[0]
            bridge.send_backward(m, dp, (rows * 2 + 1).to(device), ims(m), c, row_cp[m])
    if role.holds("vision"):
        dp = role.dp_rank("vision")
        for m in range(M):
            torch.testing.assert_close(bridge.recv_backward(m, dp, ims(m), row_cp[m]), sent[m] * 2 + 1, rtol=0, atol=0)
    bridge.wait()
    return {
        "received": received,
        "cp_rank": cp_rank,
        "total": int(batch.images_per_sample.sum()) * tpi,
        "ids": batch.sample_ids.tolist(),
        "images": batch.images_per_sample.tolist(),
    }


V = lambda off, n, **kw: dict(rank_offset=off, num_ranks=n, **kw)  # noqa: E731
PAIRING = {
    "fan_in_4to2": (6, V(0, 4, dp_shard=4), V(4, 2, dp_shard=2), 8),
    "fan_out_1to3_pp2": (7, V(0, 1), V(1, 6, pp=2, dp_shard=3), 6),
    "ratio_2to3": (5, V(0, 2, dp_shard=2), V(2, 3, dp_shard=3), 12),
    "colocated_2to1": (2, V(0, 2, dp_shard=2), V(0, 2, pp=2), 4),
    "vision_tp2_to_lm_cp2_tp2": (6, V(0, 2, tp=2), V(2, 4, cp=2, tp=2), 4),
    "fan_out_1to2_cp4": (9, V(0, 1), V(1, 8, dp_shard=2, cp=4), 4),  # seq_len 24: images reach every CP shard
    "colocated_cp2_tp2": (4, V(0, 4, dp_shard=2, tp=2), V(0, 4, cp=2, tp=2), 4),
}


@pytest.mark.multirank
@pytest.mark.parametrize("layout,backend", per_layout_backends({k: v[0] for k, v in PAIRING.items()}))
def test_each_sample_sees_its_own_images(layout, backend):
    world, vision, language, gbs = PAIRING[layout]
    cfg = tiny_config_dict(
        vision,
        language,
        data={"max_images_per_sample": 3},
        training={"global_batch_size": gbs, "microbatches": 2, "seq_len": 24 if "cp4" in layout else 48},
    )
    res = run_ranks(_pairing_worker, world, cfg, backend=backend)
    assert sum(r["received"] for r in res) == res[0]["total"] > 0  # every image token arrived exactly once
    cps = {r["cp_rank"] for r in res} - {None}
    assert all(sum(r["received"] for r in res if r["cp_rank"] == c) > 0 for c in cps)  # each CP rank got its rows
    assert len(set(res[0]["images"])) > 1  # variable number of images per sample
    assert all(r["ids"] == res[0]["ids"] for r in res)  # every rank drew the same global batch
