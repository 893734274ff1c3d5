"""Search the heterogeneous layout of a config for N devices and compare it with the best homogeneous one.

    python scripts/plan_layout.py --config train_configs/siglip_qwen3_8b_64gpu.toml --world-size 256 --device h100 \\
        [--costs COSTS.json] [--json OUT.json] [--emit-toml OUT.toml] [--top 5] [--section.key=value ...]

No process group, no weights, no device: the layouts are priced by the cost model (:mod:`mimo_titan.planning.costs`:
FLOPs and bytes at the device's planning efficiency, or the per-module speeds ``scripts/profile_modules.py``
measured, with ``--costs``), checked against the dry-run planner's memory model and played by the step simulator
(:mod:`mimo_titan.planning.simulator`). See :mod:`mimo_titan.planning.search` for what is enumerated.

Prints the top layouts by simulated tokens per second, the best homogeneous layouts (every encoder on the LM's
ranks and tensor parallelism; the encoder folded into LM stage 0 as torchtitan does), a key to the columns and
notation, and the speedup over the faster baseline (named).
``--json`` writes ``{"best": {...layout, "tokens_per_s", "step_s", "mem_per_rank_gib"}, "best_homogeneous": {...},
"speedup": F, "top": [...], ...}``; ``--emit-toml`` writes the config with the best layout's ``[parallelism.*]``
tables and ``training.microbatches``, ready for ``scripts/train.py --config`` (its first line is the command that
planned it). The config's own layout (``[parallelism.*]``, ``training.microbatches``) is ignored;
``--section.key=value`` (or ``--section.key value``) overrides the rest (e.g. ``--training.seq_len=8192
--data.max_images_per_sample=8``).
A bad input (unknown device, a world size no layout fits, a costs file of another config, a ``--json`` /
``--emit-toml`` path that cannot be written) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from typing import Any


def toml_text(data: dict[str, Any]) -> str:
    """``data`` (nested dicts of strings, numbers, booleans and lists of them) as TOML; ``None`` values are left out
    (TOML has no null: the loader's defaults take their place)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} as TOML")

    lines: list[str] = []

    def table(prefix: str, d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and v is not None}
        if prefix and (scalars or not any(isinstance(v, dict) for v in d.values())):
            lines.append(f"\n[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {value(v)}")
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v)

    table("", data)
    return "\n".join(lines).lstrip("\n") + "\n"


def _num(x: float, decimals: int) -> str:
    """``x`` with ``decimals`` decimals, more when it is below 1 so that two significant digits show (a tiny config's
    step of 40 us prints ``0.000040``, not ``0.000``); never in scientific notation."""
    if x > 0:
        decimals = max(decimals, 1 - math.floor(math.log10(x)))
    return f"{x:.{decimals}f}"


_LABEL = len("same_layout")
_KEY = """\
key: tokens/s = LM tokens per second (simulated); step s = one optimizer step; mem GiB = estimated peak of the
  busiest rank; [...] = the module's degrees (those of 1 left out); ac=full = activation checkpointing;
  M = training.microbatches; batch / inline = encoders on the LM's ranks, running a step's microbatches before the
  LM (batch) or each right before the LM's forward of it (inline); neither = encoders on ranks of their own;
  same_layout = every encoder on the LM's ranks with the LM's tp; folded = the encoder inside LM stage 0, as
  torchtitan runs it (simulated only); --json adds per-module memory and each simulated worker's busy fraction"""


def _row(rank: int | str, layout, width: int) -> str:
    mem = max(layout.mem_per_rank_gib.values(), default=0.0)
    return (
        f"{rank!s:<{_LABEL}} {layout.tokens_per_s:>12,.0f} {_num(layout.step_s, 3):>8} {_num(mem, 1):>8}  "
        f"{layout.describe()[:width]}"
    )


def _check_writable(flag: str, path: str | None) -> None:
    """``--json`` / ``--emit-toml`` must name a file in an existing folder: checked before the search runs."""
    from mimo_titan.errors import ConfigError

    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"{flag} {path}: the folder {folder} does not exist; create it or write elsewhere")
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        raise ConfigError(f"{flag} {path}: cannot write a file there; give a file path in a writable folder")


def main(argv: list[str] | None = None) -> int:
    from mimo_titan.config_help import CONFIG_KEYS_EPILOG

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=CONFIG_KEYS_EPILOG)
    p.add_argument("--config", required=True, help="a train_configs/*.toml file (its models, batch and sequence)")
    p.add_argument("--world-size", type=int, required=True, help="devices to lay out")
    p.add_argument("--device", required=True, help="h100, h200, a100, b200 or cpu")
    p.add_argument("--costs", default=None, help="a costs file from scripts/profile_modules.py (default: analytic)")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.add_argument("--emit-toml", default=None, help="write the config with the best layout here")
    p.add_argument("--top", type=int, default=5, help="heterogeneous layouts to print")
    args, overrides = p.parse_known_args(argv)  # the rest are config overrides: load_config parses (or refuses) them

    from mimo_titan.config import config_from_dict, load_config
    from mimo_titan.planning.devices import device_spec
    from mimo_titan.planning.search import layout_overrides, search_layouts

    try:
        if args.top < 1:
            raise ValueError(f"--top {args.top}: it must be >= 1")
        device = device_spec(args.device)
        _check_writable("--json", args.json)
        _check_writable("--emit-toml", args.emit_toml)
        # the search picks training.microbatches itself: the config's own value must not veto a global batch override
        cfg = load_config(args.config, ["--training.microbatches=1", *overrides])
        measured = None
        if args.costs:
            from mimo_titan.planning.profile import load_costs

            measured = load_costs(args.costs, cfg)
            _check_costs_device(measured, device.name, args.costs)
        result = search_layouts(cfg, args.world_size, device, measured=measured, top=args.top)
    except ValueError as exc:  # mimo_titan's UserError (config, layout, costs) is one
        print(f"error: {exc}", file=sys.stderr)
        return 2

    print(
        f"layouts of {args.config} on {args.world_size} x {device.name}: {cfg.training.global_batch_size} samples x "
        f"{cfg.training.seq_len} tokens per step, memory budget {result.budget_gib:.1f} GiB per rank; costs: "
        f"{'measured (' + args.costs + ')' if args.costs else 'analytic'}"
    )
    head = f"{'rank':<{_LABEL}} {'tokens/s':>12} {'step s':>8} {'mem GiB':>8}  layout"
    print(head + "\n" + "-" * len(head))
    for i, layout in enumerate(result.ranked, 1):
        print(_row(i, layout, 200))
    print("homogeneous baselines (one layout for every module):")
    for kind, base in result.homogeneous.items():
        print(_row(kind, base, 200) if base else f"{kind:<{_LABEL}} none fits memory and divides the batch")
    print(_KEY)
    sp = result.speedup
    h = result.best_homogeneous
    print(f"speedup of the best over the best homogeneous ({h.kind}): {sp:.3f}x" if sp and h else
          "speedup: no homogeneous layout fits")  # fmt: skip
    if sp and sp < 0.995 and h and h.kind == "folded":  # a tie (the folded encoder on every rank) is not news
        print(
            f"  the folded baseline is {(1 / sp - 1) * 100:.2g} % faster here: it is simulated only (mimo_titan does "
            "not run an encoder inside the LM's first stage, nor repeat it on the LM's cp ranks); the ranked layouts "
            "are the best mimo_titan runs"
        )
    print(f"searched {result.considered} module layouts, simulated {result.simulated} steps in {result.seconds:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, **result.to_json()}, f, indent=2)
    if args.emit_toml:
        best = config_from_dict(cfg.to_dict(), layout_overrides(result.best))
        text = (
            f"# emitted by scripts/plan_layout.py --config {args.config} --world-size {args.world_size} --device "
            f"{device.name}{''.join(' ' + shlex.quote(o) for o in overrides)}\n"
            f"# best layout: {result.best.describe()}\n"
            f"# simulated {_num(result.best.step_s, 3)} s per step, {result.best.tokens_per_s:,.0f} tokens/s\n"
        )
        with open(args.emit_toml, "w") as f:
            f.write(text + toml_text(best.to_dict()))
        print(f"wrote {os.path.abspath(args.emit_toml)}")
    return 0


def _check_costs_device(measured: dict, device: str, path: str) -> None:
    """A costs file measured on another device type than ``--device`` is refused (its speeds are that device's)."""
    from mimo_titan.errors import ConfigError

    got = str(measured.get("device", ""))
    ok = got == "cpu" if device == "cpu" else got.startswith("cuda") and device.lower() in got.lower()
    if not ok:
        raise ConfigError(
            f"--costs {path} was measured on {got or 'an unknown device'}, not on a {device}: its speeds do not "
            f"apply; profile on a {device} (scripts/profile_modules.py) or plan without --costs"
        )


if __name__ == "__main__":
    sys.exit(main())
