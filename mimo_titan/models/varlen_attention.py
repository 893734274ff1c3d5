"""Document-causal ("varlen") attention without a dense mask: runs of queries, causal SDPA per run.

A token attends to the keys of its own document whose position is at most its own (the mask
``kv_doc == q_doc and kv_pos <= q_pos`` of packed THD rows and of context parallelism), but that mask is never
built. Instead a :class:`VarlenPlan` is computed once from the tokens' ``(row, document, position)``:

1. the keys are sorted by ``(row, document, position)``; in that order the keys a query may see are one
   contiguous range, from its document's first key up to the query's own key;
2. the queries are cut into *runs*: queries that are consecutive in that key order and belong to one document.
   A run of ``L`` queries whose last key is the ``Kn``-th key of its document sees keys ``[0, Kn)`` of the
   document with *lower-right aligned* causal masking (query ``i`` sees keys ``[0, Kn - L + i]``). Without
   context parallelism every run is a whole document (``L == Kn``: plain causal); under context parallelism a
   run is a zigzag chunk covering positions ``[a, a + L)`` of a document (``Kn = a + L``);
3. runs of equal ``(L, Kn)`` are batched into one ``F.scaled_dot_product_attention`` call: ``is_causal=True``
   when ``L == Kn``, else ``attn_mask=torch.nn.attention.bias.causal_lower_right(L, Kn)``.

Equal to SDPA with the dense mask, forward and backward, up to floating-point summation order (fp32 ~1e-6),
whenever every query token is also a key token (self-attention; under CP the gathered keys contain the local
queries) and no ``(row, document, position)`` occurs twice among the keys.

Cost: computing a plan moves the positions / document ids to the host (one device sync) and runs a few sorts over
``B * S`` integers; callers cache it across the layers of a forward (:class:`PlanCache`). The attention then runs
one SDPA call per distinct ``(L, Kn)``.

Memory (per layer, ``N = B * S`` tokens): the queries, keys and values are gathered into run order (``O(N)``
copies, ``[N, heads, hd]``); a group of ``n > 1`` runs copies its keys/values (``n * Kn`` tokens; at most the
document lengths summed, so ``O(N)`` without CP and ``O(N)`` per zigzag half with CP); the output is put back in
token order (``O(N)``). No ``[S, S]`` tensor exists when ``L == Kn`` (flash / memory-efficient kernels on CUDA,
the flash kernel on CPU). A run with ``L < Kn`` (context parallelism only) uses a lower-right causal bias: on CUDA
it dispatches to the flash / memory-efficient kernels without materialising a mask; elsewhere (CPU) torch
materialises that run's bool ``[L, Kn]`` mask, which SDPA keeps (as an additive mask) for its backward, so CPU
context parallelism still holds about ``S_local * S / 2`` mask elements per layer.

Sources: the varlen / THD attention interface of FlashAttention-2 (Dao, 2023; ``flash_attn_varlen_func`` with
``cu_seqlens``) and Transformer Engine's THD context parallelism; the lower-right alignment is that of
``torch.nn.attention.bias.CausalBias`` (FlashAttention-2's convention for ``seqlen_q < seqlen_k``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

__all__ = ["PlanCache", "VarlenPlan", "build_plan", "causal_sdpa", "varlen_attention"]

GQA_MODES = ("auto", "native", "repeat")


@dataclass(frozen=True)
class RunGroup:
    """``n`` runs of ``L`` queries that each see ``Kn`` keys (lower-right aligned causal when ``L < Kn``).

    Attributes:
        n, L, Kn: number of runs, queries per run, keys per run.
        q_offset: the group's first query in the plan's query order (its queries are the next ``n * L``).
        k_start: the first key (in the plan's key order) when ``n == 1``, else -1.
        k_index: int64 ``[n * Kn]`` key indices (plan key order, run-major) when ``n > 1``, else None.
    """

    n: int
    L: int
    Kn: int
    q_offset: int
    k_start: int
    k_index: torch.Tensor | None


@dataclass(frozen=True)
class VarlenPlan:
    """How to run document-causal attention as batched causal SDPA calls; built by :func:`build_plan`.

    Attributes:
        batch, q_len, kv_len: ``B``, ``Sq``, ``Skv`` of the attention call the plan was built for.
        q_b, q_s: int64 ``[B * Sq]``: row and sequence index of every query, in run order.
        q_inv: int64 ``[B * Sq]``: ``q_inv[b * Sq + s]`` is the place of query ``(b, s)`` in run order.
        k_b, k_s: int64 ``[B * Skv]``: row and sequence index of every key, sorted by (row, document, position).
        groups: the SDPA calls, see :class:`RunGroup`.
    """

    batch: int
    q_len: int
    kv_len: int
    q_b: torch.Tensor
    q_s: torch.Tensor
    q_inv: torch.Tensor
    k_b: torch.Tensor
    k_s: torch.Tensor
    groups: tuple[RunGroup, ...]


def _as_rows(name: str, t: torch.Tensor, batch: int) -> torch.Tensor:
    """Integer ``[S]`` or ``[B, S]`` -> int64 ``[B, S]`` on the CPU."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.dim() not in (1, 2):
        raise ValueError(f"{name} must be an integer [S] or [B, S] tensor, got {t.dtype} {tuple(t.shape)}")
    t = t.detach().to("cpu", torch.int64)
    return t.expand(batch, -1) if t.dim() == 1 else t


def build_plan(
    q_pos: torch.Tensor,
    kv_pos: torch.Tensor,
    q_doc: torch.Tensor | None = None,
    kv_doc: torch.Tensor | None = None,
    *,
    batch: int = 1,
    device: torch.device | str | None = None,
) -> VarlenPlan:
    """Plan document-causal attention of queries ``(q_doc, q_pos)`` over keys ``(kv_doc, kv_pos)``.

    Query ``i`` may see key ``j`` iff they are in the same row, ``kv_doc[j] == q_doc[i]`` and
    ``kv_pos[j] <= q_pos[i]`` (without document ids every token is in document 0). The tokens may be in any order.
    One host sync (the index tensors are read on the CPU); the plan's index tensors are put on ``device``.

    Args:
        q_pos: integer ``[Sq]`` or ``[B, Sq]`` non-negative positions of the queries (1-D: shared by all rows).
        kv_pos: integer ``[Skv]`` or ``[B, Skv]`` positions of the keys.
        q_doc, kv_doc: optional integer documents shaped like ``q_pos`` / ``kv_pos`` (both or neither).
        batch: ``B`` when every input is 1-D (otherwise taken from the 2-D inputs).
        device: device of the plan's index tensors (default ``q_pos``'s).

    Returns:
        a :class:`VarlenPlan`.

    Raises:
        ValueError: non-integer or wrongly shaped inputs, negative positions, only one of ``q_doc`` / ``kv_doc``, a
            ``(row, document, position)`` found twice among the keys, or a query that is not among the keys.

    Example: one row, documents of 3 and 2 tokens (``doc = [0, 0, 0, 1, 1]``, ``pos = [0, 1, 2, 0, 1]``), queries
    = keys: two runs, ``(L, Kn) = (3, 3)`` and ``(2, 2)``, two causal SDPA calls. Under CP = 2 with zigzag, rank 0
    holding positions ``[0, 1, 6, 7]`` of an 8-token row has runs ``(2, 2)`` (keys 0..1) and ``(2, 8)`` (keys
    0..7, lower-right aligned: query 6 sees keys 0..6).
    """
    if (q_doc is None) != (kv_doc is None):
        raise ValueError("pass both q_doc and kv_doc (packed sequences) or neither")
    rows = [t.shape[0] for t in (q_pos, kv_pos, q_doc, kv_doc) if t is not None and t.dim() == 2]
    if rows and (min(rows) != max(rows)):
        raise ValueError(f"batch sizes differ among q_pos / kv_pos / doc ids: {rows}")
    B = rows[0] if rows else batch
    device = q_pos.device if device is None else torch.device(device)
    qp, kp = _as_rows("q_pos", q_pos, B), _as_rows("kv_pos", kv_pos, B)
    Sq, Skv = qp.shape[1], kp.shape[1]
    if q_doc is not None and kv_doc is not None:
        qd, kd = _as_rows("q_doc", q_doc, B), _as_rows("kv_doc", kv_doc, B)
        if qd.shape != qp.shape or kd.shape != kp.shape:
            raise ValueError(
                f"document ids must be shaped like their positions: q_doc {tuple(q_doc.shape)} vs q_pos "
                f"{tuple(q_pos.shape)}, kv_doc {tuple(kv_doc.shape)} vs kv_pos {tuple(kv_pos.shape)}"
            )
        low = min(int(qd.min()), int(kd.min())) if qd.numel() and kd.numel() else 0
        qd, kd = qd - low, kd - low
    else:
        qd, kd = torch.zeros_like(qp), torch.zeros_like(kp)
    if (qp.numel() and int(qp.min()) < 0) or (kp.numel() and int(kp.min()) < 0):
        raise ValueError("positions must be >= 0 (the position of each token inside its sequence / document)")
    P = max(int(qp.max()) if qp.numel() else 0, int(kp.max()) if kp.numel() else 0) + 1
    D = max(int(qd.max()) if qd.numel() else 0, int(kd.max()) if kd.numel() else 0) + 1
    row = torch.arange(B).unsqueeze(1)
    kcode = ((row * D + kd) * P + kp).flatten()  # unique key of (row, document, position), ordered like it
    qcode = ((row * D + qd) * P + qp).flatten()
    ksorted, kperm = torch.sort(kcode, stable=True)
    if ksorted.numel() > 1 and bool((ksorted[1:] == ksorted[:-1]).any()):
        raise ValueError("two key tokens share (row, document, position); positions must be distinct inside a document")
    r = torch.searchsorted(ksorted, qcode)  # rank of each query among the sorted keys
    found = r < ksorted.numel()
    if not bool(found.all()) or not bool((ksorted[r.clamp(max=max(ksorted.numel() - 1, 0))] == qcode).all()):
        raise ValueError("every query token must also be a key token (self-attention over the same tokens)")
    seg = torch.searchsorted(ksorted, qcode - qp.flatten())  # first key of the query's document
    order = torch.argsort(r)
    r_o, s_o = r[order], seg[order]
    Nq = r_o.numel()
    new_run = torch.ones(Nq, dtype=torch.bool)
    if Nq > 1:
        new_run[1:] = (r_o[1:] != r_o[:-1] + 1) | (s_o[1:] != s_o[:-1])
    starts = new_run.nonzero().flatten()
    lengths = torch.diff(starts, append=torch.tensor([Nq]))
    k_first = s_o[starts]
    k_count = r_o[starts + lengths - 1] - k_first + 1
    by_shape = torch.argsort(lengths * (ksorted.numel() + 1) + k_count, stable=True)
    starts, lengths, k_first, k_count = starts[by_shape], lengths[by_shape], k_first[by_shape], k_count[by_shape]
    # queries in run order: run after run, each run's queries in key order
    within = torch.arange(Nq) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    q_flat = order[torch.repeat_interleave(starts, lengths) + within]
    q_inv = torch.empty_like(q_flat)
    q_inv[q_flat] = torch.arange(Nq)
    groups = []
    shapes, counts = torch.unique_consecutive(torch.stack([lengths, k_count], 1), dim=0, return_counts=True)
    first_run, q_offset = 0, 0
    for (L, Kn), n in zip(shapes.tolist(), counts.tolist()):
        firsts = k_first[first_run : first_run + n]
        if n == 1:
            groups.append(RunGroup(1, L, Kn, q_offset, int(firsts[0]), None))
        else:
            index = (firsts.unsqueeze(1) + torch.arange(Kn)).flatten().to(device)
            groups.append(RunGroup(n, L, Kn, q_offset, -1, index))
        first_run, q_offset = first_run + n, q_offset + n * L

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device)

    return VarlenPlan(
        B, Sq, Skv, dev(q_flat // Sq), dev(q_flat % Sq), dev(q_inv), dev(kperm // Skv), dev(kperm % Skv), tuple(groups)
    )


def causal_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, gqa: str = "auto"
) -> torch.Tensor:
    """Causal SDPA of ``q [n, nh, L, hd]`` over ``k, v [n, nkv, Kn, hd]`` (``Kn >= L``), lower-right aligned.

    Query ``i`` sees keys ``[0, Kn - L + i]``; with ``L == Kn`` this is ``is_causal=True``. Returns
    ``[n, nh, L, hd]``. ``gqa="auto"`` passes ``enable_gqa`` to SDPA on the CPU and, for ``L == Kn`` in half
    precision, on CUDA (the flash kernel takes fewer kv heads); elsewhere it repeats the kv heads (CUDA's
    memory-efficient kernel and the lower-right kernels take equal head counts).
    """
    n_q, n_k = q.shape[2], k.shape[2]
    nh, nkv = q.shape[1], k.shape[1]
    half = q.dtype in (torch.float16, torch.bfloat16)
    native = gqa == "native" or (gqa == "auto" and (q.device.type == "cpu" or (n_q == n_k and half)))
    if nh != nkv and not native:
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
    gqa_on = nh != k.shape[1]
    if n_q == n_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa_on)
    bias = causal_lower_right(n_q, n_k)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=gqa_on)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: VarlenPlan,
    *,
    scale: float | None = None,
    gqa: str = "auto",
) -> torch.Tensor:
    """Document-causal attention by ``plan`` (see the module docstring); differentiable in ``q``, ``k``, ``v``.

    Args:
        q: ``[B, nh, Sq, hd]`` float.
        k, v: ``[B, nkv, Skv, hd]``, same dtype; ``nh`` a multiple of ``nkv``.
        plan: from :func:`build_plan` for these ``B``, ``Sq``, ``Skv``, with index tensors on ``q``'s device.
        scale: softmax scale (default ``1 / sqrt(hd)``).
        gqa: ``"auto"`` (SDPA's ``enable_gqa`` except for lower-right runs off the CPU, where the kv heads are
            repeated), ``"native"`` or ``"repeat"``.

    Returns:
        ``[B, nh, Sq, hd]`` in ``q``'s dtype (a transposed view of a token-major ``[B, Sq, nh, hd]`` tensor).

    Raises:
        ValueError: tensors that do not fit the plan.
    """
    B, nh, Sq, hd = q.shape
    nkv = k.shape[1]
    if (B, Sq, k.shape[0], k.shape[2]) != (plan.batch, plan.q_len, plan.batch, plan.kv_len):
        raise ValueError(
            f"q {tuple(q.shape)} / k {tuple(k.shape)} do not fit a plan built for B={plan.batch}, "
            f"Sq={plan.q_len}, Skv={plan.kv_len}"
        )
    q_t = q[plan.q_b, :, plan.q_s]  # [B*Sq, nh, hd], run order
    k_t = k[plan.k_b, :, plan.k_s]  # [B*Skv, nkv, hd], sorted by (row, document, position)
    v_t = v[plan.k_b, :, plan.k_s]
    outs = []
    for g in plan.groups:
        q_g = q_t[g.q_offset : g.q_offset + g.n * g.L].view(g.n, g.L, nh, hd).transpose(1, 2)
        if g.k_index is None:
            k_g = k_t[g.k_start : g.k_start + g.Kn].unsqueeze(0)
            v_g = v_t[g.k_start : g.k_start + g.Kn].unsqueeze(0)
        else:
            k_g = k_t[g.k_index].view(g.n, g.Kn, nkv, hd)
            v_g = v_t[g.k_index].view(g.n, g.Kn, nkv, hd)
        out = causal_sdpa(q_g, k_g.transpose(1, 2), v_g.transpose(1, 2), scale, gqa)  # [n, nh, L, hd]
        outs.append(out.transpose(1, 2).reshape(g.n * g.L, nh, hd))
    out_t = (torch.cat(outs) if len(outs) > 1 else outs[0])[plan.q_inv]  # [B*Sq, nh, hd], token order
    return out_t.view(B, Sq, nh, hd).transpose(1, 2)


class PlanCache:
    """One cached :class:`VarlenPlan` (plus any extra value), keyed by the identity and version of index tensors.

    All layers of one forward pass the very same position / document tensors, so the plan (and its host sync)
    is computed once per forward. A key tensor modified in place (its ``_version`` changes), another tensor, or
    an inference tensor (no version counter) is a miss. The cache holds its last key tensors alive until the next
    miss.
    """

    def __init__(self) -> None:
        self._key: tuple[tuple[torch.Tensor | None, int], ...] | None = None
        self._value: object = None

    @staticmethod
    def _key_of(tensors: tuple[torch.Tensor | None, ...]) -> tuple[tuple[torch.Tensor | None, int], ...] | None:
        if any(t is not None and t.is_inference() for t in tensors):
            return None
        return tuple((t, -1 if t is None else t._version) for t in tensors)

    def lookup(self, *tensors: torch.Tensor | None) -> object | None:
        """The cached value for exactly these tensors (same objects, unmodified), else None."""
        key = self._key_of(tensors)
        if key is None or self._key is None or len(key) != len(self._key):
            return None
        if all(a is b and va == vb for (a, va), (b, vb) in zip(key, self._key)):
            return self._value
        return None

    def store(self, value: object, *tensors: torch.Tensor | None) -> None:
        """Cache ``value`` for these tensors (nothing is kept for inference tensors)."""
        key = self._key_of(tensors)
        self._key, self._value = (key, value) if key is not None else (None, None)
