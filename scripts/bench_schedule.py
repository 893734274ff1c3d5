"""Benchmark the cross-module pipeline schedule: the real schedule, stages and bridge, compute replaced by sleeps.

    python scripts/bench_schedule.py --config train_configs/debug_noncolocated.toml \\
        --encoder-ms 10 --lm-ms 30 --microbatches 8 [--schedule 1F1B|GPipe|Interleaved1F1B] [--steps 5] \\
        [--json OUT] [--section.key=value ...]   # config overrides, e.g. --parallelism.vision.pp=2

    # virtual pipeline stages: each language rank runs 2 chunks of lm-ms / 2 each
    python scripts/bench_schedule.py --config train_configs/debug_noncolocated.toml --encoder-ms 10 --lm-ms 30 \\
        --microbatches 8 --schedule Interleaved1F1B --parallelism.virtual_stages=2

Every rank of the config's layout runs as a process on CPU/gloo (spawned here; no torchrun). Each encoder rank's
forward of a microbatch sleeps ``--encoder-ms`` (per encoder pipeline stage), each language stage's forward
``--lm-ms`` (with ``parallelism.virtual_stages = v``, Interleaved1F1B, each of a rank's v chunks ``--lm-ms / v``: the
same work per rank), every backward twice its forward; everything else is the training code path:
:class:`~mimo_titan.pipeline.schedule.MimoSchedule`, ``torch.distributed.pipelining`` stages and schedules, the
bridge's point-to-point transfers, the loss.

Printed (and with ``--json`` written as ``{"measured_s", "analytical_s", "encoder_first_s",
"encoder_first_analytical_s", "speedup", "busy_fraction_per_rank", ...}``):

- ``measured_s``: the median step time (slowest rank) of ``parallelism.module_schedule = "1F1B"``, the encoder
  leading the language stages microbatch by microbatch (colocated encoders: as ``colocated_encoders`` says);
- ``analytical_s``: the same schedule played with the same times and free communication
  (:func:`mimo_titan.pipeline.order.mimo_timeline`);
- ``encoder_first_s``: the measured step of ``module_schedule = "GPipe"`` (the encoder's whole batch first, its
  backwards after the language model's step);
- ``busy_fraction_per_rank``: each rank's sleeping (computing) time over the step, in the streamed schedule.

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
from types import SimpleNamespace

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


def main(argv: list[str] | None = None) -> dict:
    from mimo_titan.config_help import CONFIG_KEYS_EPILOG

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=CONFIG_KEYS_EPILOG)
    p.add_argument("--config", required=True)
    p.add_argument("--encoder-ms", type=float, required=True, help="encoder forward per microbatch per rank (ms)")
    p.add_argument(
        "--lm-ms",
        type=float,
        required=True,
        help="forward per microbatch per language pp rank (ms; split over its chunks)",
    )
    p.add_argument("--microbatches", type=int, required=True)
    p.add_argument(
        "--schedule",
        default=None,
        help="the language pipeline's schedule: 1F1B, GPipe or Interleaved1F1B (default: the config's)",
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--json", default=None, help="write the results here")
    args, extra = p.parse_known_args(argv)
    bad = [t for t in extra if not t.startswith("--")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")

    from mimo_titan.config import load_config
    from mimo_titan.errors import ConfigError
    from mimo_titan.pipeline.order import mimo_timeline
    from mimo_titan.topology.mesh import layouts_from_config
    from mimo_titan.train.trainer import validate_job

    cfg = load_config(args.config, extra)  # any other --section.key=value is a config override
    layouts = layouts_from_config(cfg.parallelism, cfg.model.language_name)
    M = args.microbatches
    unit = M * math.lcm(*(lay.dp for lay in layouts.values()))
    gbs = cfg.training.global_batch_size
    gbs = gbs if gbs % unit == 0 else unit * max(1, round(gbs / unit))
    overrides = [*extra, f"--training.microbatches={M}", f"--training.global_batch_size={gbs}"]
    if args.schedule:
        overrides.append(f"--parallelism.pipeline_schedule={args.schedule}")
    cfg = load_config(args.config, overrides)
    world = max(lay.end for lay in layouts.values())
    try:  # what every rank checks first: say it once, here
        validate_job(cfg, world)
    except ConfigError as exc:
        raise SystemExit(f"bench_schedule: {exc}") from None

    ctx = mp.get_context("spawn")
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
    colocated = any(layouts[n].rank_offset == lay_l.rank_offset for n in encoders)
    # encoders on the same ranks run one after the other: the busiest rank range sets the encoder stage's time
    sharing = max(sum(layouts[n].rank_offset == layouts[e].rank_offset for n in encoders) for e in encoders)
    enc_pp = max(layouts[n].pp for n in encoders)
    mode = got[0]["streamed"][2]

    def analytical(m: str):
        return mimo_timeline(
            mode=m,
            lm_schedule=cfg.parallelism.pipeline_schedule,
            lm_pp=lay_l.pp,
            microbatches=M,
            encoder_forward_s=sharing * args.encoder_ms / 1e3,
            lm_forward_s=args.lm_ms / 1e3,
            colocated=colocated,
            encoder_pp=enc_pp,
            virtual_stages=cfg.parallelism.virtual_stages,
        )

    try:
        ana, ana_first = analytical(mode), analytical("whole_batch")
    except ValueError as exc:  # a layout the analytical model does not cover (colocated encoder stages)
        raise SystemExit(f"bench_schedule: measured {got[0]['streamed'][0]:.4f} s; no analytical time: {exc}") from None
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

    result = {
        "config": args.config,
        "world_size": world,
        "microbatches": M,
        "global_batch_size": gbs,
        "encoder_ms": args.encoder_ms,
        "lm_ms": args.lm_ms,
        "pipeline_schedule": cfg.parallelism.pipeline_schedule,
        "virtual_stages": v,
        "mode": mode,
        "measured_s": round(measured, 4),
        "analytical_s": round(ana.step_s, 4),
        "encoder_first_s": round(first, 4),
        "encoder_first_analytical_s": round(ana_first.step_s, 4),
        "speedup": round(first / measured, 3),
        "measured_vs_analytical": round(measured / ana.step_s, 3),
        "busy_fraction_per_rank": busy,
        "encoder_first_busy_fraction_per_rank": busy_first,
        "stage_of_rank": {r: stage_of(r) for r in sorted(got)},
    }
    print(
        f"{args.config}: {world} ranks, M={M}, global batch {gbs}, encoder {args.encoder_ms} ms, LM {args.lm_ms} ms; "
        f"language schedule {cfg.parallelism.pipeline_schedule}" + (f", {v} virtual stages per rank" if v > 1 else "")
    )
    print(f"{'schedule':32s} {'measured s':>10s} {'analytical s':>12s}")
    print(f"{'module 1F1B (' + mode + ')':32s} {measured:10.4f} {ana.step_s:12.4f}")
    print(f"{'module GPipe (encoder first)':32s} {first:10.4f} {ana_first.step_s:12.4f}")
    print(f"speedup over encoder-first: {first / measured:.3f}x; measured / analytical: {measured / ana.step_s:.3f}")
    print("busy fraction per rank (streamed | encoder first):")
    for r in sorted(got):
        print(f"  rank {r} {stage_of(r):22s} {busy[r]:.2f} | {busy_first[r]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(0 if main() else 1)
