"""Save and resume training with torch.distributed.checkpoint (DCP): atomic steps, resharding, model-only init.

One checkpoint is a directory ``<folder>/step-N`` holding every rank's state for optimizer step N:

- ``model.<key>`` / ``optimizer.<key>.<exp_avg|exp_avg_sq|step>``: tensors under full-model keys
  (:mod:`mimo_titan.checkpoint.state`), so a checkpoint loads under any other layout (dp, tp, pp, cp, ep, etp
  and the module rank ranges may all change);
- ``extra.*``: JSON strings: the step, the data loader's position (:meth:`MimoDataLoader.state_dict`), each
  module's LR scheduler and optimizer hyper-parameters, the layout it was saved under, and (``extra.hparams``)
  the run's ``optimizer.*`` / ``lr_schedule.*`` / total steps;
- ``rng.rank<r>.<module>.<stream>``: each rank's RNG streams (``Job.rng``); they are restored only when the
  layout is unchanged (per-rank streams have no meaning under another layout; the run then keeps the fresh
  streams of its own seeds and says so).

Beside the ``step-N`` directories, ``<folder>/config.json`` holds the resolved config of the latest run that used the
folder (:meth:`CheckpointManager.save_config`), readable by :func:`mimo_titan.config.load_config`.

**Atomicity.** A save writes ``step-N.partial`` and, once every rank has written and DCP's ``.metadata`` is on
disk, rank 0 renames it to ``step-N`` (an atomic rename). A process killed part-way leaves at most a
``.partial`` directory, which is never loaded and is removed by the next save; the previous ``step-M`` is never
touched before the new one is complete. ``keep_latest_k`` then deletes the oldest complete checkpoints, their
``.metadata`` first (a purge killed part-way leaves an incomplete directory, not a damaged complete one).
Resuming with ``load_step`` from an older step sets the newer checkpoints aside as ``step-M.abandoned``, so
neither a later resume nor the purge confuses the abandoned run with the new one.

**Checks.** :meth:`CheckpointManager.validate` runs before any process group: the folder is writable and has
room for one checkpoint (:func:`checkpoint_size_bytes`), and the checkpoint to resume has the configured model's
keys and shapes (read from its ``.metadata``). A save refuses to write a model or optimizer tensor holding NaN / Inf
on any rank. On resume the optimizer and LR-schedule settings of the *current* config apply, and one log line
names those that changed. Every failure a user can fix is a :class:`~mimo_titan.errors.CheckpointError`.

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
import socket
import time
import uuid
import warnings
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.tensor import DTensor

from mimo_titan.checkpoint.state import (
    meta_model,
    missing_data,
    model_mismatch,
    model_shapes,
    model_state,
    optimizer_state,
    saved_shapes,
    stacked_key,
)
from mimo_titan.errors import CheckpointError
from mimo_titan.train.freeze import is_trainable

if TYPE_CHECKING:
    from mimo_titan.config import Config
    from mimo_titan.data import MimoDataLoader
    from mimo_titan.train.trainer import Job

__all__ = ["CheckpointManager", "complete_steps", "checkpoint_folder", "checkpoint_size_bytes"]

logger = logging.getLogger("mimo_titan")

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_folder(cfg: Config) -> str:
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


def checkpoint_size_bytes(cfg: Config) -> int:
    """Estimated size in bytes of one training checkpoint of ``cfg.model``: every parameter of the *whole* model
    (all ranks write into one folder) and AdamW's two moments (``exp_avg``, ``exp_avg_sq``), each stored in the
    parameter dtype (fp32: FSDP keeps fp32 parameters whatever ``mixed_precision_param``), so
    ``3 × 4 bytes × parameters``. Buffers, step counters, RNG states and metadata (at most a few MB) are not
    counted. Computed from a meta-device model: no memory, no process group."""
    return 3 * sum(p.numel() * p.element_size() for p in meta_model(cfg.model).parameters())


_HEAD_KEY = "language.lm_head.weight"

# hint for a checkpoint whose language head and embedding were tied differently
_FROZEN_THEN = (
    "its module was frozen when the checkpoint was saved; to train more of the model than it did, start a new run "
    "from its weights with checkpoint.initial_load_path"
)
_FROZEN_NOW = (
    "model.<module>.frozen or training.trainable freezes it now; resume with the settings it was saved with, or "
    "start a new run from its weights with checkpoint.initial_load_path"
)
_TIED = (
    "the checkpoint's language head and embedding were tied differently: set model.language.tie_word_embeddings "
    "as in the saved run"
)


def _gb(n: float) -> str:
    """Bytes as decimal GB with 3 significant digits (``1.2 GB``, ``0.00462 GB``, ``312 GB``)."""
    g = n / 1e9
    return f"{g:.0f} GB" if g >= 100 else f"{g:.3g} GB"


def _hparams(cfg: Config) -> dict:
    """The settings a resumed run takes from its *current* config, under their config keys (saved as
    ``extra.hparams`` to say what changed on resume)."""
    o, s = cfg.optimizer, cfg.lr_schedule
    return {
        "optimizer.lr": float(o.lr),
        "optimizer.betas": [float(b) for b in o.betas],
        "optimizer.eps": float(o.eps),
        "optimizer.weight_decay": float(o.weight_decay),
        "lr_schedule.warmup_steps": s.warmup_steps,
        "lr_schedule.decay": s.decay,
        "lr_schedule.min_lr_ratio": float(s.min_lr_ratio),
        "training.total_steps": cfg.training.total_steps,
        "training.max_grad_norm": float(cfg.training.max_grad_norm),
        "training.global_batch_size": cfg.training.global_batch_size,
    }


def _show(value, other) -> str:
    """``value`` for a log line: floats as ``%g`` (``1e+06``), full precision when ``%g`` would not tell it from
    ``other``."""

    def fmt(v, exact):
        if isinstance(v, float):
            return repr(v) if exact else f"{v:g}"
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x, exact) for x in v) + "]"
        return str(v)

    return fmt(value, fmt(value, False) == fmt(other, False))


def _first_nonfinite(state: dict) -> str | None:
    """The first ``model.*`` / ``optimizer.*`` key of ``state`` whose local tensor (this rank's shard) holds a NaN
    or Inf; None when all are finite. One device-to-host copy per device."""
    keys: list[str] = []
    flags: dict = {}  # device -> [(index into keys, 0-dim bool tensor)]
    for section in ("model", "optimizer"):
        for key, t in state[section].items():
            local = t.to_local() if isinstance(t, DTensor) else t
            if local.is_floating_point() and local.numel():
                keys.append(f"{section}.{key}")
                flags.setdefault(local.device, []).append((len(keys) - 1, torch.isfinite(local).all()))
    bad = []
    for pairs in flags.values():
        finite = torch.stack([f for _, f in pairs]).cpu().tolist()
        bad += [i for (i, _), ok in zip(pairs, finite) if not ok]
    return keys[min(bad)] if bad else None


def _layout_signature(job: Job) -> dict:
    return {
        "world_size": job.topology.world_size,
        "device_type": job.device.type,
        "layouts": {n: dataclasses.asdict(lay) for n, lay in job.topology.layouts.items()},
    }


def _rng_key(name: str, kind: str, stream: str) -> str:
    """Checkpoint key (under ``rng.``) of this rank's state of RNG stream ``stream`` (``kind`` cpu / cuda) of module
    ``name``."""
    return f"rank{dist.get_rank()}.{name}.{kind}.{stream}"


def _rng_states(job: Job) -> dict:
    """This rank's RNG stream states (copies) under :func:`_rng_key` keys."""
    return {
        _rng_key(name, kind, stream): t
        for name, tracker in job.rng.items()
        for kind in ("cpu", "cuda")
        for stream, t in tracker.state_dict().get(kind, {}).items()
    }


def _etp_mesh(job: Job, name: str):
    return job.topology.expert_mesh(name)["etp"] if job.topology.layouts[name].etp > 1 else None


def _scheduler_state(scheduler) -> dict:
    state = dict(scheduler.state_dict())
    state["lr_lambdas"] = [None] * len(state.get("lr_lambdas", []))  # functions are rebuilt from the config
    return state


def _param_groups(optimizer) -> list[dict]:
    return [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
        for g in optimizer.param_groups
    ]


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

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.ckpt = cfg.checkpoint
        self.folder = checkpoint_folder(cfg)
        self.last_save_s: float | None = None
        self.last_load_s: float | None = None

    # ------------------------------------------------------------------ state
    def _state(self, job: Job, loader: MimoDataLoader, *, rng: bool) -> dict:
        state: dict = {"model": {}, "optimizer": {}, "extra": {}, "rng": {}}
        for name, module in job.modules.items():
            etp = _etp_mesh(job, name)
            state["model"].update(model_state(name, module, etp))
            if name not in job.optimizers:  # a frozen module: its weights only
                continue
            state["optimizer"].update(optimizer_state(name, module, job.optimizers[name], etp))
            state["extra"][f"lr_scheduler.{name}"] = json.dumps(_scheduler_state(job.schedulers[name]))
            state["extra"][f"param_groups.{name}"] = json.dumps(_param_groups(job.optimizers[name]))
        state["extra"]["train"] = json.dumps(
            {"step": job.step, "global_batch_size": self.cfg.training.global_batch_size}
        )
        state["extra"]["dataloader"] = json.dumps(loader.state_dict())
        state["extra"]["layout"] = json.dumps(_layout_signature(job))
        state["extra"]["hparams"] = json.dumps(_hparams(self.cfg))
        if rng:
            state["rng"] = _rng_states(job)
        return state

    # ------------------------------------------------------------------ save
    def save_config(self) -> str | None:
        """With ``checkpoint.enable``, rank 0 writes the run's resolved config to ``<folder>/config.json``
        (:func:`mimo_titan.config.save_config`; :func:`mimo_titan.config.load_config` reads it back, so a later
        script can take ``--config <folder>/config.json``). Each run that uses the folder rewrites it: it holds the
        config of the latest run (a resumed run may have changed ``optimizer.*``, say). Collective: every rank of the
        default process group calls it.

        Returns:
            The file's path, or None when checkpointing is off.

        Raises:
            CheckpointError: rank 0 could not write the file, raised on every rank.
        """
        if not self.ckpt.enable:
            return None
        from mimo_titan.config import save_config

        path = os.path.join(self.folder, "config.json")

        def write() -> None:
            os.makedirs(self.folder, exist_ok=True)
            save_config(self.cfg, path)

        self._on_rank0(write, "write config.json to")
        return path

    def should_save(self, step: int) -> bool:
        """Whether to save after optimizer step ``step``: every ``interval`` steps and at the last step."""
        return self.ckpt.enable and (step % self.ckpt.interval == 0 or step == self.cfg.training.total_steps)

    def save(self, job: Job, loader: MimoDataLoader) -> float:
        """Write ``<folder>/step-<job.step>`` atomically (module docstring); returns the wall time in seconds.

        A complete checkpoint of the same step is replaced only after the new one is complete. Nothing is written
        when any rank holds a NaN / Inf in a model or optimizer tensor (:meth:`_refuse_nonfinite`).

        Raises:
            CheckpointError: a non-finite tensor; the folder cannot be written (permission, disk full), raised on
                every rank.
        """
        t0 = time.perf_counter()
        final = os.path.join(self.folder, f"step-{job.step}")
        partial = final + ".partial"
        state = self._state(job, loader, rng=True)
        self._refuse_nonfinite(state, job)
        self._on_rank0(self._sweep_partials, "clear the .partial checkpoints in")  # .partial dirs left by killed saves
        try:
            dcp.save(state, checkpoint_id=partial)
        except CheckpointException as exc:  # DCP raises it on every rank when any rank failed to write
            cause = next((e for e, _ in exc.failures.values() if isinstance(e, OSError)), None)
            if cause is None:
                raise
            raise CheckpointError(
                f"checkpoint: could not write step {job.step} to {partial}: {cause}; make "
                f"checkpoint.folder ({self.folder}) writable and free space on its file system, or "
                "set --checkpoint.folder to another directory"
            ) from None
        dist.barrier()  # every rank's files are written; DCP's coordinator wrote .metadata last

        def commit():
            if os.path.isdir(final):  # only after a rewind that could not move it aside: keep it, do not delete
                os.rename(final, _unique(final + ".replaced"))
            os.rename(partial, final)
            self._purge(keep=job.step)

        self._on_rank0(commit, f"commit step-{job.step} to")
        self.last_save_s = time.perf_counter() - t0
        logger.info("checkpoint: saved step %d to %s in %.2f s", job.step, final, self.last_save_s)
        return self.last_save_s

    def _refuse_nonfinite(self, state: dict, job: Job) -> None:
        """Raise on every rank, before anything is written, if any rank's model or optimizer tensors hold a NaN
        or Inf: one all-reduce (MIN) finds the lowest such rank, which then broadcasts its first bad key.

        Raises:
            CheckpointError: naming the step, the key, the rank and the fix.
        """
        bad = _first_nonfinite(state)
        rank, world = dist.get_rank(), dist.get_world_size()
        found = torch.tensor([rank if bad else world], dtype=torch.int64, device=job.device)
        dist.all_reduce(found, op=dist.ReduceOp.MIN)
        src = int(found.item())
        if src == world:
            return
        box = [bad]
        dist.broadcast_object_list(box, src=src)
        steps = complete_steps(self.folder)
        resume = f"step-{steps[-1]}, the newest complete checkpoint in {self.folder}" if steps else "scratch"
        raise CheckpointError(
            f"checkpoint: refusing to save step {job.step}: {box[0]} holds NaN/Inf (found on rank {src}); the run "
            f"diverged — lower optimizer.lr (now {self.cfg.optimizer.lr:g}), raise lr_schedule.warmup_steps or lower "
            f"training.max_grad_norm, and resume from {resume}"
        )

    def _on_rank0(self, fn, what: str) -> None:
        """Run ``fn`` on rank 0 only and share its outcome: every rank raises if it failed (no rank is left
        waiting in a barrier for a rank 0 that raised).

        Args:
            fn: the file operation.
            what: what it does to the folder, for the message ("commit step-4 to").

        Raises:
            CheckpointError: ``fn`` raised an ``OSError`` (permission, disk full, ...): the user can fix it.
            RuntimeError: any other exception of ``fn``.
        """
        error, user = None, False
        if dist.get_rank() == 0:
            try:
                fn()
            except OSError as exc:
                error, user = str(exc), True
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                error = f"{type(exc).__name__}: {exc}"
        box = [(error, user)]
        dist.broadcast_object_list(box, src=0)
        error, user = box[0]
        if error is None:
            return
        if user:
            raise CheckpointError(
                f"checkpoint: rank 0 could not {what} {self.folder}: {error}; make checkpoint.folder "
                "writable and free space on its file system, or set --checkpoint.folder to another "
                "directory"
            )
        raise RuntimeError(f"checkpoint: rank 0 failed to {what} {self.folder}: {error}")

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
        for step in [s for s in complete_steps(self.folder) if s != keep][: -k + 1 or None]:
            path = os.path.join(self.folder, f"step-{step}")
            os.remove(os.path.join(path, ".metadata"))
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ resume
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
            CheckpointError: ``checkpoint.load_step`` names a step with no complete checkpoint.
        """
        steps = complete_steps(self.folder)
        if self.ckpt.load_step >= 0:
            if self.ckpt.load_step not in steps:
                raise CheckpointError(
                    f"checkpoint.load_step={self.ckpt.load_step}: no complete checkpoint step-{self.ckpt.load_step} in "
                    f"{self.folder} (complete: {steps or 'none'}); pick one of those or -1 for the newest"
                )
            return self.ckpt.load_step
        return steps[-1] if steps else None

    # ------------------------------------------------------------------ checks before any process group
    def preflight(self) -> None:
        """Check, before training starts, that checkpoints can be written: ``job.output_dir`` is not a file; the
        checkpoint folder can be created and a file written into it and deleted (a probe named by host, process
        and a random suffix, so every rank may run this at once on a shared file system); its file system has
        :func:`checkpoint_size_bytes` free for one more checkpoint.

        Needs no process group. Creates the folder.

        Raises:
            CheckpointError: naming the config key, the path, the cause and the fix.
        """
        out = self.cfg.job.output_dir
        if os.path.exists(out) and not os.path.isdir(out):
            raise CheckpointError(
                f"job.output_dir={out!r} is a file, not a directory, so nothing (checkpoints "
                "included) can be written under it; set --job.output_dir to a directory or move "
                "the file away"
            )
        where = f"checkpoint.folder={self.ckpt.folder!r}"
        if not os.path.isabs(self.ckpt.folder):
            where += f" (under job.output_dir: {self.folder})"
        fix = "make it writable, or set --checkpoint.folder to a writable directory"
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise CheckpointError(f"{where} is a file, not a directory; set --checkpoint.folder to a directory")
        try:
            os.makedirs(self.folder, exist_ok=True)  # another rank may create it at the same time: fine
        except OSError as exc:
            raise CheckpointError(f"{where}: cannot create the folder: {exc.strerror or exc}; {fix}") from None
        probe = os.path.join(self.folder, f".write-probe.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            with open(probe, "wb") as f:
                f.write(b"mimo_titan checkpoint write probe\n")
            os.remove(probe)
        except OSError as exc:
            raise CheckpointError(f"{where}: cannot write a file in it: {exc.strerror or exc}; {fix}") from None
        need, free = checkpoint_size_bytes(self.cfg), shutil.disk_usage(self.folder).free
        if free < need:
            raise CheckpointError(
                f"{where}: one checkpoint needs {_gb(need)} (parameters and AdamW moments of the whole model, fp32), "
                f"{_gb(free)} free on its file system; free space there, or set --checkpoint.folder to a file system "
                "with room (checkpoint.keep_latest_k bounds how many checkpoints stay)"
            )

    def _check_initial_load_path(self) -> str:
        path = self.ckpt.initial_load_path
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise CheckpointError(
                f"checkpoint.initial_load_path={path!r} is not a checkpoint directory (no "
                ".metadata); write one with scripts/convert_hf.py import, or pass a step-N directory"
            )
        return path

    def _check_fits(self, path: str, training: bool) -> dict:
        """Compare the checkpoint ``path``'s tensor shapes (its ``.metadata``, read in this process) with the
        configured model: every ``model.*`` key and shape (:func:`~mimo_titan.checkpoint.state.model_mismatch`)
        and, for a training checkpoint, the AdamW moments of every parameter. Returns ``{key: shape}`` of the
        checkpoint.

        Raises:
            CheckpointError: the first differing key, both shapes, the ``model.*`` setting behind it, the path.
        """
        try:
            metadata = dcp.FileSystemReader(path).read_metadata()  # read once for both checks
            shapes = saved_shapes(path, metadata)
        except Exception as exc:  # noqa: BLE001 - an unreadable .metadata: the checkpoint is damaged
            raise CheckpointError(
                f"checkpoint {path}: cannot read its .metadata ({type(exc).__name__}: {exc}); "
                "it is damaged: move it away or pick another checkpoint"
            ) from None
        damage = missing_data(path, metadata)
        if damage is not None:
            raise CheckpointError(
                f"checkpoint {path} is damaged: {damage} (a copy cut short, or a file lost); move it away (an older "
                "complete checkpoint is then used) or set checkpoint.load_step to another step"
            )
        problem = model_mismatch(shapes, self.cfg.model)
        if problem is None and training:
            params = model_shapes(self.cfg.model, parameters_only=True)
            # frozen parameters have no AdamW state; a per-expert key is judged by the model's stacked name
            trains = {key: is_trainable(self.cfg, stacked_key(key)) for key in params}
            saved_params = {k[len("optimizer.") : -len(".exp_avg")] for k in shapes if k.endswith(".exp_avg")}
            for key, shape in params.items():
                if not trains[key]:
                    continue
                moments = {m: shapes.get(f"optimizer.{key}.{m}") for m in ("exp_avg", "exp_avg_sq")}
                bad = next((m for m, got in moments.items() if got != shape), None)
                if bad is not None:
                    got = moments[bad]
                    if got is None and not any(k.startswith(key.split(".")[0] + ".") for k in saved_params):
                        why = _FROZEN_THEN
                    else:
                        why = _TIED if "lm_head" in key else "not a training checkpoint, or damaged"
                    problem = (
                        f"optimizer.{key}.{bad} is "
                        + ("missing" if got is None else str(list(got)))
                        + f" but the parameter is {list(shape)} ({why})"
                    )
                    break
            if problem is None:  # AdamW state of a parameter this model does not have or freezes
                extra = next((k for k in sorted(saved_params) if not trains.get(k, False)), None)
                if extra is not None:
                    why = _FROZEN_NOW if extra in params else (_TIED if "lm_head" in extra else "another model")
                    problem = (
                        f"optimizer.{extra}.exp_avg is in the checkpoint but the configured model has no trainable "
                        f"parameter {extra} ({why})"
                    )
        if problem is None:
            return shapes
        if training:
            raise CheckpointError(
                f"checkpoint {path} does not fit the configured model: {problem}. Resume with the "
                "model.* settings it was saved with, or start a new run in another "
                f"--checkpoint.folder (this one is {self.folder})"
            )
        raise CheckpointError(
            f"checkpoint.initial_load_path={path!r} does not fit the configured model: {problem}. "
            "Set the model.* keys it was written with, or point checkpoint.initial_load_path at a "
            "checkpoint of this model"
        )

    def validate(self, loader: MimoDataLoader | None = None) -> None:
        """Every check that needs no process group (each rank runs them at the same time):

        - with ``checkpoint.enable``, :meth:`preflight` (the folder is writable and has room for a checkpoint);
        - ``load_step`` names a complete checkpoint;
        - the checkpoint to resume (or ``initial_load_path``, used only when the folder has none) has the keys and
          shapes of the configured model (:meth:`_check_fits`, from its ``.metadata`` alone);
        - the checkpoint's data stream fits ``loader`` (same seed, shuffle, packing, ``pack_multiple``; see
          :meth:`MimoDataLoader.load_state_dict`);
        - a ``training.samples`` budget is resumed with the ``global_batch_size`` it was counted in.

        Raises:
            CheckpointError: naming the key, the path and the fix.
        """
        if not self.ckpt.enable and self.ckpt.load_step >= 0:
            raise CheckpointError(
                f"checkpoint.load_step={self.ckpt.load_step} but checkpoint.enable = false, so nothing would be "
                "resumed and the run would start from scratch; set --checkpoint.enable=true (or drop load_step)"
            )
        if self.ckpt.enable:
            self.preflight()
        step = self.resume_step() if self.ckpt.enable else None
        if step is None:
            if self.ckpt.initial_load_path:
                self._check_fits(self._check_initial_load_path(), training=False)
            return
        path = os.path.join(self.folder, f"step-{step}")
        shapes = self._check_fits(path, training=True)
        if "extra.train" not in shapes or "extra.dataloader" not in shapes:
            raise CheckpointError(
                f"checkpoint {path} is not a training checkpoint (no extra.train / extra.dataloader: "
                "a model-only one loads through checkpoint.initial_load_path); move it out of "
                f"{self.folder} or set checkpoint.load_step to another step"
            )
        extra = {"train": "", "dataloader": ""}
        with warnings.catch_warnings():  # read in this process alone, before any process group exists
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.load({"extra": extra}, checkpoint_id=path, no_dist=True)
        saved_step = json.loads(extra["train"]).get("step", step)
        total = self.cfg.training.total_steps
        if saved_step > total:
            length = (
                f"training.samples={self.cfg.training.samples} gives {total} steps"
                if self.cfg.training.samples is not None
                else f"training.steps={total}"
            )
            raise CheckpointError(
                f"step-{step} in {self.folder} is past the end of this run ({length}): there is nothing to train; "
                f"raise the run's length above {saved_step} steps, set checkpoint.load_step to an earlier step, or "
                "start a new run in another checkpoint.folder"
            )
        saved_gbs = json.loads(extra["train"]).get("global_batch_size")
        gbs = self.cfg.training.global_batch_size
        if self.cfg.training.samples is not None and saved_gbs not in (None, gbs):
            raise CheckpointError(
                f"training.global_batch_size={gbs} but step-{step} was trained with {saved_gbs}: the steps of a "
                f"training.samples budget are counted in global batches, so resume with "
                f"--training.global_batch_size={saved_gbs} (or give the rest of the run as training.steps)"
            )
        if loader is not None:
            try:
                copy.copy(loader).load_state_dict(json.loads(extra["dataloader"]))
            except ValueError as exc:
                raise CheckpointError(
                    f"{exc} (step-{step} in {self.folder}); resume with the data settings and the "
                    "language cp of the saved run (packing pads documents to 2·cp), or start a new "
                    "checkpoint.folder"
                ) from None

    # ------------------------------------------------------------------ load
    def load(self, job: Job, loader: MimoDataLoader) -> bool:
        """Resume ``job`` and ``loader`` from the checkpoint :meth:`resume_step` picks, or initialise the model from
        ``checkpoint.initial_load_path`` when the folder has none. Returns True if training state was resumed.

        Either way DCP reads each rank's entries straight into its local shards (:func:`model_state` gives views of
        the live FSDP / TP / EP tensors, resharded by chunk offsets): no rank allocates a full module or a tensor of
        a module it does not hold. (Hugging Face weights are imported offline first, by ``scripts/convert_hf.py
        import``, which holds one full model in a single process.)

        The optimizer hyper-parameters and the LR schedule then follow the *current* config at the resumed step
        (:meth:`_apply_current_hparams`); one line on rank 0 says which of them differ from the saved run.
        Shapes are checked by :meth:`validate` (before any process group), not here.

        Raises:
            CheckpointError: see :meth:`resume_step`; ``initial_load_path`` without a checkpoint.
            ValueError: the data loader's stream differs from the checkpoint's (seed, shuffle, packing, ...).
            RuntimeError (from DCP): a model shape differs from the checkpoint's (when :meth:`validate` was not run).
        """
        step = self.resume_step() if self.ckpt.enable else None
        t0 = time.perf_counter()
        if step is None:
            if not self.ckpt.initial_load_path:
                return False
            path = self._check_initial_load_path()
            weights: dict[str, dict[str, torch.Tensor]] = {"model": {}}
            for name, module in job.modules.items():
                weights["model"].update(model_state(name, module, _etp_mesh(job, name)))
            self._read(weights, path, job=job)
            self.last_load_s = time.perf_counter() - t0
            logger.info("checkpoint: model initialised from %s in %.2f s", path, self.last_load_s)
            return False
        path = os.path.join(self.folder, f"step-{step}")
        self._on_rank0(lambda: self._set_aside_newer(step), f"set aside the checkpoints newer than step-{step} in")
        probe = {"extra": {"layout": "", "hparams": ""}}  # hparams: absent from older checkpoints
        self._read(probe, path, planner=DefaultLoadPlanner(allow_partial_load=True))
        same_layout = json.loads(probe["extra"]["layout"]) == json.loads(json.dumps(_layout_signature(job)))
        state = self._state(job, loader, rng=same_layout)
        del state["extra"]["hparams"]
        self._read(state, path, job=job)
        extra = state["extra"]
        for name in job.optimizers:
            for group, saved in zip(job.optimizers[name].param_groups, json.loads(extra[f"param_groups.{name}"])):
                group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()})
            job.schedulers[name].load_state_dict(json.loads(extra[f"lr_scheduler.{name}"]))
        loader.load_state_dict(json.loads(extra["dataloader"]))
        job.step = json.loads(extra["train"])["step"]
        self._apply_current_hparams(job, probe["extra"]["hparams"], extra)
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
        if job.step >= self.cfg.training.total_steps:
            logger.info(
                "checkpoint: step %d is the last step of this run (%d steps): nothing left to train",
                job.step,
                self.cfg.training.total_steps,
            )
        return True

    def _read(self, state: dict, path: str, job: Job | None = None, **kwargs) -> None:
        """``dcp.load(state)`` from ``path``; a read that fails on any rank (DCP raises on every rank then) becomes
        a :class:`CheckpointError` saying the checkpoint is damaged (the checks before the process group catch
        missing and short files; this catches bytes that do not decode).

        With ``job`` and ``model.language.tie_word_embeddings``, the head is read into a separate buffer and compared
        with the embedding it shares its weight with (the two keys of one tensor would otherwise both be written
        into it, the later silently winning): a checkpoint whose two matrices differ, trained or imported untied,
        is refused (one all-reduce, every rank calls it).

        Raises:
            CheckpointError: naming the path, the first failure and the fix; tied weights that differ.
        """
        tied = job is not None and self.cfg.model.language.tie_word_embeddings
        head = state.get("model", {}).pop(_HEAD_KEY, None) if tied else None
        if head is not None:
            state["model"][_HEAD_KEY] = torch.empty_like(head)
        try:
            dcp.load(state, checkpoint_id=path, **kwargs)
        except CheckpointException as exc:
            first = next(iter(exc.failures.values()), None)
            cause = f"{type(first[0]).__name__}: {str(first[0]).splitlines()[0]}" if first else str(exc)
            raise CheckpointError(
                f"checkpoint {path} could not be read ({cause}): it is damaged; move it away (an older complete "
                "checkpoint is then used) or set checkpoint.load_step to another step"
            ) from None
        if tied and job is not None:
            differ = 0.0
            if head is not None:
                saved_head = state["model"].pop(_HEAD_KEY)
                local = [t.to_local() if isinstance(t, DTensor) else t for t in (saved_head, head)]
                differ = float(not torch.equal(local[0], local[1]))
                state["model"][_HEAD_KEY] = head
            flag = torch.tensor([differ], device=job.device)
            dist.all_reduce(flag)
            if flag.item() > 0:
                raise CheckpointError(
                    f"checkpoint {path}: its {_HEAD_KEY} differs from language.model.embed_tokens.weight, but "
                    "model.language.tie_word_embeddings = true makes them one tensor (loading both would silently "
                    "keep only one); set model.language.tie_word_embeddings = false as the checkpoint was trained or "
                    "imported"
                )

    def _apply_current_hparams(self, job: Job, saved_json: str, extra: dict) -> None:
        """After a restore: set every optimizer's ``lr`` / ``betas`` / ``eps`` / ``weight_decay`` and every LR
        scheduler's base LR from the current config, so the next step uses
        ``optimizer.lr × lr_multiplier(job.step, total_steps, ...)`` of the current config (its LR lambdas are
        already the current ones), and log one line on rank 0 naming what differs from the saved run.

        The saved values are ``extra.hparams``; a checkpoint written before it existed falls back to the restored
        param groups and scheduler state (optimizer keys only).
        """
        current = _hparams(self.cfg)
        if saved_json:
            saved = json.loads(saved_json)
        elif not job.optimizers:  # an older checkpoint, and this rank holds only frozen modules: nothing to apply
            return
        else:
            name = next(iter(job.optimizers))
            group = json.loads(extra[f"param_groups.{name}"])[0]
            base_lrs = json.loads(extra[f"lr_scheduler.{name}"]).get("base_lrs") or [group.get("initial_lr")]
            saved = {
                "optimizer.lr": base_lrs[0],
                "optimizer.betas": list(group["betas"]),
                "optimizer.eps": group["eps"],
                "optimizer.weight_decay": group["weight_decay"],
            }
        o = self.cfg.optimizer
        for name in job.optimizers:
            optimizer, scheduler = job.optimizers[name], job.schedulers[name]
            for group in optimizer.param_groups:
                group.update(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, initial_lr=o.lr)
            scheduler.base_lrs = [o.lr] * len(optimizer.param_groups)
            # LambdaLR.get_lr's own expression, so an unchanged config restores the saved LR bit for bit
            lrs = [base * fn(scheduler.last_epoch) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
            scheduler._last_lr = lrs
        changes = [
            f"{k} {_show(saved[k], v)} -> {_show(v, saved[k])}"
            for k, v in current.items()
            if k in saved and saved[k] is not None and saved[k] != v
        ]
        if changes and dist.get_rank() == 0:
            logger.info(
                "checkpoint: resuming step %d with config changes: %s (the current config applies from step %d)",
                job.step,
                ", ".join(changes),
                job.step + 1,
            )
