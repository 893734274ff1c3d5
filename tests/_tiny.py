"""A tiny MIMO config for tests, on the real CC12M shard, with any module layout."""

from __future__ import annotations

import copy
import io
import json
import os
import tarfile
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


# conftest.py sets this to a folder of its own for each pytest session (removed at the end of the session)
BATCH_CACHE = "MIMO_TITAN_TEST_BATCH_CACHE"


def first_global_batch(cfg, processor):
    """The first global batch the training loader yields for ``cfg`` (padded rows; packed with ``data.packing``).

    Within a pytest session the batch is computed once per (whole config, processor) and read back from a file by
    every later caller: the test process's reference and each rank of the run it launches (building the loader
    decodes every image of the shard, the largest part of a tiny rank's set-up)."""
    import hashlib

    import torch

    from mimo_titan.train.trainer import build_loader

    folder = os.environ.get(BATCH_CACHE)
    if not folder or not os.path.isdir(folder):
        return next(iter(build_loader(cfg, processor)))
    proc = (processor.image_size, processor.image_tokens_per_image, processor.image_token_id, processor.vocab_size)
    key = hashlib.sha256(repr((cfg, proc)).encode()).hexdigest()
    path = os.path.join(folder, f"{key}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=False)
    batch = next(iter(build_loader(cfg, processor)))
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(batch, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    return batch


def shipped_overrides(path) -> list[str]:
    """Overrides under which a shipped config (``train_configs/*.toml``) finds its data in a test: the shapes configs
    read data the user makes first (``scripts/make_shapes_data.py``), made here once per test session, small, under
    the session's cache directory."""
    from mimo_titan.config import load_config

    cfg = load_config(path)
    paths = [cfg.data.path, cfg.validation.data.path]
    if not any("shapes" in str(p) for p in paths):
        return []
    from mimo_titan.data.synthetic import write_shapes_shard

    root = Path(os.environ.get("MIMO_TITAN_TEST_BATCH_CACHE", "/tmp")) / "shapes"
    train, val = root / "shapes-train-0000.tar", root / "shapes-val-0000.tar"
    if not val.exists():
        root.mkdir(parents=True, exist_ok=True)
        write_shapes_shard(train, num_samples=96, seed=0, image_size=cfg.model.vision.image_size)
        write_shapes_shard(val, num_samples=32, seed=1, image_size=cfg.model.vision.image_size)
    return [f"--data.path={train}", f"--validation.data.path={val}"]


def config_toml(cfg: dict) -> str:
    """A nested config dict as TOML text (tables for sub-dicts, scalars and lists as JSON values), for tests that
    launch scripts/*.py with a config file."""

    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines: list[str] = []

    def table(prefix, d):
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        if scalars:
            lines.append(f"[{prefix}]")
            lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v)

    table("", cfg)
    return "\n".join(lines) + "\n"


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    """Write ``(member name, bytes)`` pairs as a plain tar file (a WebDataset shard when names are ``<key>.<ext>``);
    returns the path as a string."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)
