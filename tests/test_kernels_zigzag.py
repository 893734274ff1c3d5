"""Zigzag context-parallel sharding, THD sharding, chunk sorting and the shared row-gather kernel.

Every op runs with ``backend="triton"`` (the Triton interpreter on CPU, set up by conftest.py) and is
compared bit-exactly with the torch reference and, where possible, with an independent definition written
here with ``torch.chunk``/``torch.split``/``torch.cat``: forward outputs and gradients of
``sum(out * w)`` for random ``w``, in fp32/fp16/bf16.
"""

from __future__ import annotations

import random
from itertools import pairwise

import pytest
import torch

import kernels._gather as gather_mod
from kernels import reference_cp as ref
from kernels._gather import gather_rows, inverse_index
from kernels.sort_chunks import sort_chunks_by_index
from kernels.zigzag import (
    pad_cu_seqlens,
    zigzag_position_ids,
    zigzag_shard,
    zigzag_shard_thd,
    zigzag_unshard,
    zigzag_unshard_thd,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(DEV)


def _out_and_grad(fn, x, w):
    """``fn(x)`` and the gradient of ``sum(fn(x) * w)`` with respect to ``x`` (a leaf copy of ``x``)."""
    leaf = x.detach().clone().requires_grad_(True) if x.is_contiguous() else None
    if leaf is None:  # keep the non-contiguous layout: differentiate through a view of a leaf
        base = x._base.detach().clone().requires_grad_(True) if x._base is not None else None
        assert base is not None, "non-contiguous test inputs are views"
        view = base.as_strided(x.shape, x.stride(), x.storage_offset())
        out = fn(view)
        (g,) = torch.autograd.grad(out, base, w)
        return out.detach(), g
    out = fn(leaf)
    (g,) = torch.autograd.grad(out, leaf, w)
    return out.detach(), g


def _assert_same(fns, x, seed=0):
    """All ``fns`` give bit-identical outputs and gradients on ``x``; returns the output."""
    results = []
    w = None
    for fn in fns:
        out = fn(x.detach())
        if w is None:
            w = _rand(out.shape, x.dtype, seed + 1)
        results.append(_out_and_grad(fn, x, w))
    out0, g0 = results[0]
    for out, g in results[1:]:
        assert out.dtype == out0.dtype and out.shape == out0.shape
        assert torch.equal(out, out0)
        assert torch.equal(g, g0)
    return out0


def _chunk_shard(x, cp, r, dim):
    """Independent zigzag definition with torch.chunk."""
    chunks = torch.chunk(x, 2 * cp, dim)
    return torch.cat([chunks[r], chunks[2 * cp - 1 - r]], dim)


# ------------------------------------------------------------------------------------------ zigzag (BSHD/SBHD)

LAYOUTS = [
    ("sbhd", (16, 2, 3, 4), 0),
    ("bshd", (2, 16, 3, 4), 1),
    ("bshd_neg", (2, 3, 16, 5), -2),
    ("bs", (3, 24), -1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_zigzag_shard_and_unshard(dtype, cp):
    for i, (_, shape, dim) in enumerate(LAYOUTS):
        shape = list(shape)
        shape[dim] = 8 * 2 * cp if shape[dim] % (2 * cp) else shape[dim]
        x = _rand(shape, dtype, seed=i)
        shards = []
        for r in range(cp):
            out = _assert_same(
                [
                    lambda t, r=r: zigzag_shard(t, cp, r, dim, backend="triton"),
                    lambda t, r=r: zigzag_shard(t, cp, r, dim, backend="torch"),
                    lambda t, r=r: _chunk_shard(t, cp, r, dim),
                ],
                x,
                seed=10 * r,
            )
            assert out.shape[dim] == x.shape[dim] // cp and out.is_contiguous()
            shards.append(out)
        full = torch.cat(shards, dim)
        restored = _assert_same(
            [
                lambda t: zigzag_unshard(t, cp, dim, backend="triton"),
                lambda t: zigzag_unshard(t, cp, dim, backend="torch"),
            ],
            full,
        )
        assert torch.equal(restored, x)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_zigzag_ranks_cover_every_position_once(cp):
    S = 8 * cp
    ids = [zigzag_position_ids(S, cp, r) for r in range(cp)]
    assert all(i.dtype == torch.int64 and i.numel() == S // cp for i in ids)
    assert torch.equal(torch.sort(torch.cat(ids)).values, torch.arange(S))
    for r in range(cp):
        assert torch.equal(ids[r], ref.zigzag_position_ids_reference(S, cp, r))
        # the shard of the positions themselves is the position ids
        assert torch.equal(zigzag_shard(torch.arange(S), cp, r, 0, backend="triton"), ids[r])
    assert torch.equal(zigzag_unshard(torch.cat(ids), cp, 0, backend="triton"), torch.arange(S))


def test_zigzag_worked_examples():
    assert zigzag_position_ids(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_position_ids(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert zigzag_position_ids(16, 4, 1).tolist() == [2, 3, 12, 13]
    assert zigzag_position_ids(4, 1, 0).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("dtype", DTYPES)
def test_zigzag_non_contiguous_inputs(dtype):
    base = _rand((4, 32, 6), dtype, seed=3)
    views = [
        (base.transpose(0, 1), 0),  # SBHD view of a BSHD tensor
        (base[:, ::2], 1),  # strided sequence dim
        (base.transpose(1, 2)[..., 1:17], -1),  # sequence last, sliced
        (base.permute(2, 1, 0), 1),  # fully permuted
    ]
    for x, dim in views:
        assert not x.is_contiguous()
        for cp in (2, 4):
            for r in (0, cp - 1):
                _assert_same(
                    [
                        lambda t: zigzag_shard(t, cp, r, dim, backend="triton"),
                        lambda t: zigzag_shard(t, cp, r, dim, backend="torch"),
                        lambda t: _chunk_shard(t, cp, r, dim),
                    ],
                    x,
                )
            _assert_same(
                [
                    lambda t: zigzag_unshard(t, cp, dim, backend="triton"),
                    lambda t: zigzag_unshard(t, cp, dim, backend="torch"),
                ],
                x,
            )


def test_zigzag_randomised_shapes():
    rng = random.Random(1234)
    for case in range(12):
        ndim = rng.randint(1, 4)
        dim = rng.randrange(-ndim, ndim)
        cp = rng.choice([1, 2, 3, 4])
        shape = [rng.randint(1, 5) for _ in range(ndim)]
        shape[dim] = 2 * cp * rng.randint(1, 4)
        dtype = rng.choice(DTYPES)
        x = _rand(shape, dtype, seed=case)
        r = rng.randrange(cp)
        _assert_same(
            [
                lambda t: zigzag_shard(t, cp, r, dim, backend="triton"),
                lambda t: zigzag_shard(t, cp, r, dim, backend="torch"),
                lambda t: _chunk_shard(t, cp, r, dim),
            ],
            x,
            seed=case,
        )
        shards = torch.cat([zigzag_shard(x, cp, q, dim, backend="triton") for q in range(cp)], dim)
        assert torch.equal(zigzag_unshard(shards, cp, dim, backend="triton"), x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zigzag_empty_tensors(dtype):
    for shape, dim in [((0, 3), 0), ((2, 0, 3), 1), ((0, 8, 3), 1), ((2, 8, 0), 1)]:
        x = torch.zeros(shape, dtype=dtype, device=DEV, requires_grad=True)
        for backend in ("triton", "torch"):
            out = zigzag_shard(x, 2, 1, dim, backend=backend)
            expected = list(shape)
            expected[dim] //= 2
            assert list(out.shape) == expected
            (g,) = torch.autograd.grad(out, x, torch.ones_like(out))
            assert g.shape == x.shape
            assert zigzag_unshard(x, 2, dim, backend=backend).shape == x.shape


def test_zigzag_errors():
    x = torch.zeros(2, 12, 3)
    with pytest.raises(ValueError, match=r"12 is not divisible by 2 \* cp_size = 8"):
        zigzag_shard(x, 4, 0, 1)
    with pytest.raises(ValueError, match="12 is not divisible"):
        zigzag_unshard(x, 4, -2, backend="triton")
    with pytest.raises(ValueError, match="not divisible"):
        zigzag_position_ids(10, 4, 0)
    with pytest.raises(ValueError, match="cp_rank"):
        zigzag_shard(x, 2, 2, 1)
    with pytest.raises(ValueError, match="cp_size"):
        zigzag_shard(x, 0, 0, 1)
    with pytest.raises(ValueError, match="seq_dim"):
        zigzag_shard(x, 2, 0, 3)
    with pytest.raises(ValueError, match="backend"):
        zigzag_shard(x, 2, 0, 1, backend="cuda")


# ------------------------------------------------------------------------------------------------- THD


def _thd_expected(x, cu, cp, r):
    """Independent per-document definition with torch.chunk."""
    b = cu.tolist()
    pieces = [_chunk_shard(x[s:e], cp, r, 0) for s, e in pairwise(b) if e > s]
    return torch.cat(pieces) if pieces else x[:0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_zigzag_thd_shard_and_unshard(dtype, cp):
    rng = random.Random(cp)
    lengths = [2 * cp * rng.randint(1, 4) for _ in range(4)]
    lengths.insert(2, 0)  # a length-0 document
    lengths.append(0)  # ... also last
    for cu_dtype in (torch.int32, torch.int64):
        cu = torch.tensor([0, *lengths], dtype=cu_dtype).cumsum(0).to(cu_dtype)
        T = int(cu[-1])
        x = _rand((T, 3, 2), dtype, seed=cp)
        locals_ = []
        for r in range(cp):
            out = _assert_same(
                [
                    lambda t: zigzag_shard_thd(t, cu, cp, r, backend="triton")[0],
                    lambda t: zigzag_shard_thd(t, cu, cp, r, backend="torch")[0],
                    lambda t: _thd_expected(t, cu, cp, r),
                ],
                x,
                seed=r,
            )
            local_cu = zigzag_shard_thd(x, cu, cp, r, backend="triton")[1]
            assert local_cu.dtype == cu_dtype and torch.equal(local_cu, cu // cp)
            assert out.shape[0] == T // cp
            locals_.append(out)
        full = torch.cat(locals_)
        restored = _assert_same(
            [
                lambda t: zigzag_unshard_thd(t, cu, cp, backend="triton"),
                lambda t: zigzag_unshard_thd(t, cu, cp, backend="torch"),
            ],
            full,
        )
        assert torch.equal(restored, x)


def test_zigzag_thd_docstring_example_and_coverage():
    cu = torch.tensor([0, 4, 4, 12])
    tokens = torch.arange(12)
    out0, lcu0 = zigzag_shard_thd(tokens, cu, 2, 0, backend="triton")
    out1, lcu1 = zigzag_shard_thd(tokens, cu, 2, 1, backend="triton")
    assert out0.tolist() == [0, 3, 4, 5, 10, 11] and out1.tolist() == [1, 2, 6, 7, 8, 9]
    assert lcu0.tolist() == lcu1.tolist() == [0, 2, 2, 6]
    assert torch.equal(torch.sort(torch.cat([out0, out1])).values, tokens)


def test_zigzag_thd_non_contiguous_and_empty():
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    base = _rand((5, 16), torch.bfloat16, seed=9)
    x = base.t()  # [T=16, 5], non-contiguous
    for r in range(2):
        _assert_same(
            [
                lambda t: zigzag_shard_thd(t, cu, 2, r, backend="triton")[0],
                lambda t: zigzag_shard_thd(t, cu, 2, r, backend="torch")[0],
                lambda t: _thd_expected(t, cu, 2, r),
            ],
            x,
        )
    for cu_empty in (torch.tensor([0]), torch.tensor([0, 0, 0], dtype=torch.int32)):
        x0 = torch.zeros(0, 4, device=DEV, requires_grad=True)
        for backend in ("triton", "torch"):
            out, lcu = zigzag_shard_thd(x0, cu_empty, 2, 1, backend=backend)
            assert out.shape == (0, 4) and torch.equal(lcu, cu_empty)
            assert zigzag_unshard_thd(x0, cu_empty, 2, backend=backend).shape == (0, 4)
            (g,) = torch.autograd.grad(out, x0, torch.ones_like(out), allow_unused=True)
            assert g is None or g.shape == (0, 4)


def test_zigzag_thd_follows_in_place_changes_of_cu_seqlens():
    cu = torch.tensor([0, 4, 12])
    x = torch.arange(12.0)
    for new_cu in ([0, 4, 12], [0, 8, 12], [0, 0, 12]):
        cu.copy_(torch.tensor(new_cu))
        for r in range(2):
            expected = _thd_expected(x, cu, 2, r)
            assert torch.equal(zigzag_shard_thd(x, cu, 2, r, backend="triton")[0], expected)
    cu[1] = 6
    with pytest.raises(ValueError, match="document 0 has length 6"):
        zigzag_shard_thd(x, cu, 2, 0, backend="triton")
    with torch.inference_mode():
        cu_inf = torch.tensor([0, 8, 12])
        assert torch.equal(zigzag_shard_thd(x, cu_inf, 2, 1, backend="triton")[0], _thd_expected(x, cu_inf, 2, 1))


def test_zigzag_thd_errors():
    x = torch.zeros(14, 2)
    with pytest.raises(ValueError, match=r"document 1 has length 6.*2 \* cp_size = 4.*pad_cu_seqlens"):
        zigzag_shard_thd(x, torch.tensor([0, 8, 14]), 2, 0)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 12 but x has 14 tokens"):
        zigzag_shard_thd(x, torch.tensor([0, 8, 12]), 2, 0, backend="triton")
    with pytest.raises(ValueError, match="start at 0"):
        zigzag_shard_thd(x, torch.tensor([2, 8, 14]), 1, 0)
    with pytest.raises(ValueError, match="non-decreasing"):
        zigzag_shard_thd(x, torch.tensor([0, 10, 8, 14]), 1, 0)
    with pytest.raises(ValueError, match="int32 or int64"):
        zigzag_shard_thd(x, torch.tensor([0.0, 14.0]), 1, 0)
    with pytest.raises(ValueError, match="document 0 has length 6"):
        zigzag_unshard_thd(torch.zeros(6), torch.tensor([0, 6]), 2)


def test_pad_cu_seqlens():
    padded, index = pad_cu_seqlens(torch.tensor([0, 3, 3, 8], dtype=torch.int32), 4)
    assert padded.dtype == torch.int32 and padded.tolist() == [0, 4, 4, 12]
    assert index.dtype == torch.int64 and index.tolist() == [0, 1, 2, 4, 5, 6, 7, 8]
    padded, index = pad_cu_seqlens(torch.tensor([0, 4, 9]), 1)
    assert padded.tolist() == [0, 4, 9] and torch.equal(index, torch.arange(9))
    padded, index = pad_cu_seqlens(torch.tensor([0]), 8)
    assert padded.tolist() == [0] and index.numel() == 0
    # collator flow: scatter into a zero-padded buffer, shard it, tokens come back through pad_index
    cu = torch.tensor([0, 5, 5, 11, 12])
    x = torch.arange(1, 13, dtype=torch.float32)[:, None].repeat(1, 2)
    padded, index = pad_cu_seqlens(cu, 4)
    buf = x.new_zeros(int(padded[-1]), 2).index_copy_(0, index, x)
    assert torch.equal(buf[index], x) and int((buf[:, 0] == 0).sum()) == int(padded[-1]) - 12
    shards = [zigzag_shard_thd(buf, padded, 2, r, backend="triton")[0] for r in range(2)]
    assert torch.equal(zigzag_unshard_thd(torch.cat(shards), padded, 2, backend="triton"), buf)
    with pytest.raises(ValueError, match="multiple"):
        pad_cu_seqlens(cu, 0)
    with pytest.raises(ValueError, match="non-decreasing"):
        pad_cu_seqlens(torch.tensor([0, 4, 2]), 2)


# ------------------------------------------------------------------------------------------ sort_chunks


def _split_cat(x, sizes, order):
    chunks = torch.split(x, list(sizes), 0)
    return torch.cat([chunks[i] for i in order])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sort_chunks_matches_split_cat(dtype):
    rng = random.Random(7)
    for case in range(6):
        D = rng.randint(1, 7)
        sizes = [rng.choice([0, 0, 1, 3, 5, 9]) for _ in range(D)]
        order = list(range(D))
        rng.shuffle(order)
        trailing = [(), (3,), (2, 5)][case % 3]
        x = _rand((sum(sizes), *trailing), dtype, seed=case)
        for sz, od in ((sizes, order), (torch.tensor(sizes), torch.tensor(order, dtype=torch.int32))):
            _assert_same(
                [
                    lambda t: sort_chunks_by_index(t, sz, od, backend="triton"),
                    lambda t: sort_chunks_by_index(t, sz, od, backend="torch"),
                    lambda t: _split_cat(t, sizes, order),
                ],
                x,
                seed=case,
            )
        # the inverse order on the reordered sizes restores x
        y = sort_chunks_by_index(x, sizes, order, backend="triton")
        inv = [order.index(i) for i in range(D)]
        assert torch.equal(sort_chunks_by_index(y, [sizes[i] for i in order], inv, backend="triton"), x)


def test_sort_chunks_rank_major_to_expert_major():
    # 2 source ranks x 2 local experts; rows labelled 10 * rank + expert
    counts = {(0, 0): 2, (0, 1): 1, (1, 0): 0, (1, 1): 3}
    sizes = [counts[(r, e)] for r in range(2) for e in range(2)]
    x = torch.tensor([10 * r + e for r in range(2) for e in range(2) for _ in range(counts[(r, e)])])
    out = sort_chunks_by_index(x, sizes, [0, 2, 1, 3], backend="triton")
    assert out.tolist() == [0, 0, 1, 11, 11, 11]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sort_chunks_non_contiguous_and_empty(dtype):
    base = _rand((6, 13), dtype, seed=2)
    x = base.t()  # [13, 6] non-contiguous
    sizes, order = [4, 0, 6, 3], [3, 1, 0, 2]
    _assert_same(
        [
            lambda t: sort_chunks_by_index(t, sizes, order, backend="triton"),
            lambda t: sort_chunks_by_index(t, sizes, order, backend="torch"),
            lambda t: _split_cat(t, sizes, order),
        ],
        x,
    )
    for shape, sizes, order in [((0, 4), [0, 0], [1, 0]), ((0, 4), [], []), ((5, 0), [2, 3], [1, 0])]:
        x0 = torch.zeros(shape, dtype=dtype, device=DEV, requires_grad=True)
        for backend in ("triton", "torch"):
            out = sort_chunks_by_index(x0, sizes, order, backend=backend)
            assert out.shape == shape
            (g,) = torch.autograd.grad(out, x0, torch.ones_like(out), allow_unused=True)
            assert g is None or g.shape == shape


def test_sort_chunks_errors():
    x = torch.zeros(6, 2)
    with pytest.raises(ValueError, match="sum to 5 but x has 6 rows"):
        sort_chunks_by_index(x, [2, 3], [1, 0])
    with pytest.raises(ValueError, match="permutation"):
        sort_chunks_by_index(x, [2, 4], [1, 1], backend="triton")
    with pytest.raises(ValueError, match="permutation"):
        sort_chunks_by_index(x, torch.tensor([2, 4]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="3 entries but there are 2 chunks"):
        sort_chunks_by_index(x, [2, 4], [0, 1, 2])
    with pytest.raises(ValueError, match=">= 0"):
        sort_chunks_by_index(x, [8, -2], [0, 1])
    with pytest.raises(ValueError, match="integers"):
        sort_chunks_by_index(x, torch.tensor([2.0, 4.0]), [0, 1])
    with pytest.raises(ValueError, match="x has 6 rows"):
        sort_chunks_by_index(x, [], [])
    # unvalidated garbage gives unspecified rows but never fails or reads out of bounds
    out = sort_chunks_by_index(x + 1, [9, 4], [0, 5], backend="triton", validate=False)
    assert out.shape == x.shape


# ------------------------------------------------------------------------------------------ gather kernel


def test_gather_rows_out_of_range_zero_and_double_backward():
    x = _rand((3, 5, 4), torch.float32, seed=4).requires_grad_(True)
    idx = torch.tensor([4, -1, 0, 7, 2])
    out = gather_rows(x, idx, 1)
    assert torch.equal(out, ref.gather_rows_reference(x, idx, 1))
    assert torch.equal(out[:, [1, 3]], torch.zeros(3, 2, 4))
    assert inverse_index(torch.tensor([3, 0, -1]), 4).tolist() == [1, -1, -1, 0]
    w = torch.randn_like(out).requires_grad_(True)
    (g,) = torch.autograd.grad(out, x, w, create_graph=True)
    (g_ref,) = torch.autograd.grad(ref.gather_rows_reference(x, idx, 1), x, w)
    assert torch.equal(g, g_ref)
    v = torch.randn_like(g)
    (gg,) = torch.autograd.grad((g * v).sum(), w)  # d(grad)/d(w) is the gather again
    assert torch.equal(gg, gather_rows(v, idx, 1))


def test_gather_rows_many_small_tiles(monkeypatch):
    """Tile boundaries, batch decomposition of the 1-D grid and masking, with tiny blocks."""
    monkeypatch.setattr(gather_mod, "_block_sizes", lambda R, H, on_cuda: (4, 8, 4))
    x = _rand((3, 22, 19), torch.bfloat16, seed=5)
    for cp in (1, 11):
        for r in (0, cp - 1):
            _assert_same(
                [
                    lambda t: zigzag_shard(t, cp, r, 1, backend="triton"),
                    lambda t: _chunk_shard(t, cp, r, 1),
                ],
                x,
            )
    sizes, order = [5, 0, 9, 8], [2, 3, 1, 0]
    _assert_same(
        [
            lambda t: sort_chunks_by_index(t.flatten(1), sizes, order, backend="triton"),
            lambda t: _split_cat(t.flatten(1), sizes, order),
        ],
        x.transpose(0, 1),
    )


def test_auto_backend_on_cpu_uses_reference():
    x = _rand((8, 3), torch.float32, seed=0).cpu()
    assert torch.equal(zigzag_shard(x, 2, 1, 0), _chunk_shard(x, 2, 1, 0))
    assert torch.equal(sort_chunks_by_index(x, [3, 5], [1, 0]), _split_cat(x, [3, 5], [1, 0]))
