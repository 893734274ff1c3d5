"""Dry-run planner: what a config costs per module, per rank — with no process group and no weights.

:func:`plan_job` validates a config for a world size exactly as training does before any process group exists
(:func:`mimo_titan.train.trainer.validate_job`), builds the model on the meta device (shapes only) and estimates,
for every module, the parameters each of its ranks holds, its per-rank memory and the training FLOPs of one step.

Memory model (bytes per rank, the worst rank of the module: the pipeline stage with the most parameters, or the
first stage, which holds the most microbatches in flight):

- **Sharded state.** Each parameter is divided over the ranks that shard it: FSDP over ``dp_shard · cp``
  (``dp_replicate`` holds copies), TP over ``tp`` for matrices (1-D norms and biases are replicated over tp), routed
  experts over ``ep · etp · edp`` = ``dp_replicate · dp_shard · cp · tp`` (the expert mesh spans the stage's ranks).
  The fp32 master weight is 4 bytes; a trainable parameter
  adds an fp32 gradient (4) and AdamW's two fp32 moments (8): 16 bytes in all, as in ZeRO (Rajbhandari et al.,
  2020, §3: 16 bytes per parameter for mixed-precision Adam, with the fp32 master counted in the 12 bytes of
  optimizer state there).
- **FSDP gathers.** While a block runs, its parameters are all-gathered in the compute dtype, the next block's
  prefetched: two blocks' unsharded parameters (``/ tp``), plus one block's unsharded gradient in the reduce dtype
  during backward. Without resharding after forward (``reshard_after_forward`` off: the default with pp = 1) the
  whole stage's parameters stay gathered from the first forward to the last backward of a step.
- **Activations.** What autograd saves per token and layer in the compute dtype, counted from this repository's
  layers (decoder: norms, q/k/v before and after RoPE, the attention output, the MLP's gate/up/activation; flash
  attention saves O(S), no ``[S, S]`` scores); the LM's last stage adds the fp32 logits and their gradient
  (``tokens x vocab / tp x 8`` bytes). Sequence parallelism and CP divide the tokens per rank; pipeline
  schedules keep up to ``pp - stage`` microbatches in flight on a 1F1B stage (all of them with GPipe). Method:
  Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (2022), §4, with flash
  attention's O(S) memory (Dao et al., 2022).
- **Runtime.** On CPU the process itself (Python, torch, gloo, the tokenizer): ``RUNTIME_GIB["cpu"]``, measured on
  this project's CPU machines; on CUDA 0 (``torch.cuda.max_memory_allocated``, which the training log reports, does
  not count the CUDA context).

The estimate is a planning figure: allocator fragmentation, communication buffers and data loading are not in it.

FLOPs per step come from :mod:`mimo_titan.train.flops` (6 x active parameters per token plus the attention term,
PaLM appendix B) for full batches (an upper bound: real rows hold padding, samples fewer images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

from mimo_titan.config import Config
from mimo_titan.parallel.fsdp import resolve_dtype

__all__ = ["RUNTIME_GIB", "JobPlan", "ModuleParamTable", "ModulePlan", "module_memory", "plan_job"]

#: Memory of a rank that holds no model (GiB), per device type: on CPU the resident set of a training process with
#: torch, torch.distributed (gloo, FSDP, pipelining) and the data pipeline loaded, 0.41-0.51 GiB on this project's CPU
#: machines (the torch libraries' file pages count as far as the page cache has them resident); on CUDA the reported
#: peak is ``max_memory_allocated``, which leaves out the CUDA context and NCCL's buffers (add 1-3 GiB per GPU).
RUNTIME_GIB = {"cpu": 0.45, "cuda": 0.0}

_GIB = float(2**30)


@dataclass
class ModulePlan:
    """One module's figures.

    Attributes:
        name: the module (``[model.<name>]``).
        ranks: ``(first, last)`` global ranks, inclusive.
        layout: ``"pp=2 dp_shard=3"``-style summary of its parallel degrees (> 1 only).
        params: its parameters (all stages).
        trainable_params: the ones that train.
        params_per_rank: parameters the worst rank holds (its shard of its stage).
        mem_per_rank_gib: estimated peak memory of the worst rank, GiB (sum of ``mem_breakdown_gib``).
        mem_breakdown_gib: ``weights``, ``grads``, ``optimizer``, ``fsdp_gather``, ``activations``, ``runtime``.
        activations_per_microbatch_gib: activations of one microbatch on the worst rank.
        microbatches_in_flight: how many microbatches' activations the worst rank holds at once.
        flops_per_step: training FLOPs of one optimizer step, summed over the module's ranks.
        rank_total_gib: estimated peak of its worst rank with every module that rank holds (colocated modules
            add up; the runtime counts once).
    """

    name: str
    ranks: tuple[int, int]
    layout: str
    params: int
    trainable_params: int
    params_per_rank: int
    mem_per_rank_gib: float
    mem_breakdown_gib: dict[str, float]
    activations_per_microbatch_gib: float
    microbatches_in_flight: int
    flops_per_step: float
    rank_total_gib: float = 0.0


@dataclass
class JobPlan:
    """The whole job: ``world_size``, ``params_total`` and one :class:`ModulePlan` per module (config order)."""

    world_size: int
    device_type: str
    params_total: int
    modules: dict[str, ModulePlan] = field(default_factory=dict)

    def to_json(self) -> dict:
        """``{"world_size", "params_total", "device_type", "modules": {name: {"params", "ranks",
        "mem_per_rank_gib", "flops_per_step", ...}}}`` (ranks as ``[first, last]``, inclusive)."""
        return {
            "world_size": self.world_size,
            "device_type": self.device_type,
            "params_total": self.params_total,
            "modules": {
                n: {
                    "params": m.params,
                    "trainable_params": m.trainable_params,
                    "ranks": list(m.ranks),
                    "layout": m.layout,
                    "params_per_rank": m.params_per_rank,
                    "mem_per_rank_gib": round(m.mem_per_rank_gib, 4),
                    "mem_breakdown_gib": {k: round(v, 4) for k, v in m.mem_breakdown_gib.items()},
                    "activations_per_microbatch_gib": round(m.activations_per_microbatch_gib, 4),
                    "microbatches_in_flight": m.microbatches_in_flight,
                    "flops_per_step": m.flops_per_step,
                    "rank_total_gib": round(m.rank_total_gib, 4),
                }
                for n, m in self.modules.items()
            },
        }

    def table(self) -> str:
        """A fixed-width text table, one line per module, and the totals."""
        head = (
            f"{'module':<10} {'ranks':>9} {'layout':<28} {'params':>10} {'per rank':>10} "
            f"{'mem/rank GiB':>12} {'act/mb GiB':>10} {'TFLOP/step':>11}"
        )
        lines = [head, "-" * len(head)]
        for m in self.modules.values():
            lines.append(
                f"{m.name:<10} {f'{m.ranks[0]}-{m.ranks[1]}':>9} {m.layout:<28} {_human(m.params):>10} "
                f"{_human(m.params_per_rank):>10} {m.mem_per_rank_gib:>12.2f} "
                f"{m.activations_per_microbatch_gib:>10.3f} {m.flops_per_step / 1e12:>11.1f}"
            )
        lines.append(f"world_size {self.world_size}, {_human(self.params_total)} parameters, device {self.device_type}")
        for m in self.modules.values():
            parts = ", ".join(f"{k} {v:.2f}" for k, v in m.mem_breakdown_gib.items())
            lines.append(
                f"  {m.name}: {parts} GiB (x{m.microbatches_in_flight} microbatches in flight); its ranks with every "
                f"module they hold: {m.rank_total_gib:.2f} GiB"
            )
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _layout_text(lay) -> str:
    dims = ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep", "etp")
    text = " ".join(f"{d}={getattr(lay, d)}" for d in dims if getattr(lay, d) > 1)
    return text or "1 rank"


def _stage_of_language(name: str, num_layers: int, stages: int, tied: bool) -> list[int]:
    """The global pipeline stages (of ``stages``) holding LM parameter ``name`` (relative to the LM): the embedding on
    the first, the final norm and head on the last (tied: the head is a copy of the embedding there), block ``i`` on
    its even share."""
    from mimo_titan.pipeline.stages import stage_layer_range

    if name.startswith("model.embed_tokens."):
        return [0, stages - 1] if tied and stages > 1 else [0]
    if name.startswith("model.layers."):
        layer = int(name.split(".")[2])
        return [next(s for s in range(stages) if layer in stage_layer_range(num_layers, stages, s))]
    return [stages - 1]


def _is_expert(name: str) -> bool:
    return ".experts." in name


def _in_flight(schedule: str, pp: int, stage: int, microbatches: int, virtual: int) -> int:
    """Microbatches whose activations a stage holds at its peak."""
    if schedule == "GPipe" or pp == 1:
        return microbatches if schedule == "GPipe" else 1
    if schedule == "Interleaved1F1B":
        # warm-up of an interleaved stage: (pp - stage - 1) * 2 + (v - 1) * pp forwards, chunks of 1 / v size
        return min(microbatches * virtual, (pp - stage - 1) * 2 + (virtual - 1) * pp + 1)
    return min(microbatches, pp - stage)


def _decoder_act_per_token(lm, bytes_: int) -> float:
    """Bytes autograd saves per token in one decoder layer (no recomputation), :class:`DecoderLayer` as written:
    norm inputs/outputs (4 h), q, k, v before and after RoPE (2 q + 4 kv, 2 more with qk_norm), the attention output
    and its o_proj input (q), the MLP's gate, up, activation and product (4 ffn; MoE: top_k experts' and the shared
    expert's widths, plus the router's scores)."""
    h = lm.hidden_size
    hd = lm.head_dim or h // lm.num_heads
    q, kv = lm.num_heads * hd, lm.num_kv_heads * hd
    moe = lm.moe
    if moe.num_experts > 0:
        ffn = moe.top_k * moe.intermediate_size + moe.shared_expert_intermediate_size + moe.num_experts
    else:
        ffn = lm.intermediate_size
    per = 4 * h + 3 * q + 4 * kv + 4 * ffn + (2 * (q + kv) if lm.qk_norm else 0)
    return per * bytes_


def _encoder_act_per_token(sec, bytes_: int) -> float:
    """Bytes saved per token (patch or audio frame) in one pre-LN encoder block: the LayerNorm outputs (2 d), q/k/v
    and the attention output (4 d), the second residual input (d), fc1's and GELU's outputs (2 ffn)."""
    d, ffn = sec.hidden_size, sec.intermediate_size
    return (7 * d + 2 * ffn) * bytes_


def _ac_factor(mode: str) -> float:
    """Fraction of a block's saved activations kept with activation checkpointing (full keeps the block input only,
    which the caller adds; selective keeps the matmul outputs: about half, as torchtitan's op policy)."""
    return {"none": 1.0, "selective": 0.5, "full": 0.0}.get(mode, 1.0)


def plan_job(cfg: Config, world_size: int, *, device_type: str = "cuda") -> JobPlan:
    """Validate ``cfg`` for ``world_size`` ranks and estimate each module's per-rank memory and FLOPs per step.

    No process group and no weights: the model is built on the meta device.

    Args:
        cfg: a loaded :class:`~mimo_titan.config.Config`.
        world_size: the number of ranks to plan for (the rank ranges must tile it).
        device_type: ``"cuda"`` or ``"cpu"``: sets the compute dtype of ``mixed_precision_param = "auto"``
            (bf16 on CUDA, fp32 on CPU) and the runtime term (:data:`RUNTIME_GIB`).

    Returns:
        A :class:`JobPlan`.

    Raises:
        LayoutError / ConfigError: everything :func:`~mimo_titan.train.trainer.validate_job` refuses, naming the
            config field and the fix.
    """
    from mimo_titan.checkpoint.state import meta_model
    from mimo_titan.train.trainer import padded_seq_len, validate_job

    layouts = validate_job(cfg, world_size)
    from mimo_titan.data.webdataset import resolve_shards

    resolve_shards(cfg.data.path)  # data.path matches shards (DataError naming it otherwise); nothing is read
    model = meta_model(cfg.model)
    act_dtype = resolve_dtype(cfg.parallelism.mixed_precision_param, device_type)
    red_dtype = resolve_dtype(cfg.parallelism.mixed_precision_reduce, device_type)
    act_bytes = act_dtype.itemsize
    train = cfg.training
    seq = padded_seq_len(cfg)
    plan = JobPlan(world_size, device_type, sum(p.numel() for p in model.parameters()))
    flops = _flops_per_step(cfg, seq)

    for name, lay in layouts.items():
        table = ModuleParamTable.build(cfg, name, model)
        opts = cfg.parallelism.modules[name]
        if lay.is_language:
            in_flight = [
                _in_flight(
                    cfg.parallelism.pipeline_schedule, lay.pp, s, train.microbatches, cfg.parallelism.virtual_stages
                )
                for s in range(lay.pp)
            ]
        else:
            in_flight = [_encoder_in_flight(cfg, layouts, name, s) for s in range(lay.pp)]
        total, breakdown, act_mb, flight, w = module_memory(
            table,
            lay,
            microbatch_samples=train.global_batch_size // train.microbatches // lay.dp,
            seq_len=seq,
            virtual_stages=cfg.parallelism.virtual_stages if lay.is_language else 1,
            in_flight=in_flight,
            activation_checkpointing=getattr(opts, "activation_checkpointing", "none"),
            reshard_after_forward=getattr(opts, "fsdp_reshard_after_forward", None),
            act_bytes=act_bytes,
            reduce_bytes=red_dtype.itemsize,
            runtime_gib=RUNTIME_GIB.get(device_type, 0.0),
        )
        plan.modules[name] = ModulePlan(
            name=name,
            ranks=(lay.rank_offset, lay.rank_offset + lay.num_ranks - 1),
            layout=_layout_text(lay),
            params=table.params,
            trainable_params=table.trainable_params,
            params_per_rank=math.ceil(w),
            mem_per_rank_gib=total,
            mem_breakdown_gib=breakdown,
            activations_per_microbatch_gib=act_mb / _GIB,
            microbatches_in_flight=flight,
            flops_per_step=flops.get(name, 0.0),
        )
    runtime = RUNTIME_GIB.get(device_type, 0.0)
    for name, m in plan.modules.items():
        first = layouts[name].rank_offset
        shared = [
            o
            for n, o in plan.modules.items()
            if layouts[n].rank_offset <= first < layouts[n].rank_offset + layouts[n].num_ranks
        ]
        m.rank_total_gib = runtime + sum(o.mem_per_rank_gib - runtime for o in shared)
    return plan


@dataclass
class ModuleParamTable:
    """What :func:`module_memory` needs of one module, gathered once from the meta model so that many layouts can be
    costed quickly (the layout search prices thousands).

    Attributes:
        name / is_language: the module.
        params / trainable_params: parameter counts (all stages).
        layers / hidden: transformer blocks and the width of a block's input (a block boundary under full AC).
        act_per_token_layer: bytes per token and block that autograd saves, per byte of the compute dtype.
        tokens_per_sample: rows one sample gives the module (encoders: images or clips per sample times rows per
            item); the language model's come from ``seq_len``.
        vocab: the LM's vocabulary (the last stage's fp32 logits); 0 for encoders.
        tied: the LM's embedding and head are tied.
    """

    name: str
    is_language: bool
    params: int
    trainable_params: int
    layers: int
    hidden: int
    act_per_token_layer: float
    tokens_per_sample: int
    vocab: int
    tied: bool
    # (param name, numel, is a matrix, is a routed expert, trains, block unit)
    rows: list[tuple[str, int, bool, bool, bool, str]] = field(repr=False, default_factory=list)
    stage_of: object = field(repr=False, default=None)
    _by_stages: dict[int, list[dict[str, list[float]]]] = field(repr=False, default_factory=dict)

    @classmethod
    def build(cls, cfg: Config, name: str, model) -> ModuleParamTable:
        """The table of module ``name`` of ``cfg`` from its meta-device ``model`` (:func:`meta_model`)."""
        from mimo_titan.parallel.plans import encoder_plans
        from mimo_titan.train.freeze import is_trainable

        section = getattr(cfg.model, name)
        sub = getattr(model, name)
        is_lm = name == cfg.model.language_name
        rows = []
        for pname, p in sub.named_parameters():
            parts = pname.split(".")
            unit = ".".join(parts[: parts.index("layers") + 2]) if "layers" in parts else "root"
            rows.append((pname, p.numel(), p.dim() >= 2, _is_expert(pname), is_trainable(cfg, f"{name}.{pname}"), unit))
        if is_lm:
            per_tok, items, vocab, stage_of = _decoder_act_per_token(section, 1), 0, section.vocab_size, None
        else:
            plans = encoder_plans(section.type)
            per_item = plans.tokens_per_item(section) if plans.tokens_per_item else _audio_frames(section)
            items = (cfg.data.max_images_per_sample if section.type == "vit" else 1) * per_item
            per_tok, vocab, stage_of = _encoder_act_per_token(section, 1), 0, plans.stage_of
        return cls(
            name=name,
            is_language=is_lm,
            params=sum(r[1] for r in rows),
            trainable_params=sum(r[1] for r in rows if r[4]),
            layers=section.num_layers,
            hidden=section.hidden_size,
            act_per_token_layer=per_tok,
            tokens_per_sample=items,
            vocab=vocab,
            tied=bool(getattr(section, "tie_word_embeddings", False)),
            rows=rows,
            stage_of=stage_of,
        )

    def stage_units(self, stages: int, pp: int) -> list[dict[str, list[float]]]:
        """Per global stage (of ``stages`` = ``pp · virtual stages``), per block unit: numels of ``[experts, matrices,
        vectors, trainable experts, trainable matrices, trainable vectors]`` (cached per ``stages``)."""
        got = self._by_stages.get(stages)
        if got is not None:
            return got
        out: list[dict[str, list[float]]] = [{} for _ in range(stages)]
        for pname, numel, matrix, expert, trains, unit in self.rows:
            if self.is_language:
                where = _stage_of_language(pname, self.layers, stages, self.tied)
            elif pp > 1:
                assert callable(self.stage_of)
                where = [self.stage_of(pname, self.layers, pp)]
            else:
                where = [0]
            k = 0 if expert else 1 if matrix else 2
            for st in where:
                acc = out[st].setdefault(unit, [0.0] * 6)
                acc[k] += numel
                if trains:
                    acc[3 + k] += numel
        self._by_stages[stages] = out
        return out


def module_memory(
    table: ModuleParamTable,
    lay,
    *,
    microbatch_samples: float,
    seq_len: int,
    virtual_stages: int,
    in_flight: list[int],
    activation_checkpointing: str,
    reshard_after_forward: bool | None,
    act_bytes: int,
    reduce_bytes: int,
    runtime_gib: float,
) -> tuple[float, dict[str, float], float, int, float]:
    """Peak memory of the worst rank of one module laid out as ``lay`` (the model of the module docstring).

    Args:
        table: the module's :class:`ModuleParamTable`.
        lay: its :class:`~mimo_titan.topology.layout.ModuleLayout` (only the degrees are read).
        microbatch_samples: samples of one microbatch on one DP rank.
        seq_len: the language model's (padded) row length, tokens.
        virtual_stages: model chunks per pp rank (the LM with Interleaved1F1B), else 1.
        in_flight: per pp rank, the microbatches whose activations it holds at its peak.
        activation_checkpointing: ``"none"`` | ``"selective"`` | ``"full"``.
        reshard_after_forward: FSDP's; ``None`` = on with ``pp > 1``.
        act_bytes / reduce_bytes: bytes per element of the compute and gradient-reduce dtypes.
        runtime_gib: the per-process runtime term (:data:`RUNTIME_GIB`).

    Returns:
        ``(total GiB, breakdown GiB, activations of one microbatch in bytes, microbatches in flight, parameters held)``
        of the worst pp rank.
    """
    reshard = lay.pp > 1 if reshard_after_forward is None else reshard_after_forward
    v = virtual_stages
    stages = lay.pp * v
    units = table.stage_units(stages, lay.pp)
    rep_shard = lay.dp_replicate * lay.dp_shard * lay.cp * lay.tp
    shard = lay.dp_shard * lay.cp
    held, held_train, block, gathered = [], [], [], []
    counts: list[tuple[int, int, int]] = []  # per stage: whole numels of experts, matrices, vectors
    for st in range(stages):
        ht = b = g = 0.0
        ce = cm = cv = 0
        for e, mx, vec, te, tm, tv in units[st].values():
            ce, cm, cv = ce + int(e), cm + int(mx), cv + int(vec)
            ht += te / rep_shard + tm / (shard * lay.tp) + tv / shard
            n = e / (lay.ep * lay.etp) + mx / lay.tp + vec
            b = max(b, n)
            g += n
        counts.append((ce, cm, cv))
        held.append(ce / rep_shard + cm / (shard * lay.tp) + cv / shard)
        held_train.append(ht)
        block.append(b)
        gathered.append(g)
    if table.is_language:
        tokens = microbatch_samples * seq_len / (lay.cp * lay.tp)
        logits = microbatch_samples * seq_len / lay.cp * table.vocab / lay.tp * 8
    else:
        tokens = microbatch_samples * table.tokens_per_sample / lay.tp
        logits = 0.0
    per_layer = table.act_per_token_layer * act_bytes * tokens
    boundary = tokens * table.hidden * act_bytes  # a block's input, kept under full AC
    per_layer_kept = per_layer * _ac_factor(activation_checkpointing) + boundary
    recompute = per_layer if activation_checkpointing != "none" else 0.0
    frozen = not table.is_language and not any(held_train)
    worst: tuple[float, dict[str, float], float, int, float] | None = None
    worst_chunks: list[int] = []
    for local in range(lay.pp):
        chunks = [local + j * lay.pp for j in range(v)]
        act_mb = max(_layers_in(table.layers, stages, st) for st in chunks) * per_layer_kept
        if stages - 1 in chunks:
            act_mb += logits
        flight = in_flight[local]
        if frozen:  # a frozen encoder runs under no_grad: one block's activations exist at a time
            flight, act_mb = 0, per_layer
        w = sum(held[st] for st in chunks)
        t = sum(held_train[st] for st in chunks)
        unit = max(block[st] for st in chunks)
        if reshard:
            gather = (2 * act_bytes + reduce_bytes) * unit
        else:
            gather = sum(gathered[st] for st in chunks) * act_bytes + reduce_bytes * unit
        breakdown = {
            "weights": 4 * w / _GIB,
            "grads": 4 * t / _GIB,
            "optimizer": 8 * t / _GIB,
            "fsdp_gather": gather / _GIB,
            "activations": (act_mb * max(flight, 1) + recompute) / _GIB,
            "runtime": runtime_gib,
        }
        total = sum(breakdown.values())
        if worst is None or total > worst[0]:
            worst = (total, breakdown, act_mb, flight, w)
            worst_chunks = chunks
    assert worst is not None
    # the parameters held, exactly (a float sum of shares can land a hair above a whole count, which the caller's
    # math.ceil would round up by one)
    ce, cm, cv = (sum(counts[st][k] for st in worst_chunks) for k in range(3))
    exact = Fraction(ce, rep_shard) + Fraction(cm, shard * lay.tp) + Fraction(cv, shard)
    total, breakdown, act_mb, flight, _ = worst
    return total, breakdown, act_mb, flight, float(exact)


def _layers_in(num_layers: int, stages: int, stage: int) -> int:
    from mimo_titan.pipeline.stages import stage_layer_range

    return len(stage_layer_range(num_layers, stages, stage))


def _audio_frames(section) -> int:
    """Encoder frames of the longest clip (``max_source_positions``, 20 ms each)."""
    return section.max_source_positions


def _encoder_in_flight(cfg: Config, layouts: dict, name: str, stage: int) -> int:
    """Microbatches whose activations encoder ``name``'s pipeline ``stage`` holds at once, as
    :class:`~mimo_titan.pipeline.schedule.MimoSchedule` runs it: every microbatch in whole-batch mode (module-level
    GPipe, or colocated with ``colocated_encoders = "batch"``), one inline, and when streamed on its own ranks its
    warm-up forwards (:func:`~mimo_titan.pipeline.order.encoder_warmup`: the LM's pp plus the encoder stages left
    with 1F1B, every microbatch with GPipe)."""
    from mimo_titan.pipeline.order import encoder_warmup
    from mimo_titan.pipeline.schedule import schedule_mode

    lay, lang = layouts[name], layouts[cfg.model.language_name]
    par = cfg.parallelism
    mode = schedule_mode(
        colocated=lay.rank_offset == lang.rank_offset,
        module_schedule=par.module_schedule,
        colocated_encoders=par.colocated_encoders,
    )
    if mode == "whole_batch":
        return cfg.training.microbatches
    if mode == "inline":
        return 1
    return encoder_warmup(par.pipeline_schedule, lang.pp, cfg.training.microbatches, lay.pp - stage, par.virtual_stages)


def _flops_per_step(cfg: Config, seq_len: int) -> dict[str, float]:
    """Training FLOPs of one step per module (:mod:`mimo_titan.train.flops`), for full batches: every LM row is
    ``seq_len`` tokens, every sample holds ``max_images_per_sample`` images and as many clips of the longest length
    the audio encoder takes (``2 · max_source_positions`` log-mel frames) — an upper bound for planning."""
    from mimo_titan.train import flops as F

    modes = F.part_modes(cfg)
    lm = cfg.model.language
    samples = cfg.training.global_batch_size
    items = samples * cfg.data.max_images_per_sample
    out = {
        cfg.model.language_name: samples
        * seq_len
        * F.lm_flops_per_token(lm, seq_len, modes[cfg.model.language_name]["model"])
    }
    for name, section in cfg.model.encoders.items():
        m = modes[name]
        if section.type == "vit":
            out[name] = items * F.vit_flops_per_image(section, lm.hidden_size, m["tower"], m["projector"])
        elif section.type == "audio":
            frames = 2 * section.max_source_positions
            out[name] = items * F.audio_flops_per_clip(section, lm.hidden_size, frames, m["tower"], m["projector"])
    return out
