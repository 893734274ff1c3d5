"""Build a MIMO training job from a ``Config`` and run its loop.

:func:`validate_job` checks everything that can be checked without a process group; :func:`build_job`
creates the meshes, the per-module model parts (built on the meta device, split, parallelised, then only this
rank's shards are allocated and initialised, with the same values whatever the layout: :class:`_InitPlan`), FSDP,
optimizers, the bridge and the schedule;
:func:`train_step` runs one optimizer step; :func:`train` is the loop that ``scripts/train.py`` calls.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import re
import resource
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import kernels
from mimo_titan.checkpoint import CheckpointManager
from mimo_titan.config import Config, MoEConfig
from mimo_titan.data import (
    Batch,
    ImageTextProcessor,
    MediaSlice,
    MimoDataLoader,
    PackedBatch,
    check_batch_divisibility,
)
from mimo_titan.errors import ConfigError, DataError, TrainingError, UserError
from mimo_titan.models.audio import audio_tokens
from mimo_titan.models.init import init_module_, module_init_seeds
from mimo_titan.models.mimo import LanguageStage, MimoModel, full_model_key
from mimo_titan.models.moe import MoE
from mimo_titan.models.specs import encoder_spec
from mimo_titan.parallel.ac import apply_module_options, check_module_options, describe_module_options
from mimo_titan.parallel.cp import apply_cp
from mimo_titan.parallel.ep import apply_ep, moe_modules
from mimo_titan.parallel.fsdp import apply_fsdp, reshard_after_forward, resolve_dtype
from mimo_titan.parallel.plans import encoder_plans
from mimo_titan.parallel.tp import apply_tp_language, check_tp
from mimo_titan.pipeline.bridge import Bridge
from mimo_titan.pipeline.order import interleaved_rounds
from mimo_titan.pipeline.schedule import EncoderLane, MimoSchedule
from mimo_titan.pipeline.stages import LanguageChunks, split_language_model, stage_layer_range, virtual_stage_indices
from mimo_titan.pipeline.tied import TiedEmbedding, tied_embedding
from mimo_titan.topology import Topology, build_topology, layouts_from_config, rank_role, validate_layouts
from mimo_titan.train.freeze import check_trainable, is_trainable
from mimo_titan.train.metrics import MetricsWriter, StepFlops, check_metrics_config, gather_maxima, module_lines
from mimo_titan.train.metrics import peak_tflops as device_peak_tflops
from mimo_titan.train.optim import (
    all_reduce_sum,
    build_lr_scheduler,
    build_optimizer,
    clip_grad_norm_,
    global_grad_sq_norm,
)
from mimo_titan.train.rng import RNGTracker, module_seeds
from mimo_titan.train.stop import GracefulStop
from mimo_titan.train.watchdog import Watchdog, process_group_timeout

__all__ = [
    "check_host_memory",
    "rank_parameter_shares",
    "set_group_timeouts",
    "validate_job",
    "check_kernel_backend",
    "planned_device_type",
    "init_distributed",
    "Job",
    "build_processor",
    "build_loader",
    "build_job",
    "canonical_named_parameters",
    "train_step",
    "train",
    "validate",
    "validation_loader",
]

# Linear layers on 3-D inputs return views; nothing in this package modifies a module output in place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

logger = logging.getLogger("mimo_titan")


def validate_job(cfg: Config, world_size: int) -> dict:
    """Every check that needs no process group: layouts, batch divisibility, features not supported yet, and that
    the chosen kernel backend can run on the planned device.

    Returns:
        The validated module layouts (``{name: ModuleLayout}``).

    Raises:
        LayoutError / ConfigError: naming the config field and the fix.
    """
    layouts = layouts_from_config(cfg.parallelism, cfg.model.language_name)
    validate_layouts(layouts, world_size)
    _check_modules(cfg, layouts)
    for name, lay in layouts.items():
        section = getattr(cfg.model, name)
        moe = getattr(section, "moe", None) or MoEConfig()
        check_module_options(name, cfg.parallelism.modules[name], section, packed=lay.is_language and cfg.data.packing)
        plans = encoder_plans(section.type) if not lay.is_language else None
        if plans is not None and lay.tp > 1 and plans.apply_tp is None:
            raise ConfigError(
                f"parallelism.{name}.tp={lay.tp}: tensor parallelism of an encoder of type '{section.type}' is not "
                "supported yet (it has no tensor-parallel plan); set tp = 1 and use dp_shard for its ranks"
            )
        if plans is not None and lay.pp > 1 and plans.split is None:
            raise ConfigError(
                f"parallelism.{name}.pp={lay.pp}: an encoder of type '{section.type}' cannot be split into pipeline "
                "stages yet; set pp = 1 (its ranks can use dp_shard instead)"
            )
        if lay.tp > 1 and moe.num_experts > 0:
            raise ConfigError(
                f"parallelism.{name}.tp={lay.tp} with model.{name}.moe.num_experts={moe.num_experts}: tensor "
                f"parallelism of MoE layers is not supported; split the experts with parallelism.{name}.ep / etp "
                "and set tp = 1"
            )
        if plans is None or plans.apply_tp is not None:
            _config_check(check_tp, name, section, lay.tp)
        if lay.tp > 1 and lay.dp_replicate > 1:
            raise ConfigError(
                f"parallelism.{name}: tp={lay.tp} with dp_replicate={lay.dp_replicate} is not supported; "
                "use dp_shard instead of dp_replicate"
            )
        # tied embeddings with pp > 1: the first and last stage hold copies kept equal (mimo_titan.pipeline.tied)
        if lay.tp > 1 and lay.is_language and cfg.model.language.tie_word_embeddings:
            raise ConfigError(
                f"parallelism.{name}.tp={lay.tp} with model.language.tie_word_embeddings = true is not "
                "supported (the vocabulary-parallel embedding and head would be sharded separately); "
                "untie them or set tp = 1"
            )
        if lay.cp != 1:
            if not lay.is_language:
                raise ConfigError(
                    f"parallelism.{name}.cp={lay.cp}: context parallelism is supported for the language "
                    "module only; set cp = 1"
                )
            if lay.dp_replicate != 1:
                raise ConfigError(
                    f"parallelism.{name}: cp={lay.cp} with dp_replicate={lay.dp_replicate} is not "
                    "supported yet; use dp_shard instead of dp_replicate"
                )
        if not lay.is_language and lay.pp > 1:
            _config_check(stage_layer_range, section.num_layers, lay.pp, 0, name)
            if lay.tp > 1:
                raise ConfigError(
                    f"parallelism.{name}: pp={lay.pp} with tp={lay.tp} is not supported for an encoder yet (its "
                    "stages would pass sequence-parallel shards); set tp = 1 or pp = 1"
                )
        if lay.ep * lay.etp > 1:
            if moe.num_experts == 0:
                raise ConfigError(
                    f"parallelism.{name}: ep={lay.ep}, etp={lay.etp} but model.{name}.moe.num_experts = 0; expert "
                    f"parallelism needs an MoE module: set model.{name}.moe.num_experts or ep = etp = 1"
                )
            if moe.num_experts % lay.ep:
                raise ConfigError(
                    f"parallelism.{name}.ep={lay.ep} must divide model.{name}.moe.num_experts={moe.num_experts}"
                )
            if not lay.is_language and lay.etp > 1:
                raise ConfigError(
                    f"parallelism.{name}.etp={lay.etp}: expert tensor parallelism needs the same number of tokens on "
                    "every rank of an etp group, which an encoder fed a variable number of images does not have; "
                    f"set parallelism.{name}.etp = 1 (ep is supported)"
                )
            if moe.intermediate_size % lay.etp:
                raise ConfigError(
                    f"parallelism.{name}.etp={lay.etp} must divide model.{name}.moe.intermediate_size="
                    f"{moe.intermediate_size}"
                )
    lang = next(lay for lay in layouts.values() if lay.is_language)
    _config_check(stage_layer_range, cfg.model.language.num_layers, lang.pp, 0)  # raises if num_layers < pp
    _config_check(
        check_batch_divisibility,
        cfg.training.global_batch_size,
        cfg.training.microbatches,
        {name: lay.dp for name, lay in layouts.items()},
    )
    if lang.pp > cfg.training.microbatches:
        raise ConfigError(
            f"training.microbatches={cfg.training.microbatches} is smaller than parallelism.language.pp={lang.pp}: "
            f"the pipeline needs at least one microbatch per stage; set training.microbatches >= {lang.pp}"
        )
    _check_schedule(cfg, layouts)
    check_trainable(cfg)
    check_kernel_backend(cfg)
    return layouts


def _check_modules(cfg: Config, layouts: dict) -> None:
    """The encoders against each other and the data (before any process group).

    Raises:
        ConfigError: a ViT without 3 input channels; two encoders of one medium (they would share a placeholder
            token); encoders on the same ranks (apart from the language model) with different ``pp``; packed
            rows with an audio encoder.
    """
    media: dict[str, str] = {}
    for name, section in cfg.model.encoders.items():
        spec = encoder_spec(section.type)
        if spec.media in media:
            raise ConfigError(
                f"model.{name} and model.{media[spec.media]} both read {spec.media}, but each medium has one "
                f"placeholder token (<|{spec.media}|>); keep one '{section.type}' encoder"
            )
        media[spec.media] = name
        if section.type == "vit" and section.num_channels != 3:
            raise ConfigError(
                f"model.{name}.num_channels={section.num_channels}: the data pipeline decodes every image as RGB "
                f"(3 channels, normalised with CLIP's mean and std); set model.{name}.num_channels = 3"
            )
    lang = next(lay for lay in layouts.values() if lay.is_language)
    shared: dict[int, list] = {}
    for lay in layouts.values():
        if not lay.is_language and lay.rank_offset != lang.rank_offset:
            shared.setdefault(lay.rank_offset, []).append(lay)
    for group in shared.values():
        if len({lay.pp for lay in group}) > 1:
            desc = ", ".join(f"parallelism.{lay.name}.pp={lay.pp}" for lay in group)
            raise ConfigError(
                f"encoders {[lay.name for lay in group]} share ranks, so they run as one leading pipeline stage and "
                f"need the same pp ({desc}); set them equal"
            )
    if cfg.data.packing and media.get("audio"):
        raise ConfigError(
            f"data.packing = true with an audio encoder (model.{media['audio']}): packed rows do not carry audio clips "
            "yet; set data.packing = false"
        )


def _check_schedule(cfg: Config, layouts: dict) -> None:
    """``parallelism.module_schedule`` / ``colocated_encoders`` against the layout (before any process group).

    Raises:
        ConfigError: ``colocated_encoders = "inline"`` with non-colocated modules, with a language ``pp > 1`` or
            with ``module_schedule = "GPipe"``; a bad Interleaved1F1B setup (:func:`_check_virtual_stages`).
    """
    par = cfg.parallelism
    lang = next(lay for lay in layouts.values() if lay.is_language)
    _check_virtual_stages(cfg, lang)
    if par.colocated_encoders != "inline":
        return
    encoders = [lay for lay in layouts.values() if not lay.is_language]
    apart = [e.name for e in encoders if e.rank_offset != lang.rank_offset]
    if apart:
        raise ConfigError(
            f"parallelism.colocated_encoders='inline' applies to encoders on the language model's ranks, but "
            f"{apart} have ranges of their own (they stream microbatch by microbatch already); remove the key or set "
            "it to 'batch'"
        )
    if par.module_schedule == "GPipe":
        raise ConfigError(
            "parallelism.colocated_encoders='inline' with parallelism.module_schedule='GPipe': GPipe runs the "
            "encoder's whole batch first; choose module_schedule = '1F1B' or colocated_encoders = 'batch'"
        )
    if lang.pp > 1:
        raise ConfigError(
            f"parallelism.colocated_encoders='inline' needs parallelism.{lang.name}.pp = 1 (got {lang.pp}): each "
            "rank encodes microbatch m right before its language forward of m, which only the first stage runs; "
            "set colocated_encoders = 'batch' or pp = 1"
        )
    staged = [e.name for e in encoders if e.pp > 1]
    if staged:
        raise ConfigError(
            f"parallelism.colocated_encoders='inline' with parallelism.{staged[0]}.pp > 1: an inline encoder runs "
            "whole inside the language model's forward of each microbatch; set its pp = 1 or colocated_encoders = "
            "'batch'"
        )


def _check_virtual_stages(cfg: Config, lang) -> None:
    """``parallelism.pipeline_schedule = "Interleaved1F1B"`` and ``parallelism.virtual_stages`` against the language
    layout (before any process group).

    Interleaved1F1B (``torch.distributed.pipelining.ScheduleInterleaved1F1B``) needs a language ``pp >= 2``,
    ``virtual_stages >= 2`` (with one chunk per rank it is 1F1B), at least one layer per chunk (``num_layers >=
    pp · virtual_stages``), microbatches that torch splits into rounds (:func:`~mimo_titan.pipeline.order.
    interleaved_rounds`: a multiple of ``max(1, microbatches // pp)``, e.g. any multiple of pp) and the encoders not
    ``inline`` (that mode needs ``pp = 1``). ``virtual_stages > 1`` needs Interleaved1F1B.

    Raises:
        ConfigError: naming the key and the fix.
    """
    par = cfg.parallelism
    v, pp, name = par.virtual_stages, lang.pp, lang.name
    if par.pipeline_schedule != "Interleaved1F1B":
        if v != 1:
            raise ConfigError(
                f"parallelism.virtual_stages={v} needs parallelism.pipeline_schedule = 'Interleaved1F1B' (got "
                f"'{par.pipeline_schedule}', which runs one stage per rank); choose Interleaved1F1B or set "
                "virtual_stages = 1"
            )
        return
    if pp < 2:
        raise ConfigError(
            f"parallelism.pipeline_schedule='Interleaved1F1B' needs parallelism.{name}.pp >= 2 (got {pp}): it "
            "interleaves the model chunks of several pipeline ranks; raise pp or choose pipeline_schedule = '1F1B'"
        )
    if v < 2:
        raise ConfigError(
            f"parallelism.pipeline_schedule='Interleaved1F1B' needs parallelism.virtual_stages >= 2 model chunks per "
            f"pipeline rank (got {v}; with one chunk it is 1F1B); set virtual_stages = 2 or choose "
            "pipeline_schedule = '1F1B'"
        )
    layers = getattr(cfg.model, name).num_layers
    if layers < pp * v:
        raise ConfigError(
            f"model.{name}.num_layers={layers} is smaller than parallelism.{name}.pp × parallelism.virtual_stages = "
            f"{pp} × {v} = {pp * v}: every virtual pipeline stage needs at least one layer; lower virtual_stages "
            f"(at most {max(1, layers // pp)}) or add layers"
        )
    _config_check(interleaved_rounds, cfg.training.microbatches, pp)
    if par.colocated_encoders == "inline":
        raise ConfigError(
            "parallelism.colocated_encoders='inline' with pipeline_schedule='Interleaved1F1B': inline encoders run "
            "inside a single language stage (pp = 1) and Interleaved1F1B needs pp >= 2; set colocated_encoders = "
            "'batch' or choose pipeline_schedule = '1F1B'"
        )


def _mem_available_bytes() -> int | None:
    """The host's available memory (``MemAvailable`` of ``/proc/meminfo``), or None where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rank_parameter_shares(cfg: Config, world_size: int) -> list[int]:
    """The parameters each rank allocates (from a meta-device model: no memory, no process group): for every module
    it holds, its pipeline stage's parameters (its virtual stages' for the language model) divided by the module's
    shard degree ``dp_shard · cp · tp`` (FSDP over dp_shard × cp, TP; experts split over ep × etp and FSDP over the
    rest of the same ranks). Returns ``[world_size]`` counts (rounded up)."""
    from mimo_titan.checkpoint.state import meta_model

    layouts = layouts_from_config(cfg.parallelism, cfg.model.language_name)
    meta = meta_model(cfg.model)
    v = cfg.parallelism.virtual_stages
    shares = [0] * world_size
    for name, lay in layouts.items():
        module = getattr(meta, name)
        if lay.pp == 1:
            stages = [sum(p.numel() for p in module.parameters())]
        elif lay.is_language:
            size = {
                s: sum(p.numel() for p in split_language_model(module, lay.pp * v, s).parameters())
                for s in range(lay.pp * v)
            }
            stages = [sum(size[s] for s in virtual_stage_indices(lay.pp, v, r)) for r in range(lay.pp)]
        else:
            split = encoder_plans(getattr(cfg.model, name).type).split
            assert split is not None, "validate_job refuses pp > 1 for an encoder without a pipeline split"
            stages = [sum(p.numel() for p in split(module, lay.pp, s, name).parameters()) for s in range(lay.pp)]
        for rank in lay.ranks:
            if rank < world_size:
                shares[rank] += -(
                    -stages[(rank - lay.rank_offset) // lay.stage_size] // (lay.dp_shard * lay.cp * lay.tp)
                )
    return shares


def check_host_memory(cfg: Config) -> None:
    """Fail before any process group when this machine cannot even hold its ranks' weights: each rank allocates only
    its shards of the modules it holds (:func:`rank_parameter_shares`; the model is built on the meta device), in
    fp32 host memory when it initialises them, and the ``LOCAL_WORLD_SIZE`` ranks of this machine (``RANK //
    LOCAL_WORLD_SIZE``-th group of consecutive ranks) do so at the same time. A lower bound: gradients, optimizer
    state and activations come on top.

    Raises:
        ConfigError: naming the parameter count, the largest tensor and the ``model.*`` keys that size it.
    """
    from mimo_titan.checkpoint.state import meta_model

    available = _mem_available_bytes()
    if available is None:
        return
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    first = int(os.environ.get("RANK", 0)) // local * local
    shares = rank_parameter_shares(cfg, max(world, first + local))
    need = 4 * sum(shares[first : first + local])
    if need <= available:
        return
    params = list(meta_model(cfg.model).named_parameters())
    name, biggest = max(params, key=lambda kv: kv[1].numel())

    def gb(n: float) -> str:
        return f"{n / 1e9:.0f} GB" if n >= 1e11 else f"{n / 1e9:.3g} GB"

    raise ConfigError(
        f"model.* describes {sum(p.numel() for _, p in params):,} parameters (the largest is {name} "
        f"{list(biggest.shape)}); each rank allocates its shards of the modules it holds (fp32, up to "
        f"{max(shares[first : first + local]):,} parameters per rank here), so the {local} rank(s) on this machine "
        f"need {gb(need)} but {gb(available)} are available; lower the model's sizes (model.language.vocab_size / "
        "hidden_size / num_layers, ...), shard the modules over more ranks (parallelism.*.dp_shard / tp / pp) or "
        "launch fewer ranks per machine"
    )


def _config_check(check, *args) -> None:
    """Run a check of another module that raises a plain ``ValueError`` naming config keys; re-raise as a
    :class:`ConfigError` (a user error, printed without a traceback)."""
    try:
        check(*args)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def planned_device_type(device_pref: str) -> str:
    """The device type :func:`init_distributed` will pick for ``training.device`` (``auto`` / ``cpu`` / ``cuda``),
    decided before any process group exists: ``cuda`` when asked for, or with ``auto`` when there is a CUDA device
    for every local rank; else ``cpu``.

    Raises:
        ConfigError: ``cuda`` without a CUDA device for every local rank.
    """
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    enough_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    if device_pref == "auto":
        return "cuda" if enough_gpus else "cpu"
    if device_pref == "cuda" and not enough_gpus:
        raise ConfigError(
            f"training.device = 'cuda' but {torch.cuda.device_count()} CUDA devices serve {local_world} local ranks; "
            "use 'auto' (CPU/gloo) or launch one rank per GPU"
        )
    return device_pref


def check_kernel_backend(cfg: Config) -> str:
    """Set the process-wide kernel backend from ``kernels.backend`` (``MIMO_TITAN_KERNELS`` wins) and check that it
    runs on the planned device. Returns ``"triton"`` or ``"torch"``: what the MoE and CP kernels will run.

    Raises:
        ConfigError: an unknown ``MIMO_TITAN_KERNELS``, or Triton on CPU without Triton's interpreter.
    """
    try:
        kernels.set_backend(cfg.kernels.backend)
        return kernels.check_backend(planned_device_type(cfg.training.device))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def sequence_multiple(cfg: Config) -> int:
    """Every sequence (packed row) length must be a multiple of this: ``2·cp`` for zigzag context parallelism
    (``2·cp`` chunks per sequence) and ``cp·tp`` so that sequence parallelism splits each CP shard over tp."""
    lang = layouts_from_config(cfg.parallelism, cfg.model.language_name)[cfg.model.language_name]
    return sequence_multiple_of(lang.cp, lang.tp)


def sequence_multiple_of(cp: int, tp: int) -> int:
    """:func:`sequence_multiple` of a language model laid out with ``cp`` and ``tp``:
    ``lcm(2·cp if cp > 1 else 1, cp·tp)``."""
    return math.lcm(2 * cp if cp > 1 else 1, cp * tp)


def padded_seq_len(cfg: Config) -> int:
    """``training.seq_len`` rounded up to :func:`sequence_multiple`: the loader builds rows of this length (a
    sample shorter than the row is padded, without loss), so a length that CP / SP cannot split is rounded up, not
    rejected."""
    m = sequence_multiple(cfg)
    return -(-cfg.training.seq_len // m) * m


def init_distributed(device_pref: str = "auto", timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Initialise the default process group from torchrun's environment (or a 1-rank group).

    Device: :func:`planned_device_type`: ``cuda:LOCAL_RANK`` with NCCL, or CPU with gloo.

    Args:
        device_pref: ``training.device``.
        timeout_s: the process group's collective timeout in seconds (None: torch's default); the trainer passes
            :func:`~mimo_titan.train.watchdog.process_group_timeout` of ``training.collective_timeout_s``.

    Returns:
        ``(rank, world_size, device)``.

    Raises:
        ConfigError: ``training.device = "cuda"`` without a CUDA device for every local rank.
    """
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = planned_device_type(device_pref) == "cuda"
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        extra: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s is not None else {}
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", rank=rank, world_size=world, device_id=device if use_cuda else None, **extra
        )
    return rank, world, device


@dataclass
class Job:
    """Everything one rank needs to train. ``modules`` maps module name → this rank's (sharded) part."""

    cfg: Config
    topology: Topology
    device: torch.device
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.AdamW]
    schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR]
    schedule: MimoSchedule
    processor: ImageTextProcessor
    moe_keys: list[str] = field(default_factory=list)  # every MoE layer of the model, same order on every rank
    rng: dict[str, RNGTracker] = field(default_factory=dict)  # per held module; runtime randomness draws from it
    step: int = 0
    history: list[dict] = field(default_factory=list)  # the newest metrics.history_steps step records
    skipped_in_a_row: int = 0  # consecutive optimizer steps skipped for a non-finite loss or gradient norm
    tied_embedding: TiedEmbedding | None = None  # this rank's copy of word embeddings tied across LM stages
    step_flops: StepFlops | None = None  # per-module FLOPs of a batch (set at the first step)
    peak_tflops: float | None = None  # the device's peak for MFU (set with step_flops; None: no MFU)

    def moe_layers(self) -> dict[str, MoE]:
        """This rank's MoE layers by global key (``vision.<layer>`` / ``language.<layer>``)."""
        out = {}
        for name, module in self.modules.items():
            for qual, moe in moe_modules(module):
                out[full_model_key(name, qual)] = moe
        return out


def _prepare_moe(part: nn.Module, topology, name: str, microbatches: int):
    """Set up the MoE layers of this rank's ``part`` of module ``name``; return its edp mesh under EP, else None.

    Every MoE layer sums its routing statistics over the module's DP group (layout-independent aux loss) and
    scales its aux-loss gradient by ``1 / microbatches``; with ``ep · etp > 1`` the experts are sliced and the
    all-to-all dispatch installed (``parallel.ep``).
    """
    layers = [m for _, m in moe_modules(part)]
    if not layers:
        return None
    lay = topology.layouts[name]
    for moe in layers:
        moe.stats_group = topology.token_group(name) if lay.dp * lay.cp > 1 else None
        moe.aux_loss_scale = 1.0 / microbatches
    if lay.ep * lay.etp == 1:
        return None
    coord = topology.role.expert_coordinates(name)
    apply_ep(
        part,
        topology.ep_group(name),
        lay.ep,
        coord["ep"],
        topology.etp_group(name) if lay.etp > 1 else None,
        lay.etp,
        coord["etp"],
    )
    return topology.edp_mesh(name)


def build_processor(cfg: Config) -> ImageTextProcessor:
    """The processor of ``cfg`` (tokenizer from ``data.tokenizer``): images for the ``vit`` encoder (normalised
    with its ``image_mean`` / ``image_std``), audio clips for an ``audio`` encoder (whose placeholder tokens are
    added to the tokenizer when it lacks them).

    Raises:
        DataError: a missing or unreadable tokenizer.
        ConfigError: no ``vit`` encoder (images are the one medium every sample carries), or
            ``model.<language>.vocab_size`` below the tokenizer's (added tokens included).
    """
    by_type = {section.type: (name, section) for name, section in cfg.model.encoders.items()}
    if "vit" not in by_type:
        raise ConfigError(
            f"model: the encoders {list(cfg.model.encoders)} include no 'vit' encoder; every sample carries an image, "
            "so add a [model.vision] table (type 'vit')"
        )
    _, vit = by_type["vit"]
    audio = by_type.get("audio")
    processor = ImageTextProcessor(
        cfg.data.tokenizer,
        vit.image_size,
        (vit.image_size // vit.patch_size) ** 2,
        audio_tokens=None if audio is None else functools.partial(audio_tokens, cfg=audio[1]),
        num_mel_bins=80 if audio is None else audio[1].num_mel_bins,
        audio_max_frames=None if audio is None else 2 * audio[1].max_source_positions,
        audio_key="model.audio" if audio is None else f"model.{audio[0]}",
        image_mean=vit.image_mean,
        image_std=vit.image_std,
    )
    lm = cfg.model.language_name
    if processor.vocab_size > cfg.model.language.vocab_size:
        added = f" (with the {len(processor.added_tokens)} audio tokens it adds)" if processor.added_tokens else ""
        raise ConfigError(
            f"model.{lm}.vocab_size={cfg.model.language.vocab_size} is smaller than the tokenizer's "
            f"{processor.vocab_size} tokens{added} ({cfg.data.tokenizer}); raise vocab_size"
        )
    return processor


def media_slices(cfg: Config, rank: int, world: int) -> list[MediaSlice]:
    """The media ``rank`` decodes: for each encoder it holds on its first pipeline stage, the encoder's medium
    (``image`` / ``audio``) for its data-parallel slice. A language-model-only rank decodes nothing. Pure (no
    process group): from the layouts of ``cfg``."""
    layouts = layouts_from_config(cfg.parallelism, cfg.model.language_name)
    role = rank_role(layouts, rank, world)
    out = []
    for name, section in cfg.model.encoders.items():
        if role.holds(name) and role.is_first_stage(name):
            out.append(MediaSlice(encoder_spec(section.type).media, role.dp_rank(name), role.dp_size(name)))
    return out


def build_loader(cfg: Config, processor: ImageTextProcessor, rank: int | None = None) -> MimoDataLoader:
    """The global-batch loader of ``cfg``: rows of :func:`padded_seq_len` tokens; with ``data.packing`` packed THD
    rows whose documents are padded to a multiple of ``2·cp``. Every rank gets the same token rows.

    Args:
        cfg: The run's config.
        processor: From :func:`build_processor`.
        rank: This global rank: the loader then decodes only the media of the encoder slices it holds
            (:func:`media_slices`; needs ``WORLD_SIZE``); ``None`` decodes every sample's media (one process,
            the reference of the tests).
    """
    lang = layouts_from_config(cfg.parallelism, cfg.model.language_name)[cfg.model.language_name]
    media = None if rank is None else media_slices(cfg, rank, int(os.environ.get("WORLD_SIZE", 1)))
    return MimoDataLoader(
        cfg.data.path,
        processor,
        cfg.training.global_batch_size,
        padded_seq_len(cfg),
        max_images_per_sample=cfg.data.max_images_per_sample,
        shuffle=cfg.data.shuffle,
        seed=cfg.job.seed,
        packing=cfg.data.packing,
        pack_multiple=2 * lang.cp if cfg.data.packing and lang.cp > 1 else 1,
        shuffle_buffer=cfg.data.shuffle_buffer,
        prefetch=cfg.data.prefetch,
        media=media,
        microbatches=cfg.training.microbatches,
    )


def build_job(cfg: Config, device: torch.device, processor: ImageTextProcessor | None = None) -> Job:
    """Build meshes, model parts, FSDP, optimizers, bridge and schedule on this rank.

    The model is built on the meta device; each part this rank holds (an encoder or its pipeline stage, the language
    stage(s)) is split from it, parallelised there (EP, CP, TP, FSDP2) and only then materialised: the rank allocates
    exactly its FSDP / TP / EP shards, initialised to the same elements as ``MimoModel.init_weights(job.seed)``
    (:mod:`mimo_titan.models.init`). Modules and stages it does not hold are never allocated.

    Requires an initialised default process group whose size matches the layouts. Every rank makes the same
    process-group calls in the same order.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    layouts = validate_job(cfg, world)
    tied = [n for n, lay in layouts.items() if lay.is_language and cfg.model.language.tie_word_embeddings]
    topology = build_topology(layouts, world, rank, device.type, tied_embeddings=tied)
    role = topology.role
    lang_name = role.language
    encoders = cfg.model.encoders

    processor = processor or build_processor(cfg)
    audio_id = processor.audio_token_id if any(e.type == "audio" for e in encoders.values()) else None
    with torch.device("meta"):  # shapes only: each rank materialises just its own shards (_materialize)
        full = MimoModel(cfg.model, processor.image_token_id, audio_token_id=audio_id)
    for key, p in full.named_parameters():  # frozen parameters: no gradient, no optimizer state, no reduce
        p.requires_grad_(is_trainable(cfg, key))
    init = _InitPlan(cfg.job.seed, full)
    moe_keys = [full_model_key(n, q) for n in [*encoders, lang_name] for q, _ in moe_modules(getattr(full, n))]
    trainable = {n: [k for k, p in full.encoder(n).named_parameters() if p.requires_grad] for n in encoders}
    param_dtype = resolve_dtype(cfg.parallelism.mixed_precision_param, device.type)
    reduce_dtype = resolve_dtype(cfg.parallelism.mixed_precision_reduce, device.type)

    modules: dict[str, nn.Module] = {}
    for name, section in encoders.items():
        if not role.holds(name):
            continue
        lay, plans, spec = layouts[name], encoder_plans(section.type), encoder_spec(section.type)
        enc = full.encoder(name)
        if lay.pp > 1:
            assert plans.split is not None, "validate_job refuses pp > 1 for an encoder without a pipeline split"
            enc = plans.split(enc, lay.pp, role.pp_stage(name), name)
        expert_mesh = _prepare_moe(enc, topology, name, cfg.training.microbatches)
        if lay.tp > 1:
            assert plans.apply_tp is not None, "validate_job refuses tp > 1 for an encoder without a TP plan"
            plans.apply_tp(enc, topology.tp_mesh(name))
        options, blocks = cfg.parallelism.modules[name], spec.fsdp_blocks(enc)
        apply_module_options(blocks, options)  # activation checkpointing, compile: before FSDP
        reshard = reshard_after_forward(options.fsdp_reshard_after_forward, lay.pp)
        modules[name] = apply_fsdp(
            enc, blocks, topology.dp_mesh(name), param_dtype, reduce_dtype, reshard, expert_mesh=expert_mesh
        )
        init.materialize(modules[name], name, topology, device)
    if role.holds(lang_name):
        modules[lang_name] = _build_language(
            cfg, full, topology, lang_name, list(full.placeholder_ids.values()), device, param_dtype, reduce_dtype, init
        )
    tied_copy = None
    if role.holds(lang_name) and lang_name in tied and layouts[lang_name].pp > 1:
        tied_copy = tied_embedding(modules[lang_name], topology.embedding_group(lang_name))

    optimizers = {n: o for n, m in modules.items() if (o := build_optimizer(m, cfg.optimizer)) is not None}
    schedulers = {n: build_lr_scheduler(o, cfg.training.total_steps, cfg.lr_schedule) for n, o in optimizers.items()}
    mb_size = cfg.training.global_batch_size // cfg.training.microbatches
    lanes = []
    for index, (name, section) in enumerate(encoders.items()):
        spec, plans, lay = encoder_spec(section.type), encoder_plans(section.type), layouts[name]
        # rows are counted per sample from the placeholders, so the bridge moves one row per "item"
        bridge = Bridge(
            lay,
            layouts[lang_name],
            mb_size,
            1,
            cfg.model.language.hidden_size,
            param_dtype,
            device,
            rank,
            lane=index,
            lanes=len(encoders),
        )
        lanes.append(
            EncoderLane(
                name,
                modules.get(name),
                bridge,
                placeholder_id=full.placeholder_ids[name],
                inputs=spec.inputs,
                dummy_inputs=spec.dummy_inputs(section),
                trainable=bool(trainable[name]),
                stage_trains=_stage_trains(trainable[name], plans, section.num_layers, lay.pp),
                prefetch_microbatches=section.prefetch_microbatches,
                tokens_per_item=plans.tokens_per_item(section) if plans.tokens_per_item else None,
            )
        )
    del full
    schedule = MimoSchedule(
        topology,
        lanes,
        modules.get(lang_name),
        microbatches=cfg.training.microbatches,
        schedule=cfg.parallelism.pipeline_schedule,
        virtual_stages=cfg.parallelism.virtual_stages,
        module_schedule=cfg.parallelism.module_schedule,
        colocated_encoders=cfg.parallelism.colocated_encoders,
        device=device,
        seq_len=padded_seq_len(cfg),
        vocab_size=cfg.model.language.vocab_size,
        act_dtype=param_dtype,
        packed=cfg.data.packing,
    )
    rng = {}
    for index, name in enumerate(layouts):
        if role.holds(name):
            coords = {**role.coordinates[name], **role.expert_coordinates(name)}
            rng[name] = RNGTracker(module_seeds(cfg.job.seed, index, coords), cuda=device.type == "cuda")
    job = Job(cfg, topology, device, modules, optimizers, schedulers, schedule, processor, moe_keys, rng)
    job.tied_embedding = tied_copy
    return job


def _build_language(
    cfg: Config,
    full: MimoModel,
    topology: Topology,
    lang_name: str,
    placeholder_ids: list[int],
    device: torch.device,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    init: _InitPlan,
) -> nn.Module:
    """This rank's part of the language model: one :class:`LanguageStage` (its pipeline stage), or with
    ``parallelism.virtual_stages = v > 1`` (Interleaved1F1B) a :class:`LanguageChunks` of ``v`` stages (global stages
    ``r + j·pp`` of ``pp · v``), each with its own CP / EP / TP plan and FSDP root, seen under one stage's names.
    ``full`` is the meta-device model; each stage is split from it, parallelised on meta, then materialised.
    """
    lay, role = topology.layouts[lang_name], topology.role
    v = cfg.parallelism.virtual_stages
    stages = virtual_stage_indices(lay.pp, v, role.pp_stage(lang_name))
    chunks = []
    for stage_idx in stages:
        part = split_language_model(full.lm, lay.pp * v, stage_idx)
        stage = LanguageStage(part, placeholder_ids)
        if lay.cp > 1:
            apply_cp(stage, topology.cp_group(lang_name), lay.cp, role.coordinates[lang_name]["cp"])
        expert_mesh = _prepare_moe(stage, topology, lang_name, cfg.training.microbatches)
        if lay.tp > 1:
            apply_tp_language(stage, topology.tp_mesh(lang_name))
        options, blocks = cfg.parallelism.modules[lang_name], list(part.model.layers.values())
        apply_module_options(blocks, options)  # activation checkpointing, compile: before FSDP
        chunks.append(
            apply_fsdp(
                stage,
                blocks,
                topology.fsdp_mesh(lang_name),
                param_dtype,
                reduce_dtype,
                reshard_after_forward=reshard_after_forward(options.fsdp_reshard_after_forward, lay.pp),
                expert_mesh=expert_mesh,
            )
        )
        init.materialize(chunks[-1], lang_name, topology, device)
    return chunks[0] if v == 1 else LanguageChunks(chunks, stages, lay.pp * v)


class _InitPlan:
    """Materialises and initialises one rank's parallelised parts of a meta-device :class:`MimoModel`.

    Every part (an encoder, an encoder's or the LM's pipeline stage) is built on the meta device, parallelised there
    (EP slices, TP / CP plans, FSDP2), then :meth:`materialize` allocates only its local shards (``to_empty``) and
    fills them with the values of the same elements of ``MimoModel.init_weights(job.seed)``
    (:func:`~mimo_titan.models.init.init_module_`): the weights do not depend on the layout, and no rank ever
    allocates a module, a stage or a shard it does not hold.

    Args:
        job_seed: ``job.seed``.
        full: the meta-device model (its shapes and the module order of its init seeds).
    """

    def __init__(self, job_seed: int, full: MimoModel):
        self.seeds = module_init_seeds(job_seed, [*full.encoder_names, full.language_name])
        self.full_shapes = {k: tuple(t.shape) for k, t in [*full.named_parameters(), *full.named_buffers()]}

    def materialize(self, part: nn.Module, name: str, topology: Topology, device: torch.device) -> None:
        """Allocate ``part`` (of module ``name``) on ``device`` and initialise its local shards in place.

        Raises:
            AssertionError: a tensor still on the meta device afterwards (a module without init rules).
        """
        part.to_empty(device=device)
        init_module_(
            part,
            self.seeds[name],
            functools.partial(full_model_key, name),
            full_shapes=self.full_shapes,
            offsets=_expert_offsets(part, name, topology),
        )
        for m in part.modules():  # per-step MoE statistics are plain attributes, built on meta with the module
            if isinstance(m, MoE):
                m.reset_stats()
                m.last_aux_loss = torch.zeros((), device=device)
        left = [k for k, t in [*part.named_parameters(), *part.named_buffers()] if t.is_meta]
        assert not left, f"{name}: tensors left on the meta device after initialisation: {left[:4]}"


def _expert_offsets(part: nn.Module, name: str, topology: Topology) -> dict[str, tuple[int, ...]]:
    """``{canonical stacked expert weight key: offset of this rank's EP slice in the full [E, H, I] / [E, I, H]
    tensor}``: its first expert ``ep_rank · E / ep`` and, with expert TP, its width slice ``etp_rank · I / etp``
    (``parallel.ep.apply_ep``); empty without expert parallelism."""
    lay = topology.layouts[name]
    if lay.ep * lay.etp == 1:
        return {}
    coord = topology.role.expert_coordinates(name)
    out: dict[str, tuple[int, ...]] = {}
    for qual, moe in moe_modules(part):
        first = coord["ep"] * (moe.num_experts // lay.ep)
        width = coord["etp"] * moe.experts.w_down.shape[1]  # the local width I / etp
        for w in ("w_gate", "w_up"):
            out[full_model_key(name, f"{qual}.experts.{w}")] = (first, 0, width)
        out[full_model_key(name, f"{qual}.experts.w_down")] = (first, width, 0)
    return out


def _stage_trains(trainable_names: list[str], plans, num_layers: int, pp: int) -> list[bool]:
    """Whether each of the encoder's ``pp`` pipeline stages holds a trainable parameter (names relative to it)."""
    if pp == 1:
        return [bool(trainable_names)]
    out = [False] * pp
    for name in trainable_names:
        out[plans.stage_of(name, num_layers, pp)] = True
    return out


def canonical_named_parameters(job: Job):
    """``(name, param)`` of this rank's parts under the single-process :class:`MimoModel` names
    (``vision.*``, ``language.*``), so a part can be compared with or loaded from the full model."""
    for module_name, module in job.modules.items():
        for name, p in module.named_parameters():
            yield full_model_key(module_name, name), p


def _moe_stats(job: Job, moe: dict) -> torch.Tensor:
    """``[n_moe_layers, E_max + 1]`` fp32: this rank's routed-copy counts per expert and its share of the step's
    aux-loss sum (the shares of a layer's DP group add up to the global value), so a world sum gives global
    values. Layers with fewer than ``E_max`` experts leave the extra columns at zero."""
    if not job.moe_keys:
        return torch.zeros(0, 1, device=job.device)
    width = max(getattr(job.cfg.model, k.split(".")[0]).moe.num_experts for k in job.moe_keys) + 1
    out = torch.zeros(len(job.moe_keys), width, device=job.device)
    for i, key in enumerate(job.moe_keys):
        layer = moe.get(key)
        if layer is not None:
            out[i, : layer.num_experts] = layer.tokens_per_expert.float()
            out[i, -1] = layer.aux_loss_sum
    return out


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def train_step(
    job: Job,
    global_batch,
    *,
    stop_requested: bool | Callable[[], bool] = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """One optimizer step on ``global_batch`` (identical on every rank). Every rank must call it.

    **Non-finite guard.** The step's loss and squared gradient norm are summed over all ranks in one all-reduce,
    so every rank sees the same values and takes the same decision: when either is NaN or infinite the optimizer
    step (and the MoE routing-bias update) is skipped on every rank, the weights stay as they were, a warning
    ``step N: non-finite loss/grad_norm, step skipped (k in a row)`` is logged, and the step still counts (the
    batch is consumed and the LR schedule advances). After ``training.max_skipped_steps`` consecutive skips the
    run stops with a :class:`~mimo_titan.errors.TrainingError`. (Megatron-LM skips such iterations with its loss
    scaler, there without advancing the LR schedule, and stops on NaN with ``--check-for-nan-in-loss-and-grad``;
    here the schedule stays a function of the step number, so a skipped step costs its batch and its LR.)

    Args:
        job: the rank's :class:`Job`.
        global_batch: the step's global batch (``Batch`` or ``PackedBatch``).
        stop_requested: whether this rank received a stop signal (:class:`~mimo_titan.train.stop.GracefulStop`), or
            a function that says so, called right before the step's all-reduce (so a signal that arrives during the
            forward-backward still counts for this step). It is summed over the ranks in that all-reduce, so every
            rank learns whether any rank wants to stop.
        progress: ``progress(phase)`` marks the step's phases for the watchdog (None: no marks).

    Returns:
        ``{"step", "loss", "grad_norm", "lr", "tokens", "step_time_s", "tokens_per_s", "peak_mem_gib", "modules",
        "sample_ids", "skipped", "stop"}`` where loss is the global per-token loss, grad_norm the global norm
        before clipping, ``tokens`` the global batch's non-padding tokens, ``step_time_s`` this call's wall time,
        ``peak_mem_gib`` this rank's peak memory, ``modules`` each module's throughput, FLOPs, TFLOP/s per rank and
        MFU (:meth:`~mimo_titan.train.metrics.StepFlops.module_metrics`; its ``mem_gib`` is filled on logged steps
        by :func:`train`), ``skipped`` whether the optimizer step was skipped and ``stop`` whether any rank asked to
        stop. The record is also appended to ``job.history``, which keeps the newest ``metrics.history_steps``.

    Raises:
        TrainingError: the ``training.max_skipped_steps``-th consecutive skipped step.
    """
    mark = progress or (lambda phase: None)
    t0 = time.perf_counter()
    if job.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(job.device)
    for opt in job.optimizers.values():
        opt.zero_grad(set_to_none=True)
    moe = job.moe_layers()
    for layer in moe.values():
        layer.reset_stats()
    mark("forward-backward")
    loss_part = job.schedule.step(global_batch)
    tied = job.tied_embedding
    if tied is not None:  # the first and the last LM stage's copies get the tied tensor's gradient
        mark("tied-embedding gradient all-reduce")
        tied.all_reduce_grad()
    mark("loss and gradient-norm all-reduce")
    mods = list(job.modules.values())
    moe_stats = _moe_stats(job, moe)  # [layers, E + 1]: routed copies per expert, aux-loss sum
    stop = stop_requested() if callable(stop_requested) else stop_requested
    flags = torch.tensor([float(stop)], device=job.device)
    sq_norm_part = global_grad_sq_norm(mods, job.device, exclude=tied.norm_duplicates if tied else ())
    stats = torch.cat([torch.stack([loss_part, sq_norm_part]), flags, moe_stats.flatten()])
    all_reduce_sum(stats)
    moe_stats = stats[3:].view_as(moe_stats)
    loss_sum, sq_norm = float(stats[0]), float(stats[1])
    finite = math.isfinite(loss_sum) and math.isfinite(sq_norm)
    lr = next(iter(job.schedulers.values())).get_last_lr()[0] if job.schedulers else job.cfg.optimizer.lr
    mark("optimizer step")
    if finite:
        grad_norm = clip_grad_norm_(mods, job.cfg.training.max_grad_norm, stats[1])
        for opt in job.optimizers.values():
            opt.step()
        for i, key in enumerate(job.moe_keys):
            # a frozen MoE layer keeps its routing bias too (aux-free balancing is a training update)
            if key in moe and any(p.requires_grad for p in moe[key].parameters()):
                moe[key].update_bias(moe_stats[i, : moe[key].num_experts])
        job.skipped_in_a_row = 0
    else:  # the gradients are dropped by the next step's zero_grad
        grad_norm = stats[1].sqrt()
        job.skipped_in_a_row += 1
    for scheduler in job.schedulers.values():
        scheduler.step()
    job.step += 1
    dt = time.perf_counter() - t0
    tokens = int((global_batch.input_ids != job.processor.pad_id).sum())
    if job.step_flops is None:
        job.step_flops = StepFlops(job.cfg, padded_seq_len(job.cfg))
        job.peak_tflops = device_peak_tflops(job.cfg, job.device)
    modules = job.step_flops.module_metrics(global_batch, tokens, dt, job.topology.layouts, job.peak_tflops)
    ids = global_batch.sample_ids
    sample_ids = [i for row in ids for i in row] if isinstance(ids, list) else ids.tolist()
    rec: dict[str, Any] = {
        "step": job.step,
        "loss": loss_sum,
        "grad_norm": float(grad_norm),
        "lr": lr,
        "tokens": tokens,
        "step_time_s": dt,
        "tokens_per_s": tokens / dt,
        "peak_mem_gib": _peak_memory_gib(job.device),
        "modules": modules,
        "sample_ids": sample_ids,
        "skipped": not finite,
        "stop": float(stats[2]) > 0,
    }
    if job.moe_keys:
        rec["moe"] = {}
        for i, key in enumerate(job.moe_keys):
            counts = moe_stats[i, : getattr(job.cfg.model, key.split(".")[0]).moe.num_experts]
            rec["moe"][key] = {
                "tokens_per_expert": counts.long().tolist(),
                "min_tokens": int(counts.min()),
                "max_tokens": int(counts.max()),
                "imbalance": float(counts.max() / counts.float().mean().clamp(min=1e-9)),
                "aux_loss": float(moe_stats[i, -1]) / job.cfg.training.microbatches,
            }
        rec["moe_aux_loss"] = sum(v["aux_loss"] for v in rec["moe"].values())
        rec["moe_max_imbalance"] = max(v["imbalance"] for v in rec["moe"].values())
    job.history.append(rec)
    if len(job.history) > job.cfg.metrics.history_steps:  # bounded: the JSONL file keeps every logged step
        del job.history[0]
    if not finite:
        limit = job.cfg.training.max_skipped_steps
        if dist.get_rank() == 0:  # the same decision on every rank: say it once
            logger.warning(
                "step %d: non-finite loss/grad_norm (loss %s, grad_norm %s), step skipped (%d in a row)",
                job.step,
                loss_sum,
                float(grad_norm),
                job.skipped_in_a_row,
            )
        if job.skipped_in_a_row >= limit:
            first, t = job.step - limit + 1, job.cfg.training
            steps = f"step {job.step}" if limit == 1 else f"steps {first}-{job.step}"
            times = "once" if limit == 1 else f"for {limit} consecutive steps"
            clip = (
                "set training.max_grad_norm > 0 (clipping is off)"
                if t.max_grad_norm == 0
                else f"lower training.max_grad_norm (now {t.max_grad_norm:g})"
            )
            raise TrainingError(
                f"{steps}: the loss or the gradient norm was non-finite {times} (training.max_skipped_steps={limit}), "
                f"so the run diverged and stops; the weights are those after step {first - 1} and no checkpoint holds "
                f"non-finite values. Lower optimizer.lr (now {job.cfg.optimizer.lr:g}), raise "
                f"lr_schedule.warmup_steps (now {job.cfg.lr_schedule.warmup_steps}) or {clip}, then resume from a "
                "checkpoint saved before the loss rose (checkpoint.load_step) or start a new run"
            )
    return rec


def validation_loader(cfg: Config, processor: ImageTextProcessor, rank: int | None = None) -> MimoDataLoader:
    """The loader of ``[validation.data]``: the training loader's geometry (:func:`build_loader`: global batch,
    rows, packing, the rank's media slices) over the validation shards, read in order from their start, without a
    background thread.

    Raises:
        DataError: the validation shards hold no valid record (naming the path), as :class:`MimoDataLoader`.
    """
    data = dataclasses.replace(cfg.data, path=cfg.validation.data.path, shuffle=False, prefetch=0)
    try:
        return build_loader(dataclasses.replace(cfg, data=data), processor, rank=rank)
    except DataError as exc:  # the loader names the key it was given its path by as data.path
        raise DataError(re.sub(r"(?<![\w.])data\.path", "validation.data.path", str(exc))) from None


def validate(
    job: Job,
    batches: Iterable[Batch | PackedBatch],
    *,
    progress: Callable[[str], None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> dict:
    """Forward-only loss of ``batches`` (global batches, the same on every rank) through this job's layouts,
    bridges and pipeline (:meth:`~mimo_titan.pipeline.schedule.MimoSchedule.evaluate`): no gradient, no
    optimizer, no change to any weight, optimizer state or the training data position. Every rank must call it.

    Args:
        job: the rank's :class:`Job`.
        batches: the validation's global batches.
        progress: ``progress(phase)`` marks each batch for the watchdog (``"validation batch N"``), so a validation
            of many batches is not taken for a stalled rank (None: no marks).
        stop_requested: whether this rank received a stop signal (:class:`~mimo_titan.train.stop.GracefulStop`),
            read after every batch and summed over the ranks (one all-reduce per batch): when any rank asks, the
            validation ends there, on every rank, and ``stopped`` is True (None: never stops early).

    Returns:
        ``{"loss", "tokens", "batches", "time_s", "stopped"}``: ``loss`` the global per-token cross-entropy over
        every loss token of the batches validated (each batch's mean weighted by its loss tokens), ``tokens`` the
        loss tokens, ``batches`` how many were validated, ``time_s`` the wall time (seconds), ``stopped`` whether a
        stop request ended the validation early.

    Reference semantics: torchtitan's ``Validator.validate`` (a forward-only loss averaged over the validation
    steps; here weighted per token, as the training loss).
    """
    t0 = time.perf_counter()
    total, tokens, count = torch.zeros((), dtype=torch.float64, device=job.device), 0, 0
    stopped = False
    for batch in batches:
        if progress is not None:
            progress(f"validation batch {count + 1}")
        n = batch.num_loss_tokens()
        part = job.schedule.evaluate(batch)  # this rank's share of the batch's mean
        total += part.double() * n
        tokens += n
        count += 1
        if stop_requested is not None and _any_rank(stop_requested(), job.device):
            stopped = True
            break
    all_reduce_sum(total)
    return {
        "loss": float(total) / max(tokens, 1),
        "tokens": tokens,
        "batches": count,
        "time_s": time.perf_counter() - t0,
        "stopped": stopped,
    }


def _validation_batches(loader: MimoDataLoader, steps: int):
    """``steps`` batches of ``loader``, or with ``-1`` every batch that starts in the epoch the loader is in: up to
    the one that reaches the end of the data (completed from the start of the next epoch). When the data fill the
    batches exactly, the stream learns that the epoch is over only by reading the next batch, which starts in the next
    epoch (a repeat of the first batch): that one is read but not yielded."""
    if steps != -1:
        for _ in range(steps):
            yield next(loader)
        return
    epoch, first = loader.epoch, True
    while True:
        batch = next(loader)
        if not first and loader.last_start_epoch > epoch:
            return
        yield batch
        first = False
        if loader.epoch > epoch:
            return


def _setup_logging(rank: int) -> None:
    """One log line format for every rank (``[rankN] message``): rank 0 logs from INFO, the others only warnings;
    the data pipeline's warnings (a damaged shard, a non-UTF-8 caption) come from rank 0 alone, since every rank
    reads the same shards (:func:`check_same_data` makes sure they saw the same records)."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"[rank{rank}] %(message)s")
    if rank != 0:
        logging.getLogger("mimo_titan.data").setLevel(logging.ERROR)


def check_same_data(loader: MimoDataLoader, device: torch.device, key: str = "data.path") -> None:
    """Every rank reads the shards itself; make sure they all see the same data (a shard that one machine cannot
    read, or a file that changed between the ranks' reads, would silently give that rank another stream; for the
    validation data, another number of batches with ``validation.steps = -1``, so the ranks' collectives would no
    longer match). Cheap: compares :meth:`MimoDataLoader.fingerprint` (shard names and sizes, keys of the first
    records).

    Args:
        loader: this rank's loader.
        device: the device of the collective.
        key: the config key the loader's shards come from, for the message (``validation.data.path``).

    Raises:
        DataError: on every rank, naming the ranks whose data differ from rank 0's.
    """
    world = dist.get_world_size()
    if world == 1:
        return
    mine = torch.tensor(loader.fingerprint(), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    differ = [r for r, t in enumerate(gathered) if not torch.equal(t, gathered[0])]
    if differ:
        counts = ", ".join(f"rank {r}: {int(gathered[r][0])} shard(s)" for r in [0, *differ[:8]])
        raise DataError(
            f"the ranks see different data under {key} ({counts}; shard names, sizes or first records differ "
            f"on ranks {differ[:8]}): every rank must see the same shards; check that {key} is the same, "
            "complete and readable on every machine"
        )


def gather_decode_counts(loader: MimoDataLoader, device: torch.device) -> list[list[int]]:
    """Every rank's ``[decoded_images, decoded_audio]`` (one all-gather; every rank must call it)."""
    s = loader.stats
    mine = torch.tensor([s["decoded_images"], s["decoded_audio"]], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [t.tolist() for t in gathered]


def set_group_timeouts(timeout_s: float) -> None:
    """Give every process group this rank belongs to the collective timeout ``timeout_s``: ``init_process_group``
    sets it for the default group only, while the module meshes' groups (``DeviceMesh`` sub-groups, pipeline and
    expert groups) would keep torch's defaults (30 min on gloo, 10 min on NCCL)."""
    c10d = dist.distributed_c10d
    set_timeout = getattr(c10d, "_set_pg_timeout", None)
    if set_timeout is None:  # pragma: no cover - torch without it: the module groups keep torch's default
        logger.warning("this torch cannot set a process group's timeout; module meshes keep torch's default")
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    for group in list(c10d._world.pg_map):
        if not c10d._rank_not_in_group(group):
            set_timeout(timeout, group)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (one all-reduce; every rank must call it)."""
    t = torch.tensor([float(flag)], device=device)
    all_reduce_sum(t)
    return bool(t.item() > 0)


def _log_step(rec: dict) -> None:
    """Rank 0's lines of a logged step: the step line (loss, norm, LR, the LM's tokens/s, step time, the largest data
    wait and this rank's peak memory), one line per module (:func:`~mimo_titan.train.metrics.module_lines`) and the
    MoE routing line."""
    moe = (
        f" | moe_aux {rec['moe_aux_loss']:.4f} | expert_imbalance {rec['moe_max_imbalance']:.2f}"
        if "moe" in rec
        else ""
    )
    logger.info(
        "step %4d | loss %.4f | grad_norm %.4f | lr %.3e | tokens/s %.0f | step_time %.3fs | data_wait %.3fs | "
        "peak_mem %.2fGiB%s",
        rec["step"],
        rec["loss"],
        rec["grad_norm"],
        rec["lr"],
        rec["tokens_per_s"],
        rec["step_time_s"],
        rec["data_wait_s"],
        rec["peak_mem_gib"],
        moe,
    )
    for line in module_lines(rec):
        logger.info(line)
    if "validation" in rec:
        v = rec["validation"]
        logger.info(
            "validation | step %4d | loss %.4f | %d loss tokens in %d batches | %.3fs",
            rec["step"],
            v["loss"],
            v["tokens"],
            v["batches"],
            v["time_s"],
        )
    if "moe" in rec:
        logger.info(
            "  moe tokens/expert (min/max/imbalance, aux): %s",
            "; ".join(
                f"{k.split('.')[0]}.L{k.split('.')[-2]} {v['min_tokens']}/{v['max_tokens']}/"
                f"{v['imbalance']:.2f}, {v['aux_loss']:.4f}"
                for k, v in rec["moe"].items()
            ),
        )


def gather_step_metrics(job: Job, rec: dict, data_wait_s: float, memory_gib: float | None = None) -> None:
    """Complete a logged step's record with what other ranks know, in one all-reduce (MAX) that every rank must
    call: each module's ``mem_gib`` (the largest peak memory of its ranks: each rank contributes its peak at the
    modules it holds) and ``data_wait_s`` (the longest wait for the batch over all ranks).

    Args:
        job: this rank's job.
        rec: the step's record (:func:`train_step`); updated in place.
        data_wait_s: how long this rank waited for the step's batch (seconds).
        memory_gib: this rank's peak memory (default: the record's ``peak_mem_gib``).
    """
    mem = rec["peak_mem_gib"] if memory_gib is None else memory_gib
    names = list(rec["modules"])
    held = [mem if job.topology.role.holds(n) else 0.0 for n in names]
    *maxima, wait = gather_maxima([*held, data_wait_s], job.device)
    for name, value in zip(names, maxima):
        rec["modules"][name]["mem_gib"] = value
    rec["data_wait_s"] = wait


def _describe_layout(job: Job, world: int) -> str:
    backend = kernels.check_backend(job.device.type)  # what the kernel ops on this device run
    v = job.cfg.parallelism.virtual_stages
    return (
        f"layout {job.topology.placement.name} on {world} ranks; device {job.device}; kernels {backend}; "
        + "; ".join(
            f"{n}: ranks {lay.rank_offset}-{lay.end - 1} pp={lay.pp} "
            + (f"virtual_stages={v} " if lay.is_language and v > 1 else "")
            + f"dp_replicate={lay.dp_replicate} "
            f"dp_shard={lay.dp_shard}"
            + (f" cp={lay.cp}" if lay.cp > 1 else "")
            + (f" tp={lay.tp}" if lay.tp > 1 else "")
            + (f" ep={lay.ep} etp={lay.etp} edp={lay.edp}" if lay.ep * lay.etp > 1 else "")
            for n, lay in job.topology.layouts.items()
        )
    )


def _describe_training(cfg: Config) -> str:
    """One log line: the schedules, and what trains in each module (parameter counts; frozen modules named)."""
    from mimo_titan.checkpoint.state import meta_model

    total: dict[str, int] = {}
    trained: dict[str, int] = {}
    for key, p in meta_model(cfg.model).named_parameters():
        module = key.split(".")[0]
        total[module] = total.get(module, 0) + p.numel()
        trained[module] = trained.get(module, 0) + (p.numel() if is_trainable(cfg, key) else 0)
    par = cfg.parallelism
    parts = [
        f"{m}: frozen ({total[m]:,} parameters)" if not trained[m] else f"{m}: {trained[m]:,} of {total[m]:,} train"
        for m in total
    ]
    return (
        f"schedule: module {par.module_schedule}, language {par.pipeline_schedule}"
        + (f" x {par.virtual_stages} virtual stages" if par.virtual_stages > 1 else "")
        + f"; parameters: {'; '.join(parts)}"
        + f"; options: {'; '.join(f'{n}: {describe_module_options(o)}' for n, o in par.modules.items())}"
    )


def train(cfg: Config, max_steps: int | None = None) -> list[dict]:
    """Run ``training.total_steps`` steps (``training.steps``, or ``training.samples`` in LM samples); log the
    resolved config once, then every ``metrics.log_freq`` steps (and the first) a step line and one line per module
    on rank 0, and write that step's record to ``metrics.jsonl`` / TensorBoard (:mod:`mimo_titan.train.metrics`).
    Returns this process's history: the records of its newest ``metrics.history_steps`` steps.

    With ``checkpoint.enable`` it resumes from the newest complete checkpoint in ``checkpoint.folder`` (or
    ``checkpoint.load_step``), or initialises the model from ``checkpoint.initial_load_path``, and saves every
    ``checkpoint.interval`` steps and at the last step (:class:`~mimo_titan.checkpoint.CheckpointManager`).

    Faults: a non-finite step is skipped on every rank (:func:`train_step`); SIGTERM / SIGINT finish the current
    step, save a checkpoint (when checkpointing is on) and return normally
    (:class:`~mimo_titan.train.stop.GracefulStop`); a rank that makes no progress for
    ``training.collective_timeout_s`` ends the job with a message naming it (:class:`~mimo_titan.train.watchdog.
    Watchdog`; the process group's timeout is a little longer).

    Args:
        cfg: the run's ``Config``.
        max_steps: stop after this many steps of this process even if the run is not finished (what a preempted
            job does; used by the resume tests). None runs to the end.

    Layout, batch, kernel-backend, tokenizer, data and checkpoint-folder errors are raised before any process group
    is created.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    stopper = GracefulStop().install()
    _setup_logging(int(os.environ.get("RANK", 0)))
    try:
        validate_job(cfg, world)  # also sets the process-wide kernel backend
        check_metrics_config(cfg)
        logger.info("config (resolved): %s", json.dumps(cfg.to_dict()))
        check_host_memory(cfg)
        processor = build_processor(cfg)
        loader = build_loader(cfg, processor, rank=int(os.environ.get("RANK", 0)))
        val_loader = None
        try:
            if cfg.validation.enable:  # its shards are checked now, before any process group
                val_loader = validation_loader(cfg, processor, rank=int(os.environ.get("RANK", 0)))
            ckpt = CheckpointManager(cfg)
            ckpt.validate(loader)
            return _run(cfg, max_steps, processor, loader, ckpt, stopper, val_loader)
        finally:
            loader.close()  # the background data thread
            if val_loader is not None:
                val_loader.close()
    finally:
        stopper.uninstall()


def _run(
    cfg: Config,
    max_steps: int | None,
    processor: ImageTextProcessor,
    loader: MimoDataLoader,
    ckpt: CheckpointManager,
    stopper: GracefulStop,
    val_loader: MimoDataLoader | None = None,
) -> list[dict]:
    """The part of :func:`train` after the checks: process group, job, loop."""
    total_steps = cfg.training.total_steps
    owns_group = not dist.is_initialized()  # a caller's process group (tests) is left to the caller
    timeout_s = cfg.training.collective_timeout_s
    rank, world, device = init_distributed(cfg.training.device, process_group_timeout(timeout_s))
    layouts = layouts_from_config(cfg.parallelism, cfg.model.language_name)
    watchdog = Watchdog(
        rank=rank, world_size=world, timeout_s=timeout_s, describe=lambda r: rank_role(layouts, r, world).describe()
    ).start()
    ok = False  # on an exception, skip the barrier: the other ranks may never reach it and the error must surface
    writer: MetricsWriter | None = None
    try:
        watchdog.progress("checking the data")
        check_same_data(loader, device)
        if val_loader is not None:
            check_same_data(val_loader, device, key="validation.data.path")
        watchdog.progress("building the job")
        job = build_job(cfg, device, processor)
        set_group_timeouts(process_group_timeout(timeout_s))
        logger.info(_describe_layout(job, world))
        logger.info(_describe_training(cfg))
        if cfg.training.samples is not None:
            logger.info(
                "training.samples=%d: %d steps of %d LM samples",
                cfg.training.samples,
                total_steps,
                cfg.training.global_batch_size,
            )
        watchdog.progress("loading the checkpoint")
        ckpt.load(job, loader)
        ckpt.save_config()  # <checkpoint folder>/config.json, with checkpoint.enable
        writer = MetricsWriter(cfg, rank, start_step=job.step)
        val_start = val_loader.state_dict() if val_loader is not None else None
        done, logged = 0, 0
        while job.step < total_steps and (max_steps is None or done < max_steps):
            watchdog.progress("loading the batch", job.step + 1)
            t_wait = time.perf_counter()
            batch = next(loader)
            data_wait = time.perf_counter() - t_wait
            # the flag is read at the step's all-reduce, so a signal that arrives during the step stops after it
            rec = train_step(job, batch, stop_requested=lambda: stopper.requested, progress=watchdog.progress)
            rec["data_wait_s"] = data_wait  # this rank's; a logged step's record holds the largest over the ranks
            done += 1
            stop = rec["stop"]
            val = cfg.validation
            validating = val_loader is not None and not stop and (job.step % val.freq == 0 or job.step == total_steps)
            if validating:  # from the start of the validation data every time: the same batches each validation
                assert val_loader is not None and val_start is not None
                watchdog.progress("validating", job.step)
                val_loader.load_state_dict(val_start)
                result = validate(
                    job,
                    _validation_batches(val_loader, val.steps),
                    progress=watchdog.progress,
                    stop_requested=lambda: stopper.requested,
                )
                if result.pop("stopped"):  # a signal during the validation: save this step and stop, without its loss
                    stop = rec["stop"] = True
                else:
                    rec["validation"] = result
            # the same decision on every rank (stop is global), so the gather below is collective
            if rec["step"] % cfg.metrics.log_freq == 0 or rec["step"] == 1 or stop or validating:
                watchdog.progress("gathering metrics", job.step)
                gather_step_metrics(job, rec, data_wait)
                _log_step(rec)
                logger.info("  %s", loader.stats_summary())
                writer.write(rec)
                logged = rec["step"]
            if ckpt.should_save(job.step) or (stop and ckpt.ckpt.enable):
                watchdog.progress("saving a checkpoint", job.step)
                rec["checkpoint_save_s"] = ckpt.save(job, loader)
                # a signal that arrived during the save: this step is saved, so stop now rather than after another
                # step and another save (every rank takes this branch, so the all-reduce is collective)
                stop = stop or _any_rank(stopper.requested, job.device)
            if stop:
                logger.info(
                    "stopped after step %d on a signal (%s)%s",
                    job.step,
                    stopper.signal_name or "received by another rank",
                    "; checkpoint saved" if ckpt.ckpt.enable else "; checkpointing is off, nothing saved",
                )
                break
        if logged != job.step:
            logger.info("%s", loader.stats_summary())
        counts = gather_decode_counts(loader, device)
        logger.info("data: decoded per rank: images %s, audio clips %s", *[[c[i] for c in counts] for i in (0, 1)])
        watchdog.progress("finishing")
        ok = True
        return job.history
    except Exception as exc:
        lost = [] if isinstance(exc, UserError) else watchdog.lost_ranks()
        if lost and hasattr(exc, "add_note"):  # a peer that died breaks this rank's collectives: name it
            exc.add_note(f"[rank{rank}] this failure follows from a rank that is gone: {'; '.join(lost)}")
        raise
    finally:
        if writer is not None:
            writer.close()
        watchdog.stop(done=ok)  # a failed rank is not "done": its peers may still name it
        if ok:
            dist.barrier()
        if owns_group:
            dist.destroy_process_group()
