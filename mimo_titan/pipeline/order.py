"""The order of forward and backward microbatches on every stage of the cross-module pipeline, and its
analytical step time.

A MIMO step is one pipeline: the encoder stages lead, the language model's stages follow. With ``T`` stages in
all and ``M`` microbatches, stage ``s`` runs, under **1F1B**, ``min(M, T - s)`` warm-up forwards and then
alternates one backward and one forward (``B0 F_w B1 F_{w+1} ...``) until its backwards drain; under **GPipe** it
runs every forward, then every backward. The language stages' orders are exactly those of
``torch.distributed.pipelining.Schedule1F1B`` / ``ScheduleGPipe`` (stage ``i`` of ``pp`` warms up with
``pp - i`` forwards); the encoder in front of them warms up with one more than the language model's first
stage, so the language model never waits for a microbatch it could already run, and holds at most
``T - s`` microbatches of activations (Megatron-LM's rule for the encoder stages that lead its 1F1B pipeline,
``schedules.forward_backward_pipelining_without_interleaving``).

**Interleaved 1F1B** (``parallelism.pipeline_schedule = "Interleaved1F1B"``, ``parallelism.virtual_stages = v``):
each of the language model's ``pp`` ranks holds ``v`` model chunks, rank ``r`` the global stages ``r, r + pp, ...,
r + (v - 1) pp`` of a ``pp · v``-stage pipeline; :func:`interleaved_order` is the order of one rank, exactly that of
``torch.distributed.pipelining.ScheduleInterleaved1F1B`` (Narayanan et al. 2021, "Efficient Large-Scale Language
Model Training on GPU Clusters Using Megatron-LM", section 2.2; Megatron-LM's ``virtual_pipeline_model_parallel_size``).
The encoder in front of it warms up with as many forwards as the language model's rank 0 runs of its first chunk
before that chunk's first backward (:func:`encoder_warmup`).

**Module-level GPipe** (``parallelism.module_schedule = "GPipe"``, the older order): the encoder runs all
forwards, the language model receives all of them before it starts its own schedule, and the encoder's
backwards start once the language model's first stage has finished its whole step.

:func:`simulate` plays the orders with fixed forward / backward times and, where given, a latency per dependency
(a transfer) and a gradient sync after a stage's last backward; :mod:`mimo_titan.planning.simulator` builds a whole
MIMO step on it (several encoders, colocated or not, the folded baseline), and :func:`mimo_timeline` is its
one-encoder shorthand with free communication.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "Action",
    "Stage",
    "Timeline",
    "encoder_warmup",
    "gpipe_order",
    "interleaved_order",
    "interleaved_rounds",
    "one_f_one_b_order",
    "simulate",
    "stage_order",
]

#: ``("F" | "B", microbatch)``
Action = tuple[str, int]


def one_f_one_b_order(microbatches: int, warmup: int) -> list[Action]:
    """``warmup`` forwards, then one backward and one forward alternately, then the remaining backwards.

    Example: ``one_f_one_b_order(4, 2)`` → F0 F1 B0 F2 B1 F3 B2 B3.
    """
    w = max(1, min(microbatches, warmup))
    out: list[Action] = [("F", m) for m in range(w)]
    nxt = w
    for b in range(microbatches):
        out.append(("B", b))
        if nxt < microbatches:
            out.append(("F", nxt))
            nxt += 1
    return out


def gpipe_order(microbatches: int) -> list[Action]:
    """Every forward, then every backward: F0 .. F(M-1) B0 .. B(M-1)."""
    return [("F", m) for m in range(microbatches)] + [("B", m) for m in range(microbatches)]


def interleaved_rounds(microbatches: int, pp: int) -> int:
    """Rounds of ``ScheduleInterleaved1F1B``: ``max(1, M // pp)``; each round runs ``M / rounds`` microbatches through
    one chunk before the rank moves on to its next chunk.

    Raises:
        ValueError: ``M`` is not a multiple of the rounds (torch's requirement, e.g. ``M = 5`` with ``pp = 2``:
            2 rounds): the message names ``training.microbatches``.
    """
    rounds = max(1, microbatches // pp)
    if microbatches % rounds:
        near = [m for m in range(max(pp, microbatches - pp), microbatches + pp + 1) if m % pp == 0]
        raise ValueError(
            f"training.microbatches={microbatches} does not split into the rounds of the Interleaved1F1B schedule "
            f"with language pp={pp}: torch.distributed.pipelining.ScheduleInterleaved1F1B needs microbatches to be "
            f"a multiple of max(1, microbatches // pp) = {rounds}; set training.microbatches to a multiple of pp, "
            f"e.g. {' or '.join(map(str, near))}"
        )
    return rounds


def interleaved_order(microbatches: int, pp: int, virtual_stages: int, rank: int) -> list[tuple[int, Action]]:
    """The compute order of pipeline rank ``rank`` of ``pp`` under Interleaved 1F1B with ``virtual_stages`` (v)
    chunks per rank: ``[(global stage, ("F" | "B", microbatch)), ...]``, rank ``r`` holding the global stages
    ``r + j·pp`` (``j < v``) of ``pp · v``.

    This is ``torch.distributed.pipelining.ScheduleInterleaved1F1B._calculate_single_rank_operations`` without its
    idle slots (torch 2.13): with ``R = max(1, M // pp)`` rounds of ``n = M / R`` microbatches, rank ``r`` warms up
    with ``min((v - 1)·n + 2·(pp - 1 - r), M·v)`` forwards (chunk ``(k // n) mod v`` for its ``k``-th forward, so
    ``n`` microbatches of one chunk, then ``n`` of the next), then runs one forward and one backward alternately
    (the backwards from the last chunk down, ``n`` at a time), then the remaining backwards. Method: Narayanan et al.
    2021 (Megatron-LM's interleaved schedule, depth-first).

    Example: ``interleaved_order(4, 2, 2, 0)`` → F0.0 F0.1 F2.0 F2.1 | F0.2 B2.0 F0.3 B2.1 F2.2 B0.0 F2.3 B0.1 |
    B2.2 B2.3 B0.2 B0.3 (``F<stage>.<microbatch>``).

    Raises:
        ValueError: ``rank`` outside ``[0, pp)``, ``virtual_stages < 1`` or microbatches torch refuses
            (:func:`interleaved_rounds`).
    """
    if not 0 <= rank < pp:
        raise ValueError(f"rank {rank} is outside [0, {pp})")
    if virtual_stages < 1:
        raise ValueError(f"virtual_stages={virtual_stages}; it must be >= 1")
    M, v = microbatches, virtual_stages
    per_round = M // interleaved_rounds(M, pp)
    total = M * v
    warmup = min((v - 1) * per_round + 2 * (pp - 1 - rank), total)

    def fwd_stage(op: int) -> int:
        return ((op // per_round) % v) * pp + rank

    def bwd_stage(op: int) -> int:
        return (v - 1 - ((op - warmup) // per_round) % v) * pp + rank

    fwd_next: dict[int, int] = {}
    bwd_next: dict[int, int] = {}
    out: list[tuple[int, Action]] = []

    def run(kind: str, stage: int, counter: dict[int, int]) -> None:
        m = counter.get(stage, 0)
        counter[stage] = m + 1
        out.append((stage, (kind, m)))

    for op in range(warmup + total):  # warm-up forwards, steady 1F1B, cool-down backwards
        if op < total:
            run("F", fwd_stage(op), fwd_next)
        if op >= warmup:
            run("B", bwd_stage(op), bwd_next)
    return out


def stage_order(schedule: str, microbatches: int, num_stages: int, stage: int, virtual_stages: int = 1) -> list[Action]:
    """The order of stage ``stage`` of a ``num_stages``-stage pipeline under ``schedule`` (``"1F1B"``, ``"GPipe"``
    or ``"Interleaved1F1B"``; for the latter ``num_stages = pp · virtual_stages`` and the order is that of the chunk
    inside its rank's :func:`interleaved_order`).

    Raises:
        ValueError: an unknown schedule, a stage outside ``[0, num_stages)``, ``virtual_stages > 1`` with a schedule
            other than Interleaved1F1B, or ``num_stages`` not a multiple of ``virtual_stages``.
    """
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is outside [0, {num_stages})")
    if schedule == "Interleaved1F1B":
        if num_stages % virtual_stages:
            raise ValueError(f"{num_stages} stages do not split into {virtual_stages} chunks per rank")
        pp = num_stages // virtual_stages
        return [a for s, a in interleaved_order(microbatches, pp, virtual_stages, stage % pp) if s == stage]
    if virtual_stages != 1:
        raise ValueError(f"virtual_stages={virtual_stages} needs the Interleaved1F1B schedule, not {schedule!r}")
    if schedule == "1F1B":
        return one_f_one_b_order(microbatches, num_stages - stage)
    if schedule == "GPipe":
        return gpipe_order(microbatches)
    raise ValueError(f"no order for schedule {schedule!r}; choose 1F1B, GPipe or Interleaved1F1B")


def encoder_warmup(
    lm_schedule: str, lm_pp: int, microbatches: int, encoder_stages_left: int = 1, virtual_stages: int = 1
) -> int:
    """Warm-up forwards of an encoder stage that leads the language pipeline, with ``encoder_stages_left`` encoder
    stages from it to the bridge (itself included).

    - 1F1B: ``lm_pp + encoder_stages_left`` (the stage is stage ``T - lm_pp - encoder_stages_left`` of ``T``);
    - GPipe: every microbatch (the language model's first stage runs every forward before its first backward, so no
      encoder stage may wait for a gradient earlier);
    - Interleaved1F1B: ``w + encoder_stages_left - 1``, ``w`` the forwards of chunk 0 that the language model's rank 0
      runs before its first backward of chunk 0 (:func:`interleaved_order`; e.g. ``pp = 2, v = 2``: 4 with
      ``M = 4`` or ``M = 8``). ``w`` is the largest ``#forwards of chunk 0 before its backward of m  - m`` over
      ``m``: the encoder runs its backward of ``m`` after ``m + w`` forwards and must not wait for a gradient
      while the language model waits for a forward; for torch's order this maximum is at ``m = 0``.
    """
    if lm_schedule == "GPipe":
        return microbatches
    if lm_schedule == "Interleaved1F1B":
        forwards, ahead = 0, 0
        for stage, (kind, m) in interleaved_order(microbatches, lm_pp, virtual_stages, 0):
            if stage != 0:
                continue
            if kind == "F":
                forwards += 1
            else:
                ahead = max(ahead, forwards - m)
        return min(microbatches, ahead + encoder_stages_left - 1)
    return min(microbatches, lm_pp + encoder_stages_left)


@dataclass
class Stage:
    """One pipeline stage in :func:`simulate`.

    Attributes:
        name: unique name (e.g. ``"vision"``, ``"language.0"``).
        order: its actions in the order it runs them.
        forward_s / backward_s: seconds of one microbatch's forward / backward.
        inputs: the stages whose forward of microbatch ``m`` this stage's forward of ``m`` needs (their
            backward of ``m`` needs this stage's backward of ``m``).
        after_all_forwards_of: the stages whose every forward must end before this stage's first forward
            (module-level GPipe: the language model waits for the encoder's whole batch).
        backward_after_step_of: the stages whose whole order must end before this stage's first backward
            (module-level GPipe: gradients cross back after the language model's step).
        worker: the rank group that runs it; stages sharing a worker run one after another in list order
            of their actions (colocated modules), default: the stage's own name.
        input_delays: seconds from the end of an input stage's forward of ``m`` to the moment this stage may start
            its forward of ``m`` (moving the activations: point-to-point or over a bridge), per input stage name;
            the gradient going back costs the same (this stage's backward of ``m`` → the input's backward of
            ``m``), and so do the whole-batch dependencies on that stage. A latency: neither worker is held.
            Default: none (free communication).
        sync_s: seconds the worker stays busy after this stage's last backward (a gradient reduce or optimizer step
            not hidden behind compute); not counted in ``busy_s``.
    """

    name: str
    order: Sequence[Action]
    forward_s: float
    backward_s: float
    inputs: Sequence[str] = ()
    after_all_forwards_of: Sequence[str] = ()
    backward_after_step_of: Sequence[str] = ()
    worker: str | None = None
    input_delays: Mapping[str, float] = field(default_factory=dict)
    sync_s: float = 0.0


@dataclass
class Timeline:
    """What :func:`simulate` returns: ``step_s`` (seconds: when the last worker is done, its last ``sync_s``
    included), per-stage ``busy_s`` (compute seconds), the end of every action ``(stage, "F" | "B", m)``, and
    ``worker_of``: the worker that runs each stage."""

    step_s: float
    busy_s: dict[str, float]
    end: dict[tuple[str, str, int], float] = field(repr=False)
    worker_of: dict[str, str] = field(default_factory=dict, repr=False)

    def busy_fraction(self, stage: str) -> float:
        """Fraction of the step stage ``stage`` computes."""
        return self.busy_s[stage] / self.step_s if self.step_s else 0.0


def simulate(
    stages: Sequence[Stage], worker_orders: Mapping[str, Sequence[tuple[str, Action]]] | None = None
) -> Timeline:
    """Play the stages' orders with fixed compute times and communication latencies (none unless a stage's
    ``input_delays`` say so).

    Every action starts when its worker is free and its dependencies have ended: ``F`` of microbatch ``m`` needs
    ``F m`` of every input stage (plus that edge's delay); ``B m`` needs ``F m`` of the same stage and ``B m`` of
    every stage fed by it (plus the edge's delay). A stage's last backward keeps its worker ``sync_s`` longer.

    Args:
        stages: the stages; consumers are derived from ``inputs``.
        worker_orders: for workers that run several stages (colocated modules), the interleaved order
            ``[(stage name, action), ...]``; a worker not given runs its one stage's ``order``.

    Returns:
        the :class:`Timeline`.

    Raises:
        ValueError: a deadlock (some action can never start) or an unknown stage name.
    """
    by_name = {s.name: s for s in stages}
    consumers: dict[str, list[str]] = {s.name: [] for s in stages}
    for s in stages:
        for i in s.inputs:
            if i not in by_name:
                raise ValueError(f"stage {s.name!r} takes input from unknown stage {i!r}")
            consumers[i].append(s.name)
    queues: dict[str, list[tuple[str, Action]]] = {}
    for s in stages:
        w = s.worker or s.name
        if worker_orders and w in worker_orders:
            queues[w] = list(worker_orders[w])
        else:
            queues.setdefault(w, []).extend((s.name, a) for a in s.order)
    end: dict[tuple[str, str, int], float] = {}
    free = dict.fromkeys(queues, 0.0)
    busy = dict.fromkeys(by_name, 0.0)
    pos = dict.fromkeys(queues, 0)
    last_forward = {s.name: max((m for k, m in s.order if k == "F"), default=-1) for s in stages}
    last_backward = {s.name: max((m for k, m in s.order if k == "B"), default=-1) for s in stages}
    worker_of = {s.name: s.worker or s.name for s in stages}
    for q in queues.values():  # a stage's sync follows its last backward in its worker's order
        for name, (kind, m) in q:
            if kind == "B":
                last_backward[name] = m

    def delay(consumer: str, producer: str) -> float:
        return by_name[consumer].input_delays.get(producer, 0.0)

    def ready(name: str, action: Action) -> float | None:
        kind, m = action
        st = by_name[name]
        deps: list[tuple[tuple[str, str, int], float]] = []
        if kind == "F":
            deps += [((i, "F", m), delay(name, i)) for i in st.inputs]
            deps += [((g, "F", last_forward[g]), delay(name, g)) for g in st.after_all_forwards_of]
        else:
            deps += [((name, "F", m), 0.0)] + [((c, "B", m), delay(c, name)) for c in consumers[name]]
            for g in st.backward_after_step_of:
                k, mm = by_name[g].order[-1]
                deps.append(((g, k, mm), delay(g, name)))
        t = 0.0
        for d, lag in deps:
            e = end.get(d)
            if e is None:
                return None
            t = max(t, e + lag)
        return t

    remaining = sum(len(q) for q in queues.values())
    while remaining:
        progressed = False
        for w, q in queues.items():
            while pos[w] < len(q):
                name, action = q[pos[w]]
                t = ready(name, action)
                if t is None:
                    break
                st = by_name[name]
                dur = st.forward_s if action[0] == "F" else st.backward_s
                start = max(t, free[w])
                free[w] = start + dur
                done = (name, *action)
                end[done] = start + dur
                if action == ("B", last_backward[name]):
                    free[w] += st.sync_s
                busy[name] += dur
                pos[w] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {w: q[pos[w]] for w, q in queues.items() if pos[w] < len(q)}
            raise ValueError(f"the schedule deadlocks: each worker waits on an action that never runs: {stuck}")
    return Timeline(max([0.0, *end.values(), *free.values()]), busy, end, worker_of)


def mimo_timeline(
    *,
    mode: str,
    lm_schedule: str,
    lm_pp: int,
    microbatches: int,
    encoder_forward_s: float,
    lm_forward_s: float,
    backward_factor: float = 2.0,
    colocated: bool = False,
    encoder_pp: int = 1,
    virtual_stages: int = 1,
) -> Timeline:
    """The analytical step of one encoder (one stage) and a ``lm_pp``-stage language model, as
    :class:`~mimo_titan.pipeline.schedule.MimoSchedule` runs it in ``mode`` (``"streamed"``, ``"inline"`` or
    ``"whole_batch"``).

    Stage names: ``"encoder"`` (``"encoder.{j}"`` for ``encoder_pp > 1``, each stage's forward taking
    ``encoder_forward_s``) and ``"language.{k}"`` for the ``lm_pp · virtual_stages`` language stages (with
    Interleaved1F1B, stage ``k`` runs on language rank ``k mod lm_pp`` and its forward takes ``lm_forward_s /
    virtual_stages``: a rank's ``lm_forward_s`` of work per microbatch split over its chunks); colocated, every
    language rank ``i`` also runs its share of the encoder, ``"encoder@{i}"`` (its forward of ``m`` takes
    ``encoder_forward_s``, as on its own ranks; one encoder stage).

    Raises:
        ValueError: ``"inline"`` with ``lm_pp > 1`` or not colocated, ``"streamed"`` colocated, ``virtual_stages > 1``
            with another schedule than Interleaved1F1B.
    """
    from mimo_titan.planning.simulator import ModuleStep, StepSpec, simulate_step  # it builds on this module

    if mode == "inline" and (lm_pp != 1 or not colocated):
        raise ValueError("inline mode runs a colocated encoder in front of a single language stage")
    if mode == "streamed" and colocated:
        raise ValueError("streamed mode is for an encoder on ranks of its own")
    if mode not in ("streamed", "inline", "whole_batch"):
        raise ValueError(f"mode={mode!r}; choose streamed, inline or whole_batch")
    if colocated and encoder_pp != 1:
        raise ValueError("the colocated timeline models a single-stage encoder")
    group = "language" if colocated else ""
    bf = backward_factor
    spec = StepSpec(
        encoders=(ModuleStep("encoder", encoder_pp, encoder_forward_s, bf * encoder_forward_s, group=group),),
        language=ModuleStep("language", lm_pp, lm_forward_s, bf * lm_forward_s, group="language"),
        microbatches=microbatches,
        pipeline_schedule=lm_schedule,
        virtual_stages=virtual_stages,
        module_schedule="GPipe" if mode == "whole_batch" else "1F1B",
        colocated_encoders="inline" if mode == "inline" else "batch",
    )
    return simulate_step(spec).timeline
