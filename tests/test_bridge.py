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


def _variable_rows_worker(rank, world, device, layouts, mb_size, microbatches, seed):
    """Every sample carries a variable number of rows (0 to 5, as audio clips of any length give), tagged with
    (sample, row index); each row belongs to a random language CP rank. Language ranks must receive exactly the
    rows of their samples that their CP rank owns, in order; gradients must come back to their rows."""
    from mimo_titan.pipeline.bridge import Bridge
    from mimo_titan.topology import build_topology

    topo = build_topology(layouts, world, rank, device.type)
    role = topo.role
    g = torch.Generator().manual_seed(seed)
    cp = layouts["language"].cp
    counts = [torch.randint(0, 6, (mb_size,), generator=g) for _ in range(microbatches)]
    owners = [torch.randint(0, cp, (int(c.sum()),), generator=g) for c in counts]
    bridge = Bridge(layouts["vision"], layouts["language"], mb_size, 1, 3, torch.float64, device, rank)

    def tagged(m: int, lo: int, hi: int) -> torch.Tensor:
        rows = [[m, s, i] for s in range(lo, hi) for i in range(int(counts[m][s]))]
        return torch.tensor(rows, dtype=torch.float64).reshape(-1, 3)

    def offsets(m: int) -> list[int]:
        return [0, *torch.cumsum(counts[m], 0).tolist()]

    row_cp = owners if cp > 1 else [None] * microbatches
    sent: dict[int, torch.Tensor] = {}
    got = 0
    if role.holds("vision"):
        dp, n = role.dp_rank("vision"), layouts["vision"].dp
        for m in range(microbatches):
            lo, hi = dp * mb_size // n, (dp + 1) * mb_size // n
            sent[m] = tagged(m, lo, hi).to(device)
            bridge.send_forward(m, dp, sent[m], counts[m], row_cp[m])
    if role.holds("language") and role.is_first_stage("language"):
        dp, n, c = role.dp_rank("language"), layouts["language"].dp, role.coordinates["language"]["cp"]
        for m in range(microbatches):
            lo, hi = dp * mb_size // n, (dp + 1) * mb_size // n
            rows = bridge.recv_forward(m, dp, counts[m], c, row_cp[m]).cpu()
            off = offsets(m)
            keep = owners[m][off[lo] : off[hi]] == c if cp > 1 else slice(None)
            torch.testing.assert_close(rows, tagged(m, lo, hi)[keep], rtol=0, atol=0)
            got += rows.shape[0] if role.coordinates["language"]["tp"] == 0 else 0
            bridge.send_backward(m, dp, (rows * 3 - 1).to(device), counts[m], c, row_cp[m])
    if role.holds("vision"):
        dp = role.dp_rank("vision")
        for m in range(microbatches):
            back = bridge.recv_backward(m, dp, counts[m], row_cp[m])
            torch.testing.assert_close(back, sent[m] * 3 - 1, rtol=0, atol=0)
    bridge.wait()
    return got, sum(int(c.sum()) for c in counts), sum(int((c == 0).sum()) for c in counts)


@pytest.mark.multirank
@pytest.mark.parametrize(
    "vision,language,world",
    [
        (dict(num_ranks=4, dp_shard=4), dict(rank_offset=4, num_ranks=2, dp_shard=2), 6),  # fan-in
        (dict(num_ranks=2, dp_shard=2), dict(rank_offset=2, num_ranks=6, dp_shard=3, cp=2), 8),  # 2 -> 3 with cp
    ],
    ids=["fan_in_4to2", "ratio_2to3_cp2"],
)
def test_variable_token_counts_per_sample_cross_the_bridge(vision, language, world):
    """Any number of rows per sample, zero included (the audio encoder's variable-length clips), routes to the
    language DP and CP ranks that hold them and back."""
    layouts = {
        "vision": ModuleLayout("vision", rank_offset=0, **vision),
        "language": ModuleLayout("language", is_language=True, **language),
    }
    results = run_ranks(_variable_rows_worker, world, layouts, 12, 2, 7)
    total, empty = results[0][1], results[0][2]
    assert total > 0 and empty > 0  # rows to move, and samples with none
    assert sum(r[0] for r in results) == total  # every row arrived once (tp rank 0 counted)
