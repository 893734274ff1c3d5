"""Dry-run planner: validate a config for a world size and print what each module costs per rank.

    python scripts/plan.py --config train_configs/debug_noncolocated.toml [--world-size 8] [--json OUT]

No process group, no weights (the model is built on the meta device). Prints, per module: its ranks, layout,
parameters (total and per rank), the estimated peak memory per rank (weights, gradients, AdamW state, FSDP
gathers, activations) and the training FLOPs per step. ``--json`` also writes them as
``{"world_size", "params_total", "modules": {name: {"params", "ranks", "mem_per_rank_gib", "flops_per_step", ...}}}``.
A config error is printed as one line naming the field (exit status 2). See :mod:`mimo_titan.train.planner`.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from mimo_titan.config_help import CONFIG_KEYS_EPILOG

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=CONFIG_KEYS_EPILOG)
    parser.add_argument("--config", required=True, help="a train_configs/*.toml file")
    parser.add_argument(
        "--world-size", type=int, default=None, help="ranks to plan for (default: the end of the last rank range)"
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="device type to plan for")
    parser.add_argument("--json", default=None, help="also write the plan as JSON to this file")
    args, overrides = parser.parse_known_args(argv)

    from mimo_titan.config import load_config
    from mimo_titan.train.planner import plan_job

    try:
        cfg = load_config(args.config, overrides)
        world = args.world_size
        if world is None:
            world = max(m.rank_offset + m.num_ranks for m in cfg.parallelism.modules.values())
        plan = plan_job(cfg, world, device_type=args.device)
    except ValueError as exc:  # mimo_titan's UserError (config, layout, data) is one
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"plan for {args.config}")
    print(plan.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan.to_json(), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
