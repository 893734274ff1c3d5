"""Context-parallel attention (all-gather K/V, attend by global position) equals full attention; the mask-free
document-run attention (``mimo_titan.models.varlen_attention``) equals SDPA with a dense mask.

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
from mimo_titan.models.varlen_attention import build_plan, varlen_attention
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


# ------------------------------------------------------------------------------------ mask-free document runs


def _dense(q, k, v, q_pos, kv_pos, q_doc, kv_doc):
    """Reference: SDPA with the dense bool mask of :func:`attention_mask`, kv heads repeated by hand."""
    r = q.shape[1] // k.shape[1]
    mask = attention_mask(q_pos, kv_pos, q_doc, kv_doc)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), attn_mask=mask)


def _fwd_bwd(fn, leaves, w, *extra):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves, *extra)
    return out.detach(), torch.autograd.grad((out * w).sum(), leaves)


def test_lower_right_runs_equal_the_dense_mask_for_zigzag_queries():
    """The queries of one CP rank (zigzag chunks of documents of different lengths, so runs with ``L < Kn``) over
    all keys, the keys in shuffled order (as gathered): forward and dq/dk/dv equal the dense-mask reference."""
    from kernels.zigzag import zigzag_shard_thd

    # rank 0 of cp = 2, S = 8: positions [0, 1, 6, 7]; runs (L, Kn) = (2, 2) and (2, 8), lower-right aligned
    plan = build_plan(torch.tensor([0, 1, 6, 7]), torch.tensor([0, 1, 6, 7, 2, 3, 4, 5]))
    assert [(g.n, g.L, g.Kn) for g in plan.groups] == [(1, 2, 2), (1, 2, 8)]
    docs = [[8, 0, 16, 8], [24, 8]]  # per row, every length divisible by 2 * cp = 4; an empty document
    rows = [_thd_index(d) for d in docs]
    pos, doc = torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows])
    keys = torch.randperm(32, generator=torch.Generator().manual_seed(1))  # gathered keys in any order
    for rank in range(2):
        sel = torch.stack([zigzag_shard_thd(torch.arange(32), r[0], 2, rank)[0] for r in rows])  # [B, 16]
        q_pos, q_doc = pos.gather(1, sel), doc.gather(1, sel)
        q, k, v, w = _qkvw(2, 32, seed=11 + rank)
        q, w = q[:, :, :16], w[:, :, :16]
        k, v = k[:, :, keys], v[:, :, keys]
        kv_pos, kv_doc = pos[:, keys], doc[:, keys]
        plan = build_plan(q_pos, kv_pos, q_doc, kv_doc)
        assert any(g.Kn > g.L for g in plan.groups)
        got = _fwd_bwd(varlen_attention, [q, k, v], w, plan)
        want = _fwd_bwd(_dense, [q, k, v], w, q_pos, kv_pos, q_doc, kv_doc)
        torch.testing.assert_close(got[0], want[0], **TOL)
        for g, gr in zip(got[1], want[1]):
            torch.testing.assert_close(g, gr, **TOL)


def test_decoder_attention_without_masks_equals_the_dense_mask():
    """``Attention`` on plain rows (``is_causal``) and on packed rows (document runs, padding as
    ``data.packing`` lays it out), GQA: output and gradients of the input and weights equal the dense-mask path;
    the plan is built once for all layers of a forward and rebuilt when the doc ids change in place."""
    from mimo_titan.config import LanguageModelConfig
    from mimo_titan.models import DecoderLM, decoder

    cfg = LanguageModelConfig(
        vocab_size=16, hidden_size=32, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2
    )
    lm = DecoderLM(cfg)
    lm.init_weights(0.2)
    attn = lm.model.layers["0"].self_attn
    # row 0: a document of 6 tokens + 2 padding (positions continue), one of 3 + 1, a tail padding document of 4;
    # row 1: one document of 16
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 0, 1, 2, 3], list(range(16))])
    doc = torch.tensor([[0] * 8 + [1] * 4 + [2] * 4, [0] * 16])
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    w = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    cos, sin = decoder.rope_cos_sin(pos, 8, cfg.rope_theta, torch.float32)

    def dense_fn(q, k, v, p, d):
        if d is None:  # plain rows: one document, positions 0 .. S-1
            p, d = torch.arange(q.shape[2]), torch.zeros(q.shape[2], dtype=torch.int64)
        return _dense(q, k, v, p, p, d, d)

    params = list(attn.parameters())
    for d in (None, doc):
        results = []
        for fn in (None, dense_fn):
            attn.attn_fn = fn
            xl = x.clone().requires_grad_(True)
            out = attn(xl, cos, sin, pos if d is not None else None, d)
            results.append((out.detach(), torch.autograd.grad((out * w).sum(), [xl, *params])))
        attn.attn_fn = None
        torch.testing.assert_close(results[0][0], results[1][0], **TOL)
        for g, gr in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(g, gr, **TOL)

    calls = []
    real = decoder.build_plan

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    decoder.build_plan = counting
    try:
        ids = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(2))
        pos, doc = pos.clone(), doc.clone()  # new tensors: a cache miss (the calls above cached a plan for the old)
        lm(ids, position_ids=pos, doc_ids=doc)
        assert len(calls) == 1  # two layers, one plan
        before = lm(ids, position_ids=pos, doc_ids=doc)
        assert len(calls) == 1  # same tensors, unmodified: cached
        doc[0, 4:8] = 5  # tokens 4..7 of row 0 become a document of their own: a new plan, another result
        after = lm(ids, position_ids=pos, doc_ids=doc)
        assert len(calls) == 2 and not torch.allclose(before[0, 4:8], after[0, 4:8])
        torch.testing.assert_close(before[:, 8:], after[:, 8:])
    finally:
        decoder.build_plan = real


def test_build_plan_errors():
    pos = torch.arange(4)
    with pytest.raises(ValueError, match="share"):
        build_plan(pos, torch.tensor([0, 1, 1, 2]))
    with pytest.raises(ValueError, match="must also be a key"):
        build_plan(torch.tensor([5]), pos)
    with pytest.raises(ValueError, match=">= 0"):
        build_plan(pos - 1, pos - 1)
    with pytest.raises(ValueError, match="both"):
        build_plan(pos, pos, pos)
    with pytest.raises(ValueError, match="do not fit"):
        q, k, v, _ = _qkvw(1, 4, seed=0)
        varlen_attention(q, k, v, build_plan(pos, pos, batch=2))
