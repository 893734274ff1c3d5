"""Benchmark the job build (meshes, meta-device model, TP / EP / CP plans, FSDP2, shard init, optimizers): time and
peak host memory per rank, against the bound ``1.5 × 16 bytes × (the rank's parameter share) + 1.5 GiB``.

    python scripts/bench_build.py [--config train_configs/debug_noncolocated.toml] [--backend gloo|fake]
        [--ranks 0,2,5] [--json OUT] [--section.key=value ...]   # config overrides on top of the 1 B model

By default the config's layout (debug_noncolocated: vision on ranks 0-1 with dp_shard=2, the language model on
ranks 2-7 with pp=2 × dp_shard=3) builds a ~1.1 B-parameter model (:data:`MODEL_1B`: a 1 B decoder of hidden 2048,
18 layers, vocabulary 32768, and an 86 M ViT-B/16 at 224 px), every rank a process on CPU:

- ``--backend gloo`` (default): all ranks at once, one gloo process group (what a training run does);
- ``--backend fake``: one rank at a time (``--ranks``, default all) in a world of the ``fake`` backend (meshes and
  FSDP for any rank in one process, collectives do nothing): measures one rank's build alone, e.g. a build that
  would not fit in this machine's memory with all ranks at once (the build before meta-device construction, run
  with ``PYTHONPATH`` at an older checkout).

Per rank it prints the build time (``build_job``, seconds), the peak RSS (``ru_maxrss``, the process's whole life:
``import torch`` and the process group included), the rank's parameter share (the local elements of its FSDP / TP /
EP shards) and the bound: 16 bytes per parameter (fp32 weights, gradients and AdamW's two moments) × 1.5 + 1.5 GiB.
Building the optimizers is part of the build (AdamW allocates its moments at the first step, which the bound
counts). ``--json`` writes ``{"ranks": {rank: {...}}, "config": ..., "overrides": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time

import torch
import torch.multiprocessing as mp

#: ~1 B decoder (hidden 2048, 18 layers, GQA 16 / 8 heads, SwiGLU 5632, vocabulary 32768, untied) + ViT-B/16 at 224 px
MODEL_1B = [
    "--model.language.vocab_size=32768",
    "--model.language.hidden_size=2048",
    "--model.language.intermediate_size=5632",
    "--model.language.num_layers=18",
    "--model.language.num_heads=16",
    "--model.language.num_kv_heads=8",
    "--model.vision.image_size=224",
    "--model.vision.patch_size=16",
    "--model.vision.hidden_size=768",
    "--model.vision.num_layers=12",
    "--model.vision.num_heads=12",
    "--model.vision.intermediate_size=3072",
    "--model.vision.projector_intermediate_size=2048",
    "--training.seq_len=256",
]
GIB = 2**30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, backend: str, config: str, overrides: list[str], out) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    try:
        if backend == "fake":
            from torch.testing._internal.distributed.fake_pg import FakeStore

            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        else:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        from mimo_titan.config import load_config
        from mimo_titan.train.trainer import build_job

        cfg = load_config(config, overrides)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t0 = time.perf_counter()
        job = build_job(cfg, torch.device("cpu"))
        build_s = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        params = {
            name: sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in module.parameters())
            for name, module in job.modules.items()
        }
        share = sum(params.values())
        bound = 1.5 * 16 * share + 1.5 * GIB
        out.put(
            (
                rank,
                {
                    "modules": params,
                    "build_s": build_s,
                    "peak_rss_gib": peak / GIB,
                    "rss_before_build_gib": rss_before / GIB,
                    "params_share": share,
                    "bound_gib": bound / GIB,
                    "within_bound": peak <= bound,
                },
            )
        )
        if backend != "fake":
            dist.barrier()
        dist.destroy_process_group()
    except BaseException as exc:  # report, then fail the process
        out.put((rank, {"error": f"{type(exc).__name__}: {exc}"}))
        raise


def _run(ctx, ranks: list[int], world: int, backend: str, config: str, overrides: list[str]) -> dict[int, dict]:
    out = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, backend, config, overrides, out)) for r in ranks]
    for proc in procs:
        proc.start()
    got: dict[int, dict] = {}
    deadline = time.time() + 1200
    while len(got) < len(ranks) and time.time() < deadline:
        if not out.empty():
            r, res = out.get()
            got[r] = res
        elif any(proc.exitcode not in (None, 0) for proc in procs) and out.empty():
            time.sleep(1.0)
            if out.empty():
                break
        else:
            time.sleep(0.05)
    for proc in procs:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    return got


def main(argv: list[str] | None = None) -> dict:
    from mimo_titan.config_help import CONFIG_KEYS_EPILOG

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=CONFIG_KEYS_EPILOG)
    p.add_argument("--config", default="train_configs/debug_noncolocated.toml")
    p.add_argument("--backend", choices=("gloo", "fake"), default="gloo")
    p.add_argument("--ranks", default=None, help="with --backend fake: the ranks to build, e.g. 0,2,5 (default all)")
    p.add_argument("--json", default=None, help="write the results here")
    args, extra = p.parse_known_args(argv)
    bad = [t for t in extra if not t.startswith("--")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")

    from mimo_titan.config import load_config
    from mimo_titan.topology.mesh import layouts_from_config

    overrides = [*MODEL_1B, *extra]
    cfg = load_config(args.config, overrides)
    layouts = layouts_from_config(cfg.parallelism, cfg.model.language_name)
    world = max(lay.end for lay in layouts.values())
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else list(range(world))
    ctx = mp.get_context("spawn")
    if args.backend == "gloo":
        got = _run(ctx, list(range(world)), world, "gloo", args.config, overrides)
    else:
        got = {}
        for r in ranks:  # one at a time: each rank's build alone in memory
            got.update(_run(ctx, [r], world, "fake", args.config, overrides))
    from mimo_titan.checkpoint.state import meta_model

    total = {k: sum(p.numel() for p in getattr(meta_model(cfg.model), k).parameters()) for k in layouts}
    print(f"model: {', '.join(f'{k} {v / 1e6:.1f} M' for k, v in total.items())} parameters; {world} ranks")
    print(f"{'rank':>4} {'modules':<28} {'share (M)':>10} {'build s':>8} {'peak RSS GiB':>13} {'bound GiB':>10}  ok")
    failed = False
    for r in sorted(got):
        res = got[r]
        if "error" in res:
            print(f"{r:>4} error: {res['error']}")
            failed = True
            continue
        mods = ", ".join(res["modules"])
        print(
            f"{r:>4} {mods:<28} {res['params_share'] / 1e6:>10.1f} {res['build_s']:>8.2f} "
            f"{res['peak_rss_gib']:>13.2f} {res['bound_gib']:>10.2f}  {'yes' if res['within_bound'] else 'NO'}"
        )
    missing = sorted(set(ranks if args.backend == "fake" else range(world)) - set(got))
    if missing:
        print(f"ranks {missing} did not report (see their errors above)")
        failed = True
    result = {"config": args.config, "overrides": overrides, "backend": args.backend, "model_params": total}
    result["ranks"] = got
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if failed:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
