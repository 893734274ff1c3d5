"""The list of every config key that ``scripts/train.py --help`` prints, generated from the schema.

:func:`config_keys_help` walks the dataclasses of :mod:`mimo_titan.config` (the same schema the loader validates
against), so the list never goes stale: every table and key of :class:`~mimo_titan.config.Config` in declaration
order, including one ``[model.<name>]`` table per module type of :data:`~mimo_titan.config.MODEL_TYPES` (with its
nested tables such as ``moe`` and ``rope_scaling``) and the ``[parallelism.<name>]`` table. Each key line gives the
full dotted key (as an override writes it), its type, its default or ``required``, and the allowed values from the
field's ``_opt`` metadata (``choices``, bounds, list length, hint)::

    [training]  # loop length, batch geometry and device.
      training.global_batch_size  int, required  (>= 1)
      training.max_grad_norm      float = 1.0  (>= 0; 0 disables gradient clipping)
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from typing import Any

from mimo_titan.config import (
    _DEFAULT_TYPES,
    MODEL_TYPES,
    Config,
    ModuleParallelism,
    _describe_type,
    _has_default,
    _hints,
    _is_dataclass_type,
)

__all__ = ["CONFIG_KEYS_EPILOG", "config_keys_help", "format_value"]

#: the ``--help`` epilog of every script that reads a config: where the keys are listed
CONFIG_KEYS_EPILOG = (
    "Config keys: `python scripts/train.py --help` lists every key with its type, default and allowed values; any "
    "of them can be overridden with --section.key=VALUE after the options."
)

_MODULE = "<name>"
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def format_value(value: Any) -> str:
    """A default as a TOML / override value: ``none``, ``true`` / ``false``, a quoted string, a number, a list."""
    if value is None:
        return "none"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return json.dumps(value)  # bool -> true/false, str -> "quoted", numbers as Python writes them


def _summary(cls: type) -> str:
    """The first paragraph of a table's docstring, without its ``[section]`` prefix and the reST markup."""
    first = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    if "``: " in first:
        first = first.split("``: ", 1)[1]
    first = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", first)
    return first.replace("``", "")


def _constraints(f: dataclasses.Field) -> str:
    meta = f.metadata
    parts = []
    if "choices" in meta:
        parts.append("one of " + ", ".join(format_value(c) for c in meta["choices"]))
    if "length" in meta:
        parts.append(f"exactly {meta['length']} values")
    bounds = [f"{sym} {format_value(meta[name])}" for name, sym in _BOUNDS if name in meta]
    if bounds:
        parts.append(("each " if "length" in meta else "") + ", ".join(bounds))
    if "hint" in meta:
        parts.append(meta["hint"])
    return f"  ({'; '.join(parts)})" if parts else ""


def _default(f: dataclasses.Field) -> Any:
    """A field's default value (its factory called); only for a field that has one."""
    if f.default is not dataclasses.MISSING:
        return f.default
    factory: Any = f.default_factory
    return factory()


def _tables(cls: type, path: str, note: str = "", sub_note: str = "") -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """``(header, [(key, description)])`` of the table ``cls`` at dotted ``path`` and of its sub-tables (after it,
    as TOML orders them); ``note`` follows the table's header, ``sub_note`` its sub-tables'. Open sections
    (``[model.<name>]``, ``[parallelism.<name>]``) expand into one table per type their modules may have."""
    hints = _hints(cls)
    keys: list[tuple[str, str]] = []
    subtables: list[tuple[type, str]] = []
    open_field = getattr(cls, "_open", None)
    for f in dataclasses.fields(cls):
        key = f"{path}.{f.name}" if path else f.name
        tp = hints[f.name]
        if f.name == open_field:
            continue
        if _is_dataclass_type(tp):
            subtables.append((tp, key))
            continue
        kind = _describe_type(tp)
        value = f"{kind} = {format_value(_default(f))}" if _has_default(f) else f"{kind}, required"
        keys.append((key, value + _constraints(f)))
    if keys:
        yield f"[{path}]{note}  # {_summary(cls)}", keys
    for sub, key in subtables:
        yield from _tables(sub, key, sub_note, sub_note)
    if open_field is None:
        return
    member = f"{path}.{_MODULE}"
    if path == "model":
        defaults = {kind: name for name, kind in _DEFAULT_TYPES.items()}
        for kind, model_cls in MODEL_TYPES.items():
            named = f" (the default of a table named {defaults[kind]})" if kind in defaults else ""
            yield from _tables(model_cls, member, f' of type "{kind}"{named}', f' of a "{kind}" module')
    else:
        yield from _tables(ModuleParallelism, member, f" for each [model.{_MODULE}], of the same name")


def config_keys_help() -> str:
    """Every table and key of :class:`~mimo_titan.config.Config` as text for ``--help`` (module docstring).

    Returns:
        Lines of text, ending with a newline.
    """
    lines = [
        "Config keys (generated from the schema in mimo_titan/config.py). Each line: the dotted key, as an override",
        "writes it (--training.steps=10), its type, its default or 'required', and the allowed values. A table whose",
        "keys all have defaults may be left out. <name> stands for a module's name, chosen by the config (vision,",
        "audio, language, ...): each module has a [model.<name>] table with its type (vit | audio | decoder) and its",
        "layout in the [parallelism.<name>] table of the same name.",
    ]
    for title, keys in _tables(Config, ""):
        lines.append("")
        lines.append(title)
        width = max(len(k) for k, _ in keys)
        lines.extend(f"  {k:<{width}}  {v}" for k, v in keys)
    return "\n".join(lines) + "\n"
