"""Load a trained MIMO model into one process (CPU or one CUDA GPU) for generation.

Sources, told apart by :func:`resolve_checkpoint`:

- a training checkpoint ``<folder>/step-N``, or the checkpoint folder itself (its newest complete step,
  :func:`~mimo_titan.checkpoint.manager.complete_steps`), or a model-only checkpoint (``scripts/convert_hf.py
  import``, :func:`~mimo_titan.checkpoint.state.save_full_model_state`): read with
  :func:`~mimo_titan.checkpoint.state.load_full_model_state` (which checks the tensors against ``cfg.model`` and names
  the ``model.*`` setting behind a difference);
- an HF export directory (``scripts/convert_hf.py export``: one subdirectory per module, named as the module, and
  the projector files beside them): its weights are overlaid with :func:`~mimo_titan.checkpoint.hf.import_hf` on a
  freshly built model (``init_weights(job.seed)``, as ``convert_hf.py import`` does).

The model is built on the meta device and takes the loaded tensors as its parameters (no second copy, no init),
then moves to the device in fp32.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from mimo_titan.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from mimo_titan.config import Config
    from mimo_titan.data.processor import ImageTextProcessor
    from mimo_titan.models.mimo import MimoModel

__all__ = ["resolve_device", "resolve_checkpoint", "load_model", "model_from_state"]

#: non-persistent buffers (not in a checkpoint) that hold statistics and start at zero
_STAT_BUFFERS = ("tokens_per_expert",)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA device 0 when CUDA is available, else the CPU), ``"cpu"`` or ``"cuda"``.

    Raises:
        ConfigError: ``"cuda"`` without a CUDA device, or another name (the message names ``--device``).
    """
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: this machine (this torch build) has no CUDA device; use --device cpu")
        return torch.device("cuda", 0)
    raise ConfigError(f"--device {name!r}: choose auto, cpu or cuda")


def _is_hf_export(path: str, cfg: Config) -> bool:
    return os.path.isfile(os.path.join(path, cfg.model.language_name, "config.json"))


def resolve_checkpoint(path: str, cfg: Config, *, hf: bool | None = None) -> tuple[str, str]:
    """What ``path`` holds: ``("dcp", directory with .metadata)`` or ``("hf", export directory)``.

    Args:
        path: a ``step-N`` directory, a checkpoint folder of ``step-N`` directories (its newest complete one is
            taken), a model-only checkpoint, or an HF export directory.
        cfg: the run's config (an export holds ``<model.language table name>/config.json``).
        hf: True: ``path`` must be an HF export; False: a DCP checkpoint; None: detect.

    Raises:
        CheckpointError: ``path`` does not exist, or holds neither a complete checkpoint nor an HF export (the
            message names it and what was looked for).
    """
    lm_dir = os.path.join(path, cfg.model.language_name)
    if not os.path.exists(path):
        raise CheckpointError(
            f"--checkpoint {path} does not exist; pass a checkpoint step-N directory, a checkpoint folder, a "
            "model-only checkpoint or an HF export directory"
        )
    if not os.path.isdir(path):
        raise CheckpointError(f"--checkpoint {path} is a file; pass a checkpoint directory")
    if hf is True or (hf is None and _is_hf_export(path, cfg)):
        if not _is_hf_export(path, cfg):
            raise CheckpointError(
                f"--checkpoint {path} is not an HF export: {lm_dir}/config.json is missing (scripts/convert_hf.py "
                f"export writes one directory per module, here {cfg.model.language_name}/)"
            )
        return "hf", path
    if os.path.isfile(os.path.join(path, ".metadata")):
        return "dcp", path
    from mimo_titan.checkpoint.manager import complete_steps

    steps = complete_steps(path)
    if steps:
        return "dcp", os.path.join(path, f"step-{steps[-1]}")
    raise CheckpointError(
        f"--checkpoint {path} holds no complete checkpoint: neither a .metadata file (a step-N or model-only "
        f"checkpoint), nor complete step-N subdirectories, nor an HF export ({cfg.model.language_name}/config.json)"
    )


def model_from_state(
    cfg: Config, processor: ImageTextProcessor, state: dict[str, torch.Tensor], device: torch.device
) -> MimoModel:
    """The single-process :class:`~mimo_titan.models.mimo.MimoModel` of ``cfg.model`` holding ``state`` (keys of
    ``MimoModel.state_dict()``, stacked experts), in eval mode on ``device``, in the state's dtype.

    The model is built on the meta device and takes the state's tensors as its own (``assign``); its statistics
    buffers start at zero; tied word embeddings are one parameter again.

    Raises:
        RuntimeError: ``state`` lacks a key of the model or has an extra one (``load_state_dict(strict=True)``).
    """
    from mimo_titan.models.mimo import MimoModel

    audio_id = processor.audio_token_id if processor.audio_tokens is not None else None
    with torch.device("meta"):
        model = MimoModel(cfg.model, processor.image_token_id, audio_token_id=audio_id)
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():  # the buffers a checkpoint does not hold are still on the meta device
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                if name not in _STAT_BUFFERS:
                    raise RuntimeError(f"buffer {name} of {type(module).__name__} has no value in the checkpoint")
                module.register_buffer(name, torch.zeros(buf.shape, dtype=buf.dtype), persistent=False)
    lm = model.lm
    if cfg.model.language.tie_word_embeddings and lm.lm_head is not None and lm.model.embed_tokens is not None:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    return model.to(device).eval()


def load_model(
    cfg: Config, checkpoint: str, *, device: torch.device, hf: bool | None = None
) -> tuple[MimoModel, ImageTextProcessor]:
    """The model of ``cfg`` with the weights of ``checkpoint`` (see :func:`resolve_checkpoint`), and its processor
    (tokenizer, image / audio decoding; :func:`~mimo_titan.train.trainer.build_processor`).

    Raises:
        CheckpointError: a missing checkpoint, or one whose tensors do not fit ``cfg.model`` (the message names the
            first differing key and the ``model.*`` setting behind it).
        ValueError: an HF export whose configs differ from ``cfg.model`` (every differing ``model.*`` field).
        DataError / ConfigError: the tokenizer (``data.tokenizer``).
    """
    from mimo_titan.checkpoint.hf import import_hf
    from mimo_titan.checkpoint.state import load_full_model_state
    from mimo_titan.models.mimo import MimoModel
    from mimo_titan.train.trainer import build_processor

    kind, path = resolve_checkpoint(checkpoint, cfg, hf=hf)
    processor = build_processor(cfg)
    with torch.no_grad():
        if kind == "dcp":
            state = load_full_model_state(path, cfg)
        else:
            audio_id = processor.audio_token_id if processor.audio_tokens is not None else None
            fresh = MimoModel(cfg.model, processor.image_token_id, audio_token_id=audio_id)
            fresh.init_weights(cfg.job.seed)
            dirs = {section.type: os.path.join(path, name) for name, section in cfg.model.encoders.items()}
            state = import_hf(
                cfg.model,
                fresh.state_dict(),
                os.path.join(path, cfg.model.language_name),
                dirs.get("vit"),
                audio_dir=dirs.get("audio"),
            )
            del fresh
        return model_from_state(cfg, processor, state, device), processor
