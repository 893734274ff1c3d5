"""Bridge: move projected image embeddings from encoder DP ranks to language-model DP ranks, and grads back.

Every rank draws the same global batch, so both sides know, for every sample of every microbatch, how many
image tokens it has. Each microbatch of ``mb_size`` samples is cut into contiguous DP ranges on each side
(``dp_sample_range``); a *route* is the non-empty intersection of an encoder DP range and a language DP range.
Along a route the encoder sends the image-token rows of exactly those samples; the language rank
concatenates its routes in sample order. Gradients travel the same routes backwards, so each encoder rank gets
``d loss / d embeds`` for exactly its own rows. This handles fan-in (encoder DP > LM DP), fan-out (encoder
DP < LM DP), equal DP and ratios that do not divide (2 → 3), and any number of image tokens per sample (zero
included): a route whose samples have no image token sends nothing, and both sides know it. With context
parallelism on the language side, each CP rank of the destination DP index receives only the rows whose
placeholders fall in its zigzag shard (both sides compute the owner of every row from the token ids,
:func:`image_row_cp_ranks`), and each row's gradient comes back from that CP rank. With tensor parallelism, one
tp rank sends what all its tp peers hold identically, and every tp rank of the receiving side receives it.

Posting: each transfer is first a list of ``dist.P2POp`` (sends) or a :class:`Pending` receive, which
:meth:`Bridge.post` posts one by one or in one ``batch_isend_irecv`` (colocated ranks, which send to each other).
Every pair of ranks posts its operations in the same order on both sides (microbatches ascending, routes by
start; the schedule decides how forwards and backwards interleave, :mod:`mimo_titan.pipeline.schedule`), so
NCCL, which ignores tags, pairs them too.

Example (mb_size 6, encoder dp 2 → language dp 3): encoder ranges [0,3) [3,6), language ranges [0,2) [2,4)
[4,6); routes (e0→l0, [0,2)), (e0→l1, [2,3)), (e1→l1, [3,4)), (e1→l2, [4,6)).

When the sending and receiving rank are the same process (colocated layouts) the rows are handed over in
memory, with no communication; the code path is otherwise identical.

Reference semantics: Megatron-LM ``pipeline_parallel/bridge_communicator.py`` (fan-in / fan-out between
HyperCommGrids); unlike it, routing is by sample range, so DP sizes need not divide each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mimo_titan.data.sharding import dp_sample_range
from mimo_titan.models.mimo import cp_shard_rows

__all__ = ["Bridge", "Pending", "Route", "cp_owner", "image_row_cp_ranks", "module_rank", "plan_routes"]

_FWD, _BWD = 0, 1


@dataclass(frozen=True)
class Route:
    """Samples ``[start, end)`` of every microbatch go from encoder DP rank ``src_dp`` to language DP rank
    ``dst_dp``."""

    src_dp: int
    dst_dp: int
    start: int
    end: int


def plan_routes(mb_size: int, src_dp_size: int, dst_dp_size: int) -> tuple[Route, ...]:
    """All routes for a microbatch of ``mb_size`` samples, ordered by ``start``.

    Raises:
        ValueError: if a DP size does not divide ``mb_size`` (from ``dp_sample_range``).
    """
    routes = []
    for s in range(src_dp_size):
        a0, a1 = dp_sample_range(mb_size, s, src_dp_size)
        for d in range(dst_dp_size):
            b0, b1 = dp_sample_range(mb_size, d, dst_dp_size)
            lo, hi = max(a0, b0), min(a1, b1)
            if lo < hi:
                routes.append(Route(s, d, lo, hi))
    return tuple(sorted(routes, key=lambda r: r.start))


def module_rank(layout, pp_stage: int, dp_rank: int, cp_rank: int = 0, tp_rank: int = 0) -> int:
    """Global rank of the given coordinates in a module's mesh (dims pp, dp_replicate, dp_shard, cp, tp)."""
    return layout.rank_offset + ((pp_stage * layout.dp + dp_rank) * layout.cp + cp_rank) * layout.tp + tp_rank


def cp_owner(batch_size: int, seq_len: int, cp_size: int, doc_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, S]`` int64 (CPU): the language CP rank that keeps each position under the zigzag shard of
    :func:`mimo_titan.models.mimo.cp_shard_rows` (computed with that very function, so the two agree); packed
    (THD) rows pass their ``doc_ids_BS`` ``[B, S]``."""
    owner = torch.zeros(batch_size, seq_len, dtype=torch.int64)
    if cp_size > 1:
        pos = torch.arange(seq_len).expand(batch_size, seq_len)
        docs = None if doc_ids_BS is None else doc_ids_BS.cpu()
        for c in range(cp_size):
            owner.scatter_(1, cp_shard_rows(pos, cp_size, c, docs), c)
    return owner


def image_row_cp_ranks(
    input_ids_BS: torch.Tensor, image_token_id: int, cp_size: int, doc_ids_BS: torch.Tensor | None = None
) -> torch.Tensor:
    """``[n_image_tokens]`` int64 (CPU): the language CP rank whose sequence shard holds each image-token row of a
    microbatch (``input_ids_BS`` ``[B, S]``), in row-major placeholder order (the bridge's row order)."""
    ids = input_ids_BS.cpu()
    batch_size, seq_len = ids.shape
    return cp_owner(batch_size, seq_len, cp_size, doc_ids_BS)[ids == image_token_id]


class Bridge:
    """Point-to-point transfer of image-token embeddings between two modules' meshes.

    Args:
        src_layout: the encoder module's ``ModuleLayout``; its last pipeline stage sends.
        dst_layout: the language module's ``ModuleLayout``; its first pipeline stage receives.
        mb_size: samples per global microbatch.
        tokens_per_image: image tokens each image contributes (P).
        hidden_size: H, the width of what crosses.
        dtype: dtype of what crosses (the encoder's compute dtype).
        device: device of the buffers (cuda for NCCL, cpu for gloo).
        rank: this process's global rank.
        lane: index of this encoder among the ``lanes`` encoders feeding the language model: each bridge tags its
            messages ``2 (mb · lanes + lane) + direction``, so two encoders on the same ranks never share a tag.
        lanes: number of encoders (bridges) of the model.

    All tensors are ``[n_tokens, H]`` in sample order; ``images_per_sample`` is the ``[mb_size]`` int64 count
    of items (images) of every sample of the *global* microbatch, each giving ``tokens_per_image`` rows. For items
    of variable length (audio clips) pass ``tokens_per_image = 1`` and each sample's row count (zero included):
    the routing only needs every sample's number of rows. Sends are asynchronous; call :meth:`wait` once the
    step no longer needs them.

    With context parallelism the methods take ``row_cp`` (``[n]`` int64, :func:`image_row_cp_ranks` of the global
    microbatch): encoder tp rank 0 sends each row to the tp ranks of the CP rank that owns it; language tp rank 0
    of each CP rank sends that rank's rows' gradients back to every encoder tp rank, which puts them in place.

    Raises:
        ValueError: if the encoder has cp > 1.
    """

    def __init__(
        self,
        src_layout,
        dst_layout,
        mb_size: int,
        tokens_per_image: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        rank: int,
        *,
        lane: int = 0,
        lanes: int = 1,
    ):
        if src_layout.cp != 1:
            raise ValueError(
                f"parallelism.{src_layout.name}.cp={src_layout.cp}: the bridge supports context "
                "parallelism on the language side only; set cp = 1 for encoders"
            )
        self.src, self.dst = src_layout, dst_layout
        self.mb_size, self.tokens_per_image, self.hidden_size = mb_size, tokens_per_image, hidden_size
        self.dtype, self.device, self.rank = dtype, device, rank
        self.lane, self.lanes = lane, lanes
        self.routes = plan_routes(mb_size, src_layout.dp, dst_layout.dp)
        src, dst = src_layout, dst_layout
        # forward: encoder tp rank 0 sends (its tp peers hold the same rows) to every tp rank of the CP rank that
        # owns the row. Backward: language tp rank 0 of every CP rank sends (its tp peers hold the same gradient)
        # to every encoder tp rank (each runs the same backward).
        last = src.pp - 1  # the encoder's last pipeline stage sends
        self.src_sender = [module_rank(src, last, d) for d in range(src.dp)]
        self.src_receivers = [[module_rank(src, last, d, 0, t) for t in range(src.tp)] for d in range(src.dp)]
        self.dst_sender = [[module_rank(dst, 0, d, c) for c in range(dst.cp)] for d in range(dst.dp)]
        self.dst_receivers = [
            [[module_rank(dst, 0, d, c, t) for t in range(dst.tp)] for c in range(dst.cp)] for d in range(dst.dp)
        ]
        self._local: dict[tuple, torch.Tensor] = {}
        self._sends: list[tuple[dist.Work, torch.Tensor]] = []

    # -- helpers ---------------------------------------------------------------------------------------
    def tag(self, mb: int, direction: int) -> int:
        """The point-to-point tag of microbatch ``mb`` in ``direction`` (0 forward, 1 backward)."""
        return 2 * (mb * self.lanes + self.lane) + direction

    def _row_offsets(self, images_per_sample: torch.Tensor) -> list[int]:
        """Global row offset of every sample boundary of the microbatch (``mb_size + 1`` entries)."""
        return [0, *torch.cumsum(images_per_sample * self.tokens_per_image, 0).tolist()]

    def _owners(self, row_cp: torch.Tensor | None, offsets: list[int]) -> torch.Tensor:
        """``[n_rows]`` int64: the language CP rank that needs each image-token row of the microbatch."""
        if row_cp is None:
            if self.dst.cp > 1:
                raise ValueError(
                    "bridge: the language module has cp > 1, so row_cp (the CP rank of every "
                    "image-token row) is required"
                )
            return torch.zeros(offsets[-1], dtype=torch.int64)
        if row_cp.shape != (offsets[-1],):
            raise ValueError(f"bridge: row_cp has shape {tuple(row_cp.shape)}, expected ({offsets[-1]},)")
        return row_cp.cpu()

    def _send(self, rows: torch.Tensor, peers: list[int], tag: int, key, ops: list[dist.P2POp]) -> None:
        """Add the sends of ``rows`` to every rank in ``peers`` to ``ops`` (this very rank gets a hand-over)."""
        if rows.shape[0] == 0:
            return
        buf = rows.detach().to(self.dtype).contiguous()
        for peer in peers:
            if peer == self.rank:
                slot = (*key, peer)
                self._local[slot] = buf
            else:
                ops.append(dist.P2POp(dist.isend, buf, peer, tag=tag))

    def _recv(self, n: int, peer: int, tag: int, key: tuple, ops: list[dist.P2POp]) -> torch.Tensor:
        """The buffer for ``[n, H]`` rows from ``peer``, its receive added to ``ops`` (or the local hand-over)."""
        if n == 0 or peer == self.rank:
            return (
                self._local.pop((*key, self.rank)).to(self.dtype)
                if n
                else torch.empty(0, self.hidden_size, dtype=self.dtype, device=self.device)
            )
        buf = torch.empty(n, self.hidden_size, dtype=self.dtype, device=self.device)
        ops.append(dist.P2POp(dist.irecv, buf, peer, tag=tag))
        return buf

    def _check_rows(self, mb: int, rows: torch.Tensor, n: int) -> None:
        if rows.shape[0] != n:
            raise ValueError(f"bridge: microbatch {mb} has {n} image-token rows on this rank, got {rows.shape[0]}")

    # -- posting ---------------------------------------------------------------------------------------
    def post(self, *items: list[dist.P2POp] | Pending, batch: bool = False) -> list[dist.Work]:
        """Post sends (lists of ops from the ``*_sends`` methods) and receives (:class:`Pending`).

        With ``batch`` every op goes into one ``dist.batch_isend_irecv`` (an NCCL group), which colocated ranks
        need: two ranks that both send to and receive from each other would otherwise deadlock on NCCL, where a
        send may wait for its receive. Otherwise each op is posted on its own, in order.

        Returns:
            the works of the sends posted (the bridge also waits for them in :meth:`wait`).
        """
        ops: list[dist.P2POp] = []
        owners: list[Pending | None] = []
        for item in items:
            if isinstance(item, Pending):
                if item.works is not None:
                    continue  # already posted
                item.works = []
                ops += item.ops
                owners += [item] * len(item.ops)
            else:
                ops += item
                owners += [None] * len(item)
        if not ops:
            return []
        works = dist.batch_isend_irecv(ops) if batch else [op.op(op.tensor, op.peer, op.group, op.tag) for op in ops]
        sent = []
        for op, work, owner in zip(ops, works, owners):
            assert work is not None  # None only on a rank outside the group: the bridge uses the default group
            if owner is None:
                self._sends.append((work, op.tensor))
                sent.append(work)
            else:
                owner.works.append(work)  # type: ignore[union-attr]
        return sent

    # -- transfers ---------------------------------------------------------------------------------------
    def forward_sends(
        self,
        mb: int,
        src_dp: int,
        embeds: torch.Tensor,
        images_per_sample: torch.Tensor,
        row_cp: torch.Tensor | None = None,
    ) -> list[dist.P2POp]:
        """Encoder side: the sends of this rank's image-token rows of microbatch ``mb`` (``[n, H]``) along its routes
        (to :meth:`post`); each language CP rank gets only the rows of its sequence shard (``row_cp``, see
        :func:`image_row_cp_ranks`). Rows for this very rank are handed over at once."""
        off = self._row_offsets(images_per_sample)
        owners = self._owners(row_cp, off)
        lo, hi = dp_sample_range(self.mb_size, src_dp, self.src.dp)
        self._check_rows(mb, embeds, off[hi] - off[lo])
        ops: list[dist.P2POp] = []
        if self.rank != self.src_sender[src_dp]:  # a tensor-parallel peer of the sender: same rows, sent once
            return ops
        for r in self.routes:
            if r.src_dp != src_dp:
                continue
            piece, own = embeds[off[r.start] - off[lo] : off[r.end] - off[lo]], owners[off[r.start] : off[r.end]]
            for c in range(self.dst.cp):
                self._send(piece[own == c], self.dst_receivers[r.dst_dp][c], self.tag(mb, _FWD), (_FWD, mb, r, c), ops)
        return ops

    def forward_recvs(
        self,
        mb: int,
        dst_dp: int,
        images_per_sample: torch.Tensor,
        cp_rank: int = 0,
        row_cp: torch.Tensor | None = None,
    ) -> Pending:
        """Language side: the receive of the image-token rows ``[n, H]`` of this DP rank's samples of microbatch
        ``mb`` that CP rank ``cp_rank`` needs (all of them when ``cp == 1``), in sample order; :meth:`post` it,
        then :meth:`Pending.result`."""
        off = self._row_offsets(images_per_sample)
        owners = self._owners(row_cp, off)
        ops: list[dist.P2POp] = []
        out: list[torch.Tensor] = []
        for r in self.routes:
            if r.dst_dp == dst_dp:
                n = int((owners[off[r.start] : off[r.end]] == cp_rank).sum())
                out.append(self._recv(n, self.src_sender[r.src_dp], self.tag(mb, _FWD), (_FWD, mb, r, cp_rank), ops))

        def assemble() -> torch.Tensor:
            return torch.cat(out) if out else torch.empty(0, self.hidden_size, dtype=self.dtype, device=self.device)

        return Pending(ops, assemble)

    def backward_sends(
        self,
        mb: int,
        dst_dp: int,
        grads: torch.Tensor,
        images_per_sample: torch.Tensor,
        cp_rank: int = 0,
        row_cp: torch.Tensor | None = None,
    ) -> list[dist.P2POp]:
        """Language side: the sends of ``d loss / d rows`` (``[n, H]``, the rows :meth:`forward_recvs` gave) back."""
        off = self._row_offsets(images_per_sample)
        owners = self._owners(row_cp, off)
        lo, hi = dp_sample_range(self.mb_size, dst_dp, self.dst.dp)
        self._check_rows(mb, grads, int((owners[off[lo] : off[hi]] == cp_rank).sum()))
        ops: list[dist.P2POp] = []
        if self.rank != self.dst_sender[dst_dp][cp_rank]:  # a tensor-parallel peer: same gradient, sent once
            return ops
        start = 0
        for r in self.routes:
            if r.dst_dp != dst_dp:
                continue
            n = int((owners[off[r.start] : off[r.end]] == cp_rank).sum())
            key = (_BWD, mb, r, cp_rank)
            self._send(grads[start : start + n], self.src_receivers[r.src_dp], self.tag(mb, _BWD), key, ops)
            start += n
        return ops

    def backward_recvs(
        self, mb: int, src_dp: int, images_per_sample: torch.Tensor, row_cp: torch.Tensor | None = None
    ) -> Pending:
        """Encoder side: the receive of ``d loss / d rows`` for the rows this rank sent for microbatch ``mb``
        (``[n, H]``); each row's gradient comes from the CP rank that used it."""
        off = self._row_offsets(images_per_sample)
        owners = self._owners(row_cp, off)
        lo, hi = dp_sample_range(self.mb_size, src_dp, self.src.dp)
        ops: list[dist.P2POp] = []
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        for r in self.routes:
            if r.src_dp != src_dp:
                continue
            own = owners[off[r.start] : off[r.end]]
            for c in range(self.dst.cp):
                rows = torch.nonzero(own == c).flatten() + (off[r.start] - off[lo])
                buf = self._recv(len(rows), self.dst_sender[r.dst_dp][c], self.tag(mb, _BWD), (_BWD, mb, r, c), ops)
                parts.append((rows.to(self.device), buf))

        def assemble() -> torch.Tensor:
            out = torch.zeros(off[hi] - off[lo], self.hidden_size, dtype=self.dtype, device=self.device)
            for rows, buf in parts:
                out[rows] = buf
            return out

        return Pending(ops, assemble)

    # -- one-call forms (each op posted on its own) ---------------------------------------------------
    def send_forward(self, mb, src_dp, embeds, images_per_sample, row_cp=None) -> None:
        """:meth:`forward_sends`, posted."""
        self.post(self.forward_sends(mb, src_dp, embeds, images_per_sample, row_cp))

    def recv_forward(self, mb, dst_dp, images_per_sample, cp_rank=0, row_cp=None) -> torch.Tensor:
        """:meth:`forward_recvs`, posted and waited for."""
        pending = self.forward_recvs(mb, dst_dp, images_per_sample, cp_rank, row_cp)
        self.post(pending)
        return pending.result()

    def send_backward(self, mb, dst_dp, grads, images_per_sample, cp_rank=0, row_cp=None) -> None:
        """:meth:`backward_sends`, posted."""
        self.post(self.backward_sends(mb, dst_dp, grads, images_per_sample, cp_rank, row_cp))

    def recv_backward(self, mb, src_dp, images_per_sample, row_cp=None) -> torch.Tensor:
        """:meth:`backward_recvs`, posted and waited for."""
        pending = self.backward_recvs(mb, src_dp, images_per_sample, row_cp)
        self.post(pending)
        return pending.result()

    def wait_sends(self, works: list[dist.Work]) -> None:
        """Wait for these sends (from :meth:`post`) now; :meth:`wait` will not wait for them again (a gloo send
        waited for twice never returns)."""
        for work in works:
            work.wait()
        done = {id(w) for w in works}
        self._sends = [(w, buf) for w, buf in self._sends if id(w) not in done]

    def wait(self) -> None:
        """Wait for every outstanding send; raise if a colocated hand-over was never collected."""
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()
        if self._local:
            leftover = sorted((k[0], k[1]) for k in self._local)
            self._local.clear()
            raise RuntimeError(f"bridge: local hand-overs never received (direction, microbatch): {leftover}")


class Pending:
    """The receives of one bridge transfer: ``ops`` to :meth:`Bridge.post`, then :meth:`result` waits for them and
    assembles the rows (``[n, H]``, dtype and device of the bridge)."""

    def __init__(self, ops: list[dist.P2POp], assemble):
        self.ops = ops
        self.works: list[dist.Work] | None = None if ops else []
        self._assemble = assemble

    def result(self) -> torch.Tensor:
        """Wait for the receives and return the rows.

        Raises:
            RuntimeError: the receives were never posted.
        """
        if self.works is None:
            raise RuntimeError("bridge: a receive was waited for before Bridge.post posted it")
        for w in self.works:
            w.wait()
        return self._assemble()
