"""Bridge: move projected image embeddings from encoder DP ranks to language-model DP ranks, and grads back.

Every rank draws the same global batch, so both sides know, for every sample of every microbatch, how many
image tokens it has. Each microbatch of ``mb_size`` samples is cut into contiguous DP ranges on each side
(``dp_sample_range``); a *route* is the non-empty intersection of an encoder DP range and a language DP range.
Along a route the encoder sends the image-token rows of exactly those samples; the language rank
concatenates its routes in sample order. Gradients travel the same routes backwards, so each encoder rank gets
``d loss / d embeds`` for exactly its own rows. This handles fan-in (encoder DP > LM DP), fan-out (encoder
DP < LM DP), equal DP and ratios that do not divide (2 → 3), and any number of image tokens per sample (zero
included): a route whose samples have no image token sends nothing, and both sides know it. With context
parallelism on the language side, every CP rank of the destination DP index receives the route's rows (each
keeps what its zigzag shard needs) and their gradients are summed on the way back. With tensor parallelism, one
tp rank sends what all its tp peers hold identically, and every tp rank of the receiving side receives it.

Ordering: every pair of ranks posts its sends and receives in the same order on both sides (microbatch
ascending, then route start, all forwards before any backward), so NCCL, which ignores tags, pairs them too.

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

__all__ = ["Route", "plan_routes", "module_rank", "Bridge"]

_FWD, _BWD = 0, 1


@dataclass(frozen=True)
class Route:
    """Samples ``[start, end)`` of every microbatch go from encoder DP rank ``src_dp`` to language DP rank ``dst_dp``."""

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


class Bridge:
    """Point-to-point transfer of image-token embeddings between two modules' meshes.

    Args:
        src_layout: the encoder module's ``ModuleLayout`` (pp must be 1).
        dst_layout: the language module's ``ModuleLayout``; its first pipeline stage receives.
        mb_size: samples per global microbatch.
        tokens_per_image: image tokens each image contributes (P).
        hidden_size: H, the width of what crosses.
        dtype: dtype of what crosses (the encoder's compute dtype).
        device: device of the buffers (cuda for NCCL, cpu for gloo).
        rank: this process's global rank.

    All tensors are ``[n_tokens, H]`` in sample order; ``images_per_sample`` is the ``[mb_size]`` int64 count
    of images of every sample of the *global* microbatch. Sends are asynchronous; call :meth:`wait` once the
    step no longer needs them.

    With tensor parallelism on either side the rows travel once per (sender, receiver) pair: encoder tp rank 0
    sends to every (cp, tp) rank of the language DP index; language tp rank 0 of each cp rank sends the
    gradient back to every encoder tp rank, which sums the cp parts.

    Raises:
        ValueError: if the encoder has pp > 1 or cp > 1.
    """

    def __init__(self, src_layout, dst_layout, mb_size: int, tokens_per_image: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device, rank: int):
        if src_layout.pp != 1:
            raise ValueError(
                f"parallelism.{src_layout.name}.pp={src_layout.pp}: encoder modules run as a single pipeline stage "
                "ahead of the language model; set pp = 1 and use dp_shard instead"
            )
        if src_layout.cp != 1:
            raise ValueError(f"parallelism.{src_layout.name}.cp={src_layout.cp}: the bridge supports context "
                             "parallelism on the language side only; set cp = 1 for encoders")
        self.src, self.dst = src_layout, dst_layout
        self.mb_size, self.tokens_per_image, self.hidden_size = mb_size, tokens_per_image, hidden_size
        self.dtype, self.device, self.rank = dtype, device, rank
        self.routes = plan_routes(mb_size, src_layout.dp, dst_layout.dp)
        src, dst = src_layout, dst_layout
        # forward: encoder tp rank 0 sends (its tp peers hold the same rows); every (cp, tp) rank of the language DP
        # index receives (each keeps what its zigzag shard needs). Backward: language tp rank 0 of every cp rank
        # sends (its tp peers hold the same gradient; cp ranks hold disjoint parts, summed by the receiver), and
        # every encoder tp rank receives (each runs the same backward).
        self.src_senders = [[module_rank(src, 0, d)] for d in range(src.dp)]
        self.src_receivers = [[module_rank(src, 0, d, 0, t) for t in range(src.tp)] for d in range(src.dp)]
        self.dst_senders = [[module_rank(dst, 0, d, c) for c in range(dst.cp)] for d in range(dst.dp)]
        self.dst_receivers = [[module_rank(dst, 0, d, c, t) for c in range(dst.cp) for t in range(dst.tp)]
                              for d in range(dst.dp)]
        self._local: dict[tuple[int, int, Route], torch.Tensor] = {}
        self._sends: list[tuple[dist.Work, torch.Tensor]] = []

    # -- helpers ---------------------------------------------------------------------------------------
    def _row_offsets(self, images_per_sample: torch.Tensor, start: int, end: int) -> list[int]:
        """Row offset of each sample boundary in ``[start, end]`` relative to sample ``start``."""
        return [0, *torch.cumsum(images_per_sample[start:end] * self.tokens_per_image, 0).tolist()]

    def _send(self, rows: torch.Tensor, peers: list[int], tag: int, key) -> None:
        """Send ``rows`` to every rank in ``peers``."""
        if rows.shape[0] == 0:
            return
        buf = rows.detach().to(self.dtype).contiguous()
        for peer in peers:
            if peer == self.rank:
                self._local[(*key, peer)] = buf
            else:
                self._sends.append((dist.isend(buf, dst=peer, tag=tag), buf))

    def _recv_all(self, pieces: list[tuple[int, list[int], object]], tag: int) -> torch.Tensor:
        """Receive each (n_rows, peers, key) piece from every rank in ``peers`` and sum over them; return the
        pieces concatenated in order as ``[sum n_rows, H]``."""
        out, works = [], []
        for n, peers, key in pieces:
            if n == 0:
                continue
            bufs = []
            for peer in peers:
                if peer == self.rank:
                    bufs.append(self._local.pop((*key, self.rank)).to(self.dtype))
                    continue
                buf = torch.empty(n, self.hidden_size, dtype=self.dtype, device=self.device)
                works.append(dist.irecv(buf, src=peer, tag=tag))
                bufs.append(buf)
            out.append(bufs)
        for w in works:
            w.wait()
        if not out:
            return torch.empty(0, self.hidden_size, dtype=self.dtype, device=self.device)
        return torch.cat([bufs[0] if len(bufs) == 1 else torch.stack(bufs).sum(0) for bufs in out])

    def _send_rows(self, mb: int, direction: int, my_dp: int, rows: torch.Tensor, images_per_sample: torch.Tensor,
                   side_size: int, mine_of, peer_of, senders: list[int]) -> None:
        lo, hi = dp_sample_range(self.mb_size, my_dp, side_size)
        offsets = self._row_offsets(images_per_sample, lo, hi)
        if rows.shape[0] != offsets[-1]:
            raise ValueError(f"bridge: microbatch {mb} has {offsets[-1]} image-token rows on this rank, got {rows.shape[0]}")
        if self.rank not in senders:  # a tensor-parallel peer of the sending rank: same rows, sent once
            return
        for r in self.routes:
            if mine_of(r) == my_dp:
                piece = rows[offsets[r.start - lo]: offsets[r.end - lo]]
                self._send(piece, peer_of(r), 2 * mb + direction, (direction, mb, r))

    def _recv_rows(self, mb: int, direction: int, my_dp: int, images_per_sample: torch.Tensor, mine_of, peer_of) -> torch.Tensor:
        pieces = []
        for r in self.routes:
            if mine_of(r) == my_dp:
                n = self._row_offsets(images_per_sample, r.start, r.end)[-1]
                pieces.append((n, peer_of(r), (direction, mb, r)))
        return self._recv_all(pieces, 2 * mb + direction)

    # -- public API ------------------------------------------------------------------------------------
    def send_forward(self, mb: int, src_dp: int, embeds: torch.Tensor, images_per_sample: torch.Tensor) -> None:
        """Encoder side: send this rank's image-token rows of microbatch ``mb`` (``[n, H]``) along its routes."""
        self._send_rows(mb, _FWD, src_dp, embeds, images_per_sample, self.src.dp,
                        lambda r: r.src_dp, lambda r: self.dst_receivers[r.dst_dp], self.src_senders[src_dp])

    def recv_forward(self, mb: int, dst_dp: int, images_per_sample: torch.Tensor) -> torch.Tensor:
        """Language side: image-token rows ``[n, H]`` of this DP rank's samples of microbatch ``mb``, in sample order."""
        return self._recv_rows(mb, _FWD, dst_dp, images_per_sample, lambda r: r.dst_dp,
                               lambda r: self.src_senders[r.src_dp])

    def send_backward(self, mb: int, dst_dp: int, grads: torch.Tensor, images_per_sample: torch.Tensor) -> None:
        """Language side: send ``d loss / d rows`` (``[n, H]``, same layout as :meth:`recv_forward`) back."""
        self._send_rows(mb, _BWD, dst_dp, grads, images_per_sample, self.dst.dp,
                        lambda r: r.dst_dp, lambda r: self.src_receivers[r.src_dp], self.dst_senders[dst_dp])

    def recv_backward(self, mb: int, src_dp: int, images_per_sample: torch.Tensor) -> torch.Tensor:
        """Encoder side: ``d loss / d rows`` for the rows this rank sent for microbatch ``mb``."""
        return self._recv_rows(mb, _BWD, src_dp, images_per_sample, lambda r: r.src_dp,
                               lambda r: self.dst_senders[r.dst_dp])

    def wait(self) -> None:
        """Wait for every outstanding send; raise if a colocated hand-over was never collected."""
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()
        if self._local:
            leftover = sorted((k[0], k[1]) for k in self._local)
            self._local.clear()
            raise RuntimeError(f"bridge: local hand-overs never received (direction, microbatch): {leftover}")
