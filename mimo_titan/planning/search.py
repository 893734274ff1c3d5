"""Layout search: the heterogeneous layout (rank split, per-module degrees, microbatches, schedule) with the most
tokens per second that fits memory, and the best homogeneous layout beside it.

:func:`search_layouts` enumerates, for a config and a world size:

- **non-colocated** layouts: the encoders on ranks of their own (each on its own range, or all of them sharing
  one), the language model (LM) on the rest; rank splits from a grid of whole nodes around the FLOPs-proportional
  split plus small powers of two;
- **colocated** layouts: every encoder on the LM's ranks with degrees of its own (``colocated_encoders = "batch"``;
  ``"inline"`` with LM ``pp = 1``);

and per module the degrees: the LM's ``pp`` (dividing its ranks and at most its layers), ``tp`` (inside a node,
dividing heads, KV heads, the MLP and the vocabulary; 1 for MoE and for tied embeddings), ``cp`` (the language
model only), ``dp_shard`` or, without tp / cp, ``dp_replicate`` over nodes with ``dp_shard`` inside one, ``ep`` (MoE:
dividing the experts and the stage's ranks); an encoder's ``dp_shard``, ``tp`` (ViT) or ``pp``;
``training.microbatches`` (dividing the global batch so that every module's DP size divides the microbatch);
``pipeline_schedule`` 1F1B or Interleaved1F1B with 2 virtual stages (GPipe runs the same bubble as 1F1B with more
memory: dominated); activation checkpointing ``none`` or ``full`` (full only where ``none`` does not fit).

Each is priced with :class:`~mimo_titan.planning.costs.CostModel` and the dry-run planner's memory model
(:func:`mimo_titan.train.planner.module_memory`), kept when every rank fits the device's memory, and played by
:func:`~mimo_titan.planning.simulator.simulate_step`. Pruning (so that 1,024 ranks take seconds): layouts that
differ only by symmetric choices are generated once; per LM rank count, only the few LM layouts with the best
LM-alone bound ``(M + (pp - 1) / v) (f + b) + sync`` survive (a layout whose LM alone is slower than a kept one's
whole step cannot win), and the encoders are priced once per rank count and microbatch size.

**Homogeneous baselines** (what one layout for every module gives):

- ``"same_layout"``: every encoder colocated on all the LM's ranks with the LM's tensor parallelism, data parallel
  over the rest (Megatron-LM's homogeneous MIMO: one grid for all modules), ``colocated_encoders = "batch"``;
- ``"folded"``: the encoder is part of the LM's first pipeline stage (torchtitan's way): it runs on LM stage 0's
  ranks, each microbatch's images right before that stage's forward (simulated only; mimo_titan does not run it).

``"same_layout"`` is a layout mimo_titan runs (so the searched set contains it: ``speedup >= 1`` against it);
``"folded"`` is priced as the encoder in stage 0 runs there: each LM data-parallel group encodes its own samples'
images, split over its tp ranks (the ViT has a tensor-parallel plan) and repeated on its cp ranks, since every CP
rank needs the whole sequence's embeddings before it takes its shard (Megatron-LM's LLaVA with CP does the same).
Every layout obeys mimo_titan's rule that each module's DP size divides the microbatch's samples.

The best of the two is ``best_homogeneous``; ``speedup`` is the best heterogeneous layout's tokens/s over it.
Tokens per second count the language model's rows: ``global_batch_size · seq_len / step_s``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from mimo_titan.errors import ConfigError
from mimo_titan.planning.costs import CostModel, Degrees, StageCosts
from mimo_titan.planning.devices import DeviceSpec

if TYPE_CHECKING:
    from mimo_titan.config import Config

__all__ = ["Layout", "SearchResult", "layout_overrides", "search_layouts"]

_GIB = float(2**30)
_KEEP_LM = 4  # LM shapes (pp, tp, cp, dp_replicate, ep, schedule) kept per LM rank count after the LM-alone bound
_KEEP_COLOCATED = 64  # LM layouts (shape and microbatches) tried at most under colocated encoders


@dataclass
class Layout:
    """One priced layout.

    Attributes:
        kind: ``"heterogeneous"`` (searched), ``"same_layout"`` or ``"folded"`` (homogeneous baselines).
        modules: per module (encoders first, the LM last): its :class:`~mimo_titan.planning.costs.Degrees`.
        microbatches / pipeline_schedule / virtual_stages / colocated_encoders: the schedule.
        activation_checkpointing: per module, ``"none"`` or ``"full"``.
        step_s: simulated seconds of one optimizer step; tokens_per_s: LM tokens per second.
        mem_per_rank_gib: per module, the estimated peak of its worst rank with everything that rank holds.
        busy_fraction: per worker of the simulated step (see :mod:`~mimo_titan.planning.simulator`).
        stage_s: per module ``(forward_s, backward_s)`` of one microbatch on one rank of its busiest stage.
    """

    kind: str
    modules: dict[str, Degrees]
    microbatches: int
    pipeline_schedule: str
    virtual_stages: int
    colocated_encoders: str
    activation_checkpointing: dict[str, str]
    step_s: float = math.inf
    tokens_per_s: float = 0.0
    mem_per_rank_gib: dict[str, float] = field(default_factory=dict)
    busy_fraction: dict[str, float] = field(default_factory=dict)
    stage_s: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def colocated(self) -> bool:
        """Every encoder on the LM's ranks."""
        lm = list(self.modules.values())[-1]
        return all(d.rank_offset == lm.rank_offset for d in list(self.modules.values())[:-1])

    def describe(self) -> str:
        """One line: ``vision 0-15 [dp_shard=16] | language 16-63 [pp=2 dp_shard=12 tp=2] | M=8 1F1B``."""
        parts = []
        for name, d in self.modules.items():
            ac = " ac=full" if self.activation_checkpointing.get(name) == "full" else ""
            parts.append(f"{name} {d.rank_offset}-{d.rank_offset + d.num_ranks - 1} [{d.text()}{ac}]")
        sched = self.pipeline_schedule + (f" v={self.virtual_stages}" if self.virtual_stages > 1 else "")
        mode = f" {self.colocated_encoders}" if self.colocated else ""
        return " | ".join(parts) + f" | M={self.microbatches} {sched}{mode}"

    def to_json(self) -> dict:
        """``{"kind", "modules": {name: {rank_offset, num_ranks, pp, ...}}, "microbatches", ..., "step_s",
        "tokens_per_s", "mem_per_rank_gib"}`` (``mem_per_rank_gib``: the largest over the modules' ranks)."""
        return {
            "kind": self.kind,
            "modules": {
                n: {**asdict(d), "activation_checkpointing": self.activation_checkpointing.get(n, "none")}
                for n, d in self.modules.items()
            },
            "microbatches": self.microbatches,
            "pipeline_schedule": self.pipeline_schedule,
            "virtual_stages": self.virtual_stages,
            "colocated_encoders": self.colocated_encoders,
            "description": self.describe(),
            "step_s": round(self.step_s, 6),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "mem_per_rank_gib": round(max(self.mem_per_rank_gib.values(), default=0.0), 3),
            "mem_per_module_gib": {n: round(v, 3) for n, v in self.mem_per_rank_gib.items()},
            "busy_fraction": {n: round(v, 3) for n, v in self.busy_fraction.items()},
        }


@dataclass
class SearchResult:
    """What :func:`search_layouts` returns.

    Attributes:
        ranked: the best heterogeneous layouts, fastest first (at most ``top``).
        homogeneous: per baseline kind (``"same_layout"``, ``"folded"``), its best layout, or ``None`` when none
            fits.
        world_size / device: what was planned for; budget_gib: memory a rank may use.
        considered: module layouts priced; simulated: steps simulated; seconds: wall time of the search.
    """

    ranked: list[Layout]
    homogeneous: dict[str, Layout | None]
    world_size: int
    device: str
    budget_gib: float
    considered: int = 0
    simulated: int = 0
    seconds: float = 0.0

    @property
    def best(self) -> Layout:
        """The fastest heterogeneous layout."""
        return self.ranked[0]

    @property
    def best_homogeneous(self) -> Layout | None:
        """The faster of the homogeneous baselines (``None`` when neither fits)."""
        got = [h for h in self.homogeneous.values() if h is not None]
        return max(got, key=lambda h: h.tokens_per_s) if got else None

    @property
    def speedup(self) -> float | None:
        """``best.tokens_per_s / best_homogeneous.tokens_per_s``."""
        h = self.best_homogeneous
        return self.best.tokens_per_s / h.tokens_per_s if h else None

    def to_json(self) -> dict:
        """``{"best": {...}, "best_homogeneous": {...} | null, "speedup": F | null, "top": [...],
        "homogeneous": {kind: {...} | null}, "world_size", "device", "budget_gib", "considered", "simulated",
        "seconds"}``."""
        h = self.best_homogeneous
        return {
            "best": self.best.to_json(),
            "best_homogeneous": h.to_json() if h else None,
            "speedup": round(self.speedup, 4) if self.speedup else None,
            "top": [x.to_json() for x in self.ranked],
            "homogeneous": {k: (v.to_json() if v else None) for k, v in self.homogeneous.items()},
            "world_size": self.world_size,
            "device": self.device,
            "budget_gib": round(self.budget_gib, 2),
            "considered": self.considered,
            "simulated": self.simulated,
            "seconds": round(self.seconds, 2),
        }


def layout_overrides(layout: Layout) -> list[str]:
    """The ``--section.key=value`` overrides that turn a config into ``layout`` (what ``--emit-toml`` writes)."""
    out = []
    for name, d in layout.modules.items():
        out += [f"--parallelism.{name}.{f}={v}" for f, v in asdict(d).items()]
        out.append(f"--parallelism.{name}.activation_checkpointing={layout.activation_checkpointing.get(name, 'none')}")
    out += [
        f"--training.microbatches={layout.microbatches}",
        f"--parallelism.pipeline_schedule={layout.pipeline_schedule}",
        f"--parallelism.virtual_stages={layout.virtual_stages}",
        "--parallelism.module_schedule=1F1B",
        f"--parallelism.colocated_encoders={'inline' if layout.colocated_encoders == 'inline' else 'batch'}",
    ]
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class _Searcher:
    """The state of one search (see :func:`search_layouts`)."""

    def __init__(self, cfg: Config, world: int, device: DeviceSpec, costs: CostModel):
        from mimo_titan.checkpoint.state import meta_model
        from mimo_titan.train.planner import RUNTIME_GIB, ModuleParamTable

        self.cfg, self.world, self.device, self.costs = cfg, world, device, costs
        self.lang = cfg.model.language_name
        self.encoders = list(cfg.model.encoders)
        model = meta_model(cfg.model)
        self.tables = {n: ModuleParamTable.build(cfg, n, model) for n in [*self.encoders, self.lang]}
        self.gbs = cfg.training.global_batch_size
        self.per_node = min(device.devices_per_node, world)
        self.budget = device.memory_budget_gib(self.per_node)
        self.runtime = RUNTIME_GIB["cpu"] if device.name == "cpu" else RUNTIME_GIB["cuda"]
        self.considered = 0
        self.simulated = 0
        self._cost_cache: dict = {}
        self._mem_cache: dict = {}
        self.smallest_need: dict[str, float] = {}  # per module: the least memory any of its layouts needed (GiB)
        # the least memory (GiB) a rank shared by several modules needed, and the module added last to it
        self.smallest_shared: tuple[float, str] = (math.inf, "")

    # ---- per-module pricing --------------------------------------------------------------------------------------
    def module_cost(self, name: str, d: Degrees, samples: float, v: int, ac: str):
        key = (name, d.rank_offset % self.per_node, d.num_ranks, d.pp, d.dp_replicate, d.dp_shard, d.cp, d.tp, d.ep,
               d.etp, samples, v, ac)  # fmt: skip
        got = self._cost_cache.get(key)
        if got is None:
            self.considered += 1
            got = self._cost_cache[key] = self.costs.module_costs(
                name, d, samples=samples, virtual_stages=v, activation_checkpointing=ac
            )
        return got

    def module_mem(self, name: str, d: Degrees, samples: float, v: int, ac: str, in_flight: tuple[int, ...]) -> float:
        """GiB of the module's worst rank (the runtime term not included)."""
        from mimo_titan.topology.layout import ModuleLayout
        from mimo_titan.train.planner import module_memory

        key = (name, d.num_ranks, d.pp, d.dp_replicate, d.dp_shard, d.cp, d.tp, d.ep, d.etp, samples, v, ac, in_flight)
        got = self._mem_cache.get(key)
        if got is None:
            lay = ModuleLayout(
                name, d.rank_offset, d.num_ranks, d.pp, d.dp_replicate, d.dp_shard, d.cp, d.tp, d.ep, d.etp
            )
            opts = self.cfg.parallelism.modules.get(name)
            total, *_ = module_memory(
                self.tables[name],
                lay,
                microbatch_samples=samples,
                seq_len=_padded_seq_len(self.costs.seq_len, d.cp, d.tp),
                virtual_stages=v,
                in_flight=list(in_flight),
                activation_checkpointing=ac,
                reshard_after_forward=getattr(opts, "fsdp_reshard_after_forward", None),
                act_bytes=self.costs.act_bytes,
                reduce_bytes=self.costs.reduce_bytes,
                runtime_gib=0.0,
            )
            got = self._mem_cache[key] = total
            self.smallest_need[name] = min(self.smallest_need.get(name, math.inf), total + self.runtime)
        return got

    # ---- the LM's options ----------------------------------------------------------------------------------------
    def lm_degrees(self, offset: int, n: int) -> list[Degrees]:
        from mimo_titan.parallel.tp import check_tp

        lm = self.cfg.model.language
        moe = lm.moe.num_experts > 0
        out = []
        for pp in _divisors(n):
            if pp > lm.num_layers:
                continue
            stage = n // pp
            for tp in (1, 2, 4, 8):
                # validate_job: no tp with MoE layers, nor with tied embeddings (vocabulary-parallel embedding and head)
                if stage % tp or tp > self.per_node or (tp > 1 and (moe or lm.tie_word_embeddings)):
                    continue
                try:
                    check_tp(self.lang, lm, tp)
                except ValueError:
                    continue
                for cp in (1, 2, 4, 8, 16, 32):
                    # a sequence that cp / tp do not split evenly is padded (_padded_seq_len), not refused
                    if (stage // tp) % cp or (cp > 1 and cp * 1024 > self.costs.seq_len):
                        continue
                    dp = stage // (tp * cp)
                    splits = [(1, dp)]
                    node_dp = self.per_node // (tp * cp) if self.per_node % (tp * cp) == 0 else 0
                    if tp == 1 and cp == 1 and node_dp and dp > node_dp and dp % node_dp == 0:
                        splits.append((dp // node_dp, node_dp))  # HSDP: shard inside a node, replicate across
                    eps = [1]
                    if moe:
                        eps = [e for e in _divisors(stage) if lm.moe.num_experts % e == 0 and e <= 64]
                    for rep, shard in splits:
                        for ep in eps:
                            out.append(Degrees(offset, n, pp, rep, shard, cp, tp, ep, 1))
        return out

    def microbatch_choices(self, dp: int, pp: int) -> list[int]:
        """``M`` dividing the global batch with ``dp`` dividing its microbatch, ``M >= pp``: powers of two times pp
        and the largest."""
        ok = [m for m in _divisors(self.gbs) if m >= pp and (self.gbs // m) % dp == 0]
        keep = {m for m in ok if m % pp == 0 and ((m // pp) & (m // pp - 1)) == 0 and m <= 16 * pp}
        if ok:
            keep.add(max(ok))
            keep.add(min(ok))
        return sorted(keep)

    def lm_options(self, offset: int, n: int) -> list[tuple[float, Degrees, int, str, int, str, object]]:
        """``(LM-alone bound s, degrees, M, schedule, v, ac, StageCosts)``, best first, fitting memory."""
        from mimo_titan.train.planner import _in_flight

        lm = self.cfg.model.language
        res = []
        for d in self.lm_degrees(offset, n):
            for M in self.microbatch_choices(d.dp, d.pp):
                samples = self.gbs // M // d.dp
                scheds = [("1F1B", 1)]
                if d.pp > 1 and M % d.pp == 0 and lm.num_layers >= 2 * d.pp:
                    scheds.append(("Interleaved1F1B", 2))
                for sched, v in scheds:
                    for ac in ("none", "full"):
                        flight = tuple(_in_flight(sched, d.pp, s, M, v) for s in range(d.pp))
                        mem = self.module_mem(self.lang, d, samples, v, ac, flight) + self.runtime
                        if mem > self.budget:
                            continue
                        c = self.module_cost(self.lang, d, samples, v, ac)
                        bound = (M + (d.pp - 1) / v) * (c.forward_s + c.backward_s) + c.dp_sync_s
                        bound += 2 * (d.pp - 1) * c.send_s
                        res.append((bound, d, M, sched, v, ac, c))
                        break  # full AC only where none does not fit
        res.sort(key=lambda r: r[0])
        return res

    # ---- encoders -----------------------------------------------------------------------------------------------
    def encoder_degrees(self, name: str, offset: int, n: int, *, colocated: bool) -> list[Degrees]:
        from mimo_titan.parallel.plans import encoder_plans
        from mimo_titan.parallel.tp import check_tp

        section = getattr(self.cfg.model, name)
        plans = encoder_plans(section.type)
        out = []
        for tp in (1, 2, 4, 8):
            if n % tp or tp > self.per_node or (tp > 1 and plans.apply_tp is None):
                continue
            if tp > 1:
                try:
                    check_tp(name, section, tp)
                except ValueError:
                    continue
            for pp in (1, 2, 4):
                if pp > 1 and (colocated or tp > 1 or plans.split is None or section.num_layers < pp):
                    continue
                if (n // tp) % pp:
                    continue
                out.append(Degrees(offset, n, pp, 1, n // (tp * pp), 1, tp, 1, 1))
        return out

    def encoder_in_flight(self, d: Degrees, mode: str, lm: Degrees, M: int, sched: str, v: int) -> tuple[int, ...]:
        from mimo_titan.pipeline.order import encoder_warmup

        if mode == "whole_batch":
            return (M,) * d.pp
        if mode == "inline":
            return (1,)
        return tuple(encoder_warmup(sched, lm.pp, M, d.pp - s, v) for s in range(d.pp))

    def best_encoder(
        self,
        name: str,
        cands: list[Degrees],
        M: int,
        mode: str,
        lm: Degrees,
        sched: str,
        v: int,
        extra_gib: float,
    ):
        """The fastest fitting ``(degrees, ac, StageCosts, mem GiB)`` of encoder ``name`` among ``cands`` (memory
        with ``extra_gib`` already on its ranks; its DP size must divide the microbatch), or ``None``."""
        best = None
        mb = self.gbs // M
        for d in cands:
            if mb % d.dp:
                continue
            samples = mb // d.dp
            for ac in ("none", "full"):
                flight = self.encoder_in_flight(d, mode, lm, M, sched, v)
                mem = self.module_mem(name, d, samples, 1, ac, flight)
                if mem + extra_gib + self.runtime > self.budget:
                    if extra_gib > 0:  # fits alone (or not: smallest_need), not beside what its ranks hold
                        self.smallest_shared = min(self.smallest_shared, (mem + extra_gib + self.runtime, name))
                    continue
                c = self.module_cost(name, d, samples, 1, ac)
                # its M microbatches through its pp stages: the pipeline's fill and drain included
                t = (M + d.pp - 1) * (c.forward_s + c.backward_s) + 2 * (d.pp - 1) * c.send_s + c.dp_sync_s
                if best is None or t < best[0]:
                    best = (t, d, ac, c, mem)
                break
        return None if best is None else best[1:]

    # ---- one layout ------------------------------------------------------------------------------------------------
    def simulate(self, layout: Layout, lm_cost, enc: dict[str, tuple]) -> Layout:
        from mimo_titan.planning.simulator import ModuleStep, StepSpec, simulate_step

        lm_d = layout.modules[self.lang]
        mb = self.gbs // layout.microbatches
        steps = []
        bridge = {}
        for name in self.encoders:
            d, _ac, c, _mem = enc[name]
            group = "lm" if d.rank_offset == lm_d.rank_offset else f"r{d.rank_offset}"
            steps.append(ModuleStep(name, d.pp, c.forward_s, c.backward_s, c.send_s, group, c.dp_sync_s))
            if layout.colocated_encoders != "folded":
                bridge[name] = self.costs.bridge_s(name, d, lm_d, samples_per_microbatch=mb)
        lm_step = ModuleStep(
            self.lang, lm_d.pp, lm_cost.forward_s, lm_cost.backward_s, lm_cost.send_s, "lm", lm_cost.dp_sync_s
        )
        spec = StepSpec(
            tuple(steps),
            lm_step,
            layout.microbatches,
            pipeline_schedule=layout.pipeline_schedule,
            virtual_stages=layout.virtual_stages,
            colocated_encoders=layout.colocated_encoders,
            bridge_s=bridge,
        )
        res = simulate_step(spec)
        self.simulated += 1
        layout.step_s = res.step_s
        layout.tokens_per_s = self.gbs * self.costs.seq_len / res.step_s
        layout.busy_fraction = res.busy_fraction
        layout.stage_s = {self.lang: (lm_cost.forward_s, lm_cost.backward_s)}
        for name in self.encoders:
            c = enc[name][2]
            layout.stage_s[name] = (c.forward_s, c.backward_s)
        return layout


def _rank_splits(world: int, per_node: int, share: float) -> list[int]:
    """Encoder rank counts to try: 1, 2, 4, ... below a node, whole nodes up to half the world (all of them up to 16
    nodes, then a geometric grid plus the nodes around the FLOPs-proportional ``share · world``)."""
    out = {n for n in (1, 2, 4) if n < per_node and n < world}
    nodes = world // per_node
    if world >= 2 * per_node:
        if nodes <= 16:
            out.update(k * per_node for k in range(1, nodes // 2 + 1))
        else:
            k = 1
            while k <= nodes // 2:
                out.update({k * per_node, int(k * 1.5) * per_node})
                k *= 2
            ideal = max(1, round(share * nodes))
            out.update(k * per_node for k in range(max(1, ideal - 3), ideal + 4) if k <= nodes // 2)
    elif world > 1:
        out.update(n for n in range(1, world // 2 + 1))
    return sorted(n for n in out if 0 < n < world)


def search_layouts(
    cfg: Config, world_size: int, device: DeviceSpec, *, measured: dict | None = None, top: int = 5
) -> SearchResult:
    """Search the layouts of ``cfg`` on ``world_size`` devices of type ``device`` (module docstring).

    Args:
        cfg: a loaded config (its models, global batch, sequence length, dtypes; its own layout is ignored).
        world_size: ranks to lay out (>= 2 for a non-colocated layout).
        device: the device type (:data:`~mimo_titan.planning.devices.DEVICES`).
        measured: a costs file loaded by :func:`mimo_titan.planning.profile.load_costs`, or ``None``.
        top: heterogeneous layouts to return.

    Returns:
        the :class:`SearchResult`; every returned heterogeneous layout passes
        :func:`~mimo_titan.train.trainer.validate_job`.

    Raises:
        ConfigError: ``world_size < 1``, or no layout fits memory: naming the module that does not fit (alone, or
            beside the modules it shares ranks with), the least memory any of its layouts needs and by how much that
            exceeds the budget; or no layout splits the global batch.
    """
    if world_size < 1:
        raise ConfigError(f"--world-size {world_size}: it must be >= 1")
    t0 = time.perf_counter()
    costs = CostModel(cfg, device, measured=measured, ranks_per_node=min(world_size, device.devices_per_node))
    s = _Searcher(cfg, world_size, device, costs)
    lang = s.lang
    gbs = s.gbs
    enc_flops = sum(costs.train_flops_per_sample(e) for e in s.encoders)
    share = enc_flops / (enc_flops + costs.train_flops_per_sample(lang))
    found: list[Layout] = []

    def keep(layout: Layout) -> None:
        found.append(layout)
        found.sort(key=lambda x: x.step_s)
        del found[4 * top :]

    def kth() -> float:
        return found[top - 1].step_s if len(found) >= top else math.inf

    # -- non-colocated: encoders on ranks of their own, the LM on the rest
    for n_enc in _rank_splits(world_size, s.per_node, share):
        n_lm = world_size - n_enc
        lm_opts = s.lm_options(n_enc, n_lm)
        for bound, lm_d, M, sched, v, lm_ac, lm_c in _distinct(lm_opts, _KEEP_LM):
            if bound >= kth():
                break
            for assign in _encoder_assignments(s, n_enc, costs):
                enc: dict[str, tuple[Degrees, str, StageCosts, float]] = {}
                for name, (off, n) in assign.items():
                    shared_with = [o for o, (off2, _n2) in assign.items() if off2 == off and o != name]
                    cands = s.encoder_degrees(name, off, n, colocated=False)
                    if shared_with:  # encoders sharing a range need one pp: take pp = 1
                        cands = [d for d in cands if d.pp == 1]
                    extra = sum(enc[o][3] for o in shared_with if o in enc)
                    got = s.best_encoder(name, cands, M, "streamed", lm_d, sched, v, extra)
                    if got is None:
                        break
                    enc[name] = got
                if len(enc) != len(s.encoders):
                    continue
                layout = _assemble("heterogeneous", enc, lang, lm_d, lm_ac, M, sched, v, "batch")
                _memory(s, layout, enc, lm_d, M, sched, v, lm_ac)
                keep(s.simulate(layout, lm_c, enc))

    # -- colocated (heterogeneous degrees on the same ranks) and the homogeneous "same_layout" baseline
    homogeneous: dict[str, Layout | None] = {"same_layout": None, "folded": None}
    lm_all = s.lm_options(0, world_size)
    homogeneous_best = math.inf
    for bound, lm_d, M, sched, v, lm_ac, lm_c in lm_all[:_KEEP_COLOCATED]:
        if bound >= max(kth(), homogeneous_best):
            break  # neither a better colocated layout nor a better baseline can follow
        lm_mem = s.module_mem(lang, lm_d, gbs // M // lm_d.dp, v, lm_ac, _lm_flight(lm_d, M, sched, v))
        modes = ["batch", "inline"] if lm_d.pp == 1 else ["batch"]
        for mode in modes:
            sim_mode = "whole_batch" if mode == "batch" else "inline"
            for kind in ("heterogeneous", "same_layout"):
                enc = {}
                extra = lm_mem
                for name in s.encoders:
                    cands = s.encoder_degrees(name, 0, world_size, colocated=True)
                    if kind == "same_layout":
                        cands = [d for d in cands if d.tp == (lm_d.tp if lm_d.tp in _tps(s, name) else 1)]
                    got = s.best_encoder(name, cands, M, sim_mode, lm_d, sched, v, extra)
                    if got is None:
                        break
                    enc[name] = got
                    extra += got[3]
                if len(enc) != len(s.encoders):
                    continue
                layout = _assemble(kind, enc, lang, lm_d, lm_ac, M, sched, v, mode)
                layout.mem_per_rank_gib = dict.fromkeys(layout.modules, extra + s.runtime)
                s.simulate(layout, lm_c, enc)
                if kind == "heterogeneous":
                    keep(layout)
                elif homogeneous["same_layout"] is None or layout.step_s < homogeneous["same_layout"].step_s:
                    homogeneous["same_layout"] = layout
                    homogeneous_best = _slowest_baseline(homogeneous)
        # the folded baseline: each LM data-parallel group of stage 0 encodes its own samples' images inline with its
        # microbatches, split over its tp ranks where the encoder has a tensor-parallel plan, repeated on its cp ranks
        # (every CP rank needs the whole sequence's embeddings before it takes its shard, as Megatron-LM's LLaVA does)
        flight0 = _lm_flight(lm_d, M, sched, v)[0]
        extra = lm_mem
        enc = {}
        for name in s.encoders:
            tp_e = lm_d.tp if lm_d.tp in _tps(s, name) else 1
            d = Degrees(0, lm_d.stage_size, 1, 1, lm_d.stage_size // tp_e, 1, tp_e)  # parameters sharded over stage 0
            samples = gbs // M // lm_d.dp  # the images of one LM DP rank's samples, on each of its cp (and tp) ranks
            for enc_ac in ("none", "full"):  # full activation checkpointing only where none does not fit
                mem = s.module_mem(name, d, samples, 1, enc_ac, (flight0,))
                if extra + mem + s.runtime <= s.budget:
                    break
            enc[name] = (d, enc_ac, s.module_cost(name, d, samples, 1, enc_ac), mem)
            extra += mem
        if len(enc) == len(s.encoders) and extra + s.runtime <= s.budget:
            layout = _assemble("folded", enc, lang, lm_d, lm_ac, M, sched, v, "folded")
            layout.mem_per_rank_gib = dict.fromkeys(layout.modules, extra + s.runtime)
            s.simulate(layout, lm_c, enc)
            if homogeneous["folded"] is None or layout.step_s < homogeneous["folded"].step_s:
                homogeneous["folded"] = layout
                homogeneous_best = _slowest_baseline(homogeneous)

    ranked = _validated(cfg, world_size, found, top)
    if not ranked:
        raise ConfigError(_no_fit_message(s, world_size, device))
    return SearchResult(
        ranked, homogeneous, world_size, device.name, s.budget, s.considered, s.simulated, time.perf_counter() - t0
    )


def _assemble(
    kind: str, enc: dict, lang: str, lm_d: Degrees, lm_ac: str, M: int, sched: str, v: int, mode: str
) -> Layout:
    """A :class:`Layout` of the encoders' chosen ``(degrees, ac, ...)`` in ``enc`` and the LM's ``lm_d`` / ``lm_ac``."""
    return Layout(
        kind,
        {**{n: e[0] for n, e in enc.items()}, lang: lm_d},
        M,
        sched,
        v,
        mode,
        {**{n: e[1] for n, e in enc.items()}, lang: lm_ac},
    )


def _slowest_baseline(homogeneous: dict[str, Layout | None]) -> float:
    """The step time below which an LM layout may still improve a baseline: the slower of the two found so far
    (infinite while one is missing)."""
    got = [h.step_s for h in homogeneous.values() if h is not None]
    return max(got) if len(got) == len(homogeneous) else math.inf


def _padded_seq_len(seq_len: int, cp: int, tp: int) -> int:
    """``seq_len`` rounded up as the loader pads rows for a language model with ``cp`` and ``tp``
    (:func:`mimo_titan.train.trainer.sequence_multiple_of`)."""
    from mimo_titan.train.trainer import sequence_multiple_of

    m = sequence_multiple_of(cp, tp)
    return -(-seq_len // m) * m


def _tps(s: _Searcher, name: str) -> set[int]:
    """The tensor-parallel degrees encoder ``name`` supports (1 always)."""
    return {d.tp for d in s.encoder_degrees(name, 0, 8 * s.per_node, colocated=True)}


def _lm_flight(d: Degrees, M: int, sched: str, v: int) -> tuple[int, ...]:
    from mimo_titan.train.planner import _in_flight

    return tuple(_in_flight(sched, d.pp, st, M, v) for st in range(d.pp))


def _distinct(opts: list, k: int) -> list:
    """The first ``k`` options with distinct ``(pp, tp, cp, dp_replicate, ep, schedule)``: the best microbatch count
    of each shape (the others are dominated near-copies)."""
    seen, out = set(), []
    for o in opts:
        d = o[1]
        key = (d.pp, d.tp, d.cp, d.dp_replicate, d.ep, o[3])
        if key in seen:
            continue
        seen.add(key)
        out.append(o)
        if len(out) == k:
            break
    return out


def _encoder_assignments(s: _Searcher, n_enc: int, costs: CostModel) -> list[dict[str, tuple[int, int]]]:
    """Ways to place the encoders on ranks ``[0, n_enc)``: all sharing the range, and (several encoders) each on a
    range of its own, split by their FLOPs."""
    names = s.encoders
    out = [dict.fromkeys(names, (0, n_enc))]
    if len(names) > 1 and n_enc >= len(names):
        flops = [costs.train_flops_per_sample(n) for n in names]
        total = sum(flops)
        sizes = [max(1, round(n_enc * f / total)) for f in flops]
        sizes[-1] = n_enc - sum(sizes[:-1])
        if all(x >= 1 for x in sizes):
            off, own = 0, {}
            for n, size in zip(names, sizes):
                own[n] = (off, size)
                off += size
            out.append(own)
    return out


def _memory(s: _Searcher, layout: Layout, enc: dict, lm_d: Degrees, M: int, sched: str, v: int, ac: str) -> None:
    """Fill ``layout.mem_per_rank_gib`` of a non-colocated layout: encoders sharing a range add up."""
    lm_mem = s.module_mem(s.lang, lm_d, s.gbs // M // lm_d.dp, v, ac, _lm_flight(lm_d, M, sched, v))
    by_range: dict[int, float] = {}
    for name in s.encoders:
        by_range[enc[name][0].rank_offset] = by_range.get(enc[name][0].rank_offset, 0.0) + enc[name][3]
    layout.mem_per_rank_gib = {n: by_range[enc[n][0].rank_offset] + s.runtime for n in s.encoders}
    layout.mem_per_rank_gib[s.lang] = lm_mem + s.runtime


def _validated(cfg: Config, world: int, found: list[Layout], top: int) -> list[Layout]:
    """The first ``top`` layouts of ``found`` that :func:`~mimo_titan.train.trainer.validate_job` accepts."""
    from mimo_titan.config import config_from_dict
    from mimo_titan.train.trainer import validate_job

    out: list[Layout] = []
    seen: set[str] = set()
    base = cfg.to_dict()
    for layout in found:
        text = layout.describe().removesuffix(" inline").removesuffix(" batch")  # the faster colocated mode only
        if text in seen:
            continue
        seen.add(text)
        try:
            validate_job(config_from_dict(base, layout_overrides(layout)), world)
        except ValueError:
            continue
        out.append(layout)
        if len(out) == top:
            break
    return out


def _no_fit_message(s: _Searcher, world: int, device: DeviceSpec) -> str:
    """Why no layout was found: the module whose most sharded layout still exceeds the memory budget (and by how
    much); else, when a layout that splits the batch was refused for the memory of modules sharing a rank, the least
    such a rank needed; else the batch geometry that no layout's data-parallel sizes divide."""
    over = {n: need - s.budget for n, need in s.smallest_need.items() if need > s.budget}
    budget = f"the {s.budget:.1f} GiB a rank may use ({device.usable_fraction:.0%} of {device.memory_gib:g} GiB)"
    fix = "use more ranks (--world-size), a device with more memory, a smaller training.global_batch_size or "
    fix += "training.seq_len"
    if over:
        worst = max(over, key=lambda n: over[n])
        need = s.smallest_need[worst]
        return (
            f"no layout of {world} {device.name} ranks fits memory: module '{worst}' needs at least {need:.1f} GiB per "
            f"rank in its most sharded layout, {over[worst]:.1f} GiB more than {budget}; {fix}"
        )
    need, name = s.smallest_shared
    if name:  # every module fits alone; the layouts that split the batch overfill a shared rank
        return (
            f"no layout of {world} {device.name} ranks fits memory: every module fits alone, but not beside the "
            f"modules it shares ranks with: module '{name}' with them needs at least {need:.1f} GiB per rank, "
            f"{need - s.budget:.1f} GiB more than {budget}; {fix}"
        )
    return (
        f"no layout of {world} ranks splits training.global_batch_size={s.gbs} so that every module's data-parallel "
        f"size divides the samples of a microbatch (mimo_titan gives each DP rank whole samples) while fitting "
        f"memory; with {world} ranks the modules' DP sizes are too large or share no factor with {s.gbs}: raise "
        "training.global_batch_size (a multiple of a power of two), or plan for fewer ranks (--world-size)"
    )
