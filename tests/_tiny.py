"""A tiny MIMO config for tests, on the real CC12M shard, with any module layout."""

from __future__ import annotations

import copy
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.exists():  # CI clones the repo with shared/ beside it; fall back to the cwd-relative path
    SHARED = Path("../shared/data").resolve()

BASE = {
    "job": {"name": "test", "seed": 1234},
    "model": {
        "vision": {
            "image_size": 32,
            "patch_size": 16,
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "intermediate_size": 64,
            "projector_intermediate_size": 64,
        },
        "language": {
            "vocab_size": 2048,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
        },
    },
    "parallelism": {"pipeline_schedule": "1F1B", "mixed_precision_param": "float32"},
    "training": {"steps": 10, "global_batch_size": 4, "microbatches": 2, "seq_len": 48, "max_grad_norm": 1.0},
    "optimizer": {"lr": 1e-3, "weight_decay": 0.1},
    "lr_schedule": {"warmup_steps": 0},
    "data": {"path": str(SHARED / "cc12m"), "tokenizer": str(SHARED / "tokenizer"), "max_images_per_sample": 1},
}


def _merge(dst: dict, upd: dict) -> None:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def tiny_config_dict(vision: dict, language: dict, **sections) -> dict:
    """``BASE`` with the given module layouts; ``sections`` maps a section name to keys merged into it (deeply)."""
    d = copy.deepcopy(BASE)
    d["parallelism"]["vision"] = dict(vision)
    d["parallelism"]["language"] = dict(language)
    _merge(d, sections)
    return d


def first_global_batch(cfg, processor):
    """The first global batch the training loader yields for ``cfg`` (padded rows; packed with ``data.packing``)."""
    from mimo_titan.train.trainer import build_loader

    return next(iter(build_loader(cfg, processor)))
