"""Build a MIMO training job from a ``Config`` and run its loop.

:func:`validate_job` checks everything that can be checked without a process group; :func:`build_job`
creates the meshes, the per-module model parts (same initial weights whatever the layout: every rank builds
the full model from ``job.seed`` and keeps its part), FSDP, optimizers, the bridge and the schedule;
:func:`train_step` runs one optimizer step; :func:`train` is the loop that ``scripts/train.py`` calls.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from mimo_titan.checkpoint import CheckpointManager
from mimo_titan.data import ImageTextProcessor, MimoDataLoader, check_batch_divisibility
from mimo_titan.models.mimo import LanguageStage, MimoModel, full_model_key
from mimo_titan.models.moe import MoE
from mimo_titan.parallel.cp import apply_cp
from mimo_titan.parallel.ep import apply_ep, moe_modules
from mimo_titan.parallel.fsdp import apply_fsdp, resolve_dtype
from mimo_titan.parallel.tp import apply_tp_language, apply_tp_vision, check_tp
from mimo_titan.pipeline.bridge import Bridge
from mimo_titan.pipeline.schedule import MimoSchedule
from mimo_titan.pipeline.stages import split_language_model, stage_layer_range
from mimo_titan.topology import build_topology, layouts_from_config, validate_layouts
from mimo_titan.train.rng import RNGTracker, module_seeds
from mimo_titan.train.optim import (
    all_reduce_sum, build_lr_scheduler, build_optimizer, clip_grad_norm_, global_grad_sq_norm,
)

__all__ = ["validate_job", "init_distributed", "Job", "build_processor", "build_loader", "build_job", "canonical_named_parameters", "train_step", "train"]

# Linear layers on 3-D inputs return views; nothing in this package modifies a module output in place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

logger = logging.getLogger("mimo_titan")


def validate_job(cfg, world_size: int) -> dict:
    """Every check that needs no process group: layouts, batch divisibility, features not supported yet.

    Returns:
        The validated module layouts (``{name: ModuleLayout}``).

    Raises:
        LayoutError / ValueError: naming the config field and the fix.
    """
    layouts = layouts_from_config(cfg.parallelism)
    validate_layouts(layouts, world_size)
    for name, lay in layouts.items():
        moe = getattr(cfg.model, name).moe
        if lay.tp > 1 and moe.num_experts > 0:
            raise ValueError(
                f"parallelism.{name}.tp={lay.tp} with model.{name}.moe.num_experts={moe.num_experts}: tensor "
                f"parallelism of MoE layers is not supported; split the experts with parallelism.{name}.ep / etp "
                "and set tp = 1"
            )
        check_tp(name, getattr(cfg.model, name), lay.tp)
        if lay.tp > 1 and lay.dp_replicate > 1:
            raise ValueError(f"parallelism.{name}: tp={lay.tp} with dp_replicate={lay.dp_replicate} is not supported; "
                             "use dp_shard instead of dp_replicate")
        if lay.tp > 1 and lay.is_language and cfg.model.language.tie_word_embeddings:
            raise ValueError(f"parallelism.{name}.tp={lay.tp} with model.language.tie_word_embeddings = true is not "
                             "supported (the vocabulary-parallel embedding and head would be sharded separately); "
                             "untie them or set tp = 1")
        if lay.cp != 1:
            if not lay.is_language:
                raise ValueError(f"parallelism.{name}.cp={lay.cp}: context parallelism is supported for the language "
                                 "module only; set cp = 1")
            if lay.dp_replicate != 1:
                raise ValueError(f"parallelism.{name}: cp={lay.cp} with dp_replicate={lay.dp_replicate} is not "
                                 "supported yet; use dp_shard instead of dp_replicate")
        if not lay.is_language and lay.pp != 1:
            raise ValueError(f"parallelism.{name}.pp={lay.pp}: encoder modules run as one stage; set pp = 1")
        if lay.ep * lay.etp > 1:
            if moe.num_experts == 0:
                raise ValueError(
                    f"parallelism.{name}: ep={lay.ep}, etp={lay.etp} but model.{name}.moe.num_experts = 0; expert "
                    f"parallelism needs an MoE module: set model.{name}.moe.num_experts or ep = etp = 1"
                )
            if moe.num_experts % lay.ep:
                raise ValueError(f"parallelism.{name}.ep={lay.ep} must divide model.{name}.moe.num_experts="
                                 f"{moe.num_experts}")
            if not lay.is_language and lay.etp > 1:
                raise ValueError(
                    f"parallelism.{name}.etp={lay.etp}: expert tensor parallelism needs the same number of tokens on "
                    "every rank of an etp group, which an encoder fed a variable number of images does not have; "
                    f"set parallelism.{name}.etp = 1 (ep is supported)"
                )
            if moe.intermediate_size % lay.etp:
                raise ValueError(f"parallelism.{name}.etp={lay.etp} must divide model.{name}.moe.intermediate_size="
                                 f"{moe.intermediate_size}")
    lang = next(lay for lay in layouts.values() if lay.is_language)
    stage_layer_range(cfg.model.language.num_layers, lang.pp, 0)  # raises if num_layers < pp
    check_batch_divisibility(cfg.training.global_batch_size, cfg.training.microbatches,
                             {name: lay.dp for name, lay in layouts.items()})
    if lang.pp > cfg.training.microbatches:
        raise ValueError(
            f"training.microbatches={cfg.training.microbatches} is smaller than parallelism.language.pp={lang.pp}: "
            f"the pipeline needs at least one microbatch per stage; set training.microbatches >= {lang.pp}"
        )
    return layouts


def sequence_multiple(cfg) -> int:
    """Every sequence (packed row) length must be a multiple of this: ``2·cp`` for zigzag context parallelism
    (``2·cp`` chunks per sequence) and ``cp·tp`` so that sequence parallelism splits each CP shard over tp."""
    lang = layouts_from_config(cfg.parallelism)["language"]
    return math.lcm(2 * lang.cp if lang.cp > 1 else 1, lang.cp * lang.tp)


def padded_seq_len(cfg) -> int:
    """``training.seq_len`` rounded up to :func:`sequence_multiple`: the loader builds rows of this length (a
    sample shorter than the row is padded, without loss), so a length that CP / SP cannot split is rounded up, not
    rejected."""
    m = sequence_multiple(cfg)
    return -(-cfg.training.seq_len // m) * m


def init_distributed(device_pref: str = "auto") -> tuple[int, int, torch.device]:
    """Initialise the default process group from torchrun's environment (or a 1-rank group).

    Device: ``auto`` → ``cuda:LOCAL_RANK`` with NCCL when there is a CUDA device for every local rank, else CPU
    with gloo; ``cuda`` / ``cpu`` force the choice.

    Returns:
        ``(rank, world_size, device)``.

    Raises:
        ValueError: ``training.device = "cuda"`` without a CUDA device for every local rank.
    """
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    enough_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    use_cuda = enough_gpus if device_pref == "auto" else device_pref == "cuda"
    if use_cuda and not enough_gpus:
        raise ValueError(
            f"training.device = 'cuda' but {torch.cuda.device_count()} CUDA devices serve {local_world} local ranks; "
            "use 'auto' (CPU/gloo) or launch one rank per GPU"
        )
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                device_id=device if use_cuda else None)
    return rank, world, device


@dataclass
class Job:
    """Everything one rank needs to train. ``modules`` maps module name → this rank's (sharded) part."""

    cfg: object
    topology: object
    device: torch.device
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]
    schedule: MimoSchedule
    processor: ImageTextProcessor
    moe_keys: list[str] = field(default_factory=list)  # every MoE layer of the model, same order on every rank
    rng: dict[str, RNGTracker] = field(default_factory=dict)  # per held module; runtime randomness draws from it
    step: int = 0
    history: list[dict] = field(default_factory=list)

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
    apply_ep(part, topology.ep_group(name), lay.ep, coord["ep"], topology.etp_group(name) if lay.etp > 1 else None,
             lay.etp, coord["etp"])
    return topology.edp_mesh(name)


def build_processor(cfg) -> ImageTextProcessor:
    """The image + text processor of ``cfg`` (tokenizer from ``data.tokenizer``).

    Raises:
        ValueError / FileNotFoundError: a missing tokenizer, or ``model.language.vocab_size`` below the tokenizer's.
    """
    processor = ImageTextProcessor(cfg.data.tokenizer, cfg.model.vision.image_size,
                                   (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2)
    if processor.vocab_size > cfg.model.language.vocab_size:
        raise ValueError(
            f"model.language.vocab_size={cfg.model.language.vocab_size} is smaller than the tokenizer's "
            f"{processor.vocab_size} tokens ({cfg.data.tokenizer}); raise vocab_size"
        )
    return processor


def build_loader(cfg, processor: ImageTextProcessor) -> MimoDataLoader:
    """The global-batch loader of ``cfg`` (identical on every rank): rows of :func:`padded_seq_len` tokens; with
    ``data.packing`` packed THD rows whose documents are padded to a multiple of ``2·cp``."""
    lang = layouts_from_config(cfg.parallelism)["language"]
    return MimoDataLoader(cfg.data.path, processor, cfg.training.global_batch_size, padded_seq_len(cfg),
                          max_images_per_sample=cfg.data.max_images_per_sample, shuffle=cfg.data.shuffle,
                          seed=cfg.job.seed, packing=cfg.data.packing,
                          pack_multiple=2 * lang.cp if cfg.data.packing and lang.cp > 1 else 1)


def build_job(cfg, device: torch.device, processor: ImageTextProcessor | None = None) -> Job:
    """Build meshes, model parts, FSDP, optimizers, bridge and schedule on this rank.

    Requires an initialised default process group whose size matches the layouts. Every rank makes the same
    process-group calls in the same order.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    layouts = validate_job(cfg, world)
    topology = build_topology(layouts, world, rank, device.type)
    role = topology.role
    lang_name = role.language
    vis_name = next(n for n in layouts if n != lang_name)

    processor = processor or build_processor(cfg)
    full = MimoModel(cfg.model, processor.image_token_id)
    full.init_weights(cfg.job.seed)
    moe_keys = [full_model_key(vis_name, q) for q, _ in moe_modules(full.vision)]
    moe_keys += [full_model_key(lang_name, q) for q, _ in moe_modules(full.language)]
    param_dtype = resolve_dtype(cfg.parallelism.mixed_precision_param, device.type)
    reduce_dtype = resolve_dtype(cfg.parallelism.mixed_precision_reduce, device.type)

    modules: dict[str, nn.Module] = {}
    if role.holds(vis_name):
        lay = layouts[vis_name]
        vision = full.vision.to(device)
        expert_mesh = _prepare_moe(vision, topology, vis_name, cfg.training.microbatches)
        if lay.tp > 1:
            apply_tp_vision(vision, topology.tp_mesh(vis_name))
        modules[vis_name] = apply_fsdp(vision, vision.vision_model.encoder.layers, topology.dp_mesh(vis_name),
                                       param_dtype, reduce_dtype, expert_mesh=expert_mesh)
    if role.holds(lang_name):
        lay = layouts[lang_name]
        part = split_language_model(full.language, lay.pp, role.pp_stage(lang_name))
        stage = LanguageStage(part, processor.image_token_id).to(device)
        if lay.cp > 1:
            apply_cp(stage, topology.cp_group(lang_name), lay.cp, role.coordinates[lang_name]["cp"])
        expert_mesh = _prepare_moe(stage, topology, lang_name, cfg.training.microbatches)
        if lay.tp > 1:
            apply_tp_language(stage, topology.tp_mesh(lang_name))
        modules[lang_name] = apply_fsdp(stage, list(part.model.layers.values()), topology.fsdp_mesh(lang_name),
                                        param_dtype, reduce_dtype, reshard_after_forward=lay.pp == 1,
                                        expert_mesh=expert_mesh)
    del full

    optimizers = {n: build_optimizer(m, cfg.optimizer) for n, m in modules.items()}
    schedulers = {n: build_lr_scheduler(o, cfg.training.total_steps, cfg.lr_schedule) for n, o in optimizers.items()}
    mb_size = cfg.training.global_batch_size // cfg.training.microbatches
    tokens_per_image = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
    bridge = Bridge(layouts[vis_name], layouts[lang_name], mb_size, tokens_per_image, cfg.model.language.hidden_size,
                    param_dtype, device, rank)
    schedule = MimoSchedule(topology, modules.get(vis_name), modules.get(lang_name), bridge, cfg.training.microbatches,
                            cfg.parallelism.pipeline_schedule, processor.image_token_id, tokens_per_image, device,
                            padded_seq_len(cfg), cfg.model.language.vocab_size, param_dtype, packed=cfg.data.packing)
    rng = {}
    for index, name in enumerate(layouts):
        if role.holds(name):
            coords = {**role.coordinates[name], **role.expert_coordinates(name)}
            rng[name] = RNGTracker(module_seeds(cfg.job.seed, index, coords), cuda=device.type == "cuda")
    return Job(cfg, topology, device, modules, optimizers, schedulers, schedule, processor, moe_keys, rng)


def canonical_named_parameters(job: "Job"):
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
            out[i, :layer.num_experts] = layer.tokens_per_expert.float()
            out[i, -1] = layer.aux_loss_sum
    return out


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def train_step(job: Job, global_batch) -> dict:
    """One optimizer step on ``global_batch`` (identical on every rank). Every rank must call it.

    Returns:
        ``{"step", "loss", "grad_norm", "lr", "tokens", "step_time_s", "tokens_per_s", "peak_mem_gib", "sample_ids"}`` where
        loss is the global per-token loss and grad_norm the global norm before clipping.
    """
    t0 = time.perf_counter()
    if job.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(job.device)
    for opt in job.optimizers.values():
        opt.zero_grad(set_to_none=True)
    moe = job.moe_layers()
    for layer in moe.values():
        layer.reset_stats()
    loss_part = job.schedule.step(global_batch)
    mods = list(job.modules.values())
    moe_stats = _moe_stats(job, moe)  # [layers, E + 1]: routed copies per expert, aux-loss sum
    stats = torch.cat([torch.stack([loss_part, global_grad_sq_norm(mods, job.device)]), moe_stats.flatten()])
    all_reduce_sum(stats)
    moe_stats = stats[2:].view_as(moe_stats)
    grad_norm = clip_grad_norm_(mods, job.cfg.training.max_grad_norm, stats[1])
    lr = next(iter(job.schedulers.values())).get_last_lr()[0] if job.schedulers else job.cfg.optimizer.lr
    for name in job.modules:
        job.optimizers[name].step()
        job.schedulers[name].step()
    for i, key in enumerate(job.moe_keys):
        if key in moe:
            moe[key].update_bias(moe_stats[i, :moe[key].num_experts])
    job.step += 1
    dt = time.perf_counter() - t0
    tokens = int((global_batch.input_ids != job.processor.pad_id).sum())
    ids = global_batch.sample_ids
    sample_ids = [i for row in ids for i in row] if isinstance(ids, list) else ids.tolist()
    rec = {"step": job.step, "loss": float(stats[0]), "grad_norm": float(grad_norm), "lr": lr, "tokens": tokens,
           "step_time_s": dt, "tokens_per_s": tokens / dt, "peak_mem_gib": _peak_memory_gib(job.device),
           "sample_ids": sample_ids}
    if job.moe_keys:
        rec["moe"] = {}
        for i, key in enumerate(job.moe_keys):
            counts = moe_stats[i, :getattr(job.cfg.model, key.split(".")[0]).moe.num_experts]
            rec["moe"][key] = {"tokens_per_expert": counts.long().tolist(),
                               "min_tokens": int(counts.min()), "max_tokens": int(counts.max()),
                               "imbalance": float(counts.max() / counts.float().mean().clamp(min=1e-9)),
                               "aux_loss": float(moe_stats[i, -1]) / job.cfg.training.microbatches}
        rec["moe_aux_loss"] = sum(v["aux_loss"] for v in rec["moe"].values())
        rec["moe_max_imbalance"] = max(v["imbalance"] for v in rec["moe"].values())
    job.history.append(rec)
    return rec


def train(cfg, max_steps: int | None = None) -> list[dict]:
    """Run ``training.total_steps`` steps (``training.steps``, or ``training.samples`` in LM samples); log one line
    per ``metrics.log_freq`` steps on rank 0. Returns this process's history.

    With ``checkpoint.enable`` it resumes from the newest complete checkpoint in ``checkpoint.folder`` (or
    ``checkpoint.load_step``), or initialises the model from ``checkpoint.initial_load_path``, and saves every
    ``checkpoint.interval`` steps and at the last step (:class:`~mimo_titan.checkpoint.CheckpointManager`).

    Args:
        cfg: the run's ``Config``.
        max_steps: stop after this many steps of this process even if the run is not finished (what a preempted
            job does; used by the resume tests). None runs to the end.

    Layout, batch, tokenizer and data errors are raised before any process group is created.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    validate_job(cfg, world)
    processor = build_processor(cfg)
    loader = build_loader(cfg, processor)
    total_steps = cfg.training.total_steps
    ckpt = CheckpointManager(cfg)
    ckpt.validate(loader)
    owns_group = not dist.is_initialized()  # a caller's process group (tests) is left to the caller
    rank, world, device = init_distributed(cfg.training.device)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"[rank{rank}] %(message)s")
    ok = False  # on an exception, skip the barrier: the other ranks may never reach it and the error must surface
    try:
        job = build_job(cfg, device, processor)
        logger.info("layout %s on %d ranks; device %s; %s", job.topology.placement.name, world, device,
                    "; ".join(f"{n}: ranks {lay.rank_offset}-{lay.end - 1} pp={lay.pp} dp_replicate={lay.dp_replicate} "
                              f"dp_shard={lay.dp_shard}" + (f" cp={lay.cp}" if lay.cp > 1 else "") + (f" tp={lay.tp}" if lay.tp > 1 else "")
                              + (f" ep={lay.ep} etp={lay.etp} edp={lay.edp}" if lay.ep * lay.etp > 1 else "")
                              for n, lay in job.topology.layouts.items()))
        if cfg.training.samples is not None:
            logger.info("training.samples=%d: %d steps of %d LM samples", cfg.training.samples, total_steps,
                        cfg.training.global_batch_size)
        ckpt.load(job, loader)
        done = 0
        while job.step < total_steps and (max_steps is None or done < max_steps):
            rec = train_step(job, next(loader))
            done += 1
            if rec["step"] % cfg.metrics.log_freq == 0 or rec["step"] == 1:
                moe = (f" | moe_aux {rec['moe_aux_loss']:.4f} | expert_imbalance {rec['moe_max_imbalance']:.2f}"
                       if "moe" in rec else "")
                logger.info("step %4d | loss %.4f | grad_norm %.4f | lr %.3e | tokens/s %.0f | step_time %.3fs | "
                            "peak_mem %.2fGiB%s", rec["step"], rec["loss"], rec["grad_norm"], rec["lr"],
                            rec["tokens_per_s"], rec["step_time_s"], rec["peak_mem_gib"], moe)
                if "moe" in rec:
                    logger.info("  moe tokens/expert (min/max/imbalance, aux): %s", "; ".join(
                        f"{k.split('.')[0]}.L{k.split('.')[-2]} {v['min_tokens']}/{v['max_tokens']}/"
                        f"{v['imbalance']:.2f}, {v['aux_loss']:.4f}" for k, v in rec["moe"].items()))
            if ckpt.should_save(job.step):
                rec["checkpoint_save_s"] = ckpt.save(job, loader)
        logger.info("data: %s", loader.stats)
        ok = True
        return job.history
    finally:
        if ok:
            dist.barrier()
        if owns_group:
            dist.destroy_process_group()
