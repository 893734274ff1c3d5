"""Per-module step metrics: throughput, TFLOP/s, MFU, memory over each module's ranks, data wait; the JSONL file and
TensorBoard.

Each module runs on its own ranks, so each gets its own line: its throughput in its own unit (the language model's
non-padding tokens; a ViT's patches and images; an audio encoder's encoder frames of 20 ms and clips), its model
FLOPs on the step's global batch (:mod:`mimo_titan.train.flops`) divided by the step time and by its number of
ranks (TFLOP/s per rank), its MFU (that over the device's peak, :func:`peak_tflops`) and the largest peak memory of
its ranks. Modules that share ranks (colocated) each report their own FLOPs over those ranks: a rank's utilisation
is then the sum of its modules'. The step time is the optimizer step's wall time (:func:`~mimo_titan.train.trainer.
train_step`), the data wait (the time the loop waited for the batch) is reported beside it.

Memory and data wait are gathered on logged steps only, in one all-reduce (MAX) of a ``[n_modules + 1]`` vector
to which each rank contributes its peak memory at the modules it holds (:func:`gather_maxima`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from mimo_titan.errors import ConfigError
from mimo_titan.train import flops as F

if TYPE_CHECKING:
    from mimo_titan.config import Config

__all__ = [
    "PEAK_BF16_TFLOPS",
    "detect_peak_tflops",
    "peak_tflops",
    "check_metrics_config",
    "StepFlops",
    "gather_maxima",
    "MetricsWriter",
    "module_lines",
]

logger = logging.getLogger("mimo_titan")

#: Dense (no structured sparsity) BF16 tensor-core peak per GPU, TFLOP/s: ``(substring of
#: torch.cuda.get_device_name(), peak)``, most specific first. Sources: NVIDIA A100 Tensor Core GPU datasheet
#: (BF16 312); NVIDIA H100 Tensor Core GPU datasheet (BF16 1,979 SXM / 1,671 NVL / 1,513 PCIe *with sparsity*,
#: halved here); NVIDIA H200 Tensor Core GPU datasheet (BF16 1,979 with sparsity); NVIDIA HGX B200 specifications
#: (FP16/BF16 4.5 PFLOPS per GPU with sparsity). torchtitan's ``get_peak_flops`` uses the same values.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2250.0),
    ("H200", 989.5),
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H100", 989.5),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)


def detect_peak_tflops(device_name: str) -> float | None:
    """The BF16 dense peak (TFLOP/s) of a GPU named ``device_name`` (``torch.cuda.get_device_name()``), or None for
    a device that :data:`PEAK_BF16_TFLOPS` does not list."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def peak_tflops(cfg: Config, device: torch.device) -> float | None:
    """The peak used for MFU: ``metrics.peak_tflops`` when set, else the CUDA device's entry of
    :data:`PEAK_BF16_TFLOPS`; None (no MFU) on CPU without ``metrics.peak_tflops`` or on an unlisted GPU (with a
    warning naming the key)."""
    if cfg.metrics.peak_tflops is not None:
        return cfg.metrics.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = detect_peak_tflops(name)
    if peak is None:
        logger.warning("MFU is not reported: no peak TFLOP/s known for %r; set metrics.peak_tflops", name)
    return peak


def check_metrics_config(cfg: Config) -> None:
    """What ``[metrics]`` needs beyond its keys' ranges, checked before any process group.

    Raises:
        ConfigError: ``metrics.tensorboard = true`` without the ``tensorboard`` package.
    """
    if cfg.metrics.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ConfigError(
                "metrics.tensorboard = true needs the tensorboard package, which is not installed: run "
                "`pip install tensorboard` or set metrics.tensorboard = false"
            ) from None


class StepFlops:
    """Model FLOPs and throughput units of a global batch, per module (no collectives; the same on every rank).

    Args:
        cfg: the run's config.
        seq_len: the LM row length ``T`` (``training.seq_len`` padded for CP / SP).

    The modes of :func:`~mimo_titan.train.flops.part_modes` (which parts train) are decided once here.
    """

    def __init__(self, cfg: Config, seq_len: int):
        self.cfg = cfg
        self.modes = F.part_modes(cfg)
        lm = cfg.model.language
        self.language = cfg.model.language_name
        self.per_token = F.lm_flops_per_token(lm, seq_len, self.modes[self.language]["model"])
        self.per_image: dict[str, float] = {}
        for name, section in cfg.model.encoders.items():
            if section.type == "vit":
                m = self.modes[name]
                self.per_image[name] = F.vit_flops_per_image(section, lm.hidden_size, m["tower"], m["projector"])

    def module_metrics(
        self, batch: Any, lm_tokens: int, step_time_s: float, layouts: dict, peak: float | None
    ) -> dict[str, dict[str, Any]]:
        """Per module: :meth:`work`, plus ``tokens_per_s`` / ``items_per_s`` over ``step_time_s``,
        ``tflops_per_rank`` (its FLOPs / step time / its number of ranks, in TFLOP/s), ``mfu`` (that over ``peak``
        TFLOP/s; None without a peak), ``ranks`` ``[first, last]`` (from ``layouts``, ``{name: ModuleLayout}``),
        ``mode`` (what trains, :func:`~mimo_titan.train.flops.part_modes`) and ``mem_gib`` (None until a logged step
        gathers it)."""
        out = self.work(batch, lm_tokens)
        for name, m in out.items():
            lay = layouts[name]
            tflops = m["flops"] / step_time_s / lay.num_ranks / 1e12
            modes = self.modes[name]
            mode = modes.get("model") or (
                modes["tower"] if modes["tower"] == modes["projector"] else "tower {tower}, projector {projector}"
            ).format(**modes)
            m.update(
                tokens_per_s=m["tokens"] / step_time_s,
                items_per_s=m["items"] / step_time_s,
                tflops_per_rank=tflops,
                mfu=tflops / peak if peak else None,
                ranks=[lay.rank_offset, lay.rank_offset + lay.num_ranks - 1],
                mode=mode,
                mem_gib=None,
            )
        return out

    def work(self, batch: Any, lm_tokens: int) -> dict[str, dict[str, Any]]:
        """``{module: {"unit", "tokens", "item_unit", "items", "flops"}}`` for the global ``batch`` (a ``Batch`` or a
        ``PackedBatch``): the LM's ``lm_tokens`` non-padding tokens (its items are the rows); a ViT's patches and
        images; an audio encoder's encoder frames and clips."""
        out: dict[str, dict[str, Any]] = {}
        lm_hidden = self.cfg.model.language.hidden_size
        for name, section in self.cfg.model.encoders.items():
            if section.type == "vit":
                images = int(batch.pixel_values.shape[0])
                patches = images * (section.image_size // section.patch_size) ** 2
                out[name] = dict(
                    unit="patches",
                    tokens=patches,
                    item_unit="images",
                    items=images,
                    flops=images * self.per_image[name],
                )
            elif section.type == "audio":
                frames_t = getattr(batch, "audio_frames", None)
                frames = [] if frames_t is None else [int(f) for f in frames_t.tolist()]
                m = self.modes[name]
                out[name] = dict(
                    unit="frames",
                    tokens=sum((f + 1) // 2 for f in frames),
                    item_unit="clips",
                    items=len(frames),
                    flops=sum(
                        F.audio_flops_per_clip(section, lm_hidden, f, m["tower"], m["projector"]) for f in frames
                    ),
                )
            else:  # pragma: no cover - module_params raises first for an unknown type
                raise ValueError(f"model.{name}.type={section.type!r} has no FLOPs model")
        rows = int(batch.input_ids.shape[0])
        out[self.language] = dict(
            unit="tokens", tokens=lm_tokens, item_unit="rows", items=rows, flops=lm_tokens * self.per_token
        )
        return {name: out[name] for name in self.cfg.model.modules}  # config order


def gather_maxima(values: list[float], device: torch.device) -> list[float]:
    """The element-wise maximum of ``values`` over every rank: one all-reduce (MAX) of a ``[len(values)]`` fp32
    tensor, which every rank must call with the same length (a single-rank run makes none)."""
    t = torch.tensor(values, dtype=torch.float32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def module_lines(rec: dict) -> list[str]:
    """The per-module log lines of a logged step record (``rec["modules"]``, see :class:`MetricsWriter`)."""
    lines = []
    for name, m in rec["modules"].items():
        mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "n/a"
        items = f" ({m['items_per_s']:,.1f} {m['item_unit']}/s)" if m["unit"] != "tokens" else ""
        lines.append(
            f"  {name}: {m['tokens_per_s']:,.0f} {m['unit']}/s{items} | {m['tflops_per_rank']:.4g} TFLOP/s per rank | "
            f"MFU {mfu} | max mem {m['mem_gib']:.2f}GiB over ranks {m['ranks'][0]}-{m['ranks'][1]} ({m['mode']})"
        )
    return lines


def _scalars(rec: dict) -> dict[str, float]:
    """The record's numbers under TensorBoard tags (``loss``, ``language/tflops_per_rank``, ...)."""
    out = {k: float(rec[k]) for k in ("loss", "grad_norm", "lr", "step_time_s", "data_wait_s", "tokens_per_s")}
    for name, m in rec["modules"].items():
        for key in ("tokens_per_s", "items_per_s", "tflops_per_rank", "mem_gib"):
            out[f"{name}/{key}"] = float(m[key])
        if m["mfu"] is not None:
            out[f"{name}/mfu"] = float(m["mfu"])
    if "validation" in rec:
        out["validation/loss"] = float(rec["validation"]["loss"])
    if "moe_aux_loss" in rec:
        out["moe/aux_loss"] = float(rec["moe_aux_loss"])
        out["moe/max_imbalance"] = float(rec["moe_max_imbalance"])
    return out


class MetricsWriter:
    """Rank 0's metrics sinks: one JSON line per logged step in ``metrics.jsonl`` (under ``job.output_dir``) and
    TensorBoard scalars under ``metrics.tensorboard_dir`` when ``metrics.tensorboard = true``. On other ranks it
    writes nothing.

    A run that starts at step 0 truncates the JSONL file; a resumed run (``start_step > 0``) appends to it, so a
    preempted-and-resumed run keeps one file (the steps between the last checkpoint and the preemption then appear
    twice: the resumed run repeats them).

    Args:
        cfg: the run's config.
        rank: this process's global rank.
        start_step: the step the run starts from (after a checkpoint load).

    Raises:
        ConfigError: TensorBoard requested without the package (:func:`check_metrics_config`).
    """

    def __init__(self, cfg: Config, rank: int, start_step: int = 0):
        self.path: str | None = None
        self._file = None
        self._tb = None
        if rank != 0:
            return
        m = cfg.metrics
        if m.jsonl:
            self.path = os.path.join(cfg.job.output_dir, m.jsonl)
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._file = open(self.path, "a" if start_step > 0 else "w", encoding="utf-8")  # noqa: SIM115
        if m.tensorboard:
            check_metrics_config(cfg)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(cfg.job.output_dir, m.tensorboard_dir))

    def write(self, rec: dict) -> None:
        """Write one logged step's record (its ``sample_ids`` left out) and flush."""
        if self._file is not None:
            row = {k: v for k, v in rec.items() if k != "sample_ids"}
            self._file.write(json.dumps(row, allow_nan=True) + "\n")
            self._file.flush()
        if self._tb is not None:
            for tag, value in _scalars(rec).items():
                if math.isfinite(value):
                    self._tb.add_scalar(tag, value, rec["step"])
            self._tb.flush()

    def close(self) -> None:
        """Close the file and the TensorBoard writer (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
