"""Benchmark the cross-module pipeline schedule: the real schedule, stages and bridge, compute replaced by sleeps,
against the step simulator (:func:`mimo_titan.planning.simulator.simulate_step`).

    python scripts/bench_schedule.py --config train_configs/debug_noncolocated.toml \\
        --encoder-ms 10 --lm-ms 30 --microbatches 8 [--schedule 1F1B|GPipe|Interleaved1F1B] [--steps 5] \\
        [--json OUT] [--section.key=value ...]   # config overrides, e.g. --parallelism.vision.pp=2

    # virtual pipeline stages: each language rank runs 2 chunks of lm-ms / 2 each
    python scripts/bench_schedule.py --config train_configs/debug_noncolocated.toml --encoder-ms 10 --lm-ms 30 \\
        --microbatches 8 --schedule Interleaved1F1B --parallelism.virtual_stages=2

    # the simulator's validation: the layouts of VALIDATION_LAYOUTS, measured against simulated
    python scripts/bench_schedule.py --validate [--layouts noncolocated,lm_pp4] [--encoder-ms 10 --lm-ms 20 \\
        --microbatches 4] [--steps 5] [--json OUT]
    # the overhead constants ACTION_OVERHEAD_S and TRANSFER_S, fitted on the noncolocated layout
    python scripts/bench_schedule.py --calibrate [--json OUT]

Every rank of the config's layout runs as a process on CPU/gloo (forked from a server that imported torch and the
training code once; no torchrun). Each encoder rank's forward of a microbatch sleeps ``--encoder-ms`` (per encoder
pipeline stage), each language stage's forward ``--lm-ms`` (with ``parallelism.virtual_stages = v``,
Interleaved1F1B, each of a rank's v chunks ``--lm-ms / v``: the same work per rank), every backward twice its
forward; everything else is the training code path: :class:`~mimo_titan.pipeline.schedule.MimoSchedule`,
``torch.distributed.pipelining`` stages and schedules, the bridge's point-to-point transfers, the loss.

Printed (and with ``--json`` written as ``{"measured_s", "analytical_s", "encoder_first_s",
"encoder_first_analytical_s", "ideal_s", "speedup", "busy_fraction_per_rank", ...}``; ``--validate`` writes
``{"layouts": {name: that dict}}``):

- ``measured_s``: the median step time (slowest rank) of ``parallelism.module_schedule = "1F1B"``, the encoder
  leading the language stages microbatch by microbatch (colocated encoders: as ``colocated_encoders`` says);
- ``analytical_s``: the simulated step of the same layout and schedule (:func:`step_spec`): the sleeps plus the
  benchmark's measured overheads, :data:`ACTION_OVERHEAD_S` per compute action and :data:`TRANSFER_S` per transfer
  (two constants for every layout); ``measured_vs_analytical``: their ratio;
- ``ideal_s``: the simulated step of the sleeps alone (free communication, no overhead);
- ``encoder_first_s`` / ``encoder_first_analytical_s`` / ``encoder_first_ideal_s``: the same for
  ``module_schedule = "GPipe"`` (the encoder's whole batch first, its backwards after the language model's step);
- ``busy_fraction_per_rank``: each rank's sleeping (computing) time over the step; ``simulated_busy_fraction``: the
  simulator's per worker (sleeps alone).

The global batch is synthetic (one image per sample; ``global_batch_size`` raised to the smallest multiple of
``microbatches × lcm(DP sizes)`` when the config's does not split); the last stage's loss (real compute, outside
the sleeps) runs over a 16-token vocabulary so that it costs next to nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn

BENCH_VOCAB = 16
AUDIO_TOKENS = 16  # rows per sample of a non-ViT encoder (an audio clip) in the synthetic batch
_BUSY = [0.0]  # seconds this process slept "computing" (reset per step)


def _sleep(seconds: float) -> None:
    end = time.perf_counter() + seconds
    time.sleep(max(0.0, seconds - 2e-4))
    while time.perf_counter() < end:  # the last fraction of a millisecond, precisely
        pass
    _BUSY[0] += seconds


class _Sleep(torch.autograd.Function):
    """Forward: sleep ``seconds`` and return zeros of ``shape``; backward: sleep twice as long, zero gradients."""

    @staticmethod
    def forward(ctx, seconds: float, shape: tuple[int, ...], *inputs: torch.Tensor) -> torch.Tensor:
        ctx.seconds = seconds
        ctx.specs = [(t.shape, t.dtype) for t in inputs]
        _sleep(seconds)
        return torch.zeros(shape, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _sleep(2 * ctx.seconds)
        return (None, None, *(torch.zeros(s, dtype=d) for s, d in ctx.specs))


class SleepEncoder(nn.Module):
    """Stands in for an encoder (or one of its pipeline stages): images ``[n, C, H, W]`` (first stage) or the previous
    stage's ``[n, P, D]`` → ``[n, P, width]`` zeros after a sleep (``width`` = D between stages, the LM's H last)."""

    def __init__(self, seconds: float, tokens_per_image: int, width: int, *, hidden_size: int, first: bool = True):
        super().__init__()
        self.seconds, self.tokens_per_image, self.width, self.first = seconds, tokens_per_image, width, first
        self.cfg = SimpleNamespace(hidden_size=hidden_size)  # D, what travels between encoder stages
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = (self.w,) if self.first else (x, self.w)
        return _Sleep.apply(self.seconds, (x.shape[0], self.tokens_per_image, self.width), *inputs)


class SleepLanguageStage(nn.Module):
    """Stands in for a :class:`~mimo_titan.models.mimo.LanguageStage`: the same inputs and output shapes."""

    def __init__(self, seconds: float, *, is_first: bool, is_last: bool, vocab: int, hidden: int, cp: int, tp: int):
        super().__init__()
        self.seconds, self.is_first, self.is_last = seconds, is_first, is_last
        self.vocab, self.hidden, self.cp, self.tp = vocab, hidden, cp, tp
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, image_dense_BSH=None, position_ids=None, doc_ids=None):
        b = x.shape[0]
        s_cp = x.shape[1] // self.cp if self.is_first else x.shape[1] * self.tp  # this CP rank's tokens
        # the last stage's logits [b, S / cp, V / tp]; other stages' SP shard [b, S / (cp tp), H]
        shape = (b, s_cp, self.vocab // self.tp) if self.is_last else (b, s_cp // self.tp, self.hidden)
        inputs = [image_dense_BSH] if self.is_first else [x]
        return _Sleep.apply(self.seconds, shape, *[t for t in inputs if t is not None], self.w)


def synthetic_batch(cfg, placeholders: dict[int, int]):
    """A global batch of ``cfg``'s geometry: one item per sample and encoder, placeholder id ``t`` repeated
    ``placeholders[t]`` times after the first token (encoder after encoder)."""
    from mimo_titan.data.collate import IGNORE_INDEX, Batch

    g = torch.Generator().manual_seed(0)
    B, S = cfg.training.global_batch_size, cfg.training.seq_len
    ids = torch.randint(0, min(placeholders), (B, S), generator=g)
    at = 1
    for token, count in placeholders.items():
        ids[:, at : at + count] = token
        at += count
    labels = torch.cat([ids[:, 1:], torch.full((B, 1), IGNORE_INDEX)], 1)
    labels[torch.isin(labels, torch.tensor(list(placeholders)))] = IGNORE_INDEX
    size = cfg.model.vision.image_size
    return Batch(ids, labels, torch.zeros(B, 3, size, size), torch.ones(B, dtype=torch.int64), torch.arange(B))


def _tokens_per_item(section) -> int:
    """Rows one item of an encoder gives in the benchmark: a ViT's patches, 16 for any other encoder."""
    return (section.image_size // section.patch_size) ** 2 if section.type == "vit" else AUDIO_TOKENS


def _worker(rank: int, world: int, port: int, args, overrides: list[str], out) -> None:
    import torch.distributed as dist

    from mimo_titan.config import load_config
    from mimo_titan.models.specs import encoder_spec
    from mimo_titan.pipeline.bridge import Bridge
    from mimo_titan.pipeline.schedule import EncoderLane, MimoSchedule
    from mimo_titan.topology.mesh import build_topology
    from mimo_titan.train.trainer import validate_job

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=__import__("datetime").timedelta(seconds=300))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    cfg = load_config(args.config, overrides)
    layouts = validate_job(cfg, world)
    topology = build_topology(layouts, world, rank, "cpu")
    role = topology.role
    lang = role.language
    encoders = [n for n in layouts if n != lang]
    # a 16-token vocabulary keeps the (real) loss of the last stage out of the measurement; the last ids are the
    # encoders' placeholders
    H, V = cfg.model.language.hidden_size, BENCH_VOCAB
    token = {name: V - 1 - k for k, name in enumerate(encoders)}
    from mimo_titan.pipeline.stages import LanguageChunks, virtual_stage_indices

    sleepers: dict[str, nn.Module | None] = {}
    for name in encoders:
        sleepers[name] = None
        if role.holds(name):
            e_lay, e_stage = layouts[name], role.pp_stage(name)
            section = getattr(cfg.model, name)
            D = section.hidden_size
            last = e_stage == e_lay.pp - 1
            rows = _tokens_per_item(section)
            sleepers[name] = SleepEncoder(
                args.encoder_ms / 1e3, rows, H if last else D, hidden_size=D, first=e_stage == 0
            )
    language: nn.Module | None = None
    if role.holds(lang):
        lay, v = layouts[lang], cfg.parallelism.virtual_stages
        stages = virtual_stage_indices(lay.pp, v, role.pp_stage(lang))  # [pp stage] unless interleaved
        chunks = [
            SleepLanguageStage(
                args.lm_ms / 1e3 / v,
                is_first=k == 0,
                is_last=k == lay.pp * v - 1,
                vocab=V,
                hidden=H,
                cp=lay.cp,
                tp=lay.tp,
            )
            for k in stages
        ]
        language = chunks[0] if v == 1 else LanguageChunks(chunks, stages, lay.pp * v)
    mb_size = cfg.training.global_batch_size // cfg.training.microbatches
    vit = encoder_spec("vit")
    batch = synthetic_batch(cfg, {token[n]: _tokens_per_item(getattr(cfg.model, n)) for n in encoders})
    results = {}
    for variant, module_schedule in (("streamed", "1F1B"), ("encoder_first", "GPipe")):
        lanes = [
            EncoderLane(
                name,
                sleepers[name],
                Bridge(
                    layouts[name],
                    layouts[lang],
                    mb_size,
                    1,
                    H,
                    torch.float32,
                    torch.device("cpu"),
                    rank,
                    lane=k,
                    lanes=len(encoders),
                ),
                placeholder_id=token[name],
                inputs=vit.inputs,  # one stand-in "image" per sample for every encoder
                dummy_inputs=vit.dummy_inputs(cfg.model.vision),
                tokens_per_item=_tokens_per_item(getattr(cfg.model, name)),
            )
            for k, name in enumerate(encoders)
        ]
        schedule = MimoSchedule(
            topology,
            lanes,
            language,
            microbatches=cfg.training.microbatches,
            schedule=cfg.parallelism.pipeline_schedule,
            virtual_stages=cfg.parallelism.virtual_stages,
            module_schedule=module_schedule,
            colocated_encoders=cfg.parallelism.colocated_encoders,
            device=torch.device("cpu"),
            seq_len=cfg.training.seq_len,
            vocab_size=V,
            act_dtype=torch.float32,
        )
        times, busy = [], []
        for i in range(args.warmup + args.steps):
            dist.barrier()
            _BUSY[0] = 0.0
            t0 = time.perf_counter()
            schedule.step(batch)
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the step ends when its slowest rank ends
            if i >= args.warmup:
                times.append(float(dt))
                busy.append(_BUSY[0])
        results[variant] = (statistics.median(times), statistics.median(busy), schedule.mode)
    out.put((rank, results))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: What the benchmark costs beyond its sleeps, in seconds, as the simulator is given it (the same constants for every
#: layout): ``ACTION_OVERHEAD_S`` per compute action (one microbatch's forward or backward on one stage or chunk: the
#: Python work of ``torch.distributed.pipelining`` and ``MimoSchedule`` around the sleep, added to its time) and
#: ``TRANSFER_S`` per point-to-point transfer (a microbatch's activations or gradients between two stages or across a
#: bridge: gloo ``isend`` / ``irecv``; a latency on the dependency, holding neither rank).
#: Source: ``python scripts/bench_schedule.py --calibrate --steps 10`` (2026-12-04, the 2-core CPU machine shared with
#: other jobs, load average about 4): the "noncolocated" layout at 10 / 20 ms with 4 and 8 microbatches, both module
#: schedules; the fit left measured / simulated at 0.989, 1.007, 1.012 and 0.995 (rms 0.9 %). Per-rank traces of the
#: same layout agree: 1-2 ms between a rank's consecutive sleeps, 1-1.5 ms from one rank's sleep to the next rank's.
ACTION_OVERHEAD_S = 0.0010
TRANSFER_S = 0.0015


def _ranks(module: str, offset: int, num: int, **keys: int) -> list[str]:
    """Config overrides placing ``module`` on ranks ``[offset, offset + num)`` with ``parallelism.<module>.<key>``s."""
    keys = {"rank_offset": offset, "num_ranks": num, **keys}
    return [f"--parallelism.{module}.{k}={v}" for k, v in keys.items()]


_NONCOLOCATED = "train_configs/debug_noncolocated.toml"

#: The layouts ``--validate`` runs (and ``tests/test_simulator.py``): ``config``, config ``overrides`` and the
#: language pipeline's ``schedule`` (default: the config's). One rank per stage keeps them quick on 2 cores; the
#: schedules are those of the debug configs.
VALIDATION_LAYOUTS: dict[str, dict] = {
    # vision (1 rank) | language pp=2: debug_noncolocated.toml with one rank per stage; the calibration layout
    "noncolocated": dict(
        config=_NONCOLOCATED, overrides=_ranks("vision", 0, 1, dp_shard=1) + _ranks("language", 1, 2, pp=2, dp_shard=1)
    ),
    # debug_colocated.toml: vision and language on the same 2 ranks (dp_shard=2 each), the encoder's whole batch
    # around the language model's step
    "colocated": dict(config="train_configs/debug_colocated.toml", overrides=[]),
    # debug_vision_audio.toml with one rank per stage: vision | audio | language pp=2, both feeding LM stage 0
    "two_encoders": dict(
        config="train_configs/debug_vision_audio.toml",
        overrides=_ranks("vision", 0, 1, dp_shard=1)
        + _ranks("audio", 1, 1, dp_shard=1)
        + _ranks("language", 2, 2, pp=2, dp_shard=1),
    ),
    # vision pp=2 (2 ranks) | language pp=2
    "encoder_pp2": dict(
        config=_NONCOLOCATED,
        overrides=_ranks("vision", 0, 2, pp=2, dp_shard=1) + _ranks("language", 2, 2, pp=2, dp_shard=1),
    ),
    # vision | language pp=4
    "lm_pp4": dict(
        config=_NONCOLOCATED, overrides=_ranks("vision", 0, 1, dp_shard=1) + _ranks("language", 1, 4, pp=4, dp_shard=1)
    ),
    # vision | language pp=2 x 2 chunks per rank
    "interleaved": dict(
        config=_NONCOLOCATED,
        overrides=_ranks("vision", 0, 1, dp_shard=1)
        + _ranks("language", 1, 2, pp=2, dp_shard=1)
        + ["--parallelism.virtual_stages=2"],
        schedule="Interleaved1F1B",
    ),
    # vision and audio on one rank (one leading stage) | language pp=2
    "shared_encoders": dict(
        config="train_configs/debug_vision_audio.toml",
        overrides=_ranks("vision", 0, 1, dp_shard=1)
        + _ranks("audio", 0, 1, dp_shard=1)
        + _ranks("language", 1, 2, pp=2, dp_shard=1),
    ),
    # debug_colocated.toml with colocated_encoders = "inline": encode m right before the LM's forward of m
    "colocated_inline": dict(
        config="train_configs/debug_colocated.toml", overrides=["--parallelism.colocated_encoders=inline"]
    ),
}


def step_spec(
    cfg,
    layouts: dict,
    *,
    encoder_ms: float,
    lm_ms: float,
    module_schedule: str,
    action_overhead_s: float = ACTION_OVERHEAD_S,
    transfer_s: float = TRANSFER_S,
):
    """The :class:`~mimo_titan.planning.simulator.StepSpec` of a benchmark run: every encoder stage's forward
    ``encoder_ms``, every language rank's ``lm_ms`` (split over its chunks), backwards twice their forwards, plus
    ``action_overhead_s`` per action and ``transfer_s`` per transfer. Modules share a group when their rank ranges
    start at the same rank (the layouts do not overlap otherwise)."""
    from mimo_titan.planning.simulator import ModuleStep, StepSpec

    lang = next(n for n, lay in layouts.items() if lay.is_language)
    encoders = [n for n in layouts if n != lang]
    e, lm, a = encoder_ms / 1e3, lm_ms / 1e3, action_overhead_s
    v = cfg.parallelism.virtual_stages

    def group(name: str) -> str:
        return f"ranks@{layouts[name].rank_offset}"

    return StepSpec(
        encoders=tuple(
            ModuleStep(n, layouts[n].pp, e + a, 2 * e + a, send_s=transfer_s, group=group(n)) for n in encoders
        ),
        language=ModuleStep(lang, layouts[lang].pp, lm + v * a, 2 * lm + v * a, send_s=transfer_s, group=group(lang)),
        microbatches=cfg.training.microbatches,
        pipeline_schedule=cfg.parallelism.pipeline_schedule,
        virtual_stages=v,
        module_schedule=module_schedule,
        colocated_encoders=cfg.parallelism.colocated_encoders,
        bridge_s=dict.fromkeys(encoders, transfer_s),
    )


def job_overrides(config: str, overrides: list[str], microbatches: int, schedule: str | None) -> list[str]:
    """``overrides`` plus the benchmark's: ``training.microbatches``, a ``training.global_batch_size`` that splits
    (the smallest multiple of ``microbatches × lcm(DP sizes)`` near the config's) and the language schedule."""
    cfg, layouts = load_job(config, overrides)
    unit = microbatches * math.lcm(*(lay.dp for lay in layouts.values()))
    gbs = cfg.training.global_batch_size
    gbs = gbs if gbs % unit == 0 else unit * max(1, round(gbs / unit))
    out = [*overrides, f"--training.microbatches={microbatches}", f"--training.global_batch_size={gbs}"]
    return out + ([f"--parallelism.pipeline_schedule={schedule}"] if schedule else [])


def load_job(config: str, overrides: list[str]):
    """``(cfg, layouts)``: the config with ``--section.key=value`` overrides and its module layouts."""
    from mimo_titan.config import load_config
    from mimo_titan.topology.mesh import layouts_from_config

    cfg = load_config(config, overrides)
    return cfg, layouts_from_config(cfg.parallelism, cfg.model.language_name)


def simulated(res: dict, module_schedule: str, action_overhead_s: float, transfer_s: float):
    """:func:`~mimo_titan.planning.simulator.simulate_step` of a :func:`run` result's layout and times under
    ``module_schedule``, with the given overheads."""
    from mimo_titan.planning.simulator import simulate_step

    cfg, layouts = load_job(res["config"], res["job_overrides"])
    spec = step_spec(
        cfg,
        layouts,
        encoder_ms=res["encoder_ms"],
        lm_ms=res["lm_ms"],
        module_schedule=module_schedule,
        action_overhead_s=action_overhead_s,
        transfer_s=transfer_s,
    )
    return simulate_step(spec)


def run(
    config: str,
    *,
    encoder_ms: float,
    lm_ms: float,
    microbatches: int,
    overrides: list[str] = (),  # type: ignore[assignment]
    schedule: str | None = None,
    steps: int = 5,
    warmup: int = 2,
) -> dict:
    """Run the benchmark of one layout: every rank as a process (forked from a server that has imported torch and
    the training code), both module schedules; return the result dict (see the module docstring).

    Raises:
        SystemExit: a config the job refuses, or a rank that fails or does not report within 600 s.
    """
    from mimo_titan.errors import ConfigError
    from mimo_titan.planning.simulator import simulate_step
    from mimo_titan.train.trainer import validate_job

    extra = list(overrides)
    overrides = job_overrides(config, extra, microbatches, schedule)
    cfg, layouts = load_job(config, overrides)
    M, gbs = microbatches, cfg.training.global_batch_size
    world = max(lay.end for lay in layouts.values())
    try:  # what every rank checks first: say it once, here
        validate_job(cfg, world)
    except ConfigError as exc:
        raise SystemExit(f"bench_schedule: {exc}") from None

    args = SimpleNamespace(config=config, encoder_ms=encoder_ms, lm_ms=lm_ms, steps=steps, warmup=warmup)
    # ranks fork from a server that imported torch and the training code once (spawning each rank re-imports them:
    # seconds per rank on 2 cores); it has run no torch op, so forking it is safe
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "mimo_titan.train.trainer"])
    out = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, overrides, out)) for r in range(world)]
    for proc in procs:
        proc.start()
    got: dict[int, dict] = {}
    deadline = time.time() + 600
    while len(got) < world and time.time() < deadline:
        if not out.empty():
            r, res = out.get()
            got[r] = res
        elif any(proc.exitcode not in (None, 0) for proc in procs):
            break
        else:
            time.sleep(0.05)
    for proc in procs:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    if len(got) < world:
        raise SystemExit(f"bench_schedule: only {len(got)} of {world} ranks reported (see their errors above)")

    lang = next(n for n, lay in layouts.items() if lay.is_language)
    encoders = [n for n in layouts if n != lang]
    lay_l = layouts[lang]
    mode = got[0]["streamed"][2]
    kw = dict(encoder_ms=encoder_ms, lm_ms=lm_ms)
    try:
        sim = simulate_step(step_spec(cfg, layouts, module_schedule="1F1B", **kw))
        sim_first = simulate_step(step_spec(cfg, layouts, module_schedule="GPipe", **kw))
        ideal = simulate_step(step_spec(cfg, layouts, module_schedule="1F1B", action_overhead_s=0, transfer_s=0, **kw))
        ideal_first = simulate_step(
            step_spec(cfg, layouts, module_schedule="GPipe", action_overhead_s=0, transfer_s=0, **kw)
        )
    except ValueError as exc:  # a layout the simulator does not cover (colocated encoder stages)
        raise SystemExit(f"bench_schedule: measured {got[0]['streamed'][0]:.4f} s; no simulated time: {exc}") from None
    measured = got[0]["streamed"][0]
    first = got[0]["encoder_first"][0]
    busy = {r: round(got[r]["streamed"][1] / measured, 3) for r in sorted(got)}
    busy_first = {r: round(got[r]["encoder_first"][1] / first, 3) for r in sorted(got)}

    v = cfg.parallelism.virtual_stages

    def stage_of(r: int) -> str:
        names = []
        for n in encoders:
            lay = layouts[n]
            if r in lay.ranks:
                names.append(n if lay.pp == 1 else f"{n}.{(r - lay.rank_offset) // lay.stage_size}")
        if r in lay_l.ranks:
            pp_rank = (r - lay_l.rank_offset) // lay_l.stage_size
            names.append(f"{lang}.{'+'.join(str(pp_rank + j * lay_l.pp) for j in range(v))}")  # its (virtual) stages
        return "+".join(names)

    return {
        "config": config,
        "overrides": extra,
        "job_overrides": overrides,
        "world_size": world,
        "microbatches": M,
        "global_batch_size": gbs,
        "encoder_ms": encoder_ms,
        "lm_ms": lm_ms,
        "pipeline_schedule": cfg.parallelism.pipeline_schedule,
        "virtual_stages": v,
        "mode": mode,
        "measured_s": round(measured, 4),
        "analytical_s": round(sim.step_s, 4),
        "encoder_first_s": round(first, 4),
        "encoder_first_analytical_s": round(sim_first.step_s, 4),
        "ideal_s": round(ideal.step_s, 4),
        "encoder_first_ideal_s": round(ideal_first.step_s, 4),
        "speedup": round(first / measured, 3),
        "measured_vs_analytical": round(measured / sim.step_s, 3),
        "encoder_first_measured_vs_analytical": round(first / sim_first.step_s, 3),
        "action_overhead_s": ACTION_OVERHEAD_S,
        "transfer_s": TRANSFER_S,
        "busy_fraction_per_rank": busy,
        "encoder_first_busy_fraction_per_rank": busy_first,
        "simulated_busy_fraction": {w: round(f, 3) for w, f in ideal.busy_fraction.items()},
        "stage_of_rank": {r: stage_of(r) for r in sorted(got)},
    }


def _print_run(res: dict) -> None:
    v, mode = res["virtual_stages"], res["mode"]
    print(
        f"{' '.join([res['config'], *res['overrides']])}: {res['world_size']} ranks, M={res['microbatches']}, global "
        f"batch {res['global_batch_size']}, encoder {res['encoder_ms']} ms, LM {res['lm_ms']} ms; language schedule "
        f"{res['pipeline_schedule']}" + (f", {v} virtual stages per rank" if v > 1 else "")
    )
    print(f"{'schedule':32s} {'measured s':>10s} {'simulated s':>11s} {'sleeps only s':>13s}")
    streamed = f"module 1F1B ({mode})"
    print(f"{streamed:32s} {res['measured_s']:10.4f} {res['analytical_s']:11.4f} {res['ideal_s']:13.4f}")
    print(
        f"{'module GPipe (encoder first)':32s} {res['encoder_first_s']:10.4f} "
        f"{res['encoder_first_analytical_s']:11.4f} {res['encoder_first_ideal_s']:13.4f}"
    )
    print(
        f"speedup over encoder-first: {res['speedup']:.3f}x; measured / simulated: {res['measured_vs_analytical']:.3f}"
        f" | {res['encoder_first_measured_vs_analytical']:.3f}"
    )
    print("busy fraction per rank (streamed | encoder first):")
    for r, f in res["busy_fraction_per_rank"].items():
        print(
            f"  rank {r} {res['stage_of_rank'][r]:22s} {f:.2f} | {res['encoder_first_busy_fraction_per_rank'][r]:.2f}"
        )


def validate(
    names: list[str] | None = None,
    *,
    encoder_ms: float = 10.0,
    lm_ms: float = 20.0,
    microbatches: int = 4,
    steps: int = 5,
    warmup: int = 2,
) -> dict[str, dict]:
    """Run :data:`VALIDATION_LAYOUTS` (or those named) with the same times; return ``{layout: run(...) result}``.

    Raises:
        SystemExit: an unknown layout name, or a run that fails (see :func:`run`).
    """
    names = list(VALIDATION_LAYOUTS) if names is None else names
    unknown = [n for n in names if n not in VALIDATION_LAYOUTS]
    if unknown:
        raise SystemExit(f"bench_schedule: unknown --layouts {unknown}; choose from {list(VALIDATION_LAYOUTS)}")
    root = Path(__file__).resolve().parents[1]
    out = {}
    for name in names:
        lay = VALIDATION_LAYOUTS[name]
        out[name] = run(
            str(root / lay["config"]),
            overrides=lay["overrides"],
            schedule=lay.get("schedule"),
            encoder_ms=encoder_ms,
            lm_ms=lm_ms,
            microbatches=microbatches,
            steps=steps,
            warmup=warmup,
        )
    return out


def calibrate(
    *,
    encoder_ms: float = 10.0,
    lm_ms: float = 20.0,
    microbatches: tuple[int, ...] = (4, 8),
    steps: int = 5,
    warmup: int = 2,
) -> dict:
    """Fit :data:`ACTION_OVERHEAD_S` and :data:`TRANSFER_S` on the ``"noncolocated"`` layout: run it with each
    number of microbatches (both module schedules: four measured steps by default) and take the pair, on a 0.1 ms grid
    over [0, 5] ms, whose simulated steps have the least sum of squared relative errors.

    Returns:
        ``{"action_overhead_s", "transfer_s", "rms_relative_error", "points": [[M, module schedule, measured s,
        simulated s], ...]}``.
    """
    from mimo_titan.planning.simulator import simulate_step

    points: list[tuple[int, str, Any, Any, float]] = []  # M, module schedule, cfg, layouts, measured s
    for M in microbatches:
        one = validate(["noncolocated"], encoder_ms=encoder_ms, lm_ms=lm_ms, microbatches=M, steps=steps, warmup=warmup)
        res = one["noncolocated"]
        cfg, layouts = load_job(res["config"], res["job_overrides"])
        for module_schedule, key in (("1F1B", "measured_s"), ("GPipe", "encoder_first_s")):
            points.append((M, module_schedule, cfg, layouts, float(res[key])))

    def sims(a: float, t: float) -> list[float]:
        return [
            simulate_step(
                step_spec(cfg, lay, encoder_ms=encoder_ms, lm_ms=lm_ms, module_schedule=ms, action_overhead_s=a,
                          transfer_s=t)
            ).step_s
            for _, ms, cfg, lay, _ in points
        ]  # fmt: skip

    def error(a: float, t: float) -> float:
        return sum((s / p[4] - 1) ** 2 for s, p in zip(sims(a, t), points))

    grid = [i * 1e-4 for i in range(51)]
    err, a, t = min((error(a, t), a, t) for a in grid for t in grid)
    out: dict[str, Any] = {
        "action_overhead_s": round(a, 6),
        "transfer_s": round(t, 6),
        "rms_relative_error": round(math.sqrt(err / len(points)), 4),
        "points": [[p[0], p[1], round(p[4], 4), round(s, 4)] for p, s in zip(points, sims(a, t))],
    }
    print(f"noncolocated layout, encoder {encoder_ms} ms, LM {lm_ms} ms, microbatches {list(microbatches)}:")
    for M, ms, meas, sim in out["points"]:
        print(f"  M={M} module {ms:5s} measured {meas:.4f} s simulated {sim:.4f} s ratio {meas / sim:.3f}")
    print(f"ACTION_OVERHEAD_S = {a:.4f}  TRANSFER_S = {t:.4f}  (rms relative error {out['rms_relative_error']})")
    return out


def _print_table(results: dict[str, dict]) -> None:
    print(
        f"{'layout':16s} {'ranks':>5s} {'module schedule':28s} {'measured s':>10s} {'simulated s':>11s} {'ratio':>6s}"
    )
    for name, res in results.items():
        rows = [
            (f"1F1B ({res['mode']})", res["measured_s"], res["analytical_s"]),
            ("GPipe (encoder first)", res["encoder_first_s"], res["encoder_first_analytical_s"]),
        ]
        for label, meas, sim in rows:
            print(f"{name:16s} {res['world_size']:5d} {label:28s} {meas:10.4f} {sim:11.4f} {meas / sim:6.3f}")


def main(argv: list[str] | None = None) -> dict:
    from mimo_titan.config_help import CONFIG_KEYS_EPILOG

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=CONFIG_KEYS_EPILOG)
    p.add_argument("--config", default=None, help="the layout to run (or --validate)")
    p.add_argument("--encoder-ms", type=float, default=None, help="encoder forward per microbatch per rank (ms)")
    p.add_argument(
        "--lm-ms",
        type=float,
        default=None,
        help="forward per microbatch per language pp rank (ms; split over its chunks)",
    )
    p.add_argument("--microbatches", type=int, default=None)
    p.add_argument(
        "--schedule",
        default=None,
        help="the language pipeline's schedule: 1F1B, GPipe or Interleaved1F1B (default: the config's)",
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--validate",
        action="store_true",
        help="run the validation layouts (VALIDATION_LAYOUTS; default times 10 / 20 ms, 4 microbatches) and print "
        "measured against simulated",
    )
    p.add_argument("--layouts", default=None, help="with --validate: a comma-separated subset of the layouts")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="fit ACTION_OVERHEAD_S and TRANSFER_S on the noncolocated layout (4 and 8 microbatches)",
    )
    args, extra = p.parse_known_args(argv)
    bad = [t for t in extra if not t.startswith("--")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    result: dict
    if args.calibrate:
        result = calibrate(
            encoder_ms=10.0 if args.encoder_ms is None else args.encoder_ms,
            lm_ms=20.0 if args.lm_ms is None else args.lm_ms,
            steps=args.steps,
            warmup=args.warmup,
        )
    elif args.validate:
        if args.config or extra:
            p.error("--validate runs its own layouts: give no --config and no config overrides")
        results = validate(
            args.layouts.split(",") if args.layouts else None,
            encoder_ms=10.0 if args.encoder_ms is None else args.encoder_ms,
            lm_ms=20.0 if args.lm_ms is None else args.lm_ms,
            microbatches=4 if args.microbatches is None else args.microbatches,
            steps=args.steps,
            warmup=args.warmup,
        )
        _print_table(results)
        result = {"layouts": results}
    else:
        missing = [f for f in ("config", "encoder_ms", "lm_ms", "microbatches") if getattr(args, f) is None]
        if missing:
            p.error(f"give {', '.join('--' + f.replace('_', '-') for f in missing)} (or --validate)")
        result = run(
            args.config,
            overrides=extra,
            schedule=args.schedule,
            encoder_ms=args.encoder_ms,
            lm_ms=args.lm_ms,
            microbatches=args.microbatches,
            steps=args.steps,
            warmup=args.warmup,
        )
        _print_run(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(0 if main() else 1)
