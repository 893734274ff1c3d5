"""Measured module costs: time each module of a config alone on the present device, for the layout search.

:func:`profile_modules` builds every module of ``cfg.model`` (the encoders, then the language model) by itself on
one device (no process group: tp = cp = pp = 1, no FSDP), in the config's compute dtype
(``parallelism.mixed_precision_param``; ``"auto"`` is bf16 on CUDA and fp32 on CPU, as
:func:`mimo_titan.parallel.fsdp.resolve_dtype`), optionally with ``num_layers`` lowered (``layers``: an 8B language
model's cost per layer measured on one GPU; every other shape kept). It feeds each module a synthetic microbatch of
``s`` samples and times its forward and its backward separately (``torch.cuda.synchronize`` around each on CUDA;
the median of ``repeats`` runs after ``warmup`` runs; the gradients are set to None before each run). The model
FLOPs of the microbatch (:mod:`mimo_titan.train.flops`, every part in mode ``"train"``: forward plus backward,
3 x the forward) are stored with each point, so a consumer can derive the achieved FLOP/s.

Inputs of a microbatch of ``s`` samples (``m = data.max_images_per_sample``), as the planner's full batches
(:func:`mimo_titan.train.planner.plan_job`):

- ViT: ``s · m`` images ``[s·m, num_channels, image_size, image_size]`` (fp32 pixels); loss = sum of the output.
- audio: ``s · m`` clips of ``2 · max_source_positions`` log-mel frames (the longest clip, 30 s for Whisper), every
  frame valid; loss = sum of the output rows.
- language model: ``s`` rows of ``seq_len`` token ids (``training.seq_len`` unless given) through
  :class:`~mimo_titan.models.mimo.LanguageStage`, the first-stage wrapper training runs: the first
  ``Σ_encoders m · tokens_per_item`` positions of each row (capped at ``seq_len - 1``) are placeholders whose
  embeddings come from a dense ``[s, seq_len, H]`` input that requires a gradient (as the encoders' rows do);
  loss = the LM's cross-entropy (fp32 logits, random labels).

Weights are random (drawn on the device: normal(0, 0.02) matrices, unit norm scales, zero biases); their values do
not change the cost except through MoE routing, whose router is random as at initialisation.

Cost file (JSON, written by ``scripts/profile_modules.py``; read back by :func:`load_costs`)::

    {"format": 1, "device": "cpu" | "cuda:<torch.cuda.get_device_name()>", "dtype": "float32" | "bfloat16",
     "torch": torch.__version__,
     "modules": {"<name>": {"fingerprint": str, "fields": {...}, "num_layers": int (as profiled),
                            "seq_len": int (LM: tokens per row; ViT: patches per image; audio: encoder frames
                                        per clip),
                            "items_per_sample": int (encoders: images / clips per sample),
                            "mel_frames": int (audio: log-mel frames per clip),
                            "moe_layers": int (MoE layers among the profiled num_layers; 0 when dense),
                            "points": [{"samples": int, "forward_s": float, "backward_s": float,
                                        "train_flops": float}, ...]}}}

A point times the *whole* module as built: for the LM the embedding, the ``num_layers`` blocks, the final norm,
the LM head and the loss; for an encoder its patch / convolution front, blocks and projector.

The **fingerprint** (:func:`config_fingerprint`) hashes the module's ``[model.<name>]`` table except
``num_layers`` (recorded as profiled) and the keys that do not change what the module costs to run
(:data:`COST_FREE_FIELDS`); a dense module's MoE keys other than ``moe.num_experts`` are left out too. An encoder's
fields add the LM's ``hidden_size`` (its projector's output) and ``data.max_images_per_sample`` (what a sample
holds). The LM's table includes ``vocab_size``.

Method: CUDA timing with a device synchronisation around the timed region (the PyTorch benchmark utilities' and
torchtitan's convention); the FLOPs convention of PaLM appendix B, as :mod:`mimo_titan.train.flops`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mimo_titan.errors import ConfigError

if TYPE_CHECKING:
    from mimo_titan.config import Config

__all__ = [
    "FORMAT",
    "COST_FREE_FIELDS",
    "profile_modules",
    "config_fingerprint",
    "fingerprint_fields",
    "load_costs",
    "device_label",
]

#: version of the cost file's layout
FORMAT = 1
#: keys of a ``[model.<name>]`` table left out of its fingerprint because they do not change the module's cost:
#: the image normalisation (applied by the data pipeline), epsilons and the RoPE base / scaling (values, not
#: shapes), ``frozen`` (a profile times full training; :func:`mimo_titan.train.flops.part_modes` scales it),
#: ``prefetch_microbatches`` (scheduling) and the MoE load-balancing rates (values)
COST_FREE_FIELDS = (
    "image_mean",
    "image_std",
    "norm_eps",
    "layer_norm_eps",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "frozen",
    "prefetch_microbatches",
    "moe.aux_loss_coeff",
    "moe.bias_update_rate",
)
_LAYERS = "num_layers"  # recorded as profiled instead
_LM_HIDDEN, _ITEMS = "lm_hidden_size", "items_per_sample"  # an encoder's fields from outside its table
_RERUN = "re-run `python scripts/profile_modules.py --config CFG.toml --json {path}` with this config"


# -- fingerprint ----------------------------------------------------------------------------------------------------
def _section(cfg: Config, name: str) -> Any:
    if name not in cfg.model.modules:
        raise ConfigError(f"the config has no module '{name}' (its [model.*] tables: {', '.join(cfg.model.modules)})")
    return cfg.model.modules[name]


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_flatten(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def _excluded(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in (_LAYERS, *COST_FREE_FIELDS))


def fingerprint_fields(cfg: Config, name: str) -> dict[str, Any]:
    """The fields of module ``name`` that its fingerprint covers: ``{key: value}`` with keys relative to
    ``[model.<name>]`` (``"hidden_size"``, ``"moe.top_k"``), JSON values; an encoder adds ``"lm_hidden_size"``
    (``model.<language>.hidden_size``) and ``"items_per_sample"`` (``data.max_images_per_sample``).

    Left out: ``num_layers`` and :data:`COST_FREE_FIELDS`; in a dense module (``moe.num_experts = 0``) every MoE key
    but ``moe.num_experts``.

    Raises:
        ConfigError: ``name`` is not a module of ``cfg``.
    """
    section = _section(cfg, name)
    fields = {k: v for k, v in _flatten(section).items() if not _excluded(k)}
    if fields.get("moe.num_experts", 0) == 0:
        fields = {k: v for k, v in fields.items() if not k.startswith("moe.") or k == "moe.num_experts"}
    if section.type != "decoder":
        fields[_LM_HIDDEN] = cfg.model.language.hidden_size
        fields[_ITEMS] = cfg.data.max_images_per_sample
    return fields


def config_fingerprint(cfg: Config, name: str) -> str:
    """A stable hash (16 hex digits of SHA-256 over the sorted JSON of :func:`fingerprint_fields`) of what module
    ``name`` costs per layer: equal for configs that differ only in ``num_layers``, key order or fields outside it.

    Raises:
        ConfigError: ``name`` is not a module of ``cfg``.
    """
    text = json.dumps(fingerprint_fields(cfg, name), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _config_key(cfg: Config, name: str, field: str) -> str:
    """The dotted config key behind fingerprint field ``field`` of module ``name``."""
    if field == _LM_HIDDEN:
        return f"model.{cfg.model.language_name}.hidden_size"
    if field == _ITEMS:
        return "data.max_images_per_sample"
    return f"model.{name}.{field}"


# -- measuring ------------------------------------------------------------------------------------------------------
def device_label(device: torch.device) -> str:
    """``"cpu"``, or ``"cuda:<torch.cuda.get_device_name()>"`` (e.g. ``"cuda:NVIDIA H200"``)."""
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_options(
    device: torch.device,
    samples: Sequence[int],
    seq_len: int | None,
    layers: int | None,
    repeats: int,
    warmup: int,
) -> None:
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: choose cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this machine (this torch build) has no CUDA device; use --device cpu")
    if not samples or any(int(s) < 1 for s in samples):
        raise ConfigError(f"--samples {list(samples)}: give microbatch sizes >= 1, e.g. --samples 1,2")
    if seq_len is not None and seq_len < 2:
        raise ConfigError(f"--seq-len {seq_len}: a row needs at least 2 tokens (omit it for training.seq_len)")
    if layers is not None and layers < 1:
        raise ConfigError(f"--layers {layers}: profile at least 1 layer per module (omit it for the config's)")
    if repeats < 1:
        raise ConfigError(f"--repeats {repeats}: time at least 1 run")
    if warmup < 0:
        raise ConfigError(f"--warmup {warmup}: must be >= 0")


def _profiled_section(cfg: Config, name: str, layers: int | None) -> Any:
    """Module ``name``'s table with ``num_layers = layers`` (when given).

    Raises:
        ConfigError: a MoE module left without a MoE layer by ``layers``.
    """
    section = _section(cfg, name)
    if layers is None:
        return section
    section = dataclasses.replace(section, num_layers=layers)
    moe = getattr(section, "moe", None)
    if moe is not None and moe.num_experts > 0 and not moe.moe_layers(layers):
        raise ConfigError(
            f"--layers {layers} leaves model.{name} without a MoE layer (its first is layer "
            f"moe.first_layer = {moe.first_layer}); use --layers {moe.first_layer + 1} or more"
        )
    return section


@contextlib.contextmanager
def _kernel_backend(cfg: Config, device: torch.device) -> Iterator[None]:
    """``kernels.backend`` of ``cfg`` while profiling (as training sets it), the previous choice afterwards."""
    import kernels
    from kernels import _backend

    previous = _backend._configured
    try:
        kernels.set_backend(cfg.kernels.backend)
        kernels.check_backend(device.type)
    except ValueError as exc:
        kernels.set_backend(previous)
        raise ConfigError(str(exc)) from None
    try:
        yield
    finally:
        kernels.set_backend(previous)


@torch.no_grad()
def _fill_random_(module: nn.Module, seed: int, device: torch.device) -> None:
    """Random values in every tensor of a module materialised with ``to_empty``: normal(0, 0.02) for tensors of 2 or
    more dims, ones for 1-D ``*weight`` (norm scales), zeros for other 1-D tensors (biases) and integer buffers."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if not t.is_floating_point():
            t.zero_()
        elif t.dim() >= 2:
            t.normal_(0.0, 0.02, generator=gen)
        elif name.endswith("weight"):
            t.fill_(1.0)
        else:
            t.zero_()


def _build(cfg: Config, section: Any, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """The module of ``section`` alone on ``device`` in ``dtype`` (built on the meta device, then materialised)."""
    from mimo_titan.models.decoder import DecoderLM
    from mimo_titan.models.specs import encoder_spec

    with torch.device("meta"):
        if section.type == "decoder":
            module: nn.Module = DecoderLM(section)
        else:
            module = encoder_spec(section.type).build(section, cfg.model.language.hidden_size)
    module = module.to(dtype).to_empty(device=device)
    if isinstance(module, DecoderLM) and section.tie_word_embeddings:  # to_empty makes two tensors of the tied one
        assert module.lm_head is not None and module.model.embed_tokens is not None
        module.lm_head.weight = module.model.embed_tokens.weight
    _fill_random_(module, seed, device)
    from mimo_titan.models.moe import MoE

    for m in module.modules():  # per-step MoE statistics are plain attributes, built on meta with the module
        if isinstance(m, MoE):
            m.reset_stats()
            m.last_aux_loss = torch.zeros((), device=device)
    return module.train()


def _tokens_per_item(section: Any) -> int:
    """The sequence one item gives its encoder: patches per image (ViT), encoder frames per clip (audio)."""
    if section.type == "vit":
        return (section.image_size // section.patch_size) ** 2
    if section.type == "audio":
        return int(section.max_source_positions)
    raise ValueError(f"model type {section.type!r}: mimo_titan.planning.profile has no inputs for it")


def _encoder_lm_tokens(cfg: Config) -> int:
    """Placeholders per sample: every encoder's LM tokens of ``data.max_images_per_sample`` full items."""
    from mimo_titan.models.audio import audio_tokens

    total = 0
    for section in cfg.model.encoders.values():
        per_item = audio_tokens(2 * section.max_source_positions, section) if section.type == "audio" else None
        total += cfg.data.max_images_per_sample * (per_item if per_item is not None else _tokens_per_item(section))
    return total


def _train_flops(cfg: Config, section: Any, samples: int, seq_len: int) -> float:
    """Model FLOPs (forward + backward, every part trained) of a microbatch of ``samples`` samples."""
    from mimo_titan.train import flops as fl

    lm_hidden = cfg.model.language.hidden_size
    items = samples * cfg.data.max_images_per_sample
    if section.type == "decoder":
        return samples * seq_len * fl.lm_flops_per_token(section, seq_len, fl.TRAIN)
    if section.type == "vit":
        return items * fl.vit_flops_per_image(section, lm_hidden, fl.TRAIN)
    if section.type == "audio":
        return items * fl.audio_flops_per_clip(section, lm_hidden, 2 * section.max_source_positions, fl.TRAIN)
    raise ValueError(f"model type {section.type!r}: mimo_titan.train.flops has no FLOPs model for it")


def _workload(
    cfg: Config, section: Any, module: nn.Module, samples: int, seq_len: int, device: torch.device, seed: int
) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    """``(forward, leaves)``: ``forward()`` runs the module on a synthetic microbatch and returns the scalar loss;
    ``leaves`` are inputs that receive a gradient (reset before each run)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if section.type == "decoder":
        from mimo_titan.models.mimo import LanguageStage

        vocab, hidden = section.vocab_size, section.hidden_size
        dtype = next(module.parameters()).dtype
        placeholders = min(seq_len - 1, _encoder_lm_tokens(cfg)) if vocab >= 2 else 0
        ids = torch.randint(0, max(vocab - 1, 1), (samples, seq_len), device=device, generator=gen)
        ids[:, :placeholders] = vocab - 1  # the placeholder id: no text token draws it
        labels = torch.randint(0, vocab, (samples, seq_len), device=device, generator=gen)
        dense = None
        if placeholders:
            dense = (0.02 * torch.randn(samples, seq_len, hidden, device=device, generator=gen)).to(dtype)
            dense.requires_grad_(True)
        stage = LanguageStage(module, vocab - 1)  # type: ignore[arg-type]
        tokens = samples * seq_len

        def lm_forward() -> torch.Tensor:
            logits = stage(ids, dense)
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum") / tokens

        return lm_forward, [dense] if dense is not None else []

    from mimo_titan.models.specs import rows_of

    items = samples * cfg.data.max_images_per_sample
    args: tuple[torch.Tensor, ...]
    if section.type == "vit":
        size = section.image_size
        args = (torch.randn(items, section.num_channels, size, size, device=device, generator=gen),)
    elif section.type == "audio":
        frames = 2 * section.max_source_positions
        features = torch.randn(items, section.num_mel_bins, frames, device=device, generator=gen)
        args = (features, torch.full((items,), frames, dtype=torch.long, device=device))
    else:
        raise ValueError(f"model type {section.type!r}: mimo_titan.planning.profile has no inputs for it")

    def encoder_forward() -> torch.Tensor:
        return rows_of(module(*args)).float().sum()

    return encoder_forward, []


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(
    module: nn.Module,
    forward: Callable[[], torch.Tensor],
    leaves: list[torch.Tensor],
    device: torch.device,
    repeats: int,
    warmup: int,
) -> tuple[float, float]:
    """Median seconds of ``forward()`` and of its loss's ``backward()`` over ``repeats`` runs after ``warmup``."""
    fwd, bwd = [], []
    for i in range(warmup + repeats):
        module.zero_grad(set_to_none=True)
        for t in leaves:
            t.grad = None
        _sync(device)
        t0 = time.perf_counter()
        loss = forward()
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        del loss
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    module.zero_grad(set_to_none=True)
    return statistics.median(fwd), statistics.median(bwd)


def profile_modules(
    cfg: Config,
    *,
    device: torch.device,
    samples: Sequence[int] = (1, 2),
    seq_len: int | None = None,
    layers: int | None = None,
    repeats: int = 3,
    warmup: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time the forward and backward of every module of ``cfg`` alone on ``device`` (see the module docstring).

    Args:
        cfg: the training config (its ``parallelism`` layouts are ignored: one device, no process group).
        device: ``cpu`` or a CUDA device.
        samples: microbatch sizes in samples, one point each.
        seq_len: tokens per LM row (default ``training.seq_len``); the encoders' items keep the config's sizes.
        layers: ``num_layers`` of every module as profiled (default: the config's).
        repeats: timed runs per point (the median is kept).
        warmup: untimed runs before them.
        log: called with one line per point as it is measured (progress), if given.

    Returns:
        The cost file's dict (``{"format": 1, "device", "dtype", "torch", "modules": {...}}``), modules in the order
        encoders, then the language model. Times in seconds, FLOPs as floats.

    Raises:
        ConfigError: an option out of range (named by its ``scripts/profile_modules.py`` flag), CUDA asked for
            without one, a MoE module left without a MoE layer by ``layers``, or a kernel backend that cannot run on
            ``device`` (``kernels.backend``).
    """
    device = torch.device(device)
    _check_options(device, samples, seq_len, layers, repeats, warmup)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    from mimo_titan.parallel.fsdp import resolve_dtype

    dtype = resolve_dtype(cfg.parallelism.mixed_precision_param, device.type)
    rows = cfg.training.seq_len if seq_len is None else seq_len
    names = [*cfg.model.encoders, cfg.model.language_name]
    sections = {name: _profiled_section(cfg, name, layers) for name in names}  # every check before any timing
    modules: dict[str, Any] = {}
    with _kernel_backend(cfg, device):
        for k, (name, section) in enumerate(sections.items()):
            module = _build(cfg, section, device, dtype, cfg.job.seed + k)
            points = []
            for s in samples:
                forward, leaves = _workload(cfg, section, module, int(s), rows, device, cfg.job.seed + 1000 * k + s)
                forward_s, backward_s = _time(module, forward, leaves, device, repeats, warmup)
                flops = _train_flops(cfg, section, int(s), rows)
                points.append(
                    {"samples": int(s), "forward_s": forward_s, "backward_s": backward_s, "train_flops": flops}
                )
                if log is not None:
                    log(f"{name}: {s} samples, forward {forward_s * 1e3:.1f} ms, backward {backward_s * 1e3:.1f} ms")
                del forward, leaves
            moe = getattr(section, "moe", None)
            entry: dict[str, Any] = {
                "fingerprint": config_fingerprint(cfg, name),
                "fields": fingerprint_fields(cfg, name),
                "num_layers": section.num_layers,
                "seq_len": rows if section.type == "decoder" else _tokens_per_item(section),
            }
            if section.type != "decoder":
                entry["items_per_sample"] = cfg.data.max_images_per_sample
            if section.type == "audio":
                entry["mel_frames"] = 2 * section.max_source_positions
            entry["moe_layers"] = len(moe.moe_layers(section.num_layers)) if moe is not None else 0
            entry["points"] = points
            modules[name] = entry
            del module
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {
        "format": FORMAT,
        "device": device_label(device),
        "dtype": _dtype_name(dtype),
        "torch": torch.__version__,
        "modules": modules,
    }


# -- reading --------------------------------------------------------------------------------------------------------
def _malformed(source: str, what: str) -> ConfigError:
    return ConfigError(f"cost file '{source}' is malformed: {what}; {_RERUN.format(path=source)}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def _check_entry(source: str, name: str, entry: Any) -> None:
    if not isinstance(entry, dict):
        raise _malformed(source, f"modules.{name} is not an object")
    if not isinstance(entry.get("fingerprint"), str) or not isinstance(entry.get("fields"), dict):
        raise _malformed(source, f"modules.{name} lacks its fingerprint or fields")
    for key in ("num_layers", "seq_len"):
        value = entry.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _malformed(source, f"modules.{name}.{key} = {value!r} is not a positive integer")
    points = entry.get("points")
    if not isinstance(points, list) or not points:
        raise _malformed(source, f"modules.{name}.points is not a non-empty list")
    for i, p in enumerate(points):
        keys = ("samples", "forward_s", "backward_s", "train_flops")
        if not isinstance(p, dict) or not all(_is_number(p.get(k)) for k in keys):
            raise _malformed(source, f"modules.{name}.points[{i}] lacks one of {', '.join(keys)} (numbers >= 0)")


def load_costs(path: str | os.PathLike, cfg: Config) -> dict[str, Any]:
    """Read a cost file written by :func:`profile_modules` (``scripts/profile_modules.py --json``) and check that it
    was measured for ``cfg``: format 1, every module of ``cfg`` present with the fingerprint of its config
    (:func:`config_fingerprint`), and the dtype that ``parallelism.mixed_precision_param`` computes in on the file's
    device type. Modules of the file that ``cfg`` lacks are ignored.

    Returns:
        The file's dict, unchanged (format in the module docstring).

    Raises:
        ConfigError: the file is missing, unreadable, not JSON, of another format or malformed; a module of ``cfg``
            is missing; a module's fingerprint differs (the message names each differing config key with its value
            in the file and in the config); the dtype differs. Every message ends with the command that re-measures.
    """
    from mimo_titan.parallel.fsdp import resolve_dtype

    source = os.fspath(path)
    rerun = _RERUN.format(path=source)
    try:
        with open(source, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"cost file '{source}' does not exist; {rerun}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        # not JSON at all (a config passed as --costs?): suggest a new file rather than overwriting this one
        hint = rerun if source.endswith(".json") else _RERUN.format(path="costs.json") + ", then pass that file"
        raise ConfigError(
            f"cost file '{source}' is not valid JSON ({exc}): --costs takes the JSON file that "
            f"scripts/profile_modules.py --json writes; {hint}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read cost file '{source}': {exc}; {rerun}") from None
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt != FORMAT:
        raise ConfigError(
            f"cost file '{source}' has format {fmt!r}, but this version reads format {FORMAT} (the JSON that "
            f"scripts/profile_modules.py writes); {rerun}"
        )
    modules = data.get("modules")
    if not isinstance(modules, dict):
        raise _malformed(source, "it has no 'modules' object")
    device, dtype = data.get("device"), data.get("dtype")
    if not isinstance(device, str) or not isinstance(dtype, str):
        raise _malformed(source, "its 'device' or 'dtype' is not a string")
    mp = cfg.parallelism.mixed_precision_param
    want = _dtype_name(resolve_dtype(mp, "cuda" if device.startswith("cuda") else "cpu"))
    if dtype != want:
        raise ConfigError(
            f"cost file '{source}' was measured in {dtype} on {device}, but parallelism.mixed_precision_param = "
            f"{mp!r} computes in {want} there; {rerun}"
        )
    for name in cfg.model.modules:
        if name not in modules:
            held = ", ".join(modules) or "none"
            raise ConfigError(
                f"cost file '{source}' has no module '{name}' (it holds: {held}), so it was measured for another "
                f"config; {rerun}"
            )
        entry = modules[name]
        _check_entry(source, name, entry)
        if entry["fingerprint"] == config_fingerprint(cfg, name):
            continue
        mine, theirs = fingerprint_fields(cfg, name), entry["fields"]
        missing = object()
        diffs = [
            f"{_config_key(cfg, name, k)} is "
            f"{'absent' if theirs.get(k, missing) is missing else json.dumps(theirs[k])} in the file, "
            f"{'absent' if mine.get(k, missing) is missing else json.dumps(mine[k])} in the config"
            for k in sorted(set(mine) | set(theirs), key=lambda k: (k not in mine or k not in theirs, k))
            if theirs.get(k, missing) != mine.get(k, missing)
        ]  # fields both sides hold first
        why = (
            "; ".join(diffs)
            if diffs
            else "its fields match but its fingerprint does not (the file was edited or written by another version)"
        )
        raise ConfigError(f"cost file '{source}' was measured for another model.{name}: {why}; {rerun}")
    return data
