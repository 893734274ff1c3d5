"""A simulator of one MIMO training step for a layout and schedule: step time and per-rank busy fraction.

Model
-----
A step is one cross-module pipeline (:mod:`mimo_titan.pipeline.order`): the encoders' pipeline stages lead the
language model's (LM's) stages. Each *worker* is the group of ranks that run one pipeline stage together (a DP
and TP/CP group: they run the same actions at the same time, so one worker stands for all of them). A worker runs
its actions strictly in the order :class:`~mimo_titan.pipeline.schedule.MimoSchedule` runs them, each taking a
fixed time (:class:`ModuleStep`'s ``forward_s`` / ``backward_s``), and an action starts when its worker is free and
what it needs has arrived:

- forward of microbatch ``m`` on a stage: the forward of ``m`` of the stage(s) feeding it, plus the transfer
  (``send_s`` of the producing module between two of its stages, ``bridge_s[encoder]`` from an encoder's last
  stage to LM stage 0, which waits for microbatch ``m`` of every encoder);
- backward of ``m``: its own forward of ``m`` and the backward of ``m`` of every stage it feeds, plus the same
  transfer time (the gradient is as large as the activation);
- a transfer is a latency (asynchronous point-to-point): it holds neither worker.

After a module's last backward, each of its workers stays busy ``dp_sync_s`` (gradient reduce / optimizer time
not hidden behind compute; with ``v`` virtual stages, ``dp_sync_s / v`` after each chunk's last backward).

The orders, as :class:`~mimo_titan.pipeline.schedule.MimoSchedule` (``schedule_mode``) runs them:

- **LM**: ``pp`` workers ``"language.{r}"`` (the LM's name), torch's ``Schedule1F1B`` / ``ScheduleGPipe`` order,
  or ``ScheduleInterleaved1F1B``'s with ``virtual_stages = v`` chunks per rank (global stage ``k`` on rank
  ``k mod pp``, each chunk's forward ``forward_s / v``).
- **Encoders on ranks of their own** (``group`` other than the LM's), ``module_schedule = "1F1B"``: *streamed*,
  stage ``j`` of ``P`` runs 1F1B with :func:`~mimo_titan.pipeline.order.encoder_warmup` forwards of warm-up;
  encoders with the same ``group`` share one worker per stage and run as one leading stage (forward of ``m`` of
  each, in the order given, later the backward of ``m`` of each; they must have the same ``pp``).
  ``module_schedule = "GPipe"``: *whole batch*, each stage runs every forward, LM stage 0 starts after the last
  one, the encoders' backwards start after LM stage 0's whole step (encoders sharing a worker: all of the first
  encoder's forwards, then the next's; backwards likewise).
- **Encoders colocated with the LM** (``group == language.group``, ``pp = 1``): every LM rank ``i`` runs a share,
  stage ``"{encoder}@{i}"`` (``forward_s`` is that share's time):

  - ``colocated_encoders = "batch"`` (or ``module_schedule = "GPipe"``): every forward, the LM's whole order,
    every backward (after LM stage 0's step);
  - ``"inline"`` (LM ``pp = 1``): forward of ``m`` right before the LM's forward of ``m``, backward of ``m``
    right after the LM's backward of ``m``;
  - ``"folded"`` (simulated only, not run by ``MimoSchedule``; the torchtitan way of a vision encoder that is part
    of the LM's first pipeline stage): the encoder runs on LM stage 0's ranks only (``"{encoder}@0"``), its
    forward of ``m`` right before LM stage 0's forward of ``m`` and its backward right after LM stage 0's backward
    of ``m``, with any LM ``pp`` and schedule; ``bridge_s`` does not apply (nothing leaves the ranks).

  A colocated encoder with ``pp > 1`` (``"batch"`` only) runs its stages' forwards before the LM's first forward and
  their backwards after LM stage 0's step, the last LM action: no LM rank computes then, so its stages are simulated
  as a whole-batch pipeline of their own (workers ``"{encoder}.{j}"``, as on ranks of its own).

Worker names (the keys of :attr:`StepResult.busy_fraction`): ``"{lm}.{r}"`` for LM rank ``r`` (``r = 0`` with
``pp = 1``; colocated encoders are counted in their LM rank's worker); an encoder on ranks of its own:
``"{name}"`` with ``pp = 1``, ``"{name}.{j}"`` for stage ``j`` otherwise; encoders sharing a group: their names
joined by ``+`` (``"vision+audio"``, ``"vision+audio.1"``).

Validation
----------
``scripts/bench_schedule.py --validate`` runs the real ``MimoSchedule`` (gloo on CPU, compute replaced by sleeps: 10
ms per encoder stage, 20 ms per LM rank, backward twice, 4 microbatches) on eight layouts (non-colocated, colocated,
two encoders, encoder pp = 2, LM pp = 4, Interleaved1F1B v = 2, two encoders sharing a rank, colocated inline), both
module schedules each, and compares the measured step with :func:`simulate_step` given the same sleep times plus the
benchmark's measured overheads: one constant per compute action and one per transfer, fitted once on the
non-colocated layout (``bench_schedule.ACTION_OVERHEAD_S = 1.0 ms``, ``TRANSFER_S = 1.5 ms``; ``--calibrate``).
With 10 timed steps, measured / simulated was 0.966 - 1.055 over the 16 steps (2026-12-04, 2-core machine shared
with other jobs; the measured steps are 4 - 16 % longer than the sleeps alone); ``tests/test_simulator.py`` keeps every
layout within 10 %. What the overheads are on a GPU cluster (kernel launch, NCCL latency, FSDP collectives) is the
caller's to put into ``forward_s``, ``send_s``, ``bridge_s`` and ``dp_sync_s``.

Method: a discrete-event replay of fixed per-stage orders with dependency latencies, as in the pipeline-bubble
analyses of Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM", section 2.2) and Megatron-LM's multi-module 1F1B (encoder stages leading the LM's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mimo_titan.pipeline.order import (
    Action,
    Stage,
    Timeline,
    encoder_warmup,
    gpipe_order,
    interleaved_order,
    one_f_one_b_order,
    simulate,
    stage_order,
)

__all__ = ["COLOCATED_ENCODERS", "MODULE_SCHEDULES", "PIPELINE_SCHEDULES", "ModuleStep", "StepResult", "StepSpec",
           "simulate_step"]  # fmt: skip

PIPELINE_SCHEDULES = ("1F1B", "GPipe", "Interleaved1F1B")
MODULE_SCHEDULES = ("1F1B", "GPipe")
COLOCATED_ENCODERS = ("batch", "inline", "folded")


@dataclass(frozen=True)
class ModuleStep:
    """One module's per-microbatch times in a step (seconds).

    Attributes:
        name: the module's name (``"vision"``, ``"audio"``, ``"language"``): stage and worker names derive from it.
        pp: pipeline stages of this module (LM: pp ranks; with virtual stages see :class:`StepSpec`).
        forward_s: one microbatch's forward on one rank of ONE pipeline stage (LM with ``v`` chunks: the rank's
            whole work, each chunk takes ``forward_s / v``).
        backward_s: the same for the backward.
        send_s: moving one microbatch's activations from one of its stages to the next (point-to-point); the
            gradient going back costs the same.
        group: rank-range key: modules with equal non-empty group share ranks (colocated); ``""``: ranks of its own.
        dp_sync_s: per-step gradient reduce / optimizer time not hidden behind compute, added after this module's
            last backward on every rank of it.
    """

    name: str
    pp: int
    forward_s: float
    backward_s: float
    send_s: float = 0.0
    group: str = ""
    dp_sync_s: float = 0.0


@dataclass(frozen=True)
class StepSpec:
    """A layout and schedule to simulate.

    Attributes:
        encoders: the encoders, in lane order (the order ``MimoSchedule`` runs encoders sharing ranks).
        language: the LM.
        microbatches: microbatches per step (M, ``training.microbatches``).
        pipeline_schedule: the LM's ``"1F1B"``, ``"GPipe"`` or ``"Interleaved1F1B"``
            (``parallelism.pipeline_schedule``).
        virtual_stages: LM chunks per pp rank (``parallelism.virtual_stages``; > 1 only with Interleaved1F1B).
        module_schedule: ``"1F1B"`` (encoders stream) or ``"GPipe"`` (whole batch first;
            ``parallelism.module_schedule``).
        colocated_encoders: ``"batch"`` or ``"inline"`` as ``MimoSchedule`` (``parallelism.colocated_encoders``),
            or ``"folded"`` (the encoder is part of LM stage 0; simulated only, whatever ``module_schedule``). It
            applies to the encoders whose ``group`` is the LM's.
        bridge_s: per encoder name: one microbatch's embeddings across the bridge to LM stage 0 (and the gradients
            back); missing names: 0.
    """

    encoders: tuple[ModuleStep, ...]
    language: ModuleStep
    microbatches: int
    pipeline_schedule: str = "1F1B"
    virtual_stages: int = 1
    module_schedule: str = "1F1B"
    colocated_encoders: str = "batch"
    bridge_s: Mapping[str, float] = field(default_factory=dict)


@dataclass
class StepResult:
    """What :func:`simulate_step` returns.

    Attributes:
        step_s: seconds from the step's start until the last worker is done (its ``dp_sync_s`` included).
        busy_fraction: per worker (see the module docstring for the names): compute seconds / ``step_s``.
        timeline: the :class:`~mimo_titan.pipeline.order.Timeline` (per-stage busy seconds, every action's end,
            each stage's worker).
        modes: per encoder name, how it runs: ``"streamed"``, ``"whole_batch"``, ``"inline"`` or ``"folded"``.
    """

    step_s: float
    busy_fraction: dict[str, float]
    timeline: Timeline
    modes: dict[str, str] = field(default_factory=dict)


def _check(spec: StepSpec) -> None:
    lm, M, v = spec.language, spec.microbatches, spec.virtual_stages
    if spec.pipeline_schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"StepSpec.pipeline_schedule={spec.pipeline_schedule!r}; choose one of {PIPELINE_SCHEDULES}")
    if spec.module_schedule not in MODULE_SCHEDULES:
        raise ValueError(f"StepSpec.module_schedule={spec.module_schedule!r}; choose one of {MODULE_SCHEDULES}")
    if spec.colocated_encoders not in COLOCATED_ENCODERS:
        raise ValueError(f"StepSpec.colocated_encoders={spec.colocated_encoders!r}; choose one of {COLOCATED_ENCODERS}")
    if M < 1:
        raise ValueError(f"StepSpec.microbatches={M}; it must be >= 1")
    if (spec.pipeline_schedule == "Interleaved1F1B") != (v > 1):
        raise ValueError(
            f"StepSpec.virtual_stages={v} with pipeline_schedule={spec.pipeline_schedule!r}: Interleaved1F1B needs "
            "virtual_stages >= 2, the other schedules virtual_stages = 1"
        )
    modules = [*spec.encoders, lm]
    names = [m.name for m in modules]
    if len(set(names)) != len(names):
        raise ValueError(f"module names must differ, got {names}")
    for mod in modules:
        if mod.pp < 1:
            raise ValueError(f"ModuleStep {mod.name!r}: pp={mod.pp}; it must be >= 1")
        times = {"forward_s": mod.forward_s, "backward_s": mod.backward_s, "send_s": mod.send_s}
        times["dp_sync_s"] = mod.dp_sync_s
        bad = {k: t for k, t in times.items() if t < 0}
        if bad:
            raise ValueError(f"ModuleStep {mod.name!r}: negative times {bad}")
    unknown = sorted(set(spec.bridge_s) - {e.name for e in spec.encoders})
    if unknown:
        raise ValueError(f"StepSpec.bridge_s names no encoder: {unknown}")
    if any(t < 0 for t in spec.bridge_s.values()):
        raise ValueError(f"StepSpec.bridge_s has a negative time: {dict(spec.bridge_s)}")
    if spec.pipeline_schedule == "Interleaved1F1B" and lm.pp < 2:
        raise ValueError(f"Interleaved1F1B needs language pp >= 2 (ModuleStep {lm.name!r} has pp={lm.pp})")


def _encoder_mode(spec: StepSpec, enc: ModuleStep) -> str:
    colocated = bool(enc.group) and enc.group == spec.language.group
    if colocated and spec.colocated_encoders == "folded":
        return "folded"
    if spec.module_schedule == "GPipe":
        return "whole_batch"
    if colocated:
        return "inline" if spec.colocated_encoders == "inline" else "whole_batch"
    return "streamed"


def simulate_step(spec: StepSpec) -> StepResult:
    """Simulate one training step of ``spec`` (see the module docstring for the model).

    Returns:
        the :class:`StepResult`: step seconds, busy fraction per worker, the timeline.

    Raises:
        ValueError: an unknown schedule name, ``virtual_stages`` that do not fit the schedule, Interleaved1F1B with
            language ``pp < 2``, a colocated encoder with ``pp > 1`` other than in ``"batch"`` mode (or colocated
            encoders mixing ``pp = 1`` and ``pp > 1``), ``colocated_encoders = "inline"`` with language ``pp > 1``,
            encoders sharing a group with different ``pp``, negative times, duplicate module names, ``bridge_s`` for
            an unknown encoder, or a schedule that deadlocks.
    """
    _check(spec)
    lm, M, v, sched = spec.language, spec.microbatches, spec.virtual_stages, spec.pipeline_schedule
    n_lm = lm.pp * v
    lm_name = [f"{lm.name}.{k}" for k in range(n_lm)]
    lm_worker = [f"{lm.name}.{r}" for r in range(lm.pp)]
    lm_stages = [
        Stage(
            lm_name[k],
            stage_order(sched, M, n_lm, k, v),
            lm.forward_s / v,
            lm.backward_s / v,
            inputs=(lm_name[k - 1],) if k else (),
            worker=lm_worker[k % lm.pp],
            input_delays={lm_name[k - 1]: lm.send_s} if k else {},
            sync_s=lm.dp_sync_s / v,
        )
        for k in range(n_lm)
    ]
    # every LM rank's order across its chunks
    rank_orders: dict[str, list[tuple[str, Action]]] = {
        lm_worker[r]: (
            [(lm_name[k], a) for k, a in interleaved_order(M, lm.pp, v, r)]
            if sched == "Interleaved1F1B"
            else [(lm_name[r], a) for a in lm_stages[r].order]
        )
        for r in range(lm.pp)
    }
    first = lm_stages[0]
    first_inputs: list[str] = []
    first_delays: dict[str, float] = {}
    after_all: list[str] = []
    stages: list[Stage] = []
    orders: dict[str, list[tuple[str, Action]]] = {}
    modes = {e.name: _encoder_mode(spec, e) for e in spec.encoders}

    colocated = [e for e in spec.encoders if e.group and e.group == lm.group]
    if colocated and len({e.pp > 1 for e in colocated}) > 1:
        raise ValueError(
            f"encoders {[e.name for e in colocated]} are colocated with {lm.name!r} with pp "
            f"{[e.pp for e in colocated]}: the simulator takes colocated encoders all with pp = 1 or all with pp > 1"
        )
    if colocated and colocated[0].pp > 1:
        if modes[colocated[0].name] != "whole_batch":
            raise ValueError(
                f"encoder {colocated[0].name!r} is colocated with {lm.name!r} with pp={colocated[0].pp}: only "
                "colocated_encoders='batch' runs a colocated encoder in pipeline stages (MimoSchedule); 'inline' and "
                "'folded' need pp = 1"
            )
        # its stages run before (forwards) and after (backwards) the LM's whole step, when no LM rank computes: a
        # pipeline of their own, as on ranks of their own
        colocated = []

    # -- encoders on ranks of their own: one pipeline per group, its stages leading LM stage 0 --
    groups: dict[str, list[ModuleStep]] = {}
    for e in spec.encoders:
        if e not in colocated:
            groups.setdefault(e.group or f"\0{e.name}", []).append(e)
    for lanes in groups.values():
        P = lanes[0].pp
        if any(e.pp != P for e in lanes):
            raise ValueError(
                f"encoders {[e.name for e in lanes]} share ranks (group {lanes[0].group!r}) but not their pipeline "
                f"depth ({[e.pp for e in lanes]}); give them the same pp"
            )
        whole = modes[lanes[0].name] == "whole_batch"
        base = "+".join(e.name for e in lanes)
        for j in range(P):
            worker = base if P == 1 else f"{base}.{j}"
            order = gpipe_order(M) if whole else one_f_one_b_order(M, encoder_warmup(sched, lm.pp, M, P - j, v))
            names = []
            for e in lanes:
                name = e.name if P == 1 else f"{e.name}.{j}"
                prev = f"{e.name}.{j - 1}"
                stages.append(
                    Stage(
                        name,
                        order,
                        e.forward_s,
                        e.backward_s,
                        inputs=(prev,) if j else (),
                        backward_after_step_of=(first.name,) if whole and j == P - 1 else (),
                        worker=worker,
                        input_delays={prev: e.send_s} if j else {},
                        sync_s=e.dp_sync_s,
                    )
                )
                names.append(name)
                if j == P - 1:
                    first_inputs.append(name)
                    first_delays[name] = spec.bridge_s.get(e.name, 0.0)
                    if whole:
                        after_all.append(name)
            if len(lanes) > 1:
                if whole:  # lane by lane: every forward of one, then the next's; backwards likewise
                    orders[worker] = [(n, a) for kind in "FB" for n in names for a in order if a[0] == kind]
                else:  # one leading stage: action a of each lane in lane order
                    orders[worker] = [(n, a) for a in order for n in names]

    # -- encoders colocated with the LM --
    mode = modes[colocated[0].name] if colocated else ""
    if mode == "inline" and lm.pp != 1:
        raise ValueError(
            f"StepSpec.colocated_encoders='inline' needs language pp = 1 (got {lm.pp}): every rank runs LM stage 0 "
            "and the whole encoder; use 'batch' or 'folded'"
        )
    ranks = [0] if mode in ("inline", "folded") else list(range(lm.pp))
    for i in ranks if colocated else ():
        w = lm_worker[i]
        enc = [f"{e.name}@{i}" for e in colocated]
        for e, name in zip(colocated, enc):
            stages.append(
                Stage(
                    name,
                    gpipe_order(M),
                    e.forward_s,
                    e.backward_s,
                    backward_after_step_of=(first.name,) if mode == "whole_batch" else (),
                    worker=w,
                    sync_s=e.dp_sync_s,
                )
            )
            first_inputs.append(name)
            first_delays[name] = 0.0 if mode == "folded" else spec.bridge_s.get(e.name, 0.0)
            if mode == "whole_batch":
                after_all.append(name)
        if mode == "whole_batch":
            fwd = [(n, ("F", m)) for n in enc for m in range(M)]
            rank_orders[w] = fwd + rank_orders[w] + [(n, ("B", m)) for n in enc for m in range(M)]
        else:  # inline / folded: around LM stage 0's actions
            seq: list[tuple[str, Action]] = []
            for name, a in rank_orders[w]:
                if name != first.name:
                    seq.append((name, a))
                elif a[0] == "F":
                    seq += [*((n, a) for n in enc), (name, a)]
                else:
                    seq += [(name, a), *((n, a) for n in enc)]
            rank_orders[w] = seq

    first.inputs = tuple(first_inputs)
    first.input_delays = first_delays
    first.after_all_forwards_of = tuple(after_all)
    orders.update(rank_orders)
    timeline = simulate([*stages, *lm_stages], orders)
    busy: dict[str, float] = {}
    for name, w in timeline.worker_of.items():
        busy[w] = busy.get(w, 0.0) + timeline.busy_s[name]
    step = timeline.step_s
    return StepResult(step, {w: (b / step if step else 0.0) for w, b in busy.items()}, timeline, modes)
