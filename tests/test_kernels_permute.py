"""MoE permute / unpermute: the Triton kernels (``TRITON_INTERPRET=1`` on CPU) against the torch reference.

Inputs are dyadic (multiples of 1/16, small), so every product and every sum is exact in fp32 whatever the
summation order: forward outputs and gradients must be *equal* in fp32 and fp16, and in bf16 for everything the
kernels only move. bf16 results that the kernels accumulate in fp32 and cast back may differ by one bf16 ulp in
the interpreter, whose fp32 → bf16 cast truncates (measured: 1.005859375 → 1.0; torch and CUDA round to nearest
even → 1.0078125).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kernels import permute_tokens, unpermute_tokens
from kernels.reference import permute_tokens_ref, unpermute_tokens_ref


def _dyadic(shape, lo=-48, hi=48, dtype=torch.float32, gen=None):
    return (torch.randint(lo, hi + 1, shape, generator=gen) / 16).to(dtype)


def _case(T, H, K, E, dtype, seed, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    # noncontig: a transposed view, stride(0) == 1
    tokens = _dyadic((H, T), dtype=dtype, gen=g).t() if noncontig else _dyadic((T, H), dtype=dtype, gen=g)
    ids = (
        torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        if T
        else torch.zeros(0, K, dtype=torch.long)
    )
    probs = _dyadic((T, K), 1, 16, dtype, g)
    return tokens, ids, probs


def _grads(outs, inputs, seed):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * _dyadic(o.shape, gen=g)).sum() for o in outs if o is not None)
    return torch.autograd.grad(loss, inputs, allow_unused=True)


CASES = [  # T, H, K, E, align
    (0, 16, 2, 8, 1),
    (1, 8, 1, 1, 1),
    (7, 24, 2, 8, 1),
    (64, 96, 8, 64, 1),
    (130, 40, 8, 256, 1),
    (33, 16, 2, 8, 8),
    (50, 24, 4, 64, 16),
    (5, 8, 8, 256, 4),
]


@pytest.mark.parametrize("T,H,K,E,align", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_permute_and_unpermute_equal_reference(T, H, K, E, align, dtype):
    seed = hash((T, H, K, E, align)) % 1000
    tokens, ids, probs = _case(T, H, K, E, dtype, seed, noncontig=(T % 2 == 1))
    results = {}
    for backend in ("triton", "torch"):
        x = tokens.clone().requires_grad_(True)
        p = probs.clone().requires_grad_(True)
        permuted, pprobs, row_map, per_expert = permute_tokens(x, ids, E, p, align, backend=backend)
        g_perm = _grads([permuted, pprobs], (x, p), seed + 1)
        y = permuted.detach().clone().requires_grad_(True)
        q = probs.clone().requires_grad_(True)
        out = unpermute_tokens(y, row_map, q, backend=backend)
        g_unperm = _grads([out], (y, q), seed + 2)
        results[backend] = (permuted, pprobs, row_map, per_expert, *g_perm, out, *g_unperm)
    names = [
        "permuted",
        "permuted_probs",
        "row_map",
        "tokens_per_expert",
        "d_tokens",
        "d_probs",
        "unpermuted",
        "d_permuted",
        "d_probs(unpermute)",
    ]
    rounded_in_kernel = {"unpermuted", "d_tokens", "d_permuted", "d_probs(unpermute)"}
    for name, a, b in zip(names, results["triton"], results["torch"]):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if dtype == torch.bfloat16 and name in rounded_in_kernel:
            torch.testing.assert_close(a, b, rtol=2**-7, atol=0, msg=name)  # one bf16 ulp
        else:
            assert torch.equal(a, b), name
    permuted, _, row_map, per_expert = results["torch"][:4]
    assert row_map.dtype == torch.int32 and per_expert.dtype == torch.int64
    assert int(per_expert.sum()) == permuted.shape[0] and bool((per_expert % align == 0).all())


def test_dropless_order_worked_example():
    tokens = torch.tensor([[1.0], [2.0]])
    ids = torch.tensor([[1, 0], [1, 2]])
    for backend in ("triton", "torch"):
        permuted, _, row_map, per_expert = permute_tokens(tokens, ids, 3, backend=backend)
        assert row_map.tolist() == [[1, 0], [2, 3]]
        assert per_expert.tolist() == [1, 2, 1]
        assert permuted.flatten().tolist() == [1.0, 1.0, 2.0, 2.0]


def test_order_and_padding_match_an_independent_definition():
    """Rows grouped by expert ascending, by token inside an expert; groups padded with zero rows."""
    T, H, K, E, align = 40, 4, 3, 6, 4
    tokens, ids, probs = _case(T, H, K, E, torch.float32, 3)
    permuted, pprobs, row_map, per_expert = permute_tokens(tokens, ids, E, probs, align, backend="triton")
    expected_rows, expected_probs = [], []
    for e in range(E):
        group = [(t, k) for t in range(T) for k in range(K) if ids[t, k] == e]
        expected_rows += [tokens[t] for t, _ in group]
        expected_probs += [float(probs[t, k]) for t, k in group]
        pad = (-len(group)) % align
        expected_rows += [torch.zeros(H)] * pad
        expected_probs += [0.0] * pad
        assert int(per_expert[e]) == len(group) + pad
    assert torch.equal(permuted, torch.stack(expected_rows))
    assert pprobs.tolist() == expected_probs
    for t, k in itertools.product(range(T), range(K)):
        assert torch.equal(permuted[row_map[t, k]], tokens[t])


def test_experts_without_tokens_and_round_trip():
    T, H, K, E = 9, 8, 2, 64  # most experts get nothing
    tokens, ids, _ = _case(T, H, K, E, torch.float32, 5)
    permuted, _, row_map, per_expert = permute_tokens(tokens, ids, E, backend="triton")
    assert int((per_expert == 0).sum()) >= E - T * K
    probs = torch.full((T, K), 1.0 / K)
    assert torch.equal(unpermute_tokens(permuted, row_map, probs, backend="triton"), tokens)


def test_random_normal_values_close():
    g = torch.Generator().manual_seed(11)
    T, H, K, E = 100, 200, 8, 64
    x = torch.randn(T, H, generator=g, requires_grad=True)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    p = torch.rand(T, K, generator=g, requires_grad=True)
    a, _, rm, _ = permute_tokens(x, ids, E, backend="triton")
    out_t = unpermute_tokens(a * 2, rm, p, backend="triton")
    out_r = unpermute_tokens_ref(permute_tokens_ref(x, ids, E)[0] * 2, rm, p)
    w = torch.randn(T, H, generator=g)
    gt = torch.autograd.grad((out_t * w).sum(), (x, p))
    gr = torch.autograd.grad((out_r * w).sum(), (x, p))
    torch.testing.assert_close(out_t, out_r, rtol=0, atol=0)
    torch.testing.assert_close(gt[0], gr[0], rtol=0, atol=0)
    torch.testing.assert_close(gt[1], gr[1], rtol=1e-6, atol=1e-5)  # a dot over H: summation order differs


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_inputs_raise(backend):
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="topk_ids must lie in"):
        permute_tokens(x, torch.tensor([[0], [1], [2], [9]]), 4, backend=backend)
    with pytest.raises(ValueError, match=r"tokens must be \[T, H\]"):
        permute_tokens(x, torch.zeros(3, 1, dtype=torch.long), 4, backend=backend)
    with pytest.raises(ValueError, match="probs must have"):
        permute_tokens(x, torch.zeros(4, 2, dtype=torch.long), 4, probs=torch.zeros(4, 1), backend=backend)
    with pytest.raises(ValueError, match="align"):
        permute_tokens(x, torch.zeros(4, 1, dtype=torch.long), 4, align=0, backend=backend)


def test_auto_backend_uses_reference_on_cpu_and_rejects_unknown():
    x = torch.randn(3, 4)
    ids = torch.tensor([[0], [1], [0]])
    assert torch.equal(permute_tokens(x, ids, 2)[0], permute_tokens_ref(x, ids, 2)[0])
    with pytest.raises(ValueError, match="backend="):
        permute_tokens(x, ids, 2, backend="cuda")


@pytest.mark.parametrize("T,H,K,E,align", [(66, 40, 4, 256, 1), (77, 24, 3, 10, 4), (300, 16, 1, 1, 1)])
def test_gpu_tile_and_block_sizes_in_the_interpreter(monkeypatch, T, H, K, E, align):
    """The CUDA configuration (routing blocks of 128, 4-token tiles, H split over several blocks) on CPU."""
    import kernels.permute as P

    monkeypatch.setattr(P, "_routing_block", lambda TK, device: 128)
    monkeypatch.setattr(P, "_tiles", lambda T, H, device: (4, 16))
    tokens, ids, probs = _case(T, H, K, E, torch.float32, 9)
    x, p = tokens.clone().requires_grad_(True), probs.clone().requires_grad_(True)
    got = permute_tokens(x, ids, E, p, align, backend="triton")
    want = permute_tokens_ref(tokens, ids, E, probs, align)
    for a, b in zip(got, want):
        assert torch.equal(a, b if b.dtype != torch.int64 or a.dtype == torch.int64 else b.to(a.dtype))
    out_t = unpermute_tokens(got[0], got[2], p, backend="triton")
    out_r = unpermute_tokens_ref(want[0], want[2], probs)
    assert torch.equal(out_t, out_r)
    g_t = torch.autograd.grad((out_t * tokens).sum(), (x, p))
    xr, pr = tokens.clone().requires_grad_(True), probs.clone().requires_grad_(True)
    pe = permute_tokens_ref(xr, ids, E, pr, align)
    g_r = torch.autograd.grad((unpermute_tokens_ref(pe[0], pe[2], pr) * tokens).sum(), (xr, pr))
    for a, b in zip(g_t, g_r):
        assert torch.equal(a, b)
