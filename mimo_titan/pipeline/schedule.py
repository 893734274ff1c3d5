"""Drive one training step of a MIMO model across module meshes (non-colocated or colocated, one code path).

Order on each rank (a rank may hold both modules, colocated):

1. encoder ranks: for each microbatch ``m``: encode this DP rank's images of ``m``, send the image-token rows
   over the :class:`~mimo_titan.pipeline.bridge.Bridge` (asynchronously);
2. language ranks: the first stage receives microbatch ``m``'s rows, places them at the placeholder positions
   (dense ``[b, S, H]``, a leaf that requires grad); then ``torch.distributed.pipelining`` (``PipelineStage`` +
   ``Schedule1F1B`` / ``ScheduleGPipe``) runs all microbatches through the language stages, with the loss
   ``sum of per-token cross-entropy / global count of loss tokens``; the first stage sends ``d loss / d rows``
   back;
3. encoder ranks: receive each microbatch's gradient and run its backward (FSDP reduces after the last).

Gradients are *sums* over microbatches and DP ranks (the loss is already normalised globally), so the
pipelining schedule runs with ``scale_grads=False`` and FSDP reduces with a sum (see ``parallel.fsdp``).

The encoder runs all microbatches' forwards before the language pipeline starts (GPipe at the module level);
within the language module the chosen schedule interleaves microbatches.

Reference semantics: Megatron-LM ``examples/mimo/training`` (encoder grid feeding the LM grid through the
bridge communicator), with torch.distributed.pipelining in place of Megatron's schedules.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import loss_parallel

from mimo_titan.data.collate import IGNORE_INDEX, Batch
from mimo_titan.data.sharding import local_batch
from mimo_titan.models.mimo import cp_shard_rows
from mimo_titan.models.moe import excluded_from_stats
from mimo_titan.parallel import comm
from mimo_titan.pipeline.bridge import Bridge, cp_owner, image_row_cp_ranks

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

    from mimo_titan.data.packing import PackedBatch

__all__ = ["MimoSchedule", "PIPELINE_SCHEDULES"]

PIPELINE_SCHEDULES = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe}


class MimoSchedule:
    """One forward + backward of the MIMO model over a global batch, split into microbatches.

    Args:
        topology: the ``Topology`` of this run.
        vision: this rank's encoder module (FSDP-wrapped) or ``None`` if the rank holds no encoder.
        language: this rank's :class:`~mimo_titan.models.mimo.LanguageStage` (FSDP-wrapped) or ``None``.
        bridge: the encoder → language :class:`Bridge`.
        microbatches: microbatches per step (M).
        schedule: ``"1F1B"`` or ``"GPipe"`` for the language pipeline.
        image_token_id: id of ``<|image|>``.
        tokens_per_image: image tokens per image (P).
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
        ValueError: for an unknown schedule name.
    """

    def __init__(
        self,
        topology,
        vision: nn.Module | None,
        language: nn.Module | None,
        bridge: Bridge,
        microbatches: int,
        schedule: str,
        image_token_id: int,
        tokens_per_image: int,
        device: torch.device,
        seq_len: int,
        vocab_size: int,
        act_dtype: torch.dtype,
        packed: bool = False,
    ):
        if schedule not in PIPELINE_SCHEDULES:
            raise ValueError(f"parallelism.pipeline_schedule={schedule!r}; choose one of {sorted(PIPELINE_SCHEDULES)}")
        role = topology.role
        self.topology, self.role, self.bridge = topology, role, bridge
        self.vision, self.language = vision, language
        self.microbatches, self.image_token_id, self.tokens_per_image = microbatches, image_token_id, tokens_per_image
        self.device = device
        self.lang_name = role.language
        enc = [n for n in topology.layouts if n != self.lang_name]
        if len(enc) != 1:
            raise ValueError(f"exactly one encoder module is supported for now, got {enc}")
        self.vision_name = enc[0]
        self._num_loss_tokens = 1
        self.pp_schedule = None
        self.packed = packed
        self.cp_size, self.cp_rank, self.tp_mesh = 1, 0, None
        if language is not None:
            lay = topology.layouts[self.lang_name]
            self.cp_size, self.cp_rank = lay.cp, role.coordinates[self.lang_name]["cp"]
            if lay.tp > 1:
                self.tp_mesh = topology.tp_mesh(self.lang_name)
            # the loss is replicated over tp: one tp rank reports it
            self.reports_loss = role.coordinates[self.lang_name]["tp"] == 0
            s_local = seq_len // self.cp_size
            stage_idx = role.pp_stage(self.lang_name)
            self.is_first = stage_idx == 0
            self.is_last = stage_idx == lay.pp - 1
            b, H = bridge.mb_size // lay.dp, bridge.hidden_size

            def meta(*shape, dtype=act_dtype, grad=True):  # activations carry gradients, token ids do not
                return torch.empty(shape, dtype=dtype, device="meta", requires_grad=grad)

            inputs = (
                (meta(b, seq_len, dtype=torch.int64, grad=False), meta(b, seq_len, H, dtype=bridge.dtype))
                if self.is_first
                else (meta(b, s_local, H),)
            )
            # inputs of later stages and outputs of non-last stages are the SP shard [b, S / (cp tp), H]
            if not self.is_first:
                inputs = (meta(b, s_local // lay.tp, H),)
            outputs = (meta(b, s_local, vocab_size // lay.tp),) if self.is_last else (meta(b, s_local // lay.tp, H),)
            self.stage = PipelineStage(
                language,
                stage_index=stage_idx,
                num_stages=lay.pp,
                device=device,
                input_args=inputs,
                output_args=outputs,
                group=topology.pp_group(self.lang_name),
            )
            self.pp_schedule = PIPELINE_SCHEDULES[schedule](
                self.stage, n_microbatches=microbatches, loss_fn=self._loss, scale_grads=False
            )

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

    def _mb_images(self, global_batch: Batch | PackedBatch, m: int) -> torch.Tensor:
        s = len(global_batch) // self.microbatches
        return global_batch.images_per_sample[m * s : (m + 1) * s]

    def _row_cp(self, global_batch: Batch | PackedBatch, m: int) -> torch.Tensor | None:
        """The language CP rank of every image-token row of global microbatch ``m`` (None without CP)."""
        cp = self.topology.layouts[self.lang_name].cp
        if cp == 1:
            return None
        s = len(global_batch) // self.microbatches
        docs = cast("PackedBatch", global_batch).doc_ids[m * s : (m + 1) * s] if self.packed else None
        return image_row_cp_ranks(global_batch.input_ids[m * s : (m + 1) * s], self.image_token_id, cp, docs)

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[n, P, H]`` encoder output; with no image, a dummy image keeps FSDP's collectives in step (its rows
        are dropped)."""
        assert self.vision is not None, "only a rank holding the encoder encodes"
        n = pixel_values.shape[0]
        if n == 0:
            dummy = torch.zeros((1, *pixel_values.shape[1:]), dtype=pixel_values.dtype, device=self.device)
            with excluded_from_stats(self.vision):  # MoE routing of the dummy counts for nothing
                out = self.vision(dummy)
        else:
            out = self.vision(pixel_values)
        # a tensor-parallel all-reduce: wait for it now, also on tp ranks that never read the output (only tp rank 0
        # sends it), not at process exit
        return comm.wait(out)[:n]

    def step(self, global_batch: Batch | PackedBatch) -> torch.Tensor:
        """Forward and backward over ``global_batch`` (the same on every rank); gradients land in ``.grad``.

        Returns:
            0-dim fp32 tensor: this rank's share of the step loss (non-zero on the last language stage only);
            the sum over ranks is the loss of the global batch.
        """
        if self.packed != hasattr(global_batch, "doc_ids"):
            raise ValueError(
                f"data.packing={str(self.packed).lower()} but the step got a {type(global_batch).__name__}; "
                "build the loader with mimo_titan.train.trainer.build_loader(cfg, ...)"
            )
        M = self.microbatches
        self._num_loss_tokens = max(global_batch.num_loss_tokens(), 1)
        row_cp = [self._row_cp(global_batch, m) for m in range(M)]
        enc_outputs = []
        if self.vision is not None:
            v_dp = self.role.dp_rank(self.vision_name)
            v_local = local_batch(global_batch, M, v_dp, self.topology.layouts[self.vision_name].dp)
            b = len(v_local) // M
            for m in range(M):
                mb = v_local.slice(m * b, (m + 1) * b)
                out = self._encode(mb.pixel_values.to(self.device))
                enc_outputs.append(out)
                self.bridge.send_forward(m, v_dp, out.flatten(0, 1), self._mb_images(global_batch, m), row_cp[m])

        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.pp_schedule is not None:
            l_dp = self.role.dp_rank(self.lang_name)
            l_local = local_batch(global_batch, M, l_dp, self.topology.layouts[self.lang_name].dp)
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
                b = len(l_local) // M
                # the image-token positions this CP rank keeps (its rows are exactly those, in order)
                rows_b, rows_s = l_local.input_ids.shape
                docs = cast("PackedBatch", l_local).doc_ids if self.packed else None
                mine = cp_owner(rows_b, rows_s, self.cp_size, docs)
                mine = (mine == self.cp_rank).to(self.device) & (input_ids == self.image_token_id)
                dense = []
                for m in range(M):
                    rows = self.bridge.recv_forward(m, l_dp, self._mb_images(global_batch, m), self.cp_rank, row_cp[m])
                    d = torch.zeros(
                        b, input_ids.shape[1], self.bridge.hidden_size, dtype=self.bridge.dtype, device=self.device
                    )
                    d[mine[m * b : (m + 1) * b]] = rows
                    dense.append(d)
                image_dense = torch.cat(dense).requires_grad_(True)
                with self._loss_context():
                    self.pp_schedule.step(input_ids, image_dense, return_outputs=False, **kwargs)
                grad = image_dense.grad
                if grad is None:
                    raise RuntimeError(
                        "the language pipeline produced no gradient for the image embeddings; the "
                        "encoder would silently stop training"
                    )
                for m in range(M):
                    g = grad[m * b : (m + 1) * b][mine[m * b : (m + 1) * b]]
                    self.bridge.send_backward(m, l_dp, g, self._mb_images(global_batch, m), self.cp_rank, row_cp[m])
            else:
                with self._loss_context():
                    self.pp_schedule.step(return_outputs=False, **kwargs)
            if losses and self.reports_loss:
                loss = torch.stack([x.detach().float() for x in losses]).sum()

        if self.vision is not None:
            vision = cast("FSDPModule", self.vision)  # fully_shard made the encoder an FSDPModule
            v_dp = self.role.dp_rank(self.vision_name)
            grads = []
            for m, out in enumerate(enc_outputs):
                g = self.bridge.recv_backward(m, v_dp, self._mb_images(global_batch, m), row_cp[m])
                grads.append(g.to(out.dtype).view_as(out))
            for m, (out, g) in enumerate(zip(enc_outputs, grads)):
                # one backward per microbatch, reducing gradients after the last (as pipelining does for the LM)
                last = m == len(enc_outputs) - 1
                vision.set_requires_gradient_sync(last)
                vision.set_is_last_backward(last)
                vision.set_reshard_after_backward(last)
                torch.autograd.backward(out, g)
        self.bridge.wait()
        return loss
