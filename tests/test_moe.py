"""The MoE layer in one process: against a per-token loop reference (forward, gradients, aux loss)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mimo_titan.config import MoEConfig
from mimo_titan.models.moe import MoE, grouped_mm


def _moe(**kw):
    cfg = MoEConfig(**{"num_experts": 6, "top_k": 2, "intermediate_size": 12, **kw})
    torch.manual_seed(0)
    m = MoE(16, cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return m


def _loop_reference(m: MoE, x_NH: torch.Tensor):
    """out[t] = Σ_k w[t,k] · SwiGLU_{e[t,k]}(x[t]) (+ shared); aux = coeff·E·Σ_e f_e·P_e, written independently."""
    logits = x_NH @ m.gate.weight.t()
    scores = logits.softmax(-1) if m.cfg.score_func == "softmax" else logits.sigmoid()
    sel = scores + m.gate.e_score_correction_bias if m.cfg.load_balance == "aux_free" else scores
    ids = sel.topk(m.cfg.top_k, -1).indices
    w = scores.gather(-1, ids)
    if m.cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(x_NH)
    for t in range(x_NH.shape[0]):
        for k in range(m.cfg.top_k):
            e = int(ids[t, k])
            h = F.silu(x_NH[t] @ m.experts.w_gate[e]) * (x_NH[t] @ m.experts.w_up[e])
            out[t] = out[t] + w[t, k] * (h @ m.experts.w_down[e])
    if m.shared_expert is not None:
        out = out + m.shared_expert(x_NH)
    E, N = m.num_experts, x_NH.shape[0]
    f = torch.bincount(ids.flatten(), minlength=E).float() / (N * m.cfg.top_k)
    aux = m.cfg.aux_loss_coeff * E * (f * scores.mean(0)).sum()
    return out, aux


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"score_func": "sigmoid"},
        {"norm_topk_prob": False, "top_k": 1},
        {"shared_expert_intermediate_size": 8},
        {"load_balance": "aux_free"},
        {"top_k": 6},
    ],
)
def test_moe_matches_per_token_loop(kw):
    m = _moe(**kw)
    x = torch.randn(2, 9, 16, requires_grad=True)
    out = m(x)
    ref, aux = _loop_reference(m, x.view(-1, 16))
    torch.testing.assert_close(out.view(-1, 16), ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), [x, *m.parameters()])
    scale = 1.0 if m.cfg.load_balance == "aux_loss" else 0.0  # the aux loss joins the backward with scale 1
    want = torch.autograd.grad((ref * g.view(-1, 16)).sum() + scale * aux, [x, *m.parameters()], allow_unused=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), rtol=1e-5, atol=1e-6)
    if m.cfg.load_balance == "aux_loss":
        torch.testing.assert_close(m.last_aux_loss, aux.detach())
    assert int(m.tokens_per_expert.sum()) == 18 * m.cfg.top_k


def test_grouped_mm_paths_agree_with_empty_groups():
    x = torch.randn(20, 16, requires_grad=True)
    w = torch.randn(4, 16, 32, requires_grad=True)
    counts = torch.tensor([5, 0, 12, 3])
    a = grouped_mm(x, w, counts, impl="loop")
    b = grouped_mm(x, w, counts, impl="grouped_mm")
    torch.testing.assert_close(a, b)
    ref = torch.cat([x[:5] @ w[0], x[5:17] @ w[2], x[17:] @ w[3]])
    torch.testing.assert_close(a, ref)
    g = torch.randn_like(a)
    ga = torch.autograd.grad((a * g).sum(), (x, w))
    gb = torch.autograd.grad((b * g).sum(), (x, w))
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v)


def test_aux_free_bias_moves_towards_balance_and_changes_selection_only():
    m = _moe(load_balance="aux_free", bias_update_rate=0.5)
    counts = torch.tensor([10, 0, 5, 5, 5, 5])
    m.update_bias(counts)
    assert m.gate.e_score_correction_bias.tolist() == [-0.5, 0.5, 0.0, 0.0, 0.0, 0.0]  # mean load is 5
    x = torch.randn(30, 16)
    weights, ids, scores = m.gate(x)
    torch.testing.assert_close(weights, scores.gather(-1, ids) / scores.gather(-1, ids).sum(-1, keepdim=True))
    assert (ids == 0).sum() < (ids == 1).sum()  # the bias steers selection away from the overloaded expert
