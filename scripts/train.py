"""Train a MIMO model: ``torchrun --standalone --nproc_per_node=N scripts/train.py --config train_configs/X.toml``.

Overrides: ``--section.key=value`` (e.g. ``--training.steps=5``). Runs on CUDA/NCCL when GPUs exist, else CPU/gloo.
"""

from mimo_titan.config import parse_args
from mimo_titan.train.trainer import train


def main() -> None:
    train(parse_args())


if __name__ == "__main__":
    main()
