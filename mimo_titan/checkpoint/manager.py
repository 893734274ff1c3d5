"""Save and resume training with torch.distributed.checkpoint (DCP): atomic steps, resharding, model-only init.

One checkpoint is a directory ``<folder>/step-N`` holding every rank's state for optimizer step N:

- ``model.<key>`` / ``optimizer.<key>.<exp_avg|exp_avg_sq|step>``: tensors under full-model keys
  (:mod:`mimo_titan.checkpoint.state`), so a checkpoint loads under any other layout (dp, tp, pp, cp, ep, etp
  and the module rank ranges may all change);
- ``extra.*``: JSON strings: the step, the data loader's position (:meth:`MimoDataLoader.state_dict`), each
  module's LR scheduler and optimizer hyper-parameters, and the layout it was saved under;
- ``rng.rank<r>.<module>.<stream>``: each rank's RNG streams (``Job.rng``); they are restored only when the
  layout is unchanged (per-rank streams have no meaning under another layout; the run then keeps the fresh
  streams of its own seeds and says so).

**Atomicity.** A save writes ``step-N.partial`` and, once every rank has written and DCP's ``.metadata`` is on
disk, rank 0 renames it to ``step-N`` (an atomic rename). A process killed part-way leaves at most a
``.partial`` directory, which is never loaded and is removed by the next save; the previous ``step-M`` is never
touched before the new one is complete. ``keep_latest_k`` then deletes the oldest complete checkpoints, their
``.metadata`` first (a purge killed part-way leaves an incomplete directory, not a damaged complete one).
Resuming with ``load_step`` from an older step sets the newer checkpoints aside as ``step-M.abandoned``, so
neither a later resume nor the purge confuses the abandoned run with the new one.

Semantics follow torchtitan's ``CheckpointManager`` (``[checkpoint]`` keys ``enable``, ``folder``, ``interval``,
``keep_latest_k``, ``load_step``, ``initial_load_path``); it is not used itself because its save writes into
the final ``step-N`` directory in place and it assumes one model (ours is one per module, on rank subsets).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import shutil
import time
import warnings

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from mimo_titan.checkpoint.state import model_state, optimizer_state

__all__ = ["CheckpointManager", "complete_steps", "checkpoint_folder"]

logger = logging.getLogger("mimo_titan")

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_folder(cfg) -> str:
    """``checkpoint.folder``, under ``job.output_dir`` when relative."""
    folder = cfg.checkpoint.folder
    return folder if os.path.isabs(folder) else os.path.join(cfg.job.output_dir, folder)


def complete_steps(folder: str) -> list[int]:
    """Steps of the complete checkpoints in ``folder`` (``step-N`` directories with DCP's ``.metadata``), ascending."""
    if not os.path.isdir(folder):
        return []
    steps = []
    for name in os.listdir(folder):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(folder, name, ".metadata")):
            steps.append(int(m.group(1)))
    return sorted(steps)


def _layout_signature(job) -> dict:
    return {"world_size": job.topology.world_size, "device_type": job.device.type,
            "layouts": {n: dataclasses.asdict(lay) for n, lay in job.topology.layouts.items()}}


def _rng_key(name: str, kind: str, stream: str) -> str:
    """Checkpoint key (under ``rng.``) of this rank's state of RNG stream ``stream`` (``kind`` cpu / cuda) of module
    ``name``."""
    return f"rank{dist.get_rank()}.{name}.{kind}.{stream}"


def _rng_states(job) -> dict:
    """This rank's RNG stream states (copies) under :func:`_rng_key` keys."""
    return {_rng_key(name, kind, stream): t for name, tracker in job.rng.items()
            for kind in ("cpu", "cuda") for stream, t in tracker.state_dict().get(kind, {}).items()}


def _etp_mesh(job, name: str):
    return job.topology.expert_mesh(name)["etp"] if job.topology.layouts[name].etp > 1 else None


def _scheduler_state(scheduler) -> dict:
    state = dict(scheduler.state_dict())
    state["lr_lambdas"] = [None] * len(state.get("lr_lambdas", []))  # functions are rebuilt from the config
    return state


def _param_groups(optimizer) -> list[dict]:
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
            for g in optimizer.param_groups]


def _unique(path: str) -> str:
    """``path``, or ``path.1``, ``path.2``, ... : the first that does not exist."""
    out, i = path, 0
    while os.path.exists(out):
        i += 1
        out = f"{path}.{i}"
    return out


class CheckpointManager:
    """Saves and loads ``step-N`` checkpoints of a :class:`~mimo_titan.train.trainer.Job` and its data loader.

    Args:
        cfg: the run's ``Config`` (``[checkpoint]`` table, ``job.output_dir``, ``training`` length).

    Every method that touches files is collective: every rank of the default process group calls it.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.ckpt = cfg.checkpoint
        self.folder = checkpoint_folder(cfg)
        self.last_save_s: float | None = None
        self.last_load_s: float | None = None

    # ------------------------------------------------------------------ state
    def _state(self, job, loader, *, rng: bool) -> dict:
        state: dict = {"model": {}, "optimizer": {}, "extra": {}, "rng": {}}
        for name, module in job.modules.items():
            etp = _etp_mesh(job, name)
            state["model"].update(model_state(name, module, etp))
            state["optimizer"].update(optimizer_state(name, module, job.optimizers[name], etp))
            state["extra"][f"lr_scheduler.{name}"] = json.dumps(_scheduler_state(job.schedulers[name]))
            state["extra"][f"param_groups.{name}"] = json.dumps(_param_groups(job.optimizers[name]))
        state["extra"]["train"] = json.dumps({"step": job.step,
                                              "global_batch_size": self.cfg.training.global_batch_size})
        state["extra"]["dataloader"] = json.dumps(loader.state_dict())
        state["extra"]["layout"] = json.dumps(_layout_signature(job))
        if rng:
            state["rng"] = _rng_states(job)
        return state

    # ------------------------------------------------------------------ save
    def should_save(self, step: int) -> bool:
        """Whether to save after optimizer step ``step``: every ``interval`` steps and at the last step."""
        return self.ckpt.enable and (step % self.ckpt.interval == 0 or step == self.cfg.training.total_steps)

    def save(self, job, loader) -> float:
        """Write ``<folder>/step-<job.step>`` atomically (module docstring); returns the wall time in seconds.

        A complete checkpoint of the same step is replaced only after the new one is complete.
        """
        t0 = time.perf_counter()
        rank = dist.get_rank()
        final = os.path.join(self.folder, f"step-{job.step}")
        partial = final + ".partial"
        self._on_rank0(self._sweep_partials)  # left by saves that were killed
        dcp.save(self._state(job, loader, rng=True), checkpoint_id=partial)
        dist.barrier()  # every rank's files are written; DCP's coordinator wrote .metadata last

        def commit():
            if os.path.isdir(final):  # only after a rewind that could not move it aside: keep it, do not delete
                os.rename(final, _unique(final + ".replaced"))
            os.rename(partial, final)
            self._purge(keep=job.step)

        self._on_rank0(commit)
        self.last_save_s = time.perf_counter() - t0
        logger.info("checkpoint: saved step %d to %s in %.2f s", job.step, final, self.last_save_s)
        return self.last_save_s

    @staticmethod
    def _on_rank0(fn) -> None:
        """Run ``fn`` on rank 0 only and share its outcome: every rank raises if it failed (no rank is left
        waiting in a barrier for a rank 0 that raised)."""
        error = None
        if dist.get_rank() == 0:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                error = f"{type(exc).__name__}: {exc}"
        box = [error]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise RuntimeError(f"checkpoint: rank 0 failed: {box[0]}")

    def _sweep_partials(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        for name in os.listdir(self.folder):
            if name.endswith(".partial"):
                shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)

    def _purge(self, keep: int) -> None:
        """Delete the oldest complete checkpoints beyond ``keep_latest_k`` (never step ``keep``). ``.metadata``
        goes first, so a purge killed part-way leaves an incomplete directory, never a damaged "complete" one."""
        k = self.ckpt.keep_latest_k
        if k <= 0:
            return
        for step in [s for s in complete_steps(self.folder) if s != keep][:-k + 1 or None]:
            path = os.path.join(self.folder, f"step-{step}")
            os.remove(os.path.join(path, ".metadata"))
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def _set_aside_newer(self, step: int) -> None:
        """Rename the complete checkpoints newer than ``step`` (a run rewound with ``load_step``) to
        ``step-M.abandoned``: kept on disk, but never resumed from nor counted by ``keep_latest_k``."""
        for newer in [s for s in complete_steps(self.folder) if s > step]:
            src = os.path.join(self.folder, f"step-{newer}")
            os.rename(src, _unique(src + ".abandoned"))
            logger.info("checkpoint: resuming from step %d; set aside the newer step-%d", step, newer)

    def resume_step(self) -> int | None:
        """The step to resume from: ``load_step`` or the newest complete checkpoint; None when there is none.

        Raises:
            FileNotFoundError: ``checkpoint.load_step`` names a step with no complete checkpoint.
        """
        steps = complete_steps(self.folder)
        if self.ckpt.load_step >= 0:
            if self.ckpt.load_step not in steps:
                raise FileNotFoundError(
                    f"checkpoint.load_step={self.ckpt.load_step}: no complete checkpoint step-{self.ckpt.load_step} in "
                    f"{self.folder} (complete: {steps or 'none'}); pick one of those or -1 for the newest"
                )
            return self.ckpt.load_step
        return steps[-1] if steps else None

    def validate(self, loader=None) -> None:
        """The checks that need no process group: ``load_step`` names a complete checkpoint; ``initial_load_path``
        (used only when the folder has none) is a checkpoint directory; the checkpoint's data stream fits
        ``loader`` (same seed, shuffle, packing, ``pack_multiple``; see :meth:`MimoDataLoader.load_state_dict`);
        a ``training.samples`` budget is resumed with the ``global_batch_size`` it was counted in.

        Raises:
            FileNotFoundError / ValueError: naming the key and the fix.
        """
        step = self.resume_step() if self.ckpt.enable else None
        path = self.ckpt.initial_load_path
        if step is None:
            if path and not os.path.isfile(os.path.join(path, ".metadata")):
                raise FileNotFoundError(f"checkpoint.initial_load_path={path!r} is not a checkpoint directory (no "
                                        ".metadata); write one with scripts/convert_hf.py import")
            return
        extra = {"train": "", "dataloader": ""}
        with warnings.catch_warnings():  # read in this process alone, before any process group exists
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.load({"extra": extra}, checkpoint_id=os.path.join(self.folder, f"step-{step}"), no_dist=True)
        saved_gbs = json.loads(extra["train"]).get("global_batch_size")
        gbs = self.cfg.training.global_batch_size
        if self.cfg.training.samples is not None and saved_gbs not in (None, gbs):
            raise ValueError(
                f"training.global_batch_size={gbs} but step-{step} was trained with {saved_gbs}: the steps of a "
                f"training.samples budget are counted in global batches, so resume with "
                f"--training.global_batch_size={saved_gbs} (or give the rest of the run as training.steps)"
            )
        if loader is not None:
            try:
                copy.copy(loader).load_state_dict(json.loads(extra["dataloader"]))
            except ValueError as exc:
                raise ValueError(f"{exc} (step-{step} in {self.folder}); resume with the data settings and the "
                                 "language cp of the saved run (packing pads documents to 2·cp), or start a new "
                                 "checkpoint.folder") from None

    def load(self, job, loader) -> bool:
        """Resume ``job`` and ``loader`` from the checkpoint :meth:`resume_step` picks, or initialise the model from
        ``checkpoint.initial_load_path`` when the folder has none. Returns True if training state was resumed.

        Raises:
            FileNotFoundError: see :meth:`resume_step`; ``initial_load_path`` without a checkpoint.
            ValueError: the data loader's stream differs from the checkpoint's (seed, shuffle, packing, ...).
            RuntimeError (from DCP): a model shape differs from the checkpoint's.
        """
        step = self.resume_step() if self.ckpt.enable else None
        t0 = time.perf_counter()
        if step is None:
            path = self.ckpt.initial_load_path
            if not path:
                return False
            self.validate()
            state = {"model": {}}
            for name, module in job.modules.items():
                state["model"].update(model_state(name, module, _etp_mesh(job, name)))
            dcp.load(state, checkpoint_id=path)
            self.last_load_s = time.perf_counter() - t0
            logger.info("checkpoint: model initialised from %s in %.2f s", path, self.last_load_s)
            return False
        path = os.path.join(self.folder, f"step-{step}")
        self._on_rank0(lambda: self._set_aside_newer(step))
        probe = {"extra": {"layout": ""}}
        dcp.load(probe, checkpoint_id=path)
        same_layout = json.loads(probe["extra"]["layout"]) == json.loads(json.dumps(_layout_signature(job)))
        state = self._state(job, loader, rng=same_layout)
        dcp.load(state, checkpoint_id=path)
        extra = state["extra"]
        for name in job.modules:
            for group, saved in zip(job.optimizers[name].param_groups, json.loads(extra[f"param_groups.{name}"])):
                group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()})
            job.schedulers[name].load_state_dict(json.loads(extra[f"lr_scheduler.{name}"]))
        loader.load_state_dict(json.loads(extra["dataloader"]))
        job.step = json.loads(extra["train"])["step"]
        if same_layout:
            for name, tracker in job.rng.items():
                sd = tracker.state_dict()
                for kind in ("cpu", "cuda"):
                    for stream in sd.get(kind, {}):
                        sd[kind][stream] = state["rng"][_rng_key(name, kind, stream)]
                tracker.load_state_dict(sd)
        else:
            logger.info("checkpoint: saved under another layout; RNG streams start fresh from job.seed")
        self.last_load_s = time.perf_counter() - t0
        logger.info("checkpoint: resumed step %d from %s in %.2f s", job.step, path, self.last_load_s)
        return True
