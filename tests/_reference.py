"""The single-process oracle: a plain ``MimoModel`` trained with cross-entropy, global clipping and AdamW.

Independent of everything the distributed tests check (meshes, FSDP, pipelining, the bridge, EP, CP): it runs
the unsharded model in this process, microbatch by microbatch only because an MoE layer's load-balancing loss is
defined per microbatch. The LR multiplier is written out here, not taken from ``mimo_titan.train.optim``.
"""

from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F


def lr_multiplier(step: int, cfg) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` (the configs' ``decay = "cosine"``)."""
    w, total, lo = cfg.lr_schedule.warmup_steps, cfg.training.total_steps, cfg.lr_schedule.min_lr_ratio
    if step < w:
        return (step + 1) / (w + 1)
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


class ReferenceTrainer:
    """``step(batch)`` → ``(loss, grad_norm)``; ``model``, ``moe_stats()`` after a step."""

    def __init__(self, cfg, image_token_id: int, audio_token_id: int | None = None):
        from mimo_titan.models import MimoModel
        from mimo_titan.parallel.ep import moe_modules

        self.cfg = cfg
        self.model = MimoModel(cfg.model, image_token_id, audio_token_id=audio_token_id)
        self.model.init_weights(cfg.job.seed)
        self.moe = dict(moe_modules(self.model))
        for m in self.moe.values():
            m.aux_loss_scale = 1.0 / cfg.training.microbatches
        # frozen modules and training.trainable globs: only the rest trains (checked by name, independently of the
        # trainer's own filter)
        pats = cfg.training.trainable
        for name, p in self.model.named_parameters():
            module_frozen = getattr(cfg.model, name.split(".")[0]).frozen
            p.requires_grad_(not module_frozen and (not pats or any(fnmatch.fnmatchcase(name, f"*{x}*") for x in pats)))
        o = cfg.optimizer
        self.opt = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            weight_decay=o.weight_decay,
        )
        self.steps = 0

    def step(self, batch) -> tuple[float, float]:
        from mimo_titan.models.mimo import encoder_inputs

        for g in self.opt.param_groups:
            g["lr"] = self.cfg.optimizer.lr * lr_multiplier(self.steps, self.cfg)
        self.opt.zero_grad()
        for m in self.moe.values():
            m.reset_stats()
        M = self.cfg.training.microbatches
        n_loss, mb, loss = (batch.labels != -100).sum(), len(batch) // M, 0.0
        for i in range(M):
            part = batch.slice(i * mb, (i + 1) * mb)
            packed = getattr(part, "doc_ids", None) is not None  # THD rows: per-document positions and masks
            logits = self.model(
                part.input_ids,
                None,
                *((part.position_ids, part.doc_ids) if packed else ()),
                encoder_inputs=encoder_inputs(self.cfg.model, part),
            )
            ce = (
                F.cross_entropy(logits.flatten(0, 1), part.labels.flatten(), ignore_index=-100, reduction="sum")
                / n_loss
            )
            ce.backward()
            loss += ce.item()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.training.max_grad_norm)
        self.opt.step()
        for m in self.moe.values():  # aux-loss-free balancing: bias step from the step's routing counts
            if any(p.requires_grad for p in m.parameters()):  # a frozen layer keeps its bias
                m.update_bias(m.tokens_per_expert)
        self.steps += 1
        return loss, norm.item()

    @torch.no_grad()
    def eval_loss(self, batches) -> float:
        """Forward-only loss of ``batches``: the sum of every loss token's cross-entropy over their number (one
        forward of each whole batch: without an optimizer step nothing depends on the microbatches)."""
        from mimo_titan.models.mimo import encoder_inputs

        total, tokens = 0.0, 0
        for batch in batches:
            packed = getattr(batch, "doc_ids", None) is not None
            logits = self.model(
                batch.input_ids,
                None,
                *((batch.position_ids, batch.doc_ids) if packed else ()),
                encoder_inputs=encoder_inputs(self.cfg.model, batch),
            )
            labels = batch.labels.flatten()
            total += float(F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=-100, reduction="sum"))
            tokens += int((labels != -100).sum())
        return total / tokens

    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters()}

    def moe_stats(self) -> dict[str, tuple[list[int], float]]:
        """Per MoE layer of the last step: routed copies per expert, aux loss (mean over microbatches)."""
        M = self.cfg.training.microbatches
        return {n: (m.tokens_per_expert.tolist(), float(m.aux_loss_sum) / M) for n, m in self.moe.items()}
