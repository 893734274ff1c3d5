"""Write the synthetic coloured-shapes captioning data (:mod:`mimo_titan.data.synthetic`): a training shard and a
held-out shard with other samples (another seed).

    python scripts/make_shapes_data.py --out data/shapes [--train 2000] [--val 90] [--image-size 32] [--seed 0]

Writes ``OUT/shapes-train-0000.tar`` and ``OUT/shapes-val-0000.tar`` (WebDataset: ``<key>.png`` + ``<key>.txt``
captions such as ``"a red dot"``), the data of ``train_configs/shapes_tiny.toml``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--train", type=int, default=2000, help="training samples")
    parser.add_argument("--val", type=int, default=90, help="held-out samples")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training shard (held-out: seed + 1)")
    args = parser.parse_args(argv)

    from mimo_titan.data.synthetic import write_shapes_shard

    if args.train < 1 or args.val < 1:
        print("error: --train and --val must be >= 1", file=sys.stderr)
        return 2
    if args.image_size < 16:
        print(f"error: --image-size {args.image_size}: the shapes need at least 16 pixels", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    for name, n, seed in (("train", args.train, args.seed), ("val", args.val, args.seed + 1)):
        path = os.path.join(args.out, f"shapes-{name}-0000.tar")
        write_shapes_shard(path, num_samples=n, seed=seed, image_size=args.image_size)
        print(f"{path}: {n} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
