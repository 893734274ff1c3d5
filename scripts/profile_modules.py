"""Measure what each module of a config costs on this device: forward and backward time per microbatch.

    python scripts/profile_modules.py --config CFG.toml --json COSTS.json [--device cpu|cuda] [--samples 1,2]
        [--seq-len N] [--layers N] [--repeats 3] [--warmup 1] [--section.key=VALUE ...]

Builds every module of the config (each encoder, then the language model) alone on one device (no process group;
tp = cp = pp = 1) in the config's compute dtype (``parallelism.mixed_precision_param``: ``auto`` is bf16 on CUDA,
fp32 on CPU), feeds it a synthetic microbatch of each ``--samples`` size (images / clips of the config's size,
``data.max_images_per_sample`` per sample; LM rows of ``--seq-len`` tokens, default ``training.seq_len``) and
times its forward and backward (median of ``--repeats`` runs after ``--warmup``). Prints one line per module and
microbatch (forward ms, backward ms, achieved TFLOP/s = the model FLOPs of :mod:`mimo_titan.train.flops` over the
forward + backward time) and writes the cost file ``--json`` that the layout search reads
(:func:`mimo_titan.planning.profile.load_costs` checks that it fits the config it plans).

``--device`` defaults to CUDA when present, else the CPU. ``--layers N`` profiles every module with N layers
(its other shapes kept), so a model too large for one device is measured per layer, e.g. Qwen3-8B on one GPU::

    python scripts/profile_modules.py --config train_configs/siglip_qwen3_8b_64gpu.toml --json costs.json \\
        --layers 4 --samples 1,2,4

Config overrides (``--section.key=VALUE``) follow as in ``scripts/train.py``. A user error (config, option, no
CUDA device) prints one line ``error: ...`` and exits with status 2. File format: :mod:`mimo_titan.planning.profile`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn

EXIT_USER_ERROR = 2


class _UsageError(Exception):
    """A command line that does not make sense (printed as ``error: ...``)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    from mimo_titan.config_help import CONFIG_KEYS_EPILOG

    text = (__doc__ or "").replace("``", "")
    p = _Parser(description=text, epilog=CONFIG_KEYS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a train_configs/*.toml file")
    p.add_argument("--json", required=True, help="the cost file to write")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when present, else cpu)")
    p.add_argument("--samples", default="1,2", help="microbatch sizes in samples, comma separated (1,2)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per LM row (default: training.seq_len)")
    p.add_argument("--layers", type=int, default=None, help="num_layers of every module as profiled (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point; the median is kept (3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them (1)")
    return p


def _samples(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.strip("[] ").split(",") if t.strip()]
    except ValueError:
        raise _UsageError(f"--samples {text!r}: give comma-separated integers, e.g. --samples 1,2") from None
    if not values:
        raise _UsageError(f"--samples {text!r}: give at least one microbatch size, e.g. --samples 1,2")
    return values


def _check_writable(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise _UsageError(f"--json {path}: the folder {folder} does not exist")
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        raise _UsageError(f"--json {path}: cannot write a file there")


def table(costs: dict) -> str:
    """The printed summary of a cost dict: one line per module and microbatch."""
    lines = [
        f"device {costs['device']}, {costs['dtype']}, torch {costs['torch']}",
        f"{'module':<12} {'layers':>6} {'seq':>6} {'samples':>7} {'forward ms':>11} {'backward ms':>12} {'TFLOP/s':>9}",
    ]
    for name, m in costs["modules"].items():
        for p in m["points"]:
            seconds = p["forward_s"] + p["backward_s"]
            lines.append(
                f"{name:<12} {m['num_layers']:>6} {m['seq_len']:>6} {p['samples']:>7} {p['forward_s'] * 1e3:>11.1f} "
                f"{p['backward_s'] * 1e3:>12.1f} {p['train_flops'] / seconds / 1e12:>9.3f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; a user error prints ``error: ...`` (one line) and returns 2."""
    try:
        args, overrides = _parser().parse_known_args(argv)
        samples = _samples(args.samples)
        _check_writable(args.json)
        from mimo_titan.config import load_config
        from mimo_titan.inference.loading import resolve_device
        from mimo_titan.planning.profile import profile_modules

        cfg = load_config(args.config, overrides)
        device = resolve_device(args.device)
        costs = profile_modules(
            cfg,
            device=device,
            samples=samples,
            seq_len=args.seq_len,
            layers=args.layers,
            repeats=args.repeats,
            warmup=args.warmup,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except (_UsageError, ValueError) as exc:  # mimo_titan's UserError (config, option) is a ValueError
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(table(costs))
    tmp = args.json + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(costs, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
