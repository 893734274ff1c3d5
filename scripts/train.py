"""Train a MIMO model: ``torchrun --standalone --nproc_per_node=N scripts/train.py --config train_configs/X.toml``.

Overrides: ``--section.key=value`` (e.g. ``--training.steps=5``). Runs on CUDA/NCCL when GPUs exist, else CPU/gloo.

A user error (config, layout, data, checkpoint, a diverged run) is printed once, by the lowest rank that raised
it, without a traceback, and every rank exits with status 1 (:mod:`mimo_titan.train.report`). SIGTERM / SIGINT
finish the current step, save a checkpoint when checkpointing is on, and exit 0.

``kernels.backend = "triton"`` (or ``MIMO_TITAN_KERNELS=triton``, which wins) forces the Triton kernels; on a
machine without CUDA this script turns on Triton's interpreter before the kernels are imported.
"""

import os
import sys

from mimo_titan.train.report import run_main


def main() -> None:
    from mimo_titan.config import parse_args

    cfg = parse_args()
    # the kernels read the backend when they are imported (Triton's interpreter must be on before they exist), so
    # export the config's choice first; an explicit environment variable wins
    if cfg.kernels.backend != "auto":
        os.environ.setdefault("MIMO_TITAN_KERNELS", cfg.kernels.backend)
    from mimo_titan.train.trainer import train

    train(cfg)


if __name__ == "__main__":
    sys.exit(run_main(main))
