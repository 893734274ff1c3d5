"""Cost model of one module on one layout: compute and communication seconds of a microbatch, from FLOPs and bytes.

For a module laid out as ``(pp, dp_replicate, dp_shard, cp, tp, ep, etp)`` and a microbatch of ``b`` samples per
data-parallel rank, :meth:`CostModel.module_costs` gives, for one rank of the module's busiest pipeline stage:

- **compute**: the microbatch's training FLOPs (:mod:`mimo_titan.train.flops`: ``2N`` per token forward, ``4N``
  backward, plus the attention core) on that stage, divided over ``tp · cp``, at ``peak · efficiency`` FLOP/s.
  ``efficiency`` is the device's planning MFU (:mod:`~mimo_titan.planning.devices`), or the FLOP/s a profiler run
  measured for this module (:mod:`mimo_titan.planning.profile`), lowered for small matmuls: by ``t / (t + 128)``
  for ``t`` rows and ``w / (w + 256)`` for a matmul width ``w = hidden / tp`` (relative to the profiled shape), a
  planning heuristic for the GEMM efficiency curve. The language model's last stage adds the LM head, an encoder's
  last stage its projector. Activation checkpointing adds the recomputed forward to the backward (full: the
  whole forward of the blocks; selective: 10 %).
- **tensor parallelism** with sequence parallelism: per block and direction two all-gathers and two
  reduce-scatters of the ``[tokens, hidden]`` activation, ``(tp - 1) / tp`` of it per rank each (Korthikanti et al.
  2022, §4.2.2), not overlapped.
- **context parallelism**: a ring over ``cp`` ranks passes every rank's K and V ``cp - 1`` times per block (and
  dK, dV back in backward), overlapped with the attention core: only what exceeds the attention's compute counts
  (Liu et al., "Ring Attention", 2023).
- **expert parallelism**: per MoE block and direction an all-to-all dispatch and combine of ``tokens · top_k``
  rows of width ``hidden``, ``(ep - 1) / ep`` of them leaving the rank (Lepikhin et al., "GShard", 2020).
- **FSDP**: the stage's parameters are all-gathered (compute dtype) once per microbatch and direction when they are
  resharded after forward (``pp > 1``), once per step otherwise; prefetching overlaps the gathers with compute,
  so a direction takes ``max(compute + TP + CP + EP, gather)``. Gradients are reduce-scattered once per step
  (gradient sync on the last microbatch, as the schedules run it) in ``mixed_precision_reduce``; all but the
  last block's share hides behind the last backward. ``dp_replicate`` adds an all-reduce of the shard across
  replicas. AdamW's step streams 32 bytes per held trainable parameter through HBM.
- **pipeline transfers**: one microbatch's boundary activation ``[tokens / (cp · tp), hidden]`` per rank.

A collective's bandwidth is the node-local one (NVLink) when each of the module's groups of it sits in one node of
``devices_per_node`` consecutive ranks, the network's when any group spans two (the slowest group sets the pace;
:func:`groups_cross_nodes`); each costs ``latency_s`` more. Ring collectives move ``(n - 1) / n`` of the data per
rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mimo_titan.pipeline.stages import stage_layer_range
from mimo_titan.planning.devices import DeviceSpec
from mimo_titan.train import flops as F

if TYPE_CHECKING:
    from mimo_titan.config import Config

__all__ = ["CostModel", "Degrees", "StageCosts", "group_crosses_nodes", "groups_cross_nodes"]

_ROWS_HALF = 128  # rows at which a matmul reaches half its large-size efficiency (planning heuristic)
_WIDTH_HALF = 256  # matmul width (hidden / tp) at which it reaches half (planning heuristic)
_AC_RECOMPUTE = {"none": 0.0, "selective": 0.1, "full": 1.0}


@dataclass(frozen=True)
class Degrees:
    """A module's placement and parallel degrees (the fields of ``[parallelism.<module>]``)."""

    rank_offset: int
    num_ranks: int
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1
    etp: int = 1

    @property
    def dp(self) -> int:
        """Data-parallel ranks: ``dp_replicate · dp_shard``."""
        return self.dp_replicate * self.dp_shard

    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage."""
        return self.num_ranks // self.pp

    def text(self) -> str:
        """``"pp=2 dp_shard=12 tp=2"``: the degrees above 1 (as the dry-run planner writes a layout)."""
        from mimo_titan.train.planner import _layout_text

        return _layout_text(self)


@dataclass(frozen=True)
class StageCosts:
    """One microbatch on one rank of a module's busiest pipeline stage, seconds.

    Attributes:
        forward_s / backward_s: compute and the communication that does not overlap it (a rank with ``v`` virtual
            stages: all its chunks together).
        send_s: one microbatch's boundary activation to the next stage (its gradient back costs the same).
        dp_sync_s: per step: the gradient reduction that does not hide behind the last backward, plus the
            optimizer step.
        flops: training FLOPs of one microbatch on that rank.
    """

    forward_s: float
    backward_s: float
    send_s: float
    dp_sync_s: float
    flops: float


def group_crosses_nodes(first_rank: int, size: int, stride: int, per_node: int) -> bool:
    """Whether ``size`` ranks ``first_rank, first_rank + stride, ...`` span more than one node of ``per_node``."""
    if size <= 1:
        return False
    last = first_rank + (size - 1) * stride
    return first_rank // per_node != last // per_node


def groups_cross_nodes(rank_offset: int, num_ranks: int, size: int, stride: int, per_node: int) -> bool:
    """Whether any group of ``size`` ranks at ``stride`` of a module on ranks ``[rank_offset, rank_offset +
    num_ranks)`` spans more than one node of ``per_node`` consecutive ranks.

    The groups of one mesh dimension tile the module's ranks in blocks of ``size · stride`` from ``rank_offset`` (the
    row-major mesh ``(pp, dp_replicate, dp_shard, cp, tp)``, or ``(pp, edp, ep, etp)`` for experts), and every node
    boundary that falls strictly inside a block splits one of that block's groups; so a module whose
    ``rank_offset`` is not aligned to the blocks has crossing groups even where its first group does not cross.
    """
    if size <= 1:
        return False
    block = size * stride
    first_boundary = (rank_offset // per_node + 1) * per_node
    return any((b - rank_offset) % block for b in range(first_boundary, rank_offset + num_ranks, per_node))


class CostModel:
    """Per-module microbatch costs of a config on a device type.

    Args:
        cfg: the loaded config (models, dtypes, ``training.seq_len``, ``data.max_images_per_sample``).
        device: the :class:`~mimo_titan.planning.devices.DeviceSpec` planned for.
        measured: the dict :func:`mimo_titan.planning.profile.load_costs` returns, or ``None`` for the device's
            planning MFU.
        ranks_per_node: ranks that share one node (on ``cpu`` they share its cores:
            :meth:`~mimo_titan.planning.devices.DeviceSpec.compute_share`).

    Raises:
        ConfigError: from the FLOPs model for an encoder type it does not know.
    """

    def __init__(self, cfg: Config, device: DeviceSpec, *, measured: dict | None = None, ranks_per_node: int = 1):
        from mimo_titan.parallel.fsdp import resolve_dtype

        self.cfg, self.device = cfg, device
        self.share = device.compute_share(ranks_per_node)
        dev_type = "cpu" if device.name == "cpu" else "cuda"
        self.act_bytes = resolve_dtype(cfg.parallelism.mixed_precision_param, dev_type).itemsize
        self.reduce_bytes = resolve_dtype(cfg.parallelism.mixed_precision_reduce, dev_type).itemsize
        # the rows' tokens; the padding a layout's CP / SP split adds (under 2·cp·tp tokens, trainer.padded_seq_len)
        # is not priced: it depends on the layout, and the config's own layout is not the one priced
        self.seq_len = cfg.training.seq_len
        self.lang = cfg.model.language_name
        self.modes = F.part_modes(cfg)
        self._flops: dict[str, tuple[float, float, float, float, float]] = {}
        self.efficiency: dict[str, float] = {}
        self._ref_shape: dict[str, tuple[float, float]] = {}
        for name in [*cfg.model.encoders, self.lang]:
            self._flops[name] = self._module_flops(name)
            self.efficiency[name] = device.mfu
        if measured is not None:
            self._calibrate(measured)

    # ---- FLOPs -----------------------------------------------------------------------------------------------
    def _module_flops(self, name: str) -> tuple[float, float, float, float, float]:
        """Per sample: ``(forward of the blocks, training total of the blocks, forward of the head / projector,
        training total of it, attention-core forward of the blocks)``."""
        cfg, section = self.cfg, getattr(self.cfg.model, name)
        if name == self.lang:
            mode = self.modes[name]["model"]
            seq = self.seq_len
            head = section.vocab_size * section.hidden_size
            tot = F.lm_flops_per_token(section, seq, mode) * seq
            fwd = F.lm_flops_per_token(section, seq, F.FORWARD) * seq
            head_tot = F.MATMUL_FLOPS_PER_PARAM[mode] * head * seq
            head_fwd = 2.0 * head * seq
            attn = F.ATTENTION_FLOPS_FACTOR[F.FORWARD] * F.lm_params(section).attention_width * seq * seq
            return fwd - head_fwd, tot - head_tot, head_fwd, head_tot, attn
        m = self.modes[name]
        lm_h = cfg.model.language.hidden_size
        items = cfg.data.max_images_per_sample if section.type == "vit" else 1
        if section.type == "vit":
            p = F.vit_params(section, lm_h)
            rows = (section.image_size // section.patch_size) ** 2

            def per_item(tower: str, proj: str) -> float:
                return F.vit_flops_per_image(section, lm_h, tower, proj)

            attn = F.ATTENTION_FLOPS_FACTOR[F.FORWARD] * p.attention_width * rows * rows
        elif section.type == "audio":
            p = F.audio_params(section, lm_h)
            frames = 2 * section.max_source_positions
            rows = (frames + 1) // 2

            def per_item(tower: str, proj: str) -> float:
                return F.audio_flops_per_clip(section, lm_h, frames, tower, proj)

            attn = F.ATTENTION_FLOPS_FACTOR[F.FORWARD] * p.attention_width * rows * rows
        else:
            raise ValueError(f"model.{name}.type={section.type!r}: the cost model has no FLOPs model for it")
        tot = per_item(m["tower"], m["projector"]) * items
        fwd = per_item(F.FORWARD, F.FORWARD) * items
        proj_rows = rows if section.type == "vit" else math.ceil(rows / section.pool)
        proj_tot = F.MATMUL_FLOPS_PER_PARAM[m["projector"]] * p.projector * proj_rows * items
        proj_fwd = 2.0 * p.projector * proj_rows * items
        return fwd - proj_fwd, tot - proj_tot, proj_fwd, proj_tot, attn * items

    def train_flops_per_sample(self, name: str) -> float:
        """Training FLOPs of one sample through module ``name`` (blocks and head / projector)."""
        _, tot, _, head_tot, _ = self._flops[name]
        return tot + head_tot

    def tokens_per_sample(self, name: str) -> int:
        """Rows one sample gives module ``name``: the LM's sequence, or an encoder's patches / frames per sample."""
        if name == self.lang:
            return self.seq_len
        section = getattr(self.cfg.model, name)
        if section.type == "vit":
            return (section.image_size // section.patch_size) ** 2 * self.cfg.data.max_images_per_sample
        return section.max_source_positions

    def lm_tokens_per_sample(self, name: str) -> int:
        """Rows encoder ``name`` emits into the language model per sample (what crosses the bridge)."""
        section = getattr(self.cfg.model, name)
        if section.type == "vit":
            return (section.image_size // section.patch_size) ** 2 * self.cfg.data.max_images_per_sample
        return math.ceil(section.max_source_positions / section.pool)

    # ---- calibration ----------------------------------------------------------------------------------------------
    def _calibrate(self, measured: dict) -> None:
        """Replace each profiled module's efficiency by its measured FLOP/s over the device's peak (the largest
        microbatch profiled)."""
        for name, entry in measured.get("modules", {}).items():
            if name not in self._flops or not entry.get("points"):
                continue
            point = max(entry["points"], key=lambda q: q["samples"])
            seconds = point["forward_s"] + point["backward_s"]
            if seconds <= 0:
                continue
            self.efficiency[name] = point["train_flops"] / seconds / self.device.peak_flops
            # the rows the point multiplied: the LM's rows as profiled (profile_modules --seq-len may differ from
            # training.seq_len); an encoder's shapes are pinned by its fingerprint
            per_sample = entry.get("seq_len", self.seq_len) if name == self.lang else self.tokens_per_sample(name)
            rows = point["samples"] * per_sample
            self._ref_shape[name] = (rows, getattr(self.cfg.model, name).hidden_size)

    def _size_factor(self, name: str, rows: float, width: float) -> float:
        def g(t: float, w: float) -> float:
            return t / (t + _ROWS_HALF) * w / (w + _WIDTH_HALF)

        ref = self._ref_shape.get(name)
        return g(rows, width) / (g(*ref) if ref else 1.0)

    # ---- one module -------------------------------------------------------------------------------------------------
    def module_costs(
        self,
        name: str,
        deg: Degrees,
        *,
        samples: float,
        virtual_stages: int = 1,
        activation_checkpointing: str = "none",
    ) -> StageCosts:
        """Costs of one microbatch of ``samples`` samples (per DP rank) of module ``name`` laid out as ``deg``.

        Returns:
            The :class:`StageCosts` of one rank of its busiest pp rank.
        """
        dev, cfg = self.device, self.cfg
        section = getattr(cfg.model, name)
        is_lm = name == self.lang
        blk_fwd, blk_tot, head_fwd, head_tot, attn_fwd = (x * samples for x in self._flops[name])
        layers = section.num_layers
        stages = deg.pp * virtual_stages
        # the busiest pp rank: its layers (over its chunks) and the head / projector on the last global stage
        worst = (-1.0, 0, False, False)
        for r in range(deg.pp):
            chunks = [r + j * deg.pp for j in range(virtual_stages)]
            n = sum(len(stage_layer_range(layers, stages, s)) for s in chunks)
            head = stages - 1 in chunks
            load = n * blk_tot / layers + head * head_tot
            if load > worst[0]:
                worst = (load, n, head, 0 in chunks)
        _, worst_layers, worst_head, worst_first = worst
        share = worst_layers / layers
        split = deg.tp * deg.cp
        f_fwd = (blk_fwd * share + head_fwd * worst_head) / split
        f_tot = (blk_tot * share + head_tot * worst_head) / split
        f_bwd = f_tot - f_fwd
        recompute = _AC_RECOMPUTE.get(activation_checkpointing, 0.0) * blk_fwd * share / split
        rows_full = samples * self.tokens_per_sample(name) / deg.cp  # rows of this rank's CP shard
        hidden = section.hidden_size
        speed = (
            dev.peak_flops * self.efficiency[name] * self.share * self._size_factor(name, rows_full, hidden / deg.tp)
        )
        comp_f = f_fwd / speed
        comp_b = (f_bwd + recompute) / speed

        first, n_ranks = deg.rank_offset, deg.num_ranks
        per_node = dev.devices_per_node
        lat = dev.latency_s
        ab = self.act_bytes
        # tensor parallelism (sequence parallel): 2 all-gathers + 2 reduce-scatters per block and direction
        tp_s = 0.0
        if deg.tp > 1:
            bw = dev.bandwidth(inter_node=groups_cross_nodes(first, n_ranks, deg.tp, 1, per_node))
            one = (deg.tp - 1) / deg.tp * rows_full * hidden * ab / bw + lat
            tp_s = 4 * one * worst_layers
        # context parallelism: K, V around the ring, overlapped with the attention core
        cp_f = cp_b = 0.0
        if deg.cp > 1 and is_lm:
            hd = section.head_dim or section.hidden_size // section.num_heads
            kv = 2 * section.num_kv_heads * hd / deg.tp
            bw = dev.bandwidth(inter_node=groups_cross_nodes(first, n_ranks, deg.cp, deg.tp, per_node))
            ring = (deg.cp - 1) * (rows_full * kv * ab / bw + lat) * worst_layers
            attn = attn_fwd * share / split / speed
            cp_f = max(0.0, ring - attn)
            cp_b = max(0.0, 2 * ring - 2 * attn)
        # expert parallelism: dispatch + combine all-to-all per MoE block and direction
        ep_s = 0.0
        moe = getattr(section, "moe", None)
        if moe is not None and moe.num_experts > 0 and deg.ep > 1:
            moe_layers = sum(moe.is_moe_layer(i) for i in range(layers)) * share
            bw = dev.bandwidth(inter_node=groups_cross_nodes(first, n_ranks, deg.ep, deg.etp, per_node))
            ep_s = 2 * moe_layers * ((deg.ep - 1) / deg.ep * rows_full / deg.tp * moe.top_k * hidden * ab / bw + lat)
        # FSDP: gathers (overlapped by prefetch) and the step's gradient reduction
        params = self._stage_params(name, deg, worst_layers, head=worst_head, first=worst_first)
        shard = deg.dp_shard * deg.cp
        bw_shard = dev.bandwidth(inter_node=groups_cross_nodes(first, n_ranks, shard, deg.tp, per_node))
        gather = (shard - 1) / shard * params / deg.tp * ab / bw_shard + lat * max(1, worst_layers) if shard > 1 else 0
        reshard = deg.pp > 1
        fwd = max(comp_f + tp_s + cp_f + ep_s, gather if reshard else 0.0)
        bwd = max(comp_b + tp_s + cp_b + ep_s, gather if reshard else 0.0)
        trainable = self.modes[name]["model" if is_lm else "tower"] == F.TRAIN or (
            not is_lm and self.modes[name]["projector"] == F.TRAIN
        )
        sync = 0.0
        if trainable:
            held = params / deg.tp / shard
            if shard > 1:
                rs = (shard - 1) / shard * params / deg.tp * self.reduce_bytes / bw_shard
                sync += rs / max(1, worst_layers) + lat
            if deg.dp_replicate > 1:
                crosses = groups_cross_nodes(first, n_ranks, deg.dp_replicate, shard * deg.tp, per_node)
                bw_rep = dev.bandwidth(inter_node=crosses)
                sync += 2 * (deg.dp_replicate - 1) / deg.dp_replicate * held * self.reduce_bytes / bw_rep + lat
            sync += 32 * held / dev.hbm_bytes_per_s
            if not reshard and shard > 1:
                sync += gather  # the first forward's gather of a step: nothing to hide behind yet
        # stage-to-stage transfer of the boundary activation (rank r to rank r + stage_size): the slowest hop
        send = 0.0
        if deg.pp > 1 or virtual_stages > 1:
            bw = dev.bandwidth(inter_node=groups_cross_nodes(first, n_ranks, deg.pp, deg.stage_size, per_node))
            send = rows_full / deg.tp * hidden * ab / bw + lat
        return StageCosts(fwd, bwd, send, sync, f_tot)

    def _stage_params(self, name: str, deg: Degrees, layers: int, *, head: bool, first: bool) -> float:
        """Parameters of a pp rank holding ``layers`` blocks (routed experts: its ``ep · etp`` slice), the
        embedding / patch embedding when it holds the ``first`` stage, the LM head / projector with the ``head``."""
        section = getattr(self.cfg.model, name)
        if name == self.lang:
            p = F.lm_params(section)
            embed = section.vocab_size * section.hidden_size
            tied = section.tie_word_embeddings
            body = p.total - embed * (1 if tied else 2)
            moe = section.moe
            if moe.num_experts > 0 and deg.ep * deg.etp > 1:
                routed = 3 * section.hidden_size * moe.intermediate_size * moe.num_experts
                moe_layers = sum(moe.is_moe_layer(i) for i in range(section.num_layers))
                body -= routed * moe_layers * (1 - 1 / (deg.ep * deg.etp))
            ends = embed * (first + head) if not (tied and first and head) else embed
            return body / section.num_layers * layers + ends
        p = F.module_params(self.cfg, name)
        return (p.total - p.projector) / section.num_layers * layers + p.projector * head

    def bridge_s(self, encoder: str, enc: Degrees, lm: Degrees, *, samples_per_microbatch: int) -> float:
        """One microbatch's embeddings from encoder ``encoder``'s ranks to the language model's first stage.

        Every LM data-parallel rank receives its samples' rows ``[rows, H]`` in the compute dtype; every encoder
        data-parallel rank sends its own samples' rows (fan-in / fan-out); the slower side sets the time.
        Colocated modules exchange inside their ranks' nodes; otherwise the network carries it unless the encoder's
        last stage and the LM's first stage sit in one node.
        """
        h = self.cfg.model.language.hidden_size
        per_sample = self.lm_tokens_per_sample(encoder) * h * self.act_bytes
        recv = samples_per_microbatch / lm.dp * per_sample
        send = samples_per_microbatch / enc.dp * per_sample
        colocated = enc.rank_offset == lm.rank_offset
        per_node = self.device.devices_per_node
        senders = (enc.rank_offset + (enc.pp - 1) * enc.stage_size, enc.rank_offset + enc.num_ranks - 1)
        receivers = (lm.rank_offset, lm.rank_offset + lm.stage_size - 1)
        inter = not colocated and min(*senders, *receivers) // per_node != max(*senders, *receivers) // per_node
        return max(recv, send) / self.device.bandwidth(inter_node=inter) + self.device.latency_s
