"""Exact context-parallel (CP) attention for causal decoder LMs: all-gather K/V, attend by (document, position).

With context parallelism every rank of the cp group holds ``S / cp_size`` tokens of each sequence (in any
order; normally the zigzag shard of :mod:`kernels.zigzag`, which gives every rank equal causal work). Its
queries must attend to the keys of *all* ranks, so :class:`ContextParallelAttention`:

1. all-gathers ``k`` and ``v`` over the cp group in one collective (autograd: the backward is a
   reduce-scatter that sums every rank's ``dk``/``dv`` contributions into the owner's shard);
2. all-gathers the local tokens' global positions (and document ids, for packed sequences) in one small
   integer collective, so the gathered keys' positions are known whatever the sharding order;
3. plans the attention without a mask (:mod:`mimo_titan.models.varlen_attention`): the gathered keys are put in
   (document, position) order, and the local queries fall into runs of consecutive positions of one document
   (the zigzag chunks: a run covering positions ``[a, a + L)`` sees that document's keys ``[0, a + L)`` with
   lower-right aligned causal masking); runs of equal shape share one ``F.scaled_dot_product_attention`` call
   (``is_causal=True`` when ``a = 0``, else ``torch.nn.attention.bias.causal_lower_right``).

The result equals full causal (or document-causal) attention restricted to the local query rows, forward and
backward, up to floating-point summation order (fp32: ~1e-6). SDPA's own softmax numerics are used unchanged
(it accumulates the softmax in fp32 for low-precision inputs).

Memory per rank and layer: the gathered ``k``/``v`` (``[B, nkv, S, hd]`` each, small with GQA) and their copy in
(document, position) order, O(S); the keys of each run (``a + L`` tokens; at most ``2 * S`` per row in all for
zigzag), O(S); the plan's index tensors, O(S) integers. What is not O(S): on CUDA none of it (the lower-right
runs dispatch to the flash / memory-efficient kernels without a mask); on CPU torch materialises each
lower-right run's bool ``[L, a + L]`` mask and SDPA keeps it (as an additive float mask) for the backward, about
``S_local * S / 2`` elements per layer in all, so long-context CP is for CUDA. Ring attention (K/V blocks passed
around the ring, online softmax) would avoid holding the full K/V; the all-gather form is simpler, exact and
cheap in communication when K/V are small (GQA). The plan and the gathered positions are cached between calls
that pass the very same position tensors (as all layers of one forward do), see ``cache_plan``; computing the
plan syncs the host once per forward.

Sources: all-gather-KV context parallelism as used to train Llama 3 ("The Llama 3 Herd of Models",
Dubey et al. 2024, §3.3.2 "Context parallelism": all-gather K and V, then attention of the local Q chunk;
sequences split into ``2 * cp_size`` chunks for load balance); zigzag load balancing as in Megatron-LM /
TransformerEngine context parallelism (``get_batch_on_this_cp_rank``, ``thd_get_partitioned_indices``).
This is an independent implementation on ``torch.distributed`` functional collectives, so it runs on gloo
(CPU) and NCCL (CUDA); ``torch.distributed.tensor.experimental.context_parallel`` has no CPU SDPA support.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mimo_titan.models.varlen_attention import GQA_MODES, PlanCache, VarlenPlan, build_plan, varlen_attention
from mimo_titan.parallel import comm

__all__ = ["ContextParallelAttention", "attention_mask", "local_attention"]

_GQA_MODES = GQA_MODES


# ----------------------------------------------------------------------------------------------- masks


def _check_index(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dim() not in (1, 2):
        raise ValueError(f"{name} must be [S] or [B, S], got shape {tuple(t.shape)}")


def attention_mask(
    q_pos: torch.Tensor,
    kv_pos: torch.Tensor,
    q_doc: torch.Tensor | None = None,
    kv_doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean causal (and same-document) mask from global token positions; ``True`` = attend.

    A dense ``O(Sq * Skv)`` reference (tests, and :func:`local_attention` with an extra ``attn_mask``); the
    attention paths themselves build no such mask.

    Query ``i`` may attend to key ``j`` iff ``kv_pos[j] <= q_pos[i]`` and, when document ids are given,
    ``kv_doc[j] == q_doc[i]``. Positions are global (the token's index in its sequence, or in its document for
    packed sequences), so the tokens may be in any order, e.g. zigzag shards.

    Args:
        q_pos: integer ``[Sq]`` or ``[B, Sq]``: positions of the query tokens.
        kv_pos: integer ``[Skv]`` or ``[B, Skv]``: positions of the key tokens.
        q_doc: optional integer, same shape as ``q_pos``: document of each query token (packed/THD sequences).
        kv_doc: optional integer, same shape as ``kv_pos``; given iff ``q_doc`` is.

    Returns:
        bool ``[Sq, Skv]`` if both positions are 1-D, else ``[B, 1, Sq, Skv]`` (1-D inputs broadcast over
        ``B``), ready for ``F.scaled_dot_product_attention``'s ``attn_mask``. On ``q_pos``'s device.

    Raises:
        ValueError: non-integer or wrongly shaped inputs, only one of ``q_doc``/``kv_doc``, a document tensor
            shaped unlike its positions, or batch sizes that differ.
    """
    _check_index("q_pos", q_pos)
    _check_index("kv_pos", kv_pos)
    if (q_doc is None) != (kv_doc is None):
        raise ValueError("pass both q_doc and kv_doc (packed sequences) or neither")
    if q_doc is not None and kv_doc is not None:  # both or neither, checked above
        _check_index("q_doc", q_doc)
        _check_index("kv_doc", kv_doc)
        if q_doc.shape != q_pos.shape or kv_doc.shape != kv_pos.shape:
            raise ValueError(
                f"document ids must be shaped like their positions: q_doc {tuple(q_doc.shape)} vs q_pos "
                f"{tuple(q_pos.shape)}, kv_doc {tuple(kv_doc.shape)} vs kv_pos {tuple(kv_pos.shape)}"
            )
    batched = q_pos.dim() == 2 or kv_pos.dim() == 2
    if q_pos.dim() == 2 and kv_pos.dim() == 2 and q_pos.shape[0] != kv_pos.shape[0]:
        raise ValueError(f"batch sizes differ: q_pos {tuple(q_pos.shape)}, kv_pos {tuple(kv_pos.shape)}")
    mask = kv_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)  # [..., Sq, Skv]
    if q_doc is not None and kv_doc is not None:
        mask = mask & (kv_doc.unsqueeze(-2) == q_doc.unsqueeze(-1))
    if batched:
        mask = mask.unsqueeze(1)  # [B, 1, Sq, Skv]
    return mask


# ----------------------------------------------------------------------------------------------- attention


def _check_qkv(q, k, v, q_pos, doc_ids) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(
                f"{name} must be a 4-D tensor [B, heads, S_local, head_dim], got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
    B, nh, S, hd = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[2] != S or k.shape[3] != hd:
        raise ValueError(
            f"k/v {tuple(k.shape)} must be [B={B}, nkv, S_local={S}, head_dim={hd}] like q {tuple(q.shape)} "
            "(the same local tokens)"
        )
    nkv = k.shape[1]
    if nkv == 0 or nh % nkv:
        raise ValueError(f"query heads ({nh}) must be a multiple of key/value heads ({nkv}) (GQA)")
    _check_index("q_pos", q_pos)
    if q_pos.shape[-1] != S or (q_pos.dim() == 2 and q_pos.shape[0] != B):
        raise ValueError(f"q_pos must be [S_local={S}] or [B={B}, S_local={S}], got {tuple(q_pos.shape)}")
    if doc_ids is not None:
        _check_index("doc_ids", doc_ids)
        if doc_ids.shape != q_pos.shape:
            raise ValueError(f"doc_ids {tuple(doc_ids.shape)} must be shaped like q_pos {tuple(q_pos.shape)}")


def _guard(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(safe_mask, row_ok)``: a query row with no allowed key would give softmax(all -inf) = NaN, so it may
    see every key in ``safe_mask`` and its output is zeroed with ``row_ok`` afterwards. Such rows cannot occur
    with causal (+ same-document) masks over consistent positions (every token sees itself)."""
    row_ok = mask.any(dim=-1, keepdim=True)  # [..., Sq, 1]
    return mask | ~row_ok, row_ok


def _sdpa(q, k, v, safe_mask, row_ok, scale, gqa: str) -> torch.Tensor:
    """SDPA with a guarded boolean mask (see :func:`_guard`) and GQA; rows without allowed keys are 0."""
    nh, nkv = q.shape[1], k.shape[1]
    native = gqa == "native" or (gqa == "auto" and q.device.type == "cpu")
    if nh != nkv and not native:
        # Repeat kv heads (head h reads kv head h // (nh / nkv), as enable_gqa does): on CUDA an explicit mask
        # excludes flash attention, and memory-efficient attention takes no enable_gqa in some torch versions.
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
    kwargs = {"enable_gqa": True} if nh != k.shape[1] else {}
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask, scale=scale, **kwargs)
    return out.masked_fill(~row_ok, 0.0)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    gqa: str = "auto",
) -> torch.Tensor:
    """Causal (document-causal for packed sequences) attention of one process's tokens: the cp=1 counterpart.

    Same signature as :class:`ContextParallelAttention`'s call; the queries attend to the same local tokens. Without
    ``attn_mask`` no dense mask is built (document runs and causal SDPA, see
    :mod:`mimo_titan.models.varlen_attention`; the plan is computed on every call, with one host sync); with
    ``attn_mask`` the dense mask of :func:`attention_mask` is ANDed with it (``O(S^2)``, for tests).

    Args:
        q: ``[B, nh, S, hd]`` float (any float dtype SDPA supports on its device).
        k, v: ``[B, nkv, S, hd]``, same dtype; ``nh`` a multiple of ``nkv`` (GQA).
        q_pos: integer ``[S]`` or ``[B, S]``: position of each token (within its document for packed
            sequences), >= 0 and distinct inside a document. Need not be ``arange``: any order works, attention
            follows the positions.
        doc_ids: optional integer, shaped like ``q_pos``: document index of each token (packed/THD); tokens
            attend only within their document.
        attn_mask: optional extra bool mask (``True`` = attend) broadcastable to ``[B, nh, S, S]``, ANDed with
            the causal/document mask (dense path).
        scale: softmax scale (default ``1 / sqrt(hd)``).
        gqa: ``"auto"`` (SDPA's ``enable_gqa`` where the kernel takes it, see
            :func:`~mimo_titan.models.varlen_attention.causal_sdpa`; repeated kv heads elsewhere), ``"native"``
            or ``"repeat"``.

    Returns:
        ``[B, nh, S, hd]`` in ``q``'s dtype; a query row whose mask allows no key is 0 (not NaN).

    Raises:
        ValueError: wrong shapes/dtypes, a non-bool ``attn_mask``, negative or repeated positions inside a
            document (without ``attn_mask``), or an unknown ``gqa`` mode.
    """
    if gqa not in _GQA_MODES:
        raise ValueError(f"gqa={gqa!r}; choose one of {_GQA_MODES}")
    _check_qkv(q, k, v, q_pos, doc_ids)
    if attn_mask is None:
        plan = build_plan(q_pos, q_pos, doc_ids, doc_ids, batch=q.shape[0], device=q.device)
        return varlen_attention(q, k, v, plan, scale=scale, gqa=gqa)
    mask = attention_mask(q_pos, q_pos, doc_ids, doc_ids)
    if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool:
        raise ValueError("attn_mask must be a bool tensor (True = attend), ANDed with the causal mask")
    return _sdpa(q, k, v, *_guard(mask & attn_mask), scale, gqa)


class ContextParallelAttention:
    """Callable replacing ``F.scaled_dot_product_attention`` in an attention layer whose sequence is CP-sharded.

    Every rank passes its local tokens' ``q``/``k``/``v`` (any token order, normally the zigzag shard) and their
    global positions; the call all-gathers ``k``/``v`` (with autograd) and the positions/document ids over
    ``cp_group``, attends by global position (and document) without a mask (see the module docstring), and returns
    the local queries' attention output. It
    is exact: it equals full causal (document-causal) attention over the whole sequence restricted to the local
    rows, and the gradients of the local ``q``/``k``/``v`` equal the matching rows of the full gradients. The
    backward runs one reduce-scatter on the cp group, so every rank must run its backward too.

    Args:
        cp_group: the cp ``ProcessGroup`` (or a 1-D ``DeviceMesh``); may be ``None`` when ``cp_size == 1``.
        cp_size: the cp group's size; with 1 no collective runs (plain :func:`local_attention`).
        gqa: how ``nkv < nh`` is handled, see :func:`local_attention`.
        cache_plan: reuse the gathered positions and the attention plan while the call gets the very same
            ``q_pos`` (and ``doc_ids``) tensor objects, unmodified (all layers of one forward): saves one
            collective and one host sync per layer. Every rank must hit or miss the cache alike (a miss runs a
            collective); ranks running the same model code do. The cache holds one plan until the next call with
            other position tensors; set ``False`` to rebuild it on every call.

    Memory: see the module docstring (gathered K/V ``[B, nkv, S, hd]`` per rank, no ``[S_local, S]`` mask on CUDA;
    ring attention would avoid the gathered K/V).

    Raises:
        ValueError: (construction) ``cp_size < 1``, no group for ``cp_size > 1``, or a group whose size is not
            ``cp_size``; (call) see :meth:`__call__`.
    """

    def __init__(self, cp_group, cp_size: int, *, gqa: str = "auto", cache_plan: bool = True):
        if not isinstance(cp_size, int) or isinstance(cp_size, bool) or cp_size < 1:
            raise ValueError(f"cp_size must be a positive int, got {cp_size!r}")
        if gqa not in _GQA_MODES:
            raise ValueError(f"gqa={gqa!r}; choose one of {_GQA_MODES}")
        if cp_size > 1:
            if cp_group is None:
                raise ValueError(f"cp_size={cp_size} needs a cp process group")
            group = cp_group.get_group() if hasattr(cp_group, "get_group") else cp_group
            size = dist.get_world_size(group)
            if size != cp_size:
                raise ValueError(f"cp_size={cp_size} but the cp group has {size} ranks")
            cp_group = group
        self.cp_group = cp_group
        self.cp_size = cp_size
        self.gqa = gqa
        self.cache_plan = cache_plan
        self._cache = PlanCache()

    # ------------------------------------------------------------------------------------------- gathers

    def _gather_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``k, v [B, nkv, S_local, hd]`` -> gathered ``[B, nkv, cp * S_local, hd]`` each, rank-major keys."""
        cp = self.cp_size
        kv = torch.stack([k, v])  # [2, B, nkv, Sl, hd], contiguous
        # backward: a reduce-scatter of the (contiguous, see comm.wait) gradient
        g = comm.all_gather(kv, self.cp_group)  # [cp * 2, B, nkv, Sl, hd]
        two, B, nkv, Sl, hd = kv.shape
        g = g.view(cp, two, B, nkv, Sl, hd).permute(1, 2, 3, 0, 4, 5).reshape(two, B, nkv, cp * Sl, hd)
        return g[0], g[1]

    def _gather_index(self, idx: torch.Tensor) -> torch.Tensor:
        """Integer ``[n, ..., S_local]`` -> ``[n, ..., cp * S_local]`` (int64), in the same rank order as K/V."""
        idx = idx.to(torch.int64).contiguous()
        g = comm.all_gather(idx, self.cp_group, differentiable=False)  # [cp * n, ..., Sl]
        g = g.view(self.cp_size, *idx.shape)  # [cp, n, ..., Sl]
        return torch.movedim(g, 0, -2).reshape(*idx.shape[:-1], self.cp_size * idx.shape[-1])

    def _plan(self, q_pos: torch.Tensor, doc_ids: torch.Tensor | None, batch: int) -> VarlenPlan:
        """The attention plan of the local queries against all gathered keys (cached, see ``cache_plan``)."""
        plan = self._cache.lookup(q_pos, doc_ids) if self.cache_plan else None
        if isinstance(plan, VarlenPlan) and plan.batch == batch:
            return plan
        if self.cp_size == 1:
            kv_pos, kv_doc = q_pos, doc_ids
        elif doc_ids is None:
            kv_pos, kv_doc = self._gather_index(q_pos.unsqueeze(0))[0], None
        else:
            kv_pos, kv_doc = self._gather_index(torch.stack([q_pos.to(torch.int64), doc_ids.to(torch.int64)]))
        plan = build_plan(q_pos, kv_pos, doc_ids, kv_doc, batch=batch, device=q_pos.device)
        if self.cache_plan:
            self._cache.store(plan, q_pos, doc_ids)
        return plan

    # ------------------------------------------------------------------------------------------- call

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_pos: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        *,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Attention of this rank's queries over the whole (CP-sharded) sequence.

        Args:
            q: ``[B, nh, S_local, hd]`` float: this rank's query tokens (any order, e.g. zigzag).
            k, v: ``[B, nkv, S_local, hd]``, the same tokens; ``nh`` a multiple of ``nkv`` (GQA).
            q_pos: integer ``[S_local]`` or ``[B, S_local]``: global position of each local token (its index
                in the sequence, or in its document for packed sequences), e.g. from
                ``kernels.zigzag.zigzag_position_ids``.
            doc_ids: optional integer, shaped like ``q_pos``: document index of each local token (packed/THD
                sequences: attention stays inside a document). Documents are identified by id across ranks.
            attn_mask: must be ``None`` when ``cp_size > 1`` (with ``cp_size == 1`` it is ANDed in, as in
                :func:`local_attention`, on its dense path).
            scale: softmax scale (default ``1 / sqrt(hd)``).

        Returns:
            ``[B, nh, S_local, hd]`` in ``q``'s dtype, differentiable w.r.t. ``q``, ``k``, ``v``.

        Raises:
            ValueError: ``attn_mask`` given with ``cp_size > 1`` (CP derives the mask from positions and
                documents), positions repeated inside a document, or wrong shapes/dtypes (see
                :func:`local_attention`).
        """
        if self.cp_size == 1 and attn_mask is not None:
            return local_attention(q, k, v, q_pos, doc_ids, attn_mask, scale=scale, gqa=self.gqa)
        if attn_mask is not None:
            raise ValueError(
                "ContextParallelAttention does not take a dense attn_mask: under context parallelism the mask "
                "is derived from the tokens' global positions (causal) and document ids; pass doc_ids for "
                "packed (THD) sequences instead of a block-diagonal mask"
            )
        _check_qkv(q, k, v, q_pos, doc_ids)
        plan = self._plan(q_pos, doc_ids, q.shape[0])
        k_all, v_all = (k, v) if self.cp_size == 1 else self._gather_kv(k, v)
        return varlen_attention(q, k_all, v_all, plan, scale=scale, gqa=self.gqa)
