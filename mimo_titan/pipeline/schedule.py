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
from mimo_titan.parallel import comm
from mimo_titan.pipeline.bridge import Bridge, Pending, cp_owner, image_row_cp_ranks, module_rank
from mimo_titan.pipeline.order import encoder_warmup, one_f_one_b_order
from mimo_titan.pipeline.stages import LanguageChunks

if TYPE_CHECKING:
    from collections.abc import Callable

    from mimo_titan.data.packing import PackedBatch

__all__ = ["MODULE_SCHEDULES", "PIPELINE_SCHEDULES", "MimoSchedule", "schedule_mode"]

PIPELINE_SCHEDULES = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe, "Interleaved1F1B": ScheduleInterleaved1F1B}
MODULE_SCHEDULES = ("1F1B", "GPipe")


def schedule_mode(*, colocated: bool, module_schedule: str, colocated_encoders: str) -> str:
    """``"streamed"``, ``"inline"`` or ``"whole_batch"`` (see the module docstring) for a layout and its keys."""
    if module_schedule == "GPipe":
        return "whole_batch"
    if colocated:
        return "inline" if colocated_encoders == "inline" else "whole_batch"
    return "streamed"


class _FirstStage(PipelineStage):
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


class MimoSchedule:
    """One forward + backward of the MIMO model over a global batch, split into microbatches.

    Args:
        topology: the ``Topology`` of this run.
        encoder: this rank's encoder module (FSDP-wrapped, or any module in benchmarks) or ``None``.
        language: this rank's :class:`~mimo_titan.models.mimo.LanguageStage` (FSDP-wrapped), with
            ``virtual_stages > 1`` its :class:`~mimo_titan.pipeline.stages.LanguageChunks`, or ``None``.
        bridge: the encoder → language :class:`Bridge`.
        microbatches: microbatches per step (M).
        schedule: ``"1F1B"``, ``"GPipe"`` or ``"Interleaved1F1B"``: the language pipeline's schedule
            (``parallelism.pipeline_schedule``).
        virtual_stages: language chunks per pp rank (``parallelism.virtual_stages``; >= 2 with Interleaved1F1B,
            1 otherwise); every rank passes it (an encoder stage's warm-up depends on it).
        module_schedule: ``"1F1B"`` (the encoder leads the language stages in one schedule) or ``"GPipe"`` (the
            encoder's whole batch first, its backwards after the language model's step).
        colocated_encoders: ``"batch"`` or ``"inline"``, how a colocated encoder runs (module docstring).
        encoder_trainable: False for a frozen encoder (every rank must agree): it encodes under ``no_grad``, no
            gradient crosses the bridge and it runs no backward.
        prefetch_microbatches: how many microbatches a frozen encoder on its own ranks may have sent that the
            language model has not yet received (a bounded queue; it waits for the oldest send beyond that).
        encoder_stage_trains: for an encoder with pipeline stages, whether each stage has a trainable parameter
            (every rank alike); a stage runs backwards only if it or an earlier stage trains. Default: every stage
            as ``encoder_trainable``.
        image_token_id: id of ``<|image|>``.
        device: device the step runs on.
        seq_len: S, tokens per sample (or per packed row).
        vocab_size: V (logits width of the last stage; ``V / tp`` per rank under tensor parallelism).
        act_dtype: dtype of activations between language stages (the FSDP compute dtype).
        packed: global batches are packed THD rows (``PackedBatch``): every stage gets the rows' ``position_ids``
            and ``doc_ids`` as keyword inputs.

    Each language ``PipelineStage`` gets static input / output metadata (meta tensors of the microbatch
    shapes), so torch.distributed.pipelining runs no metadata-inference pass: such a pass would run the stage
    on uninitialised tensors (MoE routing and expert all-to-alls included) before the first step.

    Raises:
        ValueError: an unknown schedule name, ``"inline"`` with a language ``pp > 1``, Interleaved1F1B with a language
            ``pp < 2`` or ``virtual_stages < 2``, ``virtual_stages > 1`` with another schedule.
    """

    def __init__(
        self,
        topology,
        encoder: nn.Module | None,
        language: nn.Module | None,
        bridge: Bridge,
        *,
        microbatches: int,
        schedule: str,
        image_token_id: int,
        device: torch.device,
        seq_len: int,
        vocab_size: int,
        act_dtype: torch.dtype,
        packed: bool = False,
        module_schedule: str = "1F1B",
        colocated_encoders: str = "batch",
        encoder_trainable: bool = True,
        prefetch_microbatches: int = 2,
        encoder_stage_trains: list[bool] | None = None,
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
        self.topology, self.role, self.bridge = topology, role, bridge
        self.encoder, self.language = encoder, language
        self.prefetch = prefetch_microbatches
        self.microbatches, self.image_token_id = microbatches, image_token_id
        self.device = device
        self.lang_name = role.language
        enc = [n for n in topology.layouts if n != self.lang_name]
        if len(enc) != 1:
            raise ValueError(f"exactly one encoder module is supported for now, got {enc}")
        self.enc_name = enc[0]
        enc_lay, lang_lay = topology.layouts[self.enc_name], topology.layouts[self.lang_name]
        self.colocated = enc_lay.rank_offset == lang_lay.rank_offset
        self.mode = schedule_mode(
            colocated=self.colocated, module_schedule=module_schedule, colocated_encoders=colocated_encoders
        )
        if self.mode == "inline" and lang_lay.pp > 1:
            raise ValueError(
                f"parallelism.colocated_encoders='inline' needs parallelism.{self.lang_name}.pp = 1 (got "
                f"{lang_lay.pp}): every rank must run the language model's first stage; use 'batch'"
            )
        if self.mode == "inline" and enc_lay.pp > 1:
            raise ValueError(
                f"parallelism.colocated_encoders='inline' needs parallelism.{self.enc_name}.pp = 1 (got {enc_lay.pp})"
            )

        def warmup(enc_stage: int) -> int:  # encoder stage enc_stage leads enc_pp - enc_stage + lm pp stages
            return encoder_warmup(schedule, lang_lay.pp, microbatches, enc_lay.pp - enc_stage, virtual_stages)

        stage_trains = encoder_stage_trains if encoder_stage_trains is not None else [encoder_trainable] * enc_lay.pp
        # stage j needs its backward iff a stage up to j trains: the gradient has somewhere to go
        needs_grad = [any(stage_trains[: j + 1]) for j in range(enc_lay.pp)]
        #: whether any gradient crosses the bridge back to the encoder (False: a frozen encoder)
        self.encoder_trainable = needs_grad[-1]
        self._bwd, self._prev_bwd = self.encoder_trainable, False
        self.enc_first = self.enc_last = True
        self.encoder_warmup = warmup(0)
        self._bridge_warmup = warmup(enc_lay.pp - 1)  # of the stage that sends over the bridge
        self.act_dtype, self.tokens_per_image = act_dtype, bridge.tokens_per_image
        if encoder is not None:
            stage = role.pp_stage(self.enc_name)
            #: forwards this encoder stage runs ahead of its first backward (streamed mode)
            self.encoder_warmup = warmup(stage)
            self.enc_first, self.enc_last = stage == 0, stage == enc_lay.pp - 1
            self._bwd, self._prev_bwd = needs_grad[stage], stage > 0 and needs_grad[stage - 1]
            self._prev_warmup = warmup(stage - 1) if stage else 0
            self.enc_width = getattr(getattr(encoder, "cfg", None), "hidden_size", 0)  # D, between encoder stages
            c = role.coordinates[self.enc_name]
            dp = role.dp_rank(self.enc_name)
            self._enc_prev = module_rank(enc_lay, stage - 1, dp, c["cp"], c["tp"]) if stage else -1
            self._enc_next = module_rank(enc_lay, stage + 1, dp, c["cp"], c["tp"]) if not self.enc_last else -1
        self._num_loss_tokens = 1
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
        role, topology, bridge = self.role, self.topology, self.bridge
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
        b, H = bridge.mb_size // lay.dp, bridge.hidden_size

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
                stage = PipelineStage(chunk, **common)
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
    def _mb_images(self, m: int) -> torch.Tensor:
        s = len(self._batch) // self.microbatches
        return self._batch.images_per_sample[m * s : (m + 1) * s]

    def _row_cp(self, global_batch: Batch | PackedBatch, m: int) -> torch.Tensor | None:
        """The language CP rank of every image-token row of global microbatch ``m`` (None without CP)."""
        cp = self.topology.layouts[self.lang_name].cp
        if cp == 1:
            return None
        s = len(global_batch) // self.microbatches
        docs = cast("PackedBatch", global_batch).doc_ids[m * s : (m + 1) * s] if self.packed else None
        return image_row_cp_ranks(global_batch.input_ids[m * s : (m + 1) * s], self.image_token_id, cp, docs)

    # -- encoder side -------------------------------------------------------------------------------------
    # An encoder with pp > 1 is a chain of stages (split_vision_encoder): stage s receives [n, P, D] from stage s - 1
    # (the same DP and tp coordinates), the last stage sends its rows over the bridge. A DP rank without image in a
    # microbatch runs one dummy image through every stage (FSDP's collectives stay in step; its rows never cross).
    def _enc_images(self, m: int) -> int:
        """Images of this encoder DP rank in microbatch ``m``."""
        b = len(self._enc_local) // self.microbatches
        return int(self._enc_local.images_per_sample[m * b : (m + 1) * b].sum())

    def _between_stages(self, m: int) -> torch.Tensor:
        """An empty ``[max(n, 1), P, D]`` buffer for what travels between encoder stages in microbatch ``m``."""
        return torch.empty(
            max(self._enc_images(m), 1), self.tokens_per_image, self.enc_width, dtype=self.act_dtype, device=self.device
        )

    def _post_stage_recvs(self, upto: int) -> None:
        """Post the receives of the previous encoder stage's outputs for microbatches ``<= upto`` not posted yet."""
        while self._stage_posted < min(upto + 1, self.microbatches):
            m = self._stage_posted
            buf = self._between_stages(m)
            self._stage_recv[m] = Pending([dist.P2POp(dist.irecv, buf, self._enc_prev, tag=2 * m)], lambda b=buf: b)
            self.bridge.post(self._stage_recv[m])
            self._stage_posted += 1

    def _encoder_forward(self, m: int) -> list[dist.P2POp]:
        """Run this encoder stage on microbatch ``m``; return the sends of its output (to post): the rows over the
        bridge from the last stage, ``[max(n, 1), P, D]`` to the next stage otherwise."""
        assert self.encoder is not None, "only a rank holding the encoder encodes"
        n = self._enc_images(m)
        if self.enc_first:
            b = len(self._enc_local) // self.microbatches
            x = self._enc_local.slice(m * b, (m + 1) * b).pixel_values.to(self.device)
            if n == 0:
                x = torch.zeros((1, *x.shape[1:]), dtype=x.dtype, device=self.device)
        else:
            self._post_stage_recvs(m)
            x = self._stage_recv.pop(m).result()
            if self._prev_bwd:  # the previous stage wants its output's gradient
                x.requires_grad_(True)
                self._enc_in[m] = x
        grad = contextlib.nullcontext() if self._bwd else torch.no_grad()
        stats = excluded_from_stats(self.encoder) if n == 0 else contextlib.nullcontext()
        with stats, grad:  # MoE routing of a dummy image counts for nothing
            out = self.encoder(x)
        # a tensor-parallel all-reduce: wait for it now, also on tp ranks that never read the output (only tp rank 0
        # sends it), not at process exit
        out = comm.wait(out)
        if self._bwd:
            self._enc_out[m] = out
        if self.enc_last:
            rows = out[:n].flatten(0, 1)
            return self.bridge.forward_sends(m, self._enc_dp, rows, self._mb_images(m), self._row_cp_mb[m])
        return [dist.P2POp(dist.isend, out.detach().contiguous(), self._enc_next, tag=2 * m)]

    def _encoder_grad_recv(self, m: int) -> Pending:
        """The receive of ``d loss / d output`` of microbatch ``m``: rows ``[n P, H]`` over the bridge (last stage) or
        ``[max(n, 1), P, D]`` from the next stage."""
        if self.enc_last:
            return self.bridge.backward_recvs(m, self._enc_dp, self._mb_images(m), self._row_cp_mb[m])
        buf = self._between_stages(m)
        return Pending([dist.P2POp(dist.irecv, buf, self._enc_next, tag=2 * m + 1)], lambda: buf)

    def _encoder_backward(self, m: int, grad: torch.Tensor) -> None:
        """Backward of microbatch ``m`` through this encoder stage; send its input's gradient to the previous stage.
        FSDP reduces after the stage's last backward."""
        out = self._enc_out.pop(m)
        self._enc_backwards += 1
        last = self._enc_backwards == self.microbatches
        if isinstance(self.encoder, FSDPModule):  # one reduce after the last microbatch, as pipelining does
            self.encoder.set_requires_gradient_sync(last)
            self.encoder.set_is_last_backward(last)
            self.encoder.set_reshard_after_backward(last)
        if self.enc_last:  # rows of the real images; a dummy image's output gets a zero gradient
            n = self._enc_images(m)
            g = torch.zeros_like(out)
            g[:n] = grad.view(n, *out.shape[1:])  # cast to out's dtype by the assignment
            grad = g
        torch.autograd.backward(out, grad.to(out.dtype))
        if self._prev_bwd:
            x = self._enc_in.pop(m)
            assert x.grad is not None, "an encoder stage's input takes part in its output"
            # the previous stage sends every forward up to m + its warm-up - 1 before it receives this gradient
            self._post_stage_recvs(m + self._prev_warmup - 1)
            self.bridge.post([dist.P2POp(dist.isend, x.grad.contiguous(), self._enc_prev, tag=2 * m + 1)])

    def _run_encoder_streamed(self) -> None:
        """This encoder stage as a leading stage of the 1F1B pipeline (non-colocated)."""
        M = self.microbatches
        if not self._bwd:  # forwards only, at most `prefetch` microbatches ahead of the receiver
            sent: list[list] = []
            for m in range(M):
                if m >= self.prefetch:
                    self.bridge.wait_sends(sent[m - self.prefetch])
                sent.append(self.bridge.post(self._encoder_forward(m)))
            return
        for kind, m in one_f_one_b_order(M, self.encoder_warmup):
            if kind == "F":
                self.bridge.post(self._encoder_forward(m))
            else:
                pending = self._encoder_grad_recv(m)
                self.bridge.post(pending)
                self._encoder_backward(m, pending.result())

    # -- language side (first stage) ------------------------------------------------------------------------
    def _post_forward_recvs(self, upto: int) -> None:
        """Post the bridge receives of microbatches ``<= upto`` not posted yet (streamed mode), in order."""
        while self._posted < min(upto + 1, self.microbatches):
            self.bridge.post(self._fwd_recv[self._posted])
            self._posted += 1

    def _before_lm_forward(self, m: int) -> dict[str, torch.Tensor]:
        """Microbatch ``m``'s image embeddings ``{"image_dense_BSH": [b, S, H]}`` (a leaf whose gradient goes back
        over the bridge)."""
        if self.mode == "inline":
            self.bridge.post(self._encoder_forward(m), self._fwd_recv[m], batch=True)
        elif self.mode == "streamed":
            self._post_forward_recvs(m)
        rows = self._fwd_recv[m].result()
        b = self._lm_ids.shape[0] // self.microbatches
        mine = self._mine[m * b : (m + 1) * b]
        dense = torch.zeros(*mine.shape, self.bridge.hidden_size, dtype=self.bridge.dtype, device=self.device)
        dense[mine] = rows
        if self.encoder_trainable:
            dense.requires_grad_(True)
            dense.register_hook(lambda g, m=m: self._on_image_grad(m, g))
        return {"image_dense_BSH": dense}

    def _on_image_grad(self, m: int, grad_BSH: torch.Tensor) -> None:
        """The gradient of microbatch ``m``'s image embeddings has been computed: send its rows back (streamed)
        or keep them for the exchange after the backward (inline) or the step (whole batch)."""
        b = self._lm_ids.shape[0] // self.microbatches
        rows = grad_BSH[self._mine[m * b : (m + 1) * b]]
        self._grads_seen.add(m)
        if self.mode == "streamed":
            # the encoder sends every forward up to m + warmup - 1 before it receives this gradient: post those
            # receives first, so both ranks of the pair order their operations alike
            self._post_forward_recvs(m + self._bridge_warmup - 1)
            self.bridge.post(self._grad_sends(m, rows))
        else:
            self._grad_rows[m] = rows

    def _grad_sends(self, m: int, rows: torch.Tensor):
        return self.bridge.backward_sends(m, self._lm_dp, rows, self._mb_images(m), self.cp_rank, self._row_cp_mb[m])

    def _after_lm_backward(self, m: int) -> None:
        if self.mode != "inline" or not self.encoder_trainable:
            return
        if m not in self._grad_rows:
            raise RuntimeError(
                f"the language pipeline produced no gradient for the image embeddings of microbatches [{m}]; the "
                "encoder would silently stop training"
            )
        sends = self._grad_sends(m, self._grad_rows.pop(m))  # first: a rank's own rows are handed over in memory
        pending = self._encoder_grad_recv(m)
        self.bridge.post(sends, pending, batch=True)
        self._encoder_backward(m, pending.result())

    # -- the step -------------------------------------------------------------------------------------------
    def step(self, global_batch: Batch | PackedBatch) -> torch.Tensor:
        """Forward and backward over ``global_batch`` (the same on every rank); gradients land in ``.grad``.

        Returns:
            0-dim fp32 tensor: this rank's share of the step loss (non-zero on the last language stage only);
            the sum over ranks is the loss of the global batch.

        Raises:
            ValueError: a batch that does not match ``data.packing``.
            RuntimeError: the language model produced no gradient for some microbatch's image embeddings.
        """
        if self.packed != hasattr(global_batch, "doc_ids"):
            raise ValueError(
                f"data.packing={str(self.packed).lower()} but the step got a {type(global_batch).__name__}; "
                "build the loader with mimo_titan.train.trainer.build_loader(cfg, ...)"
            )
        M = self.microbatches
        self._batch = global_batch
        self._num_loss_tokens = max(global_batch.num_loss_tokens(), 1)
        self._row_cp_mb = [self._row_cp(global_batch, m) for m in range(M)]
        self._enc_out: dict[int, torch.Tensor] = {}
        self._enc_in: dict[int, torch.Tensor] = {}
        self._stage_recv: dict[int, Pending] = {}
        self._stage_posted = 0
        self._enc_backwards = 0
        self._grad_rows: dict[int, torch.Tensor] = {}
        self._grads_seen: set[int] = set()
        self._posted = 0
        batch_post = self.colocated  # colocated ranks send to and receive from each other
        if self.encoder is not None:
            self._enc_dp = self.role.dp_rank(self.enc_name)
            self._enc_local = local_batch(global_batch, M, self._enc_dp, self.topology.layouts[self.enc_name].dp)

        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.encoder is not None and self.mode == "streamed":
            self._run_encoder_streamed()
        sends = []
        if self.encoder is not None and self.mode == "whole_batch":
            for m in range(M):
                ops = self._encoder_forward(m)
                if self.enc_last:
                    sends += ops
                else:  # to the next encoder stage, which waits for it
                    self.bridge.post(ops)
            if not (self.pp_schedule is not None and self.is_first):  # nothing to receive: post the rows now
                self.bridge.post(sends, batch=batch_post)
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
                # the image-token positions this CP rank keeps (its rows are exactly those, in order)
                rows_b, rows_s = l_local.input_ids.shape
                docs = cast("PackedBatch", l_local).doc_ids if self.packed else None
                mine = cp_owner(rows_b, rows_s, self.cp_size, docs)
                self._mine = (mine == self.cp_rank).to(self.device) & (input_ids == self.image_token_id)
                # each microbatch's receive is built on first use: after its rows are sent (a rank's own rows are
                # handed over in memory)
                self._fwd_recv = _LazyRecvs(self)
                if self.mode == "whole_batch":
                    self.bridge.post(sends, *(self._fwd_recv[m] for m in range(M)), batch=batch_post)
                    sends = []
                with self._loss_context():
                    self.pp_schedule.step(input_ids, return_outputs=False, **kwargs)
                if self.encoder_trainable and len(self._grads_seen) != M:
                    missing = sorted(set(range(M)) - self._grads_seen)
                    raise RuntimeError(
                        f"the language pipeline produced no gradient for the image embeddings of microbatches "
                        f"{missing}; the encoder would silently stop training"
                    )
            else:
                with self._loss_context():
                    self.pp_schedule.step(return_outputs=False, **kwargs)
            if losses and self.reports_loss:
                loss = torch.stack([x.detach().float() for x in losses]).sum()

        if self.mode == "whole_batch" and self.encoder_trainable:
            grad_sends = [op for m in sorted(self._grad_rows) for op in self._grad_sends(m, self._grad_rows[m])]
            self._grad_rows.clear()
            bridged = self.encoder is not None and self.enc_last  # the rows' gradients come over the bridge
            pending = [self._encoder_grad_recv(m) for m in range(M)] if bridged else []
            self.bridge.post(grad_sends, *pending, batch=batch_post)
            if self.encoder is not None and self._bwd:  # a stage before every trainable one runs no backward
                for m in range(M):
                    if bridged:
                        grad = pending[m].result()
                    else:  # from the next encoder stage
                        p = self._encoder_grad_recv(m)
                        self.bridge.post(p)
                        grad = p.result()
                    self._encoder_backward(m, grad)
        self.bridge.wait()
        self._batch = None  # type: ignore[assignment]
        return loss


class _LazyRecvs:
    """The bridge receive of each microbatch ``m``, built on first use (after the rows of ``m`` are sent: a
    colocated rank's own rows are handed over in memory)."""

    def __init__(self, schedule: MimoSchedule):
        self._schedule = schedule
        self._made: dict[int, Pending] = {}

    def __getitem__(self, m: int) -> Pending:
        if m not in self._made:
            s = self._schedule
            self._made[m] = s.bridge.forward_recvs(m, s._lm_dp, s._mb_images(m), s.cp_rank, s._row_cp_mb[m])
        return self._made[m]
