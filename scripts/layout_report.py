"""The layout-search report: SigLIP-so400m + Qwen3-8B and + Qwen3-30B-A3B at 64 / 256 / 1,024 GPUs, sequence 8K
and 64K, the best heterogeneous layout beside the best homogeneous one.

    python scripts/layout_report.py [--device h100] [--json OUT.json]

Each row is ``scripts/plan_layout.py --config CFG --world-size N --device D --training.seq_len=S
--data.max_images_per_sample=I --training.global_batch_size=B`` with, per sequence length:

- 8K: 8 images per sample (8 x 729 = 5,832 image tokens of 8,192), 512 samples per step (4 M tokens);
- 64K: 64 images per sample (46,656 image tokens of 65,536: a short video), 128 samples per step (8 M tokens).

Prints a Markdown table (the figures of the one in README.md, which abbreviates the layouts; GiB: the best layout's
peak per rank) and with ``--json`` writes every row's ``plan_layout`` JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "SigLIP + Qwen3-8B": "train_configs/siglip_qwen3_8b_64gpu.toml",
    "SigLIP + Qwen3-30B-A3B": "train_configs/siglip_qwen3_30b_a3b_128gpu.toml",
}
WORLDS = (64, 256, 1024)
#: sequence length -> (images per sample, samples per step)
SEQUENCES = {8192: (8, 512), 65536: (64, 128)}


def scenario_overrides(seq_len: int) -> list[str]:
    """The config overrides of one sequence length."""
    images, gbs = SEQUENCES[seq_len]
    return [
        f"--training.seq_len={seq_len}",
        f"--data.max_images_per_sample={images}",
        f"--training.global_batch_size={gbs}",
    ]


def _cell(text: str) -> str:
    """``text`` for a Markdown table cell: a layout's ``" | "`` between modules would split it into columns."""
    return text.replace(" | ", "; ").replace("|", "/")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="h100", help="h100, h200, a100, b200 (default h100)")
    p.add_argument("--json", default=None, help="write every row's result here")
    args = p.parse_args(argv)

    from mimo_titan.config import load_config
    from mimo_titan.planning.devices import device_spec
    from mimo_titan.planning.search import search_layouts

    try:
        device = device_spec(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows, out = [], []
    for model, path in MODELS.items():
        for seq in SEQUENCES:
            for world in WORLDS:
                cfg = load_config(ROOT / path, scenario_overrides(seq))
                try:
                    r = search_layouts(cfg, world, device, top=1)
                except ValueError as exc:
                    rows.append(f"| {model} | {world:,} | {seq // 1024}K | no layout: {_cell(str(exc))} | | | | | |")
                    continue
                h = r.best_homogeneous
                hom = f"{h.kind}: {_cell(h.describe())}" if h else "none fits"
                gib = max(r.best.mem_per_rank_gib.values(), default=0.0)
                speedup = f"{r.speedup:.3f}" if r.speedup else "n/a"
                rows.append(
                    f"| {model} | {world:,} | {seq // 1024}K | {_cell(r.best.describe())} | "
                    f"{r.best.tokens_per_s / 1e6:.3f} | {gib:.0f} | {hom} | "
                    f"{h.tokens_per_s / 1e6 if h else float('nan'):.3f} | {speedup} |"
                )
                out.append({"model": model, "world_size": world, "seq_len": seq, **r.to_json()})
                print(f"  {model}, {world} GPUs, {seq // 1024}K: {r.seconds:.1f} s", file=sys.stderr)
    print(
        "| model | GPUs | seq | best heterogeneous | M tok/s | GiB | best homogeneous | M tok/s | speedup |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
