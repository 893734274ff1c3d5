"""What trains: ``model.<module>.frozen`` and ``training.trainable`` globs, decided by parameter name.

A frozen parameter gets no gradient (``requires_grad = False``), no optimizer state and no FSDP gradient reduce;
a module with no trainable parameter runs its forward under ``no_grad`` and, for an encoder, receives no gradient
over the bridge. The decision depends only on the config and the single-process :class:`MimoModel` names, so every
rank takes it alike. Reference semantics: LLaVA's two training stages (stage 1 trains only the projector),
Megatron-Bridge's ``freeze_language_model`` / ``freeze_vision_model`` provider options.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING

from mimo_titan.errors import ConfigError

if TYPE_CHECKING:
    from mimo_titan.config import Config

__all__ = ["check_trainable", "is_trainable", "module_trainable", "parameter_names"]


def is_trainable(cfg: Config, key: str) -> bool:
    """Whether the parameter with :class:`MimoModel` name ``key`` (``vision.projector.linear_1.weight``) trains:
    its module is not ``model.<module>.frozen``, and, when ``training.trainable`` is set, one of its globs matches
    somewhere in ``key`` (``"projector"`` matches every projector: LLaVA's stage 1)."""
    module = key.split(".", 1)[0]
    if getattr(cfg.model, module).frozen:
        return False
    pats = cfg.training.trainable
    return not pats or any(fnmatch.fnmatchcase(key, f"*{p}*") for p in pats)


def module_trainable(cfg: Config, module_name: str) -> bool:
    """Whether any parameter of module ``module_name`` trains (:func:`is_trainable`); the same on every rank."""
    return any(is_trainable(cfg, k) for k in parameter_names(cfg) if k.startswith(module_name + "."))


def parameter_names(cfg: Config) -> list[str]:
    """Every parameter name of ``cfg``'s single-process model (built on the meta device: no memory)."""
    from mimo_titan.checkpoint.state import meta_model  # here: the checkpoint package imports this module

    return [n for n, _ in meta_model(cfg.model).named_parameters()]


def check_trainable(cfg: Config) -> None:
    """``model.<module>.frozen`` and ``training.trainable`` leave something to train, and every glob matches.

    Raises:
        ConfigError: a ``training.trainable`` glob that matches no parameter, or nothing left to train.
    """
    names = parameter_names(cfg)
    for pat in cfg.training.trainable:
        if not any(fnmatch.fnmatchcase(k, f"*{pat}*") for k in names):
            example = next((k for k in names if "projector" in k), names[0])
            raise ConfigError(
                f"training.trainable: {pat!r} matches no parameter; each entry is a glob matched anywhere in a "
                f"parameter's full name such as {example!r} (e.g. 'projector', 'language.model.layers.*.mlp')"
            )
    if not any(is_trainable(cfg, k) for k in names):
        frozen = [m for m, section in cfg.model.modules.items() if section.frozen]
        why = f"model.{' and model.'.join(frozen)}.frozen = true" if frozen else ""
        if cfg.training.trainable:
            why = f"{why}{' with ' if why else ''}training.trainable={cfg.training.trainable}"
        raise ConfigError(f"nothing would train: {why} freezes every parameter; unfreeze a module or widen the globs")
