"""Context-parallel attention (all-gather K/V, mask by global position) equals full attention.

Multi-rank: every rank takes its zigzag shard of a global ``q``/``k``/``v`` (BSHD: ``kernels.zigzag.zigzag_shard``;
packed THD: ``zigzag_shard_thd`` per document), runs :class:`ContextParallelAttention`, and compares its output and
the gradients of its ``q``/``k``/``v`` (backward of ``sum(out * w)``, ``w`` the shard of a global weight) with the
matching shards of a one-process reference: SDPA ``is_causal=True`` (BSHD) or SDPA with a block-diagonal causal
mask built by loops from ``cu_seqlens`` (THD), both with explicitly repeated kv heads. fp32, within 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _launch import per_layout_backends, run_ranks
from mimo_titan.parallel.cp_attention import ContextParallelAttention, attention_mask, local_attention

NH, NKV, HD = 4, 2, 8
TOL = dict(rtol=1e-5, atol=1e-5)
# THD packings per batch row (every length divisible by 2 * cp for cp = 2 and 4; row 0 has an empty document)
THD_DOCS = ([8, 0, 16, 8], [24, 8])


# ----------------------------------------------------------------------------------------------- references


def _qkvw(B, S, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, NH, S, HD), (B, NKV, S, HD), (B, NKV, S, HD), (B, NH, S, HD)]
    return [torch.randn(s, generator=g).to(device) for s in shapes]


def _reference(q, k, v, w, mask=None):
    """Full attention (kv heads repeated by hand) and the gradients of sum(out * w) w.r.t. q, k, v."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    r = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    if mask is None:
        out = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
    grads = torch.autograd.grad((out * w).sum(), [q, k, v])
    return out.detach(), grads


def _thd_mask(docs_per_row, device="cpu"):
    """bool [B, 1, T, T]: block-diagonal causal, built by loops from the document lengths."""
    T = sum(docs_per_row[0])
    mask = torch.zeros(len(docs_per_row), 1, T, T, dtype=torch.bool)
    for b, docs in enumerate(docs_per_row):
        start = 0
        for n in docs:
            for i in range(n):
                mask[b, 0, start + i, start : start + i + 1] = True
            start += n
    return mask.to(device)


def _thd_index(docs):
    """(cu_seqlens, position within document, document id) of one packed row."""
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int64)
    pos = torch.cat([torch.arange(n) for n in docs])
    doc = torch.cat([torch.full((n,), d, dtype=torch.int64) for d, n in enumerate(docs)])
    return cu, pos, doc


# ----------------------------------------------------------------------------------------------- multi-rank


def _cp_worker(rank, world, device):
    import torch.distributed as dist

    from kernels.zigzag import zigzag_position_ids, zigzag_shard, zigzag_shard_thd

    group = dist.group.WORLD
    errs = {}

    def check(name, got, want):
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{name}: {m}")
        errs[name] = max(errs.get(name, 0.0), (got - want).abs().max().item())

    def run(attn, q, k, v, w, pos, doc=None, k_view=None):
        """Local leaves -> out, (dq, dk, dv). ``k_view`` (optional) maps the k leaf to the tensor passed."""
        q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out = attn(q, k if k_view is None else k_view(k), v, pos, doc)
        return out, torch.autograd.grad((out * w).sum(), [q, k, v])

    # --- BSHD, B = 2, GQA: zigzag shards along the sequence dim of [B, heads, S, hd] ---------------------------
    S = 32
    q, k, v, w = _qkvw(2, S, seed=5, device=device)
    out_ref, g_ref = _reference(q, k, v, w)
    shard = lambda t: zigzag_shard(t, world, rank, seq_dim=2)  # noqa: E731
    q_l, k_l, v_l, w_l = (shard(t) for t in (q, k, v, w))
    pos = zigzag_position_ids(S, world, rank, device=device)
    for gqa in ("native", "repeat"):
        attn = ContextParallelAttention(group, world, gqa=gqa)
        for _ in range(2):  # the second call reuses the cached plan (same q_pos object), as a second layer
            out, grads = run(attn, q_l, k_l, v_l, w_l, pos)
            check(f"bshd.out.{gqa}", out, shard(out_ref))
            for name, g, gr in zip("qkv", grads, g_ref):
                check(f"bshd.d{name}.{gqa}", g, shard(gr))
    # batched positions [B, S_local], no cache, k passed as a non-contiguous view (as after a transpose)
    attn = ContextParallelAttention(group, world, cache_plan=False)
    k_bshd = k_l.transpose(1, 2).contiguous()  # leaf [B, S_local, nkv, hd]
    out, grads = run(attn, q_l, k_bshd, v_l, w_l, pos.expand(2, -1), k_view=lambda t: t.transpose(1, 2))
    check("bshd_batched_pos.out", out, shard(out_ref))
    for name, g, gr in zip("qkv", (grads[0], grads[1].transpose(1, 2), grads[2]), g_ref):
        check(f"bshd_batched_pos.d{name}", g, shard(gr))

    # --- THD: two packed rows with different documents, per-document zigzag, per-row positions/doc ids ----------
    T = sum(THD_DOCS[0])
    q, k, v, w = _qkvw(2, T, seed=7, device=device)
    out_ref, g_ref = _reference(q, k, v, w, mask=_thd_mask(THD_DOCS, device))

    def shard_thd(t):  # [B, heads, T, hd] -> [B, heads, T / cp, hd], each row by its own cu_seqlens
        rows = []
        for b, docs in enumerate(THD_DOCS):
            cu = _thd_index(docs)[0].to(device)
            rows.append(zigzag_shard_thd(t[b].transpose(0, 1), cu, world, rank)[0].transpose(0, 1))
        return torch.stack(rows)

    pos_l, doc_l = [], []
    for docs in THD_DOCS:
        cu, p, d = (x.to(device) for x in _thd_index(docs))
        pos_l.append(zigzag_shard_thd(p, cu, world, rank)[0])
        doc_l.append(zigzag_shard_thd(d, cu, world, rank)[0])
    pos_l, doc_l = torch.stack(pos_l), torch.stack(doc_l)
    attn = ContextParallelAttention(group, world)
    out, grads = run(attn, *(shard_thd(t) for t in (q, k, v, w)), pos_l, doc_l)
    check("thd.out", out, shard_thd(out_ref))
    for name, g, gr in zip("qkv", grads, g_ref):
        check(f"thd.d{name}", g, shard_thd(gr))
    # one packed row with 1-D positions / doc ids (the common B = 1 THD case)
    out, grads = run(attn, *(shard_thd(t)[:1] for t in (q, k, v, w)), pos_l[0], doc_l[0])
    check("thd_b1.out", out, shard_thd(out_ref)[:1])
    for name, g, gr in zip("qkv", grads, g_ref):
        check(f"thd_b1.d{name}", g, shard_thd(gr)[:1])

    # --- errors: a dense mask under CP; a group of another size -------------------------------------------------
    with pytest.raises(ValueError, match="derived from the tokens' global positions"):
        attn(q_l, k_l, v_l, pos, attn_mask=torch.ones(S // world, S, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="cp group has"):
        ContextParallelAttention(group, world + 1)
    return errs


@pytest.mark.multirank
@pytest.mark.parametrize("layout,backend", per_layout_backends({"cp2": 2, "cp4": 4}))
def test_cp_attention_matches_full_attention(layout, backend):
    world = {"cp2": 2, "cp4": 4}[layout]
    results = run_ranks(_cp_worker, world, backend=backend)
    for errs in results:
        assert all(e <= 1e-5 for e in errs.values()), errs


# ----------------------------------------------------------------------------------------------- one process


def test_attention_mask_zigzag_example_and_documents():
    # rank 0 of cp = 2, S = 8 holds positions [0, 1, 6, 7]; keys gathered in rank order: [0, 1, 6, 7, 2, 3, 4, 5]
    kv_pos = torch.tensor([0, 1, 6, 7, 2, 3, 4, 5])
    m = attention_mask(torch.tensor([0, 1, 6, 7]), kv_pos)
    assert m.shape == (4, 8) and m.dtype == torch.bool
    assert m.tolist() == [[kv <= q for kv in kv_pos.tolist()] for q in (0, 1, 6, 7)]
    # documents: same position, other document -> masked
    m = attention_mask(
        torch.tensor([1, 1]), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1]), torch.tensor([0, 0, 1, 1])
    )
    assert m.tolist() == [[True, True, False, False], [False, False, True, True]]
    # batched: [B, 1, Sq, Skv]; 1-D keys broadcast over the batch
    mb = attention_mask(torch.tensor([[0, 1], [1, 0]]), torch.arange(2))
    assert mb.shape == (2, 1, 2, 2)
    assert mb[1, 0].tolist() == [[True, True], [True, False]]
    for bad in [
        lambda: attention_mask(torch.arange(3.0), torch.arange(3)),
        lambda: attention_mask(torch.arange(3), torch.arange(3), torch.zeros(3, dtype=torch.long)),
        lambda: attention_mask(
            torch.arange(3), torch.arange(3), torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long)
        ),
        lambda: attention_mask(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long)),
    ]:
        with pytest.raises(ValueError):
            bad()


@pytest.mark.parametrize("gqa", ["native", "repeat"])
def test_local_attention_matches_sdpa_any_token_order(gqa):
    S = 12
    q, k, v, w = _qkvw(2, S, seed=1)
    out_ref, g_ref = _reference(q, k, v, w)
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(0))  # tokens in any order: mask by position
    qp, kp, vp, wp = (t[:, :, perm] for t in (q, k, v, w))
    qp, kp, vp = (t.clone().requires_grad_(True) for t in (qp, kp, vp))
    out = local_attention(qp, kp, vp, perm, gqa=gqa)
    grads = torch.autograd.grad((out * wp).sum(), [qp, kp, vp])
    torch.testing.assert_close(out, out_ref[:, :, perm], **TOL)
    for g, gr in zip(grads, g_ref):
        torch.testing.assert_close(g, gr[:, :, perm], **TOL)
    # cp_size == 1: no process group, no collective; same result (and a dense mask is accepted)
    cp1 = ContextParallelAttention(None, 1, gqa=gqa)
    torch.testing.assert_close(cp1(qp, kp, vp, perm), out)
    torch.testing.assert_close(cp1(qp, kp, vp, perm, attn_mask=torch.ones(S, S, dtype=torch.bool)), out)


def test_local_attention_packed_documents():
    q, k, v, w = _qkvw(2, 32, seed=2)
    out_ref, g_ref = _reference(q, k, v, w, mask=_thd_mask(THD_DOCS))
    idx = [_thd_index(d) for d in THD_DOCS]
    pos, doc = torch.stack([i[1] for i in idx]), torch.stack([i[2] for i in idx])
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = local_attention(q, k, v, pos, doc)
    grads = torch.autograd.grad((out * w).sum(), [q, k, v])
    torch.testing.assert_close(out, out_ref, **TOL)
    for g, gr in zip(grads, g_ref):
        torch.testing.assert_close(g, gr, **TOL)


def test_row_without_keys_is_zero_not_nan():
    q, k, v, w = _qkvw(1, 4, seed=3)
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    user = torch.ones(4, 4, dtype=torch.bool)
    user[2] = False  # query 2 may see nothing
    out = local_attention(q, k, v, torch.arange(4), attn_mask=user)
    grads = torch.autograd.grad((out * w).sum(), [q, k, v])
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert (out[:, :, 2] == 0).all() and (grads[0][:, :, 2] == 0).all()
    ref = local_attention(q, k, v, torch.arange(4))
    torch.testing.assert_close(out[:, :, [0, 1, 3]], ref[:, :, [0, 1, 3]])
    # inconsistent positions (a query before every key) are guarded too
    out = local_attention(q, k, v, torch.tensor([5, 6, 7, 8]), doc_ids=torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(out).all()


def test_argument_errors():
    q, k, v, _ = _qkvw(1, 4, seed=4)
    pos = torch.arange(4)
    with pytest.raises(ValueError, match="positive int"):
        ContextParallelAttention(None, 0)
    with pytest.raises(ValueError, match="needs a cp process group"):
        ContextParallelAttention(None, 2)
    with pytest.raises(ValueError, match="gqa"):
        ContextParallelAttention(None, 1, gqa="x")
    for args, match in [
        ((q, k[:, :, :3], v[:, :, :3], pos), "same local tokens"),
        ((q, k, v[..., :4], pos), "same shape"),
        ((q[:, :3], k, v, pos), "multiple"),
        ((q, k, v, pos[:3]), "q_pos"),
        ((q, k, v, pos.float()), "integer"),
        ((q, k, v, pos, pos[None]), "doc_ids"),
        ((q[0], k, v, pos), "4-D"),
    ]:
        with pytest.raises(ValueError, match=match):
            local_attention(*args)
    with pytest.raises(ValueError, match="bool"):
        local_attention(q, k, v, pos, attn_mask=torch.zeros(4, 4))
