"""Drive one training step of a MIMO model across module meshes: one pipeline whose leading stage is the encoder.

The encoder (its DP ranks, non-colocated or colocated with the language model) and the language model's pipeline
stages (``torch.distributed.pipelining``: ``PipelineStage`` + ``Schedule1F1B`` / ``ScheduleGPipe``, or one
``PipelineStage`` per model chunk + ``ScheduleInterleaved1F1B`` with virtual stages) run one microbatch-level
schedule. Three ways to run it (:attr:`MimoSchedule.mode`):

``"streamed"`` (non-colocated, ``parallelism.module_schedule = "1F1B"``, the default)
    The encoder is stage 0 of a ``1 + pp`` stage 1F1B pipeline (:mod:`mimo_titan.pipeline.order`): it encodes
    microbatch ``m`` and sends its image-token rows over the :class:`~mimo_titan.pipeline.bridge.Bridge` at once;
    the language model's first stage receives microbatch ``m`` right before its forward of ``m`` (and only
    ``m``); the gradient of ``m``'s rows goes back the moment that stage's backward of ``m`` reaches them, and
    the encoder runs its backward of ``m`` while the language model works on later microbatches. With
    ``Interleaved1F1B`` the encoder warms up with the forwards the language model's first chunk runs before its first
    backward (:func:`~mimo_titan.pipeline.order.encoder_warmup`).
``"inline"`` (colocated, ``parallelism.colocated_encoders = "inline"``, language ``pp = 1``)
    Each rank encodes microbatch ``m`` right before the language model's forward of ``m`` and runs the
    encoder's backward of ``m`` right after the language model's backward of ``m``.
``"whole_batch"`` (colocated, ``colocated_encoders = "batch"``, the default; or ``module_schedule = "GPipe"``)
    The encoder runs every microbatch's forward, the rows cross in one exchange, the language model runs its
    schedule, the gradients cross back in one exchange and the encoder runs every backward: GPipe at the module
    level, fewer and larger encoder kernels.

Colocated exchanges go through one ``batch_isend_irecv`` (an NCCL group: two ranks that send to each other
would otherwise deadlock on NCCL). Streamed pairs of ranks post their point-to-point operations in the same
order on both sides (the language side posts the receive of every forward the encoder sends before a
gradient's receive ahead of sending that gradient), as NCCL, which ignores tags, needs.

Gradients are *sums* over microbatches and DP ranks (the loss is already normalised globally), so the
pipelining schedule runs with ``scale_grads=False`` and FSDP reduces with a sum (see ``parallel.fsdp``).

Reference semantics: Megatron-LM's multi-module pipeline (``pipeline_parallel/schedules.py``: encoder stages lead
the language model's stages in one 1F1B schedule; ``bridge_communicator.py`` between the module grids;
``examples/mimo/training``), with torch.distributed.pipelining for the language stages.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.pipelining.schedules import _PipelineSchedule
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import loss_parallel

from mimo_titan.data.collate import IGNORE_INDEX, Batch
from mimo_titan.data.sharding import local_batch
from mimo_titan.models.mimo import cp_shard_rows
from mimo_titan.models.moe import excluded_from_stats
from mimo_titan.models.specs import rows_of
from mimo_titan.parallel import comm
from mimo_titan.pipeline.bridge import Bridge, Pending, cp_owner, image_row_cp_ranks, module_rank
from mimo_titan.pipeline.order import encoder_warmup, one_f_one_b_order
from mimo_titan.pipeline.stages import LanguageChunks

if TYPE_CHECKING:
    from collections.abc import Callable

    from mimo_titan.data.packing import PackedBatch

# torch.distributed.pipelining reads ``.grad`` of every stage input that requires a gradient, to pass it to the
# previous stage; the first stage's encoder embeddings (a sum of the encoders' leaves) have none to pass (each
# encoder's leaf sends its own over its bridge), and torch warns about that read on every step
warnings.filterwarnings(
    "ignore", message=r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"
)

__all__ = ["MODULE_SCHEDULES", "PIPELINE_SCHEDULES", "EncoderLane", "MimoSchedule", "schedule_mode"]

PIPELINE_SCHEDULES = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe, "Interleaved1F1B": ScheduleInterleaved1F1B}
MODULE_SCHEDULES = ("1F1B", "GPipe")


def schedule_mode(*, colocated: bool, module_schedule: str, colocated_encoders: str) -> str:
    """``"streamed"``, ``"inline"`` or ``"whole_batch"`` (see the module docstring) for a layout and its keys."""
    if module_schedule == "GPipe":
        return "whole_batch"
    if colocated:
        return "inline" if colocated_encoders == "inline" else "whole_batch"
    return "streamed"


class _Stage(PipelineStage):
    """A language ``PipelineStage`` that, in a forward-only step (:meth:`MimoSchedule.evaluate`), keeps nothing of a
    microbatch once it is done when it is the last stage.

    torch's stage caches every forward's output and inputs for the backward (``fwd_cache``), and a forward-only
    schedule never pops them: the last stage would hold the ``[b, S, V]`` logits of every microbatch until the next
    step, ``M`` times what a 1F1B training step keeps. Its output has already reached the loss when the forward
    returns (and a last stage sends nothing), so the entry is emptied right away. A non-last stage's outputs
    (``[b, S, H]``) are still read by the sends that follow the forward; :meth:`MimoSchedule.evaluate` frees them
    after the step.
    """

    def forward_one_chunk(self, fwd_chunk_id, *args, **kwargs):
        out = super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)
        if self.is_last and not self.has_backward:
            self.fwd_cache[fwd_chunk_id] = ((), [])  # read once more by get_fwd_send_ops, which sends nothing
        return out


class _FirstStage(_Stage):
    """The language model's first ``PipelineStage``: takes microbatch ``m``'s image embeddings from the bridge right
    before its forward of ``m`` (as the keyword input ``image_dense_BSH``) and reports the end of its backward of
    ``m`` (colocated encoders run theirs then)."""

    def __init__(
        self,
        *args,
        before_forward: Callable[[int], dict[str, torch.Tensor]],
        after_backward: Callable[[int], None],
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._before_forward, self._after_backward = before_forward, after_backward

    def forward_one_chunk(self, fwd_chunk_id, args, kwargs=None, *rest, **kw):
        extra = self._before_forward(fwd_chunk_id)
        return super().forward_one_chunk(fwd_chunk_id, args, {**(kwargs or {}), **extra}, *rest, **kw)

    def backward_one_chunk(self, bwd_chunk_id, *rest, **kw):
        out = super().backward_one_chunk(bwd_chunk_id, *rest, **kw)
        self._after_backward(bwd_chunk_id)
        return out


class EncoderLane:
    """One encoder feeding the language model through its own :class:`Bridge` (every rank builds every lane, in
    the same order; only the ranks that hold the encoder pass its module).

    Args:
        name: the encoder's module name (``[model.<name>]``).
        module: this rank's part of the encoder (FSDP-wrapped, or any module in benchmarks), or ``None``.
        bridge: the encoder → language :class:`Bridge`, built with ``tokens_per_image = 1`` (rows are counted per
            sample from the placeholders) and ``lane`` = this lane's index.
        placeholder_id: id of the encoder's placeholder token (``<|image|>``, ``<|audio|>``).
        inputs: ``batch -> tuple`` of the encoder's forward arguments for the items of a ``Batch`` slice (CPU), or
            ``None`` when it holds none (:attr:`mimo_titan.models.specs.EncoderSpec.inputs`).
        dummy_inputs: one minimal item, encoded by a DP rank with nothing to encode in a microbatch (its FSDP
            collectives stay in step; its rows never cross).
        trainable: False for a frozen encoder (every rank must agree): it encodes under ``no_grad``, no gradient
            crosses its bridge and it runs no backward.
        stage_trains: for an encoder with pipeline stages, whether each stage has a trainable parameter (every rank
            alike); a stage runs backwards only if it or an earlier stage trains. Default: every stage as
            ``trainable``.
        prefetch_microbatches: how many microbatches a frozen encoder on its own ranks may have sent that the
            language model has not yet received (a bounded queue).
        tokens_per_item: rows per item (``P`` patches per image) of an encoder split into pipeline stages: what
            travels between its stages is ``[max(n, 1), P, D]``.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module | None,
        bridge: Bridge,
        *,
        placeholder_id: int,
        inputs: Callable[[Batch], tuple[torch.Tensor, ...] | None],
        dummy_inputs: tuple[torch.Tensor, ...],
        trainable: bool = True,
        stage_trains: list[bool] | None = None,
        prefetch_microbatches: int = 2,
        tokens_per_item: int | None = None,
    ):
        self.name, self.module, self.bridge = name, module, bridge
        self.placeholder_id = placeholder_id
        self.inputs, self.dummy_inputs = inputs, dummy_inputs
        self.trainable, self.stage_trains = trainable, stage_trains
        self.prefetch = prefetch_microbatches
        self.tokens_per_item = tokens_per_item
        # -- set by MimoSchedule: the layout and how this lane runs (every rank) --
        self.layout: Any = None
        self.colocated = False  # on the language model's ranks
        self.mode = "streamed"  # schedule_mode(...)
        self.grads_cross = trainable  # a gradient crosses the bridge back to the encoder
        self.bridge_warmup = 1
        # -- on a rank that holds the encoder: its stage --
        self.warmup = self.prev_warmup = 0
        self.first = self.last = True
        self.bwd = self.prev_bwd = False
        self.width = 0  # D, what travels between stages
        self.dp = 0
        self.prev_rank = self.next_rank = -1
        # -- per step --
        self.local: Any = None  # this encoder DP rank's part of the global batch
        self.rows_ps: list[torch.Tensor] = []  # per microbatch: rows of every sample of the global microbatch
        self.row_cp: list[torch.Tensor | None] = []  # per microbatch: the language CP rank of every row
        self.enc_out: dict[int, torch.Tensor] = {}
        self.enc_in: dict[int, torch.Tensor] = {}
        self.stage_recv: dict[int, Pending] = {}
        self.stage_posted = self.backwards = 0
        self.grad_rows: dict[int, torch.Tensor] = {}
        self.grads_seen: set[int] = set()
        self.mine: torch.Tensor = torch.empty(0, dtype=torch.bool)  # [b_local, S] this CP rank's placeholders
        self.fwd_recv: Any = None  # _LazyRecvs


class MimoSchedule:
    """One forward + backward of the MIMO model over a global batch, split into microbatches.

    Args:
        topology: the ``Topology`` of this run.
        lanes: one :class:`EncoderLane` per encoder, in the same order on every rank.
        language: this rank's :class:`~mimo_titan.models.mimo.LanguageStage` (FSDP-wrapped), with
            ``virtual_stages > 1`` its :class:`~mimo_titan.pipeline.stages.LanguageChunks`, or ``None``.
        microbatches: microbatches per step (M).
        schedule: ``"1F1B"``, ``"GPipe"`` or ``"Interleaved1F1B"``: the language pipeline's schedule
            (``parallelism.pipeline_schedule``).
        virtual_stages: language chunks per pp rank (``parallelism.virtual_stages``; >= 2 with Interleaved1F1B,
            1 otherwise); every rank passes it (an encoder stage's warm-up depends on it).
        module_schedule: ``"1F1B"`` (the encoders lead the language stages in one schedule) or ``"GPipe"`` (the
            encoders' whole batch first, their backwards after the language model's step).
        colocated_encoders: ``"batch"`` or ``"inline"``, how an encoder on the language model's ranks runs.
        device: device the step runs on.
        seq_len: S, tokens per sample (or per packed row).
        vocab_size: V (logits width of the last stage; ``V / tp`` per rank under tensor parallelism).
        act_dtype: dtype of activations between language stages (the FSDP compute dtype).
        packed: global batches are packed THD rows (``PackedBatch``): every stage gets the rows' ``position_ids``
            and ``doc_ids`` as keyword inputs.

    Each lane runs in its own mode (:func:`schedule_mode`, from whether its encoder shares the language model's
    ranks); the language model's first stage waits, before its forward of microbatch ``m``, for microbatch ``m``
    of every encoder, and sends each trainable encoder its rows' gradients of ``m`` once its backward of ``m`` has
    them. Encoders that share ranks (colocated with each other, apart from the language model) run as one leading
    stage: forward of ``m`` of each in lane order, then later the backward of ``m`` of each.

    Each language ``PipelineStage`` gets static input / output metadata (meta tensors of the microbatch
    shapes), so torch.distributed.pipelining runs no metadata-inference pass: such a pass would run the stage
    on uninitialised tensors (MoE routing and expert all-to-alls included) before the first step.

    Raises:
        ValueError: an unknown schedule name, ``"inline"`` with a language ``pp > 1`` or an encoder ``pp > 1``,
            encoders sharing ranks with different ``pp``, Interleaved1F1B with a language ``pp < 2`` or
            ``virtual_stages < 2``, ``virtual_stages > 1`` with another schedule.
    """

    def __init__(
        self,
        topology,
        lanes: list[EncoderLane],
        language: nn.Module | None,
        *,
        microbatches: int,
        schedule: str,
        device: torch.device,
        seq_len: int,
        vocab_size: int,
        act_dtype: torch.dtype,
        packed: bool = False,
        module_schedule: str = "1F1B",
        colocated_encoders: str = "batch",
        virtual_stages: int = 1,
    ):
        if schedule not in PIPELINE_SCHEDULES:
            raise ValueError(f"parallelism.pipeline_schedule={schedule!r}; choose one of {sorted(PIPELINE_SCHEDULES)}")
        lang_pp = topology.layouts[topology.role.language].pp
        if (schedule == "Interleaved1F1B") != (virtual_stages > 1) or (virtual_stages > 1 and lang_pp < 2):
            raise ValueError(
                f"parallelism.pipeline_schedule={schedule!r} with virtual_stages={virtual_stages} and language "
                f"pp={lang_pp}: Interleaved1F1B needs virtual_stages >= 2 and pp >= 2, the other schedules "
                "virtual_stages = 1 (mimo_titan.train.trainer.validate_job says which key to change)"
            )
        if module_schedule not in MODULE_SCHEDULES:
            raise ValueError(f"parallelism.module_schedule={module_schedule!r}; choose one of {list(MODULE_SCHEDULES)}")
        role = topology.role
        self.topology, self.role = topology, role
        self.language = language
        self.microbatches = microbatches
        self.device = device
        self.lang_name = role.language
        names = [n for n in topology.layouts if n != self.lang_name]
        if sorted(lane.name for lane in lanes) != sorted(names):
            raise ValueError(f"one EncoderLane per encoder module {names} is needed, got {[x.name for x in lanes]}")
        self.lanes = lanes
        lang_lay = topology.layouts[self.lang_name]
        self.act_dtype = act_dtype

        def warmup(enc_pp: int, enc_stage: int) -> int:  # encoder stage enc_stage leads enc_pp - enc_stage + lm pp
            return encoder_warmup(schedule, lang_lay.pp, microbatches, enc_pp - enc_stage, virtual_stages)

        for lane in lanes:
            lay = topology.layouts[lane.name]
            lane.layout = lay
            lane.colocated = lay.rank_offset == lang_lay.rank_offset
            lane.mode = schedule_mode(
                colocated=lane.colocated, module_schedule=module_schedule, colocated_encoders=colocated_encoders
            )
            if lane.mode == "inline" and (lang_lay.pp > 1 or lay.pp > 1):
                raise ValueError(
                    f"parallelism.colocated_encoders='inline' needs parallelism.{self.lang_name}.pp = 1 and "
                    f"parallelism.{lane.name}.pp = 1 (got {lang_lay.pp}, {lay.pp}): every rank must run the language "
                    "model's first stage and the whole encoder; use 'batch'"
                )
            stage_trains = lane.stage_trains if lane.stage_trains is not None else [lane.trainable] * lay.pp
            # stage j needs its backward iff a stage up to j trains: the gradient has somewhere to go
            needs_grad = [any(stage_trains[: j + 1]) for j in range(lay.pp)]
            #: whether any gradient crosses this lane's bridge back to the encoder (False: a frozen encoder)
            lane.grads_cross = needs_grad[-1]
            lane.bridge_warmup = warmup(lay.pp, lay.pp - 1)  # of the stage that sends over the bridge
            lane.bwd = False
            if lane.module is not None:
                stage = role.pp_stage(lane.name)
                #: forwards this encoder stage runs ahead of its first backward (streamed mode)
                lane.warmup = warmup(lay.pp, stage)
                lane.first, lane.last = stage == 0, stage == lay.pp - 1
                lane.bwd, lane.prev_bwd = needs_grad[stage], stage > 0 and needs_grad[stage - 1]
                lane.prev_warmup = warmup(lay.pp, stage - 1) if stage else 0
                lane.width = getattr(getattr(lane.module, "cfg", None), "hidden_size", 0)  # D, between stages
                c = role.coordinates[lane.name]
                lane.dp = role.dp_rank(lane.name)
                lane.prev_rank = module_rank(lay, stage - 1, lane.dp, c["cp"], c["tp"]) if stage else -1
                lane.next_rank = module_rank(lay, stage + 1, lane.dp, c["cp"], c["tp"]) if not lane.last else -1
        held = [lane for lane in lanes if lane.module is not None and lane.mode == "streamed"]
        if len({(lane.layout.pp, lane.warmup) for lane in held}) > 1:
            raise ValueError(
                f"encoders {[x.name for x in held]} share ranks but not their pipeline depth "
                f"({[x.layout.pp for x in held]}); give them the same parallelism.<name>.pp"
            )
        modes = sorted({lane.mode for lane in lanes})
        #: how the encoders run (:func:`schedule_mode`); ``"a+b"`` when lanes differ
        self.mode = "+".join(modes)
        #: whether any encoder receives gradients over its bridge
        self.encoder_trainable = any(lane.grads_cross for lane in lanes)
        self.encoder_warmup = next((lane.warmup for lane in lanes if lane.module is not None), 0)
        self._bridge_warmup = max(lane.bridge_warmup for lane in lanes)
        self._mb_size, self._hidden = lanes[0].bridge.mb_size, lanes[0].bridge.hidden_size
        self._dense_dtype = lanes[0].bridge.dtype
        self._num_loss_tokens = 1
        self._forward_only = False  # set by evaluate()
        self.pp_schedule: _PipelineSchedule | None = None
        self.packed = packed
        self.cp_size, self.cp_rank, self.tp_mesh = 1, 0, None
        self.is_first = False
        if language is not None:
            self._build_lm_stages(
                language,
                schedule=schedule,
                virtual_stages=virtual_stages,
                microbatches=microbatches,
                device=device,
                seq_len=seq_len,
                vocab_size=vocab_size,
                act_dtype=act_dtype,
            )

    # -- language stages ----------------------------------------------------------------------------------
    def _build_lm_stages(
        self,
        language: nn.Module,
        *,
        schedule: str,
        virtual_stages: int,
        microbatches: int,
        device: torch.device,
        seq_len: int,
        vocab_size: int,
        act_dtype: torch.dtype,
    ) -> None:
        """This rank's language ``PipelineStage`` s and their ``torch.distributed.pipelining`` schedule.

        One stage per rank (``1F1B`` / ``GPipe``: pp stage ``r``), or with ``Interleaved1F1B`` one per chunk of a
        :class:`~mimo_titan.pipeline.stages.LanguageChunks` (global stages ``r + j·pp`` of ``pp · v``, driven by
        ``ScheduleInterleaved1F1B``). The global first stage is a :class:`_FirstStage` (it takes the image rows from
        the bridge); the rank holding it is :attr:`is_first`, the rank holding the global last stage :attr:`is_last`.

        Static metadata (meta tensors, no shape-inference pass): the first stage takes token ids ``[b, S]`` int64,
        every other stage the SP shard ``[b, S / (cp·tp), H]`` of ``act_dtype``; the last stage returns logits
        ``[b, S / cp, V / tp]``, every other stage ``[b, S / (cp·tp), H]`` (``b`` the microbatch rows of this DP
        rank).

        Raises:
            ValueError: ``language`` holds a number of chunks other than ``virtual_stages``.
        """
        role, topology = self.role, self.topology
        lay = topology.layouts[self.lang_name]
        self.cp_size, self.cp_rank = lay.cp, role.coordinates[self.lang_name]["cp"]
        if lay.tp > 1:
            self.tp_mesh = topology.tp_mesh(self.lang_name)
        # the loss is replicated over tp: one tp rank reports it
        self.reports_loss = role.coordinates[self.lang_name]["tp"] == 0
        s_local = seq_len // self.cp_size
        if isinstance(language, LanguageChunks):
            chunks, stage_indices, num_stages = list(language.chunks), list(language.stage_indices), language.num_stages
        else:
            chunks, stage_indices, num_stages = [language], [role.pp_stage(self.lang_name)], lay.pp
        if len(chunks) != virtual_stages or num_stages != lay.pp * virtual_stages:
            raise ValueError(
                f"the language part holds {len(chunks)} of {num_stages} stages, but parallelism.virtual_stages="
                f"{virtual_stages} with pp={lay.pp}; build it with mimo_titan.train.trainer.build_job"
            )
        self.is_first = stage_indices[0] == 0
        self.is_last = stage_indices[-1] == num_stages - 1
        b, H = self._mb_size // lay.dp, self._hidden

        def meta(*shape, dtype=act_dtype, grad=True):  # activations carry gradients, token ids do not
            return torch.empty(shape, dtype=dtype, device="meta", requires_grad=grad)

        #: this rank's language ``PipelineStage`` s, in global stage order
        self.stages: list[PipelineStage] = []
        for chunk, stage_idx in zip(chunks, stage_indices):
            first, last = stage_idx == 0, stage_idx == num_stages - 1
            # the first stage's image embeddings come from the bridge (a keyword input); later stages' inputs and
            # non-last stages' outputs are the SP shard [b, S / (cp tp), H]
            inputs = (meta(b, seq_len, dtype=torch.int64, grad=False),) if first else (meta(b, s_local // lay.tp, H),)
            outputs = (meta(b, s_local, vocab_size // lay.tp),) if last else (meta(b, s_local // lay.tp, H),)
            common = dict(
                stage_index=stage_idx,
                num_stages=num_stages,
                device=device,
                input_args=inputs,
                output_args=outputs,
                group=topology.pp_group(self.lang_name),
            )
            if first:
                stage: PipelineStage = _FirstStage(
                    chunk, before_forward=self._before_lm_forward, after_backward=self._after_lm_backward, **common
                )
            else:
                stage = _Stage(chunk, **common)
            self.stages.append(stage)
        self.stage = self.stages[0]
        if schedule == "Interleaved1F1B":
            self.pp_schedule = ScheduleInterleaved1F1B(
                cast("list[Any]", self.stages), n_microbatches=microbatches, loss_fn=self._loss, scale_grads=False
            )
        else:
            self.pp_schedule = PIPELINE_SCHEDULES[schedule](
                self.stage, n_microbatches=microbatches, loss_fn=self._loss, scale_grads=False
            )

    # -- loss --------------------------------------------------------------------------------------------
    def _loss(self, logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        """Sum of per-token cross-entropy (fp32) over the microbatch / global number of loss tokens of the step.

        Under context parallelism the logits are this rank's zigzag shard, and so are the labels (sharded by
        :meth:`step`, never SP-scattered). Under tensor parallelism the logits are this rank's vocabulary shard
        ``[b, S, V / tp]`` and the cross-entropy is vocabulary-parallel (``loss_parallel``: the softmax statistics
        are all-reduced over tp; the step runs inside its context, which its backward needs).
        """
        logits = logits_BSV.float()
        if self.tp_mesh is not None:
            logits = DTensor.from_local(logits, self.tp_mesh, [Shard(2)], run_check=False)
        ce = F.cross_entropy(logits.flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        if isinstance(ce, DTensor):
            ce = ce.to_local()
        return ce / self._num_loss_tokens

    def _loss_context(self):
        """``loss_parallel()`` under tensor parallelism (forward and backward of the loss run inside), else a no-op."""
        return loss_parallel() if self.tp_mesh is not None else contextlib.nullcontext()

    # -- per-step geometry --------------------------------------------------------------------------------
    def _rows_per_sample(self, lane: EncoderLane, m: int) -> torch.Tensor:
        """``[mb_size]`` int64: the placeholders of ``lane`` in every sample of global microbatch ``m`` (its rows)."""
        s = len(self._batch) // self.microbatches
        return (self._batch.input_ids[m * s : (m + 1) * s] == lane.placeholder_id).sum(1)

    def _row_cp(self, lane: EncoderLane, m: int) -> torch.Tensor | None:
        """The language CP rank of every row of ``lane`` in global microbatch ``m`` (None without CP)."""
        cp = self.topology.layouts[self.lang_name].cp
        if cp == 1:
            return None
        s = len(self._batch) // self.microbatches
        docs = cast("PackedBatch", self._batch).doc_ids[m * s : (m + 1) * s] if self.packed else None
        return image_row_cp_ranks(self._batch.input_ids[m * s : (m + 1) * s], lane.placeholder_id, cp, docs)

    # -- encoder side -------------------------------------------------------------------------------------
    # An encoder with pp > 1 is a chain of stages (split_vision_encoder): stage s receives [n, P, D] from stage s - 1
    # (the same DP and tp coordinates, tagged as the lane's bridge tags), the last stage sends its rows over the
    # bridge. A DP rank without items in a
    # microbatch runs one dummy item through every stage (FSDP's collectives stay in step; its rows never cross).
    def _enc_slice(self, lane: EncoderLane, m: int) -> Batch:
        b = len(lane.local) // self.microbatches
        return lane.local.slice(m * b, (m + 1) * b)

    def _enc_items(self, lane: EncoderLane, m: int) -> int:
        """Items (images, clips) of this encoder DP rank in microbatch ``m``."""
        args = lane.inputs(self._enc_slice(lane, m))
        return 0 if args is None else int(args[0].shape[0])

    def _between_stages(self, lane: EncoderLane, m: int) -> torch.Tensor:
        """An empty ``[max(n, 1), P, D]`` buffer for what travels between encoder stages in microbatch ``m``."""
        assert lane.tokens_per_item is not None, f"encoder {lane.name} has pipeline stages but no tokens_per_item"
        n = max(self._enc_items(lane, m), 1)
        return torch.empty(n, lane.tokens_per_item, lane.width, dtype=self.act_dtype, device=self.device)

    def _post_stage_recvs(self, lane: EncoderLane, upto: int) -> None:
        """Post the receives of the previous encoder stage's outputs for microbatches ``<= upto`` not posted yet."""
        while lane.stage_posted < min(upto + 1, self.microbatches):
            m = lane.stage_posted
            buf = self._between_stages(lane, m)
            op = dist.P2POp(dist.irecv, buf, lane.prev_rank, tag=lane.bridge.tag(m, 0))
            lane.stage_recv[m] = Pending([op], lambda b=buf: b)
            lane.bridge.post(lane.stage_recv[m])
            lane.stage_posted += 1

    def _encoder_forward(self, lane: EncoderLane, m: int) -> list[dist.P2POp]:
        """Run this encoder stage on microbatch ``m``; return the sends of its output (to post): the rows over the
        bridge from the last stage, ``[max(n, 1), P, D]`` to the next stage otherwise."""
        assert lane.module is not None, "only a rank holding the encoder encodes"
        part = self._enc_slice(lane, m)
        n_rows = int((part.input_ids == lane.placeholder_id).sum())
        if lane.first:
            args = lane.inputs(part)
            empty = args is None
            args = tuple(t.to(self.device) for t in (lane.dummy_inputs if args is None else args))
        else:
            self._post_stage_recvs(lane, m)
            x = lane.stage_recv.pop(m).result()
            empty = self._enc_items(lane, m) == 0
            if lane.prev_bwd:  # the previous stage wants its output's gradient
                x.requires_grad_(True)
                lane.enc_in[m] = x
            args = (x,)
        grad = contextlib.nullcontext() if lane.bwd else torch.no_grad()
        stats = excluded_from_stats(lane.module) if empty else contextlib.nullcontext()
        with stats, grad:  # MoE routing of a dummy item counts for nothing
            out = lane.module(*args)
        # a tensor-parallel all-reduce: wait for it now, also on tp ranks that never read the output (only tp rank 0
        # sends it), not at process exit
        out = comm.wait(out)
        if lane.bwd:
            lane.enc_out[m] = out
        if lane.last:
            rows = rows_of(out)[:n_rows]
            return lane.bridge.forward_sends(m, lane.dp, rows, lane.rows_ps[m], lane.row_cp[m])
        tag = lane.bridge.tag(m, 0)
        return [dist.P2POp(dist.isend, out.detach().contiguous(), lane.next_rank, tag=tag)]

    def _encoder_grad_recv(self, lane: EncoderLane, m: int) -> Pending:
        """The receive of ``d loss / d output`` of microbatch ``m``: rows ``[R, H]`` over the bridge (last stage) or
        ``[max(n, 1), P, D]`` from the next stage."""
        if lane.last:
            return lane.bridge.backward_recvs(m, lane.dp, lane.rows_ps[m], lane.row_cp[m])
        buf = self._between_stages(lane, m)
        return Pending([dist.P2POp(dist.irecv, buf, lane.next_rank, tag=lane.bridge.tag(m, 1))], lambda: buf)

    def _encoder_backward(self, lane: EncoderLane, m: int, grad: torch.Tensor) -> None:
        """Backward of microbatch ``m`` through this encoder stage; send its input's gradient to the previous stage.
        FSDP reduces after the stage's last backward."""
        assert lane.module is not None
        out = lane.enc_out.pop(m)
        lane.backwards += 1
        last = lane.backwards == self.microbatches
        if isinstance(lane.module, FSDPModule):  # one reduce after the last microbatch, as pipelining does
            lane.module.set_requires_gradient_sync(last)
            lane.module.set_is_last_backward(last)
            lane.module.set_reshard_after_backward(last)
        if lane.last:  # the real rows; a dummy item's output gets a zero gradient
            g = torch.zeros_like(out)
            rows_of(g)[: grad.shape[0]] = grad  # cast to out's dtype by the assignment
            grad = g
        torch.autograd.backward(out, grad.to(out.dtype))
        if lane.prev_bwd:
            x = lane.enc_in.pop(m)
            assert x.grad is not None, "an encoder stage's input takes part in its output"
            # the previous stage sends every forward up to m + its warm-up - 1 before it receives this gradient
            self._post_stage_recvs(lane, m + lane.prev_warmup - 1)
            tag = lane.bridge.tag(m, 1)
            lane.bridge.post([dist.P2POp(dist.isend, x.grad.contiguous(), lane.prev_rank, tag=tag)])

    def _run_encoders_streamed(self, held: list[EncoderLane]) -> None:
        """This rank's encoder stage(s) as one leading stage of the 1F1B pipeline (non-colocated with the language
        model): forward of ``m`` of each held encoder in lane order, later the backward of ``m`` of each."""
        M = self.microbatches
        training = [lane for lane in held if lane.bwd]
        if not training:  # forwards only, at most `prefetch` microbatches ahead of the receiver
            prefetch = min(lane.prefetch for lane in held)
            # per microbatch, each lane's send works: a lane's own bridge waits for them (it tracks them and waits
            # again at the end of the step otherwise, and a gloo send waited for twice never returns)
            sent: list[list[tuple[EncoderLane, list]]] = []
            for m in range(M):
                if m >= prefetch:
                    for lane, works in sent[m - prefetch]:
                        lane.bridge.wait_sends(works)
                sent.append([(lane, lane.bridge.post(self._encoder_forward(lane, m))) for lane in held])
            return
        for kind, m in one_f_one_b_order(M, held[0].warmup):
            if kind == "F":
                for lane in held:
                    lane.bridge.post(self._encoder_forward(lane, m))
            else:
                pending = [self._encoder_grad_recv(lane, m) for lane in training]
                for lane, p in zip(training, pending):
                    lane.bridge.post(p)
                for lane, p in zip(training, pending):
                    self._encoder_backward(lane, m, p.result())

    # -- language side (first stage) ------------------------------------------------------------------------
    def _post_forward_recvs(self, upto: int) -> None:
        """Post the bridge receives of the streamed encoders' microbatches ``<= upto`` not posted yet: microbatch by
        microbatch, each in lane order (the order the encoders' ranks send in)."""
        while self._posted < min(upto + 1, self.microbatches):
            for lane in self.lanes:
                if lane.mode == "streamed":
                    lane.bridge.post(lane.fwd_recv[self._posted])
            self._posted += 1

    def _before_lm_forward(self, m: int) -> dict[str, torch.Tensor]:
        """Microbatch ``m``'s encoder embeddings ``{"image_dense_BSH": [b, S, H]}``: every encoder's rows at its
        placeholders (one leaf per trainable encoder, whose gradient goes back over its bridge)."""
        for lane in self.lanes:
            if lane.mode == "inline":
                lane.bridge.post(self._encoder_forward(lane, m), lane.fwd_recv[m], batch=True)
        self._post_forward_recvs(m)
        b = self._lm_ids.shape[0] // self.microbatches
        dense = None
        for lane in self.lanes:
            rows = lane.fwd_recv[m].result()
            mine = lane.mine[m * b : (m + 1) * b]
            part = torch.zeros(*mine.shape, self._hidden, dtype=self._dense_dtype, device=self.device)
            part[mine] = rows
            if lane.grads_cross:
                part.requires_grad_(True)
                part.register_hook(lambda g, m=m, lane=lane: self._on_rows_grad(lane, m, g))
            dense = part if dense is None else dense + part
        assert dense is not None
        return {"image_dense_BSH": dense}

    def _on_rows_grad(self, lane: EncoderLane, m: int, grad_BSH: torch.Tensor) -> None:
        """The gradient of ``lane``'s embeddings of microbatch ``m`` has been computed: keep its rows; once every
        trainable encoder's are in, send them back (streamed) or leave them for the exchange after the backward
        (inline) or the step (whole batch)."""
        b = self._lm_ids.shape[0] // self.microbatches
        lane.grad_rows[m] = grad_BSH[lane.mine[m * b : (m + 1) * b]]
        lane.grads_seen.add(m)
        streamed = [x for x in self.lanes if x.mode == "streamed" and x.grads_cross]
        if lane not in streamed or any(m not in x.grad_rows for x in streamed):
            return
        # the encoders send every forward up to m + warmup - 1 before they receive this gradient: post those
        # receives first, so both ranks of a pair order their operations alike
        self._post_forward_recvs(m + self._bridge_warmup - 1)
        for x in streamed:
            x.bridge.post(self._grad_sends(x, m, x.grad_rows.pop(m)))

    def _grad_sends(self, lane: EncoderLane, m: int, rows: torch.Tensor):
        return lane.bridge.backward_sends(m, self._lm_dp, rows, lane.rows_ps[m], self.cp_rank, lane.row_cp[m])

    def _after_lm_backward(self, m: int) -> None:
        for lane in self.lanes:
            if lane.mode != "inline" or not lane.grads_cross:
                continue
            if m not in lane.grad_rows:
                raise RuntimeError(
                    f"the language pipeline produced no gradient for the {lane.name} embeddings of microbatches [{m}]; "
                    "the encoder would silently stop training"
                )
            sends = self._grad_sends(lane, m, lane.grad_rows.pop(m))  # first: own rows are handed over in memory
            pending = self._encoder_grad_recv(lane, m)
            lane.bridge.post(sends, pending, batch=True)
            self._encoder_backward(lane, m, pending.result())

    # -- the step -------------------------------------------------------------------------------------------
    def _run_lm(self, *args, **kwargs) -> None:
        """This rank's language stages over the microbatches: forward + backward, or forwards only
        (:meth:`evaluate`: torch's ``eval`` mode of the schedule, without keeping the last stage's logits)."""
        assert self.pp_schedule is not None
        if not self._forward_only:
            self.pp_schedule.step(*args, return_outputs=False, **kwargs)
            return
        # ``_PipelineSchedule.eval`` does exactly this, but also merges and returns the last stage's logits
        # ([B, S, V] of the whole batch), which validation does not need
        has_backward = self.pp_schedule._has_backward
        self.pp_schedule._has_backward = False
        try:
            self.pp_schedule.step(*args, return_outputs=False, **kwargs)
        finally:
            self.pp_schedule._has_backward = has_backward

    def evaluate(self, global_batch: Batch | PackedBatch) -> torch.Tensor:
        """Forward only over ``global_batch`` (the same on every rank), through the same layouts, bridges and
        pipeline as :meth:`step`, under ``torch.no_grad``: every encoder runs as a frozen one does (forwards only,
        nothing crosses a bridge backwards), the language stages run torch's forward-only (``eval``) schedule, no
        gradient is made and no ``.grad`` changes. FSDP-sharded parameters are resharded afterwards, and nothing of the
        batch stays cached in the pipeline stages (the last stage keeps no microbatch's logits past its loss).

        Returns:
            0-dim fp32 tensor: this rank's share of the batch's loss (non-zero on the last language stage only,
            one tp rank); the sum over ranks is the global per-token cross-entropy of the batch (its sum over the
            batch's loss tokens / their number, as :meth:`step`'s loss).

        Raises:
            ValueError: a batch that does not match ``data.packing``.

        Reference semantics: torchtitan's ``Validator`` (forward-only loss over a validation loader, pipelined
        with the schedule's ``eval``).
        """
        saved = [(lane.bwd, lane.prev_bwd, lane.grads_cross) for lane in self.lanes]
        self._forward_only = True
        try:
            for lane in self.lanes:
                lane.bwd = lane.prev_bwd = lane.grads_cross = False
            with torch.no_grad():
                loss = self.step(global_batch)
        finally:
            self._forward_only = False
            for lane, (bwd, prev_bwd, grads_cross) in zip(self.lanes, saved):
                lane.bwd, lane.prev_bwd, lane.grads_cross = bwd, prev_bwd, grads_cross
        # a forward without backward leaves FSDP modules that keep their parameters after forward
        # (reshard_after_forward = False) gathered: free them as a training step's backward would
        stages = getattr(self, "stages", [])  # this rank's language stages (none on an encoder-only rank)
        for stage in stages:  # and the stages' cached outputs (only a backward pops them)
            stage.clear_runtime_states()
        modules = [lane.module for lane in self.lanes] + [stage.submod for stage in stages]
        for module in modules:
            for sub in module.modules() if module is not None else ():
                if isinstance(sub, FSDPModule):
                    sub.reshard()
        return loss

    def step(self, global_batch: Batch | PackedBatch) -> torch.Tensor:
        """Forward and backward over ``global_batch`` (the same on every rank); gradients land in ``.grad``.

        Returns:
            0-dim fp32 tensor: this rank's share of the step loss (non-zero on the last language stage only);
            the sum over ranks is the loss of the global batch.

        Raises:
            ValueError: a batch that does not match ``data.packing``.
            RuntimeError: the language model produced no gradient for some microbatch's encoder embeddings.
        """
        if self.packed != hasattr(global_batch, "doc_ids"):
            raise ValueError(
                f"data.packing={str(self.packed).lower()} but the step got a {type(global_batch).__name__}; "
                "build the loader with mimo_titan.train.trainer.build_loader(cfg, ...)"
            )
        M = self.microbatches
        self._batch = global_batch
        self._num_loss_tokens = max(global_batch.num_loss_tokens(), 1)
        self._posted = 0
        for lane in self.lanes:
            lane.rows_ps = [self._rows_per_sample(lane, m) for m in range(M)]
            lane.row_cp = [self._row_cp(lane, m) for m in range(M)]
            lane.enc_out, lane.enc_in, lane.stage_recv = {}, {}, {}
            lane.stage_posted = lane.backwards = 0
            lane.grad_rows, lane.grads_seen = {}, set()
            if lane.module is not None:
                lane.local = local_batch(global_batch, M, lane.dp, lane.layout.dp)
        held = [lane for lane in self.lanes if lane.module is not None]
        batch_post = any(lane.colocated for lane in self.lanes)  # colocated ranks send to and receive from each other

        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        streamed = [lane for lane in held if lane.mode == "streamed"]
        if streamed:
            self._run_encoders_streamed(streamed)
        sends: list = []
        for lane in (x for x in held if x.mode == "whole_batch"):
            for m in range(M):
                ops = self._encoder_forward(lane, m)
                if lane.last:
                    sends += ops
                else:  # to the next encoder stage, which waits for it
                    lane.bridge.post(ops)
        if sends and not (self.pp_schedule is not None and self.is_first):  # nothing to receive: post the rows now
            self.lanes[0].bridge.post(sends, batch=batch_post)
            sends = []
        if self.pp_schedule is not None:
            self._lm_dp = self.role.dp_rank(self.lang_name)
            l_local = local_batch(global_batch, M, self._lm_dp, self.topology.layouts[self.lang_name].dp)
            input_ids = l_local.input_ids.to(self.device)
            kwargs: dict[str, Any] = {}
            doc_ids = None
            if self.packed:
                packed = cast("PackedBatch", l_local)
                doc_ids = packed.doc_ids.to(self.device)
                kwargs.update(position_ids=packed.position_ids.to(self.device), doc_ids=doc_ids)
            losses: list[torch.Tensor] = []
            if self.is_last:  # this rank's CP shard of the labels, as its logits
                labels = cp_shard_rows(l_local.labels.to(self.device), self.cp_size, self.cp_rank, doc_ids)
                kwargs.update(target=labels, losses=losses)
            if self.is_first:
                self._lm_ids = input_ids
                # the placeholder positions this CP rank keeps (its rows are exactly those, in order)
                rows_b, rows_s = l_local.input_ids.shape
                docs = cast("PackedBatch", l_local).doc_ids if self.packed else None
                keep = (cp_owner(rows_b, rows_s, self.cp_size, docs) == self.cp_rank).to(self.device)
                for lane in self.lanes:
                    lane.mine = keep & (input_ids == lane.placeholder_id)
                    # each microbatch's receive is built on first use: after its rows are sent (a rank's own rows
                    # are handed over in memory)
                    lane.fwd_recv = _LazyRecvs(self, lane)
                whole = [lane for lane in self.lanes if lane.mode == "whole_batch"]
                if whole:
                    recvs = [lane.fwd_recv[m] for lane in whole for m in range(M)]
                    whole[0].bridge.post(sends, *recvs, batch=batch_post)
                    sends = []
                with self._loss_context():
                    self._run_lm(input_ids, **kwargs)
                for lane in self.lanes:
                    if lane.grads_cross and len(lane.grads_seen) != M:
                        missing = sorted(set(range(M)) - lane.grads_seen)
                        raise RuntimeError(
                            f"the language pipeline produced no gradient for the {lane.name} embeddings of "
                            f"microbatches {missing}; the encoder would silently stop training"
                        )
            else:
                with self._loss_context():
                    self._run_lm(**kwargs)
            if losses and self.reports_loss:
                loss = torch.stack([x.detach().float() for x in losses]).sum()

        whole = [lane for lane in self.lanes if lane.mode == "whole_batch" and lane.grads_cross]
        if whole:
            grad_sends = [
                op
                for lane in whole
                for m in sorted(lane.grad_rows)
                for op in self._grad_sends(lane, m, lane.grad_rows[m])
            ]
            for lane in whole:
                lane.grad_rows.clear()
            # the rows' gradients come over the bridge to the encoders' last stages
            pending = {
                lane.name: [self._encoder_grad_recv(lane, m) for m in range(M)]
                for lane in whole
                if lane.module is not None and lane.last
            }
            whole[0].bridge.post(grad_sends, *(p for ps in pending.values() for p in ps), batch=batch_post)
            for lane in whole:
                if lane.module is None or not lane.bwd:  # a stage before every trainable one runs no backward
                    continue
                for m in range(M):
                    if lane.name in pending:
                        grad = pending[lane.name][m].result()
                    else:  # from the next encoder stage
                        p = self._encoder_grad_recv(lane, m)
                        lane.bridge.post(p)
                        grad = p.result()
                    self._encoder_backward(lane, m, grad)
        for lane in self.lanes:
            lane.bridge.wait()
        self._batch = None  # type: ignore[assignment]
        for lane in self.lanes:
            lane.local = None
        return loss


class _LazyRecvs:
    """The bridge receive of each microbatch ``m`` of one encoder lane, built on first use (after the rows of ``m``
    are sent: a colocated rank's own rows are handed over in memory)."""

    def __init__(self, schedule: MimoSchedule, lane: EncoderLane):
        self._schedule, self._lane = schedule, lane
        self._made: dict[int, Pending] = {}

    def __getitem__(self, m: int) -> Pending:
        if m not in self._made:
            s, lane = self._schedule, self._lane
            self._made[m] = lane.bridge.forward_recvs(m, s._lm_dp, lane.rows_ps[m], s.cp_rank, lane.row_cp[m])
        return self._made[m]
