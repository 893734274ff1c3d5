"""Typed training configuration loaded from TOML, with command-line overrides.

A run is described by one TOML file whose tables mirror the dataclasses in
this module (:class:`Config` is the root)::

    [job]                      # optional (all keys have defaults)
    name = "mimo-tiny"
    seed = 0
    output_dir = "outputs"

    [model.vision]             # one table per module, named freely; type "vit" | "audio" | "decoder"
    type = "vit"               # VisionModelConfig (the default of a table named vision)
    image_size = 224
    patch_size = 16
    hidden_size = 768
    num_layers = 12
    num_heads = 12
    intermediate_size = 3072
    projector_intermediate_size = 2048

    [model.language]           # LanguageModelConfig: type "decoder" (the default of a table named language)
    vocab_size = 32000
    hidden_size = 2048
    intermediate_size = 5632
    num_layers = 22
    num_heads = 32
    num_kv_heads = 4
    # head_dim omitted -> None (derived as hidden_size // num_heads elsewhere)
    # rope_scaling = {type = "llama3", factor = 8.0}   # RopeScalingConfig, optional (default type "none")

    [model.language.moe]       # MoEConfig, optional (also [model.vision.moe])
    num_experts = 8                    # 0 (the default) = dense
    top_k = 2
    intermediate_size = 1408           # per-expert SwiGLU width
    layer_freq = 1                     # every layer from first_layer on
    first_layer = 1                    # layer 0 stays dense
    load_balance = "aux_free"          # aux_loss | aux_free | none

    [parallelism]              # ParallelismConfig scalar keys
    pipeline_schedule = "1F1B"         # "1F1B" | "GPipe" | "Interleaved1F1B": the language pipeline's schedule
    virtual_stages = 1                 # model chunks per language pp rank (Interleaved1F1B: >= 2)
    module_schedule = "1F1B"           # "1F1B": encoders lead the LM stages microbatch by microbatch | "GPipe"
    colocated_encoders = "batch"       # "batch" | "inline" (per microbatch; needs language pp = 1)
    mixed_precision_param = "auto"     # auto | float32 | bfloat16 (no float16: there is no gradient scaler)
    mixed_precision_reduce = "float32" # float32 | bfloat16

    [parallelism.vision]       # ModuleParallelism: one per [model.<name>] table, same name
    rank_offset = 0
    num_ranks = 2
    dp_shard = 2

    [parallelism.language]     # ModuleParallelism of the language model
    rank_offset = 2
    num_ranks = 4
    pp = 2
    dp_shard = 2
    activation_checkpointing = "selective"  # none | full | selective (per transformer block)
    compile = false                    # torch.compile per transformer block
    fsdp_reshard_after_forward = true  # unset: false with pp = 1, true with pp > 1

    [training]
    steps = 1000                       # or samples = 32000 (LM samples)
    global_batch_size = 32
    microbatches = 4
    seq_len = 2048
    max_grad_norm = 1.0                # global gradient-norm clipping; 0 disables it
    device = "auto"                    # auto | cpu | cuda
    max_skipped_steps = 3              # consecutive non-finite steps skipped, then stop
    collective_timeout_s = 600         # a rank without progress this long ends the job

    [optimizer]
    lr = 3e-4
    betas = [0.9, 0.95]

    [lr_schedule]              # optional
    warmup_steps = 100                 # at most the run's optimizer steps
    decay = "cosine"                   # cosine | linear | constant

    [data]
    path = "/data/shards"              # a .tar shard or a directory of .tar shards
    tokenizer = "/models/tok"          # dir holding tokenizer.json, or the file

    [metrics]                  # optional; MetricsConfig
    log_freq = 10
    jsonl = "metrics.jsonl"            # relative: under job.output_dir; "" = none
    tensorboard = false                # true needs `pip install tensorboard`
    peak_tflops = 989.5                # for MFU; omitted: detected on A100 / H100 / H200 / B200

    [checkpoint]               # optional; CheckpointConfig
    enable = true
    folder = "checkpoint"              # under job.output_dir
    interval = 500
    keep_latest_k = 3                  # 0 keeps all
    load_step = -1                     # -1: the newest complete checkpoint

    [validation]               # optional; ValidationConfig
    enable = true
    freq = 100                         # steps between validations (and after the last step)
    steps = 10                         # global batches per validation; -1 = one pass
    [validation.data]
    path = "/data/val-{0000..0003}.tar"

    [kernels]                  # optional; KernelsConfig
    backend = "auto"                   # auto | triton | torch (env MIMO_TITAN_KERNELS wins)

A table whose dataclass has only defaulted fields (``[job]``, ``[lr_schedule]``,
``[metrics]``, ``[checkpoint]``, ``[validation]``, ``[kernels]``) may be omitted entirely; any key with a
default may be omitted. Unknown keys are errors (with a "did you mean"
suggestion), as are wrongly typed values, missing required keys and values
outside an allowed set. A TOML integer is accepted where a float is expected;
a boolean is never accepted as a number.

Every number has a range, declared on its field (``_opt(ge=, gt=, le=, lt=)``,
applied to each element of a list) and checked first, for all keys:

* sizes and counts are >= 1: the ``model.*`` widths, layer and head counts,
  ``vocab_size``, ``image_size``, ``patch_size``, ``num_channels``,
  ``head_dim`` (or ``none``), ``training.steps`` / ``samples`` /
  ``global_batch_size`` / ``microbatches`` / ``max_skipped_steps``,
  ``data.max_images_per_sample``; ``training.seq_len`` >= 2;
* epsilons, ``rope_theta`` and ``optimizer.lr`` are > 0;
  ``training.collective_timeout_s`` >= 5 (seconds; below that the watchdog
  would judge healthy ranks in their first steps); ``job.seed`` in [-2**63, 2**64 - 2] (torch's
  seed range, less the init's offset); ``optimizer.betas`` in [0, 1);
* ``optimizer.weight_decay``, ``training.max_grad_norm`` (0 disables
  clipping), ``lr_schedule.warmup_steps`` and the MoE sizes and rates are
  >= 0; ``lr_schedule.min_lr_ratio`` is in [0, 1];
* no float may be ``nan`` or ``inf``.

Then the checks that relate several keys, declared by a table's dataclass in a
``_config_problems()`` method (innermost tables first, the root last) and
reported the same way, naming the key: ``hidden_size`` divisible by
``num_heads`` (unless ``head_dim`` is set), an even language head dim (RoPE),
``num_heads`` a multiple of ``num_kv_heads``, ``image_size`` at least
``patch_size``, ``moe.top_k <= moe.num_experts`` and a MoE layer below
``num_layers``, ``training.global_batch_size`` a multiple of
``training.microbatches``, exactly one of ``training.steps`` /
``training.samples``, and, across sections, ``lr_schedule.warmup_steps`` at
most the run's optimizer steps (``training.total_steps``).

The same tables may come from JSON: :func:`save_config` writes the resolved config as JSON (training saves it as
``<checkpoint folder>/config.json``) and :func:`load_config` reads any ``*.json`` path back into an equal
:class:`Config` (``null`` for an unset key). ``scripts/train.py --help`` lists every key with its type, default
and allowed values, generated from this schema (:mod:`mimo_titan.config_help`).

Overrides are applied to the parsed TOML *before* it is converted into
dataclasses, so they are validated exactly like values from the file. Each
override names a dotted key and a value, either as one token or as two::

    python scripts/train.py --config train_configs/tiny.toml \\
        --training.steps=10 \\
        --optimizer.lr 1e-4 \\
        --parallelism.language.dp_shard=2 \\
        --data.shuffle=false \\
        --optimizer.betas=0.9,0.99 \\
        --model.language.head_dim=none

Override values are parsed according to the target field's type: ``int``;
``float`` (integers accepted); ``bool`` (``true``/``false``/``1``/``0``, any
case); ``str`` (taken verbatim); ``list[float]`` (comma separated, optional
surrounding brackets); ``int | None`` (``none``/``null`` gives ``None``).

Values restricted to a fixed set (e.g. ``parallelism.pipeline_schedule``) are
matched case-insensitively and stored in their canonical spelling
(``"gpipe"`` -> ``"GPipe"``).

Every problem raises :class:`ConfigError` whose message names the dotted key,
its value, the config file (and the override that set the key, if one did),
and how to fix it. Parallel layouts (mesh sizes vs. rank counts, and sizes
that a parallel degree must divide) and the existence of data/tokenizer paths
are deliberately *not* checked here; the parallelism and data modules own
those checks.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar, cast

import tomli

from mimo_titan.errors import ConfigError

__all__ = [
    "ConfigError",
    "JobConfig",
    "MoEConfig",
    "IMAGE_NORMALIZATION",
    "RopeScalingConfig",
    "VisionModelConfig",
    "LanguageModelConfig",
    "ModelConfig",
    "ModuleParallelism",
    "ParallelismConfig",
    "TrainingConfig",
    "OptimizerConfig",
    "LRScheduleConfig",
    "DataConfig",
    "MetricsConfig",
    "ValidationConfig",
    "ValidationDataConfig",
    "CheckpointConfig",
    "KernelsConfig",
    "Config",
    "load_config",
    "save_config",
    "config_from_dict",
    "parse_args",
]


def _opt(
    default: Any = MISSING,
    *,
    factory: Any = MISSING,
    choices: Sequence[str] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    length: int | None = None,
    hint: str | None = None,
) -> Any:
    """A dataclass field carrying validation metadata used by the loader.

    ``ge`` / ``gt`` / ``le`` / ``lt`` bound the value (every element of a list); ``choices`` is the allowed set
    of a string; ``length`` the exact length of a list; ``hint`` is appended to an out-of-range message (what
    the value means, e.g. "0 disables clipping").
    """
    meta: dict[str, Any] = {}
    if choices is not None:
        meta["choices"] = tuple(choices)
    for name, bound in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)):
        if bound is not None:
            meta[name] = bound
    if length is not None:
        meta["length"] = length
    if hint is not None:
        meta["hint"] = hint
    return field(default=default, default_factory=factory, metadata=meta)


# --------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------


@dataclass(kw_only=True)
class JobConfig:
    """``[job]``: run identity and output location."""

    name: str = "mimo"
    # torch.manual_seed takes [-2**63, 2**64 - 1], and the model's init draws module k from seed + k (k <= 1)
    seed: int = _opt(0, ge=-(2**63), le=2**64 - 2)
    output_dir: str = "outputs"


@dataclass(kw_only=True)
class MoEConfig:
    """``[model.vision.moe]`` / ``[model.language.moe]``: Mixture-of-Experts MLPs.

    Every key has a default and ``num_experts = 0`` (the default) means a
    dense module, so the table may be omitted. With ``num_experts > 0`` the
    MLP of every layer selected by :meth:`is_moe_layer` is replaced by a
    dropless top-k routed MoE of ``num_experts`` SwiGLU experts (no capacity
    factor, no token dropping), as in torchtitan's MoE and DeepSeek-V3.

    Attributes:
        num_experts: routed experts per MoE layer; 0 = dense module. The
            remaining keys are ignored (and not cross-checked) when 0.
        top_k: experts per token, ``1 <= top_k <= num_experts``.
        intermediate_size: SwiGLU hidden width of one routed expert; must be
            > 0 when ``num_experts > 0``.
        layer_freq: a MoE layer every ``layer_freq`` layers (>= 1).
        first_layer: index of the first MoE layer (>= 0); layers below it stay
            dense (DeepSeek's ``first_k_dense_replace``). Must be below the
            module's ``num_layers`` when ``num_experts > 0``.
        score_func: router scores, ``"softmax"`` over all experts (Mixtral,
            DeepSeek-V2) or per-expert ``"sigmoid"`` (DeepSeek-V3).
        norm_topk_prob: renormalise the chosen top-k weights to sum to 1.
        shared_expert_intermediate_size: SwiGLU width of an always-active
            shared expert added to the routed output; 0 = none.
        load_balance: ``"aux_loss"`` (Switch/GShard-style auxiliary loss scaled
            by ``aux_loss_coeff``), ``"aux_free"`` (DeepSeek-V3 per-expert
            routing bias nudged by ``bias_update_rate`` after each step) or
            ``"none"``.
        aux_loss_coeff: weight of the auxiliary load-balancing loss (>= 0).
        bias_update_rate: step size of the aux-loss-free bias update (>= 0).
    """

    num_experts: int = _opt(0, ge=0)
    top_k: int = _opt(2, ge=1)
    intermediate_size: int = _opt(0, ge=0)
    layer_freq: int = _opt(1, ge=1)
    first_layer: int = _opt(0, ge=0)
    score_func: str = _opt("softmax", choices=("softmax", "sigmoid"))
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = _opt(0, ge=0)
    load_balance: str = _opt("aux_loss", choices=("aux_loss", "aux_free", "none"))
    aux_loss_coeff: float = _opt(0.01, ge=0)
    bias_update_rate: float = _opt(0.001, ge=0)

    @property
    def enabled(self) -> bool:
        """True if the module has MoE layers (``num_experts > 0``)."""
        return self.num_experts > 0

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i`` of the module uses a MoE MLP.

        Layer ``i`` is MoE iff ``num_experts > 0``, ``i >= first_layer`` and
        ``(i - first_layer) % layer_freq == 0``.

        Args:
            i: 0-based layer index within the module.

        Returns:
            True for a MoE layer, False for a dense one (always False when
            ``num_experts == 0``).

        Raises:
            ValueError: ``i`` is negative.
        """
        if i < 0:
            raise ValueError(f"layer index {i} is negative; layer indices start at 0")
        if self.num_experts <= 0 or i < self.first_layer:
            return False
        return (i - self.first_layer) % self.layer_freq == 0

    def moe_layers(self, num_layers: int) -> list[int]:
        """Indices of the MoE layers among ``range(num_layers)``, ascending."""
        return [i for i in range(num_layers) if self.is_moe_layer(i)]

    def _config_problems(self) -> list[tuple[str, str]]:
        """Cross-key checks run by the loader; ``(key, "problem; fix")`` pairs.

        Keys are relative to this table; ``{p}`` in a message is replaced by
        the table's dotted path.
        """
        if self.num_experts <= 0:
            return []
        out: list[tuple[str, str]] = []
        if self.top_k > self.num_experts:
            out.append(
                (
                    "top_k",
                    f"top_k must be <= num_experts={self.num_experts} (each token picks top_k "
                    f"distinct experts); set '{{p}}.top_k' to at most {self.num_experts} "
                    f"or raise '{{p}}.num_experts'",
                )
            )
        if self.intermediate_size <= 0:
            out.append(
                (
                    "intermediate_size",
                    f"a MoE module (num_experts={self.num_experts}) needs the per-expert SwiGLU width; "
                    f"set '{{p}}.intermediate_size' > 0, or set '{{p}}.num_experts = 0' for a dense module",
                )
            )
        return out


def _moe_layer_problems(num_layers: int, moe: MoEConfig) -> list[tuple[str, str]]:
    """The module-level MoE check: a MoE module must have at least one MoE layer."""
    if moe.num_experts > 0 and moe.first_layer >= num_layers:
        return [
            (
                "moe.first_layer",
                f"first_layer must be < num_layers={num_layers}, otherwise no layer is MoE although "
                f"num_experts={moe.num_experts}; lower '{{p}}.moe.first_layer' or set "
                f"'{{p}}.moe.num_experts = 0' for a dense module",
            )
        ]
    return []


def _near_multiples(value: int, m: int) -> str:
    """The positive multiples of ``m`` next to ``value``, as text for a fix ("24 or 32")."""
    below = value // m * m
    return f"{below} or {below + m}" if below > 0 else str(m)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _heads_problem(hidden_size: int, num_heads: int, rope: bool) -> tuple[str, str] | None:
    """``hidden_size`` must split into ``num_heads`` heads of an integer width (``rope``: the language model,
    whose head dim must also be even and whose ``head_dim`` key avoids the split)."""
    if hidden_size % num_heads == 0:
        return None
    if rope:
        fixes = (
            f"set '{{p}}.hidden_size' to a multiple of 2 * num_heads = {2 * num_heads} (an even head dim, "
            f"as RoPE needs; e.g. {_near_multiples(hidden_size, 2 * num_heads)}), change '{{p}}.num_heads' "
            "or set '{p}.head_dim'"
        )
    else:
        fixes = (
            f"set '{{p}}.hidden_size' to a multiple of num_heads (e.g. {_near_multiples(hidden_size, num_heads)}) "
            "or change '{p}.num_heads'"
        )
    return (
        "hidden_size",
        f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}, so the head dim would not be an "
        f"integer; {fixes}",
    )


#: Per-channel RGB ``(image_mean, image_std)`` of ``[0, 1]`` pixels for each ViT family, as its Hugging Face image
#: processor normalises (``CLIPImageProcessor``: OpenAI CLIP's dataset statistics; ``SiglipImageProcessor``: 0.5 /
#: 0.5, i.e. pixels mapped to ``[-1, 1]``).
IMAGE_NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


@dataclass(kw_only=True)
class VisionModelConfig:
    """``[model.vision]``: ViT encoder plus the MLP projector into the LM.

    Every size is >= 1 and ``norm_eps`` > 0. Cross-key rules: ``hidden_size`` is a multiple of ``num_heads``
    (attention heads of width ``hidden_size / num_heads``) and ``image_size >= patch_size``: the image is cut into
    ``(image_size // patch_size) ** 2`` patches, one token each; when ``patch_size`` does not divide ``image_size``
    the stride-``patch_size`` convolution drops the last ``image_size % patch_size`` pixel rows and columns, as
    Hugging Face's ViT / SigLIP do (SigLIP-so400m/14 at 384 px: 27 x 27 = 729 patches, 6 pixels dropped).

    ``image_mean`` / ``image_std`` normalise the ``[0, 1]`` RGB pixels per channel, ``(x - mean) / std``, as the
    encoder family's image processor does (Hugging Face's ``image_mean`` / ``image_std``): CLIP's statistics by
    default (:data:`IMAGE_NORMALIZATION`), ``[0.5, 0.5, 0.5]`` for both with SigLIP weights (an import of a SigLIP
    tower refuses other values, see :func:`mimo_titan.checkpoint.hf.import_hf`). Three values each, the mean in
    ``[0, 1]``, the std > 0.

    ``moe`` (table ``[model.vision.moe]``) makes the encoder's MLPs
    Mixture-of-Experts; dense by default.
    """

    type: str = _opt("vit", choices=("vit",))
    image_size: int = _opt(ge=1)
    patch_size: int = _opt(ge=1)
    num_channels: int = _opt(3, ge=1)
    hidden_size: int = _opt(ge=1)
    num_layers: int = _opt(ge=1)
    num_heads: int = _opt(ge=1)
    intermediate_size: int = _opt(ge=1)
    norm_eps: float = _opt(1e-6, gt=0, hint="the LayerNorm epsilon, e.g. 1e-6")
    projector_intermediate_size: int = _opt(ge=1)  # MLP projector hidden width (to LM hidden size)
    image_mean: list[float] = _opt(  # noqa: RUF009 - _opt returns a dataclasses.field (a default_factory here)
        factory=lambda: list(IMAGE_NORMALIZATION["clip"][0]),
        length=3,
        ge=0,
        le=1,
        hint="the per-channel RGB mean of [0, 1] pixels: CLIP's [0.48145466, 0.4578275, 0.40821073] (default), "
        "SigLIP's [0.5, 0.5, 0.5]",
    )
    image_std: list[float] = _opt(  # noqa: RUF009 - _opt returns a dataclasses.field (a default_factory here)
        factory=lambda: list(IMAGE_NORMALIZATION["clip"][1]),
        length=3,
        gt=0,
        hint="the per-channel RGB standard deviation of [0, 1] pixels: CLIP's [0.26862954, 0.26130258, "
        "0.27577711] (default), SigLIP's [0.5, 0.5, 0.5]",
    )
    moe: MoEConfig = field(default_factory=MoEConfig)
    frozen: bool = False  # no gradients, no optimizer state; forward under no_grad (the projector included)
    prefetch_microbatches: int = _opt(2, ge=1)  # a frozen encoder on its own ranks runs this far ahead of the LM

    def _config_problems(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        heads = _heads_problem(self.hidden_size, self.num_heads, rope=False)
        if heads is not None:
            out.append(heads)
        size, patch = self.image_size, self.patch_size
        if size < patch:
            out.append(
                (
                    "image_size",
                    f"image_size={size} is smaller than patch_size={patch}, so the image holds no patch; set "
                    f"'{{p}}.image_size' >= {patch} (e.g. {patch * (224 // patch or 1)}) or lower '{{p}}.patch_size'",
                )
            )
        return out + _moe_layer_problems(self.num_layers, self.moe)


@dataclass(kw_only=True)
class AudioModelConfig:
    """``[model.<name>]`` of type ``"audio"``: a Whisper encoder plus the MLP projector into the LM.

    The encoder (:class:`mimo_titan.models.audio.AudioEncoder`) reads ``num_mel_bins`` log-mel bins every 10 ms,
    halves the frame rate with its stride-2 convolution (one encoder frame per 20 ms), averages ``pool``
    consecutive encoder frames into one LM token and projects it to the LM's hidden size: a clip of ``F`` mel
    frames gives ``ceil(ceil(F / 2) / pool)`` tokens. ``max_source_positions`` is the number of encoder frames
    (sinusoidal positions) it holds: 1500 = 30 s of audio, Whisper's window; a longer clip is rejected.

    Every size is >= 1, ``layer_norm_eps`` > 0. Cross-key rules: ``hidden_size`` is a multiple of ``num_heads``
    (attention heads of width ``hidden_size / num_heads``) and even (the sinusoidal positions pair a sine and a
    cosine per frequency).
    """

    type: str = _opt("audio", choices=("audio",))
    num_mel_bins: int = _opt(80, ge=1, hint="log-mel bins per frame: 80 (Whisper), 128 (Whisper large-v3)")
    hidden_size: int = _opt(ge=1)
    num_layers: int = _opt(ge=1)
    num_heads: int = _opt(ge=1)
    intermediate_size: int = _opt(ge=1)
    max_source_positions: int = _opt(
        1500, ge=1, hint="encoder frames of 20 ms after the stride-2 convolution; 1500 = 30 s (Whisper)"
    )
    layer_norm_eps: float = _opt(1e-5, gt=0, hint="the LayerNorm epsilon, 1e-5 in Whisper")
    pool: int = _opt(1, ge=1, hint="encoder frames (20 ms each) averaged into one LM token, e.g. 1, 2 or 4")
    projector_intermediate_size: int = _opt(ge=1)  # MLP projector hidden width (to LM hidden size)
    frozen: bool = False  # no gradients, no optimizer state; forward under no_grad (the projector included)
    prefetch_microbatches: int = _opt(2, ge=1)  # a frozen encoder on its own ranks runs this far ahead of the LM

    def _config_problems(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        heads = _heads_problem(self.hidden_size, self.num_heads, rope=False)
        if heads is not None:
            out.append(heads)
        elif self.hidden_size % 2:
            out.append(
                (
                    "hidden_size",
                    f"hidden_size={self.hidden_size} is odd, but the sinusoidal positions of the audio encoder "
                    "pair a sine and a cosine per frequency; set '{p}.hidden_size' to an even multiple of "
                    f"num_heads (e.g. {_near_multiples(self.hidden_size, 2 * self.num_heads)})",
                )
            )
        return out


@dataclass(kw_only=True)
class RopeScalingConfig:
    """``model.language.rope_scaling``: long-context scaling of the rotary frequencies; ``type = "none"`` (default).

    Written as an inline table, ``rope_scaling = {type = "llama3", factor = 8.0, low_freq_factor = 1.0,
    high_freq_factor = 4.0, original_max_position_embeddings = 8192}`` (Llama 3.1's values, also the defaults), or
    as the table ``[model.language.rope_scaling]``. ``"llama3"`` is Llama 3.1's frequency-dependent scaling (HF
    ``rope_type = "llama3"``, see :func:`mimo_titan.models.decoder.rope_inv_freq`): wavelengths above
    ``original_max_position_embeddings / low_freq_factor`` tokens are stretched by ``factor``, those below
    ``original_max_position_embeddings / high_freq_factor`` are kept, those in between are blended.

    Attributes:
        type: ``"none"`` (plain RoPE; the other keys are ignored) or ``"llama3"``.
        factor: stretch of the low frequencies, >= 1 (8 in Llama 3.1).
        low_freq_factor: > 0, below ``high_freq_factor`` (1 in Llama 3.1).
        high_freq_factor: > 0 (4 in Llama 3.1).
        original_max_position_embeddings: the pretraining context in tokens, >= 1 (8192 in Llama 3.1).
    """

    type: str = _opt("none", choices=("none", "llama3"))
    factor: float = _opt(8.0, ge=1, hint="the stretch of the low rotary frequencies, 8 in Llama 3.1")
    low_freq_factor: float = _opt(1.0, gt=0, hint="1 in Llama 3.1")
    high_freq_factor: float = _opt(4.0, gt=0, hint="4 in Llama 3.1")
    original_max_position_embeddings: int = _opt(8192, ge=1, hint="the pretraining context, 8192 in Llama 3.1")

    def _config_problems(self) -> list[tuple[str, str]]:
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            return [
                (
                    "high_freq_factor",
                    f"llama3 RoPE scaling blends the frequencies between the wavelengths "
                    f"original_max_position_embeddings / high_freq_factor and / low_freq_factor, so "
                    f"high_freq_factor must be > low_freq_factor={self.low_freq_factor}; set "
                    f"'{{p}}.high_freq_factor' above it (Llama 3.1: low 1.0, high 4.0)",
                )
            ]
        return []


@dataclass(kw_only=True)
class LanguageModelConfig:
    """``[model.language]``: decoder-only language model.

    Every size is >= 1 (``head_dim`` may also be omitted / ``none``: then it is ``hidden_size // num_heads``),
    ``rope_theta`` and ``rms_norm_eps`` are > 0. Cross-key rules: without ``head_dim``, ``hidden_size`` is a
    multiple of ``num_heads``; the head dim is even (RoPE rotates pairs of dimensions); ``num_heads`` is a
    multiple of ``num_kv_heads`` (grouped-query attention).

    ``moe`` (table ``[model.language.moe]``) makes the decoder's MLPs
    Mixture-of-Experts; dense by default. ``rope_scaling`` (:class:`RopeScalingConfig`, e.g.
    ``rope_scaling = {type = "llama3", factor = 8.0}``) scales the rotary frequencies; none by default.
    """

    type: str = _opt("decoder", choices=("decoder",))
    vocab_size: int = _opt(ge=1)
    hidden_size: int = _opt(ge=1)
    intermediate_size: int = _opt(ge=1)
    num_layers: int = _opt(ge=1)
    num_heads: int = _opt(ge=1)
    num_kv_heads: int = _opt(ge=1)
    head_dim: int | None = _opt(None, ge=1, hint="or none to use hidden_size // num_heads")
    rope_theta: float = _opt(10000.0, gt=0, hint="the RoPE base, e.g. 10000 (Llama-2) or 500000 (Llama-3)")
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    rms_norm_eps: float = _opt(1e-6, gt=0, hint="the RMSNorm epsilon, e.g. 1e-6")
    tie_word_embeddings: bool = False
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before RoPE (Qwen3)
    moe: MoEConfig = field(default_factory=MoEConfig)
    frozen: bool = False  # no gradients, no optimizer state (gradients still flow through to the encoder)

    def _config_problems(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        heads, kv = self.num_heads, self.num_kv_heads
        problem = None if self.head_dim is not None else _heads_problem(self.hidden_size, heads, rope=True)
        if problem is not None:
            out.append(problem)
        elif self.head_dim is not None and self.head_dim % 2:
            out.append(
                (
                    "head_dim",
                    f"head_dim={self.head_dim} is odd, but RoPE rotates pairs of dimensions; set '{{p}}.head_dim' to "
                    f"an even number (e.g. {self.head_dim + 1})",
                )
            )
        elif self.head_dim is None and (self.hidden_size // heads) % 2:
            out.append(
                (
                    "hidden_size",
                    f"the head dim hidden_size / num_heads = {self.hidden_size} / {heads} = "
                    f"{self.hidden_size // heads} is odd, but RoPE rotates pairs of dimensions; "
                    f"set '{{p}}.hidden_size' to a multiple of 2 * num_heads = {2 * heads} "
                    f"(e.g. {_near_multiples(self.hidden_size, 2 * heads)}), or set '{{p}}.head_dim' to an even number",
                )
            )
        if heads % kv:
            divisors = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0)
            out.append(
                (
                    "num_kv_heads",
                    f"num_heads={heads} is not a multiple of num_kv_heads={kv}: grouped-query attention shares each "
                    f"key/value head among num_heads / num_kv_heads query heads; set '{{p}}.num_kv_heads' to a "
                    f"divisor of {heads} ({divisors})",
                )
            )
        return out + _moe_layer_problems(self.num_layers, self.moe)


#: ``type`` of a ``[model.<name>]`` table → its dataclass (the model types a module can be)
MODEL_TYPES: dict[str, type] = {"vit": VisionModelConfig, "audio": AudioModelConfig, "decoder": LanguageModelConfig}
#: the type of a table without ``type``, by its name (the two modules of older configs)
_DEFAULT_TYPES = {"vision": "vit", "language": "decoder"}


class _OpenSections:
    """Mixin of a table whose sub-tables have names of the user's choosing (``[model.<name>]``,
    ``[parallelism.<name>]``): they are collected in the dict field named by ``_open`` (in TOML order) and read back
    as attributes (``cfg.model.vision``)."""

    _open: ClassVar[str] = "modules"

    @classmethod
    def _section_class(cls, name: str, data: Mapping[str, Any], key: str, source: str) -> type:
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get(self._open)
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__} has no section or key {name!r}")


@dataclass(kw_only=True)
class ModelConfig(_OpenSections):
    """``[model.<name>]``: one table per module, its ``type`` one of :data:`MODEL_TYPES`: ``"vit"`` (a ViT encoder,
    :class:`VisionModelConfig`), ``"audio"`` (a Whisper encoder, :class:`AudioModelConfig`) or ``"decoder"`` (the
    language model, :class:`LanguageModelConfig`). A table named ``vision`` defaults to ``"vit"``, one named
    ``language`` to ``"decoder"``. Exactly one module is a decoder; every other module is an encoder.

    ``cfg.model.<name>`` reads a module's table; :attr:`language` is the decoder's whatever its name, and
    :attr:`encoders` the others, in the file's order.
    """

    modules: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _section_class(cls, name: str, data: Mapping[str, Any], key: str, source: str) -> type:
        kind = data.get("type", _DEFAULT_TYPES.get(name))
        if kind is None:
            raise ConfigError(
                f"'{key}' in {source} has no type; set '{key}.type' to one of {sorted(MODEL_TYPES)} (only the tables "
                "named 'vision' and 'language' have a default type)"
            )
        if kind not in MODEL_TYPES:
            raise ConfigError(
                f"invalid value {kind!r} for '{key}.type' in {source}; choose one of {sorted(MODEL_TYPES)}"
            )
        return MODEL_TYPES[kind]

    @property
    def language_name(self) -> str:
        """The name of the decoder module (``"language"`` in the shipped configs)."""
        return next(n for n, m in self.modules.items() if isinstance(m, LanguageModelConfig))

    @property
    def language(self) -> LanguageModelConfig:
        """The decoder's table."""
        return self.modules[self.language_name]

    @property
    def encoders(self) -> dict[str, Any]:
        """``{name: table}`` of every encoder module, in the file's order."""
        return {n: m for n, m in self.modules.items() if not isinstance(m, LanguageModelConfig)}

    def _config_problems(self) -> list[tuple[str, str]]:
        decoders = [n for n, m in self.modules.items() if isinstance(m, LanguageModelConfig)]
        if len(decoders) != 1:
            what = "none" if not decoders else ", ".join(f"[{{p}}.{n}]" for n in decoders)
            return [("modules", f"exactly one module must be the language model (type 'decoder'), found {what}")]
        if not self.encoders:
            return [("modules", "no encoder module; add one, e.g. a [{p}.vision] table (type 'vit')")]
        return []


@dataclass(kw_only=True)
class ModuleParallelism:
    """``[parallelism.vision]`` / ``[parallelism.language]``: one module's layout and its memory / speed options.

    Consistency of the sizes with ``num_ranks`` is validated by the
    parallelism module, not here.

    Options (see :mod:`mimo_titan.parallel.ac` and :func:`mimo_titan.parallel.fsdp.reshard_after_forward`):
    ``activation_checkpointing`` (``"none"`` | ``"full"`` | ``"selective"``: recompute every transformer block in
    backward, or only its cheap ops), ``compile`` (``torch.compile`` per transformer block) and
    ``fsdp_reshard_after_forward`` (``true`` / ``false``; unset: off with ``pp = 1``, where a step's microbatches
    would otherwise re-gather every block's parameters, and on with ``pp > 1``).
    """

    rank_offset: int
    num_ranks: int
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1
    etp: int = 1
    # memory / speed options of the module's transformer blocks (mimo_titan.parallel.ac), applied before FSDP:
    # "full" recomputes every block in backward, "selective" saves matmul / attention / collective outputs only
    activation_checkpointing: str = _opt("none", choices=("none", "full", "selective"))
    compile: bool = False  # torch.compile each transformer block separately (default backend)
    # free gathered parameters after each forward; none (the default): off with pp = 1, on with pp > 1
    fsdp_reshard_after_forward: bool | None = None


@dataclass(kw_only=True)
class ParallelismConfig(_OpenSections):
    """``[parallelism]``: per-module layouts plus shared settings.

    ``mixed_precision_param = "auto"`` means bfloat16 on CUDA and float32 on
    CPU; it is resolved by the training code, not here.
    """

    modules: dict[str, ModuleParallelism] = field(default_factory=dict)  # [parallelism.<name>] tables
    pipeline_schedule: str = _opt("1F1B", choices=("1F1B", "GPipe", "Interleaved1F1B"))
    # Interleaved1F1B: model chunks (virtual pipeline stages) per language pp rank, Megatron-LM's
    # virtual_pipeline_model_parallel_size; 1 with the other schedules
    virtual_stages: int = _opt(1, ge=1)
    module_schedule: str = _opt("1F1B", choices=("1F1B", "GPipe"))
    colocated_encoders: str = _opt("batch", choices=("batch", "inline"))
    mixed_precision_param: str = _opt("auto", choices=("auto", "float32", "bfloat16"))  # no fp16: no grad scaler
    mixed_precision_reduce: str = _opt("float32", choices=("float32", "bfloat16"))

    @classmethod
    def _section_class(cls, name: str, data: Mapping[str, Any], key: str, source: str) -> type:
        return ModuleParallelism


@dataclass(kw_only=True)
class TrainingConfig:
    """``[training]``: loop length, batch geometry and device.

    The length is given either as ``steps`` (optimizer steps) or as ``samples``: a budget in language-model
    samples, the unit of ``global_batch_size`` (one sequence of ``seq_len`` tokens, or one packed row with
    ``data.packing``; an encoder's batch varies with the images per sample and is not counted). ``samples``
    gives ``ceil(samples / global_batch_size)`` steps (Megatron-LM's ``--train-samples``, rounded up so that
    no sample of the budget is dropped). Exactly one of the two must be set.

    ``global_batch_size`` must be a multiple of ``microbatches`` (each module's data-parallel size must also
    divide the microbatch size; that needs the layout and is checked by the data module).
    ``max_grad_norm`` is the threshold of global gradient-norm clipping; ``0`` disables clipping.
    """

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the run: ``steps``, or ``ceil(samples / global_batch_size)``."""
        if self.steps is not None:
            return self.steps
        assert self.samples is not None, "training.steps or training.samples is set (checked by the loader)"
        return -(-self.samples // self.global_batch_size)

    def _config_problems(self) -> list[tuple[str, str]]:
        if self.steps is None and self.samples is None:
            return [
                (
                    "steps",
                    "the run length is missing; set '{p}.steps' (optimizer steps) or '{p}.samples' "
                    "(language-model samples, counted like global_batch_size)",
                )
            ]
        if self.steps is not None and self.samples is not None:
            return [
                (
                    "samples",
                    f"'{{p}}.steps' = {self.steps} is set too; give the run length once: remove "
                    "one of '{p}.steps' and '{p}.samples'",
                )
            ]
        gbs, mb = self.global_batch_size, self.microbatches
        if gbs % mb:
            return [
                (
                    "global_batch_size",
                    f"global_batch_size={gbs} is not divisible by microbatches={mb}, so the global batch does not "
                    f"split into equal microbatches; set '{{p}}.global_batch_size' to a multiple of {mb} (e.g. "
                    f"{_near_multiples(gbs, mb)}) or '{{p}}.microbatches' to a divisor of {gbs}",
                )
            ]
        return []

    steps: int | None = _opt(None, ge=1)
    samples: int | None = _opt(None, ge=1)  # budget in LM samples (sequences / packed rows) instead of steps
    global_batch_size: int = _opt(ge=1)
    microbatches: int = _opt(1, ge=1)
    seq_len: int = _opt(ge=2)
    max_grad_norm: float = _opt(1.0, ge=0, hint="0 disables gradient clipping")
    device: str = _opt("auto", choices=("auto", "cpu", "cuda"))
    max_skipped_steps: int = _opt(3, ge=1)  # consecutive non-finite steps skipped before the run stops
    collective_timeout_s: float = _opt(600.0, ge=5)  # a rank without progress this long ends the job
    # when set, only parameters whose full name matches one of these globs train (anywhere in the name:
    # "projector" trains vision.projector.*); the rest are frozen, like model.<module>.frozen
    trainable: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class OptimizerConfig:
    """``[optimizer]``: only AdamW is supported.

    ``lr`` > 0, ``betas`` two moment decay rates in [0, 1), ``eps`` > 0, ``weight_decay`` >= 0.
    """

    name: str = _opt("AdamW", choices=("AdamW",))
    lr: float = _opt(gt=0)
    betas: list[float] = _opt(  # noqa: RUF009 - _opt returns a dataclasses.field (a default_factory here)
        factory=lambda: [0.9, 0.95], length=2, ge=0, lt=1, hint="AdamW's moment decay rates, e.g. [0.9, 0.95]"
    )
    eps: float = _opt(1e-8, gt=0, hint="AdamW's denominator epsilon, e.g. 1e-8")
    weight_decay: float = _opt(0.0, ge=0, hint="0 disables weight decay")


@dataclass(kw_only=True)
class LRScheduleConfig:
    """``[lr_schedule]``: linear warmup followed by a decay to ``min_lr_ratio * lr``.

    ``warmup_steps`` may not exceed the run's optimizer steps (``training.total_steps``).
    """

    warmup_steps: int = _opt(0, ge=0)
    decay: str = _opt("cosine", choices=("cosine", "linear", "constant"))
    min_lr_ratio: float = _opt(0.1, ge=0, le=1)


@dataclass(kw_only=True)
class DataConfig:
    """``[data]``: WebDataset shards and tokenizer (existence checked by the data module)."""

    # WebDataset shards: a .tar file, a directory of .tar files, a glob or a brace pattern (cc12m-{0000..0099}.tar),
    # or a list of those
    path: str | list[str]
    tokenizer: str  # a directory holding tokenizer.json, or the tokenizer.json file
    max_images_per_sample: int = _opt(1, ge=1)
    shuffle: bool = True
    shuffle_buffer: int = _opt(1000, ge=1, hint="records held (encoded) to shuffle the stream")
    prefetch: int = _opt(2, ge=0, hint="batches a background thread keeps ready; 0 loads in the training loop")
    packing: bool = False  # pack several samples per row (THD) with cu_seqlens; attention never crosses documents


@dataclass(kw_only=True)
class CheckpointConfig:
    """``[checkpoint]``: distributed checkpoints (torch.distributed.checkpoint), as torchtitan's ``[checkpoint]``.

    Attributes:
        enable: save every ``interval`` steps and at the last step, and resume from ``folder`` when it holds a
            complete checkpoint.
        folder: checkpoint directory; a relative path is taken under ``job.output_dir``. Each checkpoint is a
            subdirectory ``step-N``.
        interval: steps between saves (>= 1).
        keep_latest_k: keep only the newest k complete checkpoints; 0 keeps all.
        load_step: the step to resume from; -1 = the newest complete checkpoint in ``folder``.
        initial_load_path: a model-only checkpoint (e.g. written by ``scripts/convert_hf.py import``) whose
            weights initialise the model when ``folder`` has no checkpoint yet; "" = none.
    """

    enable: bool = False
    folder: str = "checkpoint"
    interval: int = _opt(500, ge=1)
    keep_latest_k: int = _opt(0, ge=0)
    load_step: int = _opt(-1, ge=-1)
    initial_load_path: str = ""


@dataclass(kw_only=True)
class MetricsConfig:
    """``[metrics]``: what is logged, how often and where (:mod:`mimo_titan.train.metrics`).

    Attributes:
        log_freq: rank 0 logs (and writes a metrics record) every ``log_freq`` steps, and at the first step.
        jsonl: the file of one JSON line per logged step with every metric; a relative path is taken under
            ``job.output_dir``; "" writes none.
        tensorboard: also write TensorBoard scalars (needs ``pip install tensorboard``).
        tensorboard_dir: TensorBoard's folder; a relative path is taken under ``job.output_dir``.
        peak_tflops: the device's peak TFLOP/s for MFU; none detects an A100 / H100 / H200 / B200 (BF16 dense) and
            reports no MFU elsewhere (on CPU among others).
        history_steps: the step records :func:`~mimo_titan.train.trainer.train` keeps in memory and returns (the
            newest); the JSONL file has every logged step.
    """

    log_freq: int = _opt(1, ge=1)
    jsonl: str = "metrics.jsonl"
    tensorboard: bool = False
    tensorboard_dir: str = "tensorboard"
    peak_tflops: float | None = _opt(None, gt=0, hint="the device's peak TFLOP/s, e.g. 989.5 (H100 SXM, BF16 dense)")
    history_steps: int = _opt(100, ge=1)

    def _config_problems(self) -> list[tuple[str, str]]:
        if self.tensorboard and not self.tensorboard_dir:
            return [("tensorboard_dir", "metrics.tensorboard = true needs a folder; set '{p}.tensorboard_dir'")]
        return []


@dataclass(kw_only=True)
class ValidationDataConfig:
    """``[validation.data]``: the validation shards. The tokenizer, ``max_images_per_sample`` and ``packing`` are
    those of ``[data]``; the stream is read in order (no shuffle) from its start at every validation."""

    # as data.path: a .tar file, a directory of .tar files, a glob or a brace pattern, or a list of those
    path: str | list[str] = ""


@dataclass(kw_only=True)
class ValidationConfig:
    """``[validation]``: a forward-only loss on held-out data during training (torchtitan's ``[validation]``).

    Attributes:
        enable: validate every ``freq`` steps and after the last step.
        freq: optimizer steps between validations.
        steps: global batches per validation (of ``training.global_batch_size`` samples, split into
            ``training.microbatches`` like a training batch); -1 reads the validation data once (until its stream
            wraps: the last batch may repeat a few samples from the start).
        data: ``[validation.data]``, the shards.
    """

    enable: bool = False
    freq: int = _opt(100, ge=1)
    steps: int = _opt(1, ge=-1, hint="global batches per validation; -1 = one pass over the validation data")
    data: ValidationDataConfig = field(default_factory=ValidationDataConfig)

    def _config_problems(self) -> list[tuple[str, str]]:
        if self.steps == 0:
            return [("steps", "0 batches validate nothing; set '{p}.steps' >= 1, or -1 for one pass over the data")]
        if self.enable and not self.data.path:
            return [
                (
                    "data.path",
                    "validation.enable = true needs validation shards; set '{p}.data.path' (a .tar, directory, "
                    "glob or brace pattern, like data.path) or set '{p}.enable' = false",
                )
            ]
        return []


@dataclass(kw_only=True)
class KernelsConfig:
    """``[kernels]``: which implementation the MoE permutation and zigzag CP kernels use.

    ``backend = "auto"`` runs the Triton kernels on CUDA tensors and the plain-torch references elsewhere;
    ``"triton"`` forces the Triton kernels (on CPU they run in Triton's interpreter, ``TRITON_INTERPRET=1``, which
    ``scripts/train.py`` sets); ``"torch"`` forces the references. The environment variable
    ``MIMO_TITAN_KERNELS`` wins over this key.
    """

    backend: str = _opt("auto", choices=("auto", "triton", "torch"))


@dataclass(kw_only=True)
class Config:
    """Root of the configuration tree; one attribute per TOML table."""

    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig
    parallelism: ParallelismConfig
    training: TrainingConfig
    optimizer: OptimizerConfig
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    data: DataConfig
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)

    def _config_problems(self) -> list[tuple[str, str]]:
        """Checks that relate two sections (and need no parallel layout); keys are full dotted keys."""
        models, layouts = list(self.model.modules), list(self.parallelism.modules)
        if set(models) != set(layouts):
            no_layout = [n for n in models if n not in layouts]
            if no_layout:
                return [
                    (
                        "parallelism.modules",
                        f"module '{no_layout[0]}' ([model.{no_layout[0]}]) has no layout; add a "
                        f"[parallelism.{no_layout[0]}] table with rank_offset and num_ranks",
                    )
                ]
            extra = next(n for n in layouts if n not in models)
            return [
                (
                    "parallelism.modules",
                    f"[parallelism.{extra}] lays out a module that no [model.{extra}] table defines; add the model "
                    "table or remove the layout",
                )
            ]
        t, warmup = self.training, self.lr_schedule.warmup_steps
        total = t.total_steps
        if warmup > total:
            run = (
                f"training.steps={t.steps}"
                if t.steps is not None
                else f"training.samples={t.samples} / training.global_batch_size={t.global_batch_size}, rounded up"
            )
            return [
                (
                    "lr_schedule.warmup_steps",
                    f"warmup_steps={warmup} is longer than the run of {_plural(total, 'optimizer step')} ({run}), so "
                    f"the learning rate would never reach its peak; set 'lr_schedule.warmup_steps' to at most {total} "
                    "or lengthen the run",
                )
            ]
        return []

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as a plain nested dict (e.g. for logging).

        Returns:
            A deep copy made of dicts, lists and scalars only.
        """
        out = dataclasses.asdict(self)
        for section in ("model", "parallelism"):  # [model.<name>] tables sit under their section, as in the TOML
            out[section] = {**out[section].pop("modules"), **out[section]}
        return out


# --------------------------------------------------------------------------
# Generic machinery
# --------------------------------------------------------------------------


class _Ctx:
    """Where values come from, for error messages."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.overridden: dict[str, str] = {}  # dotted key -> override token
        self.built: list[tuple[Any, str]] = []  # (table, dotted path), innermost first: cross-checked last

    def where(self, key: str) -> str:
        text = f"'{key}' in {self.source}"
        token = self.overridden.get(key)
        if token is not None:
            text += f" (set by override '{token}')"
        return text


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_str_or_list(tp: Any) -> bool:
    """``str | list[str]`` (``data.path``: one entry or several)."""
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and set(typing.get_args(tp)) == {str, list[str]}


def _optional_inner(tp: Any) -> Any | None:
    """For ``X | None`` return ``X``; otherwise ``None``."""
    if _is_str_or_list(tp):
        return None
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
        raise TypeError(f"unsupported union type in config schema: {tp!r}")
    return None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING


def _describe_type(tp: Any) -> str:
    if _is_str_or_list(tp):
        return "string or list of strings"
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_describe_type(inner)} or none"
    if tp is bool:
        return "bool (true/false)"
    if tp is int:
        return "int"
    if tp is float:
        return "float"
    if tp is str:
        return "string"
    if typing.get_origin(tp) is list:
        (elem,) = typing.get_args(tp)
        return f"list of {_describe_type(elem)}"
    if _is_dataclass_type(tp):
        return "table"
    return repr(tp)


def _describe_value(value: Any) -> str:
    if isinstance(value, bool):
        kind = "bool"
    elif isinstance(value, int):
        kind = "int"
    elif isinstance(value, float):
        kind = "float"
    elif isinstance(value, str):
        kind = "string"
    elif isinstance(value, list):
        kind = "array"
    elif isinstance(value, dict):
        kind = "table"
    elif value is None:
        return "none"
    else:
        kind = type(value).__name__
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{kind} {shown}"


def _type_error(tp: Any, value: Any, key: str, ctx: _Ctx) -> ConfigError:
    expected = _describe_type(tp)
    if _is_dataclass_type(tp):
        fix = f"write it as a [{key}] table"
    elif isinstance(value, dict):
        fix = f"write '{key.rsplit('.', 1)[-1]} = <value>' instead of a [{key}] table"
    else:
        fix = f"give it a value of type {expected}"
    return ConfigError(f"wrong type for {ctx.where(key)}: expected {expected}, got {_describe_value(value)}; {fix}")


def _coerce(value: Any, tp: Any, key: str, ctx: _Ctx) -> Any:
    """Check/convert a raw (TOML or parsed-override) value to the field type ``tp``."""
    if _is_str_or_list(tp):
        if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            return value
        raise _type_error(tp, value, key, ctx)
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _coerce(value, inner, key, ctx)
    if _is_dataclass_type(tp):
        return _build(tp, value, key, ctx)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is list:
        (elem,) = typing.get_args(tp)
        if isinstance(value, list):
            try:
                return [_coerce(v, elem, f"{key}[{i}]", ctx) for i, v in enumerate(value)]
            except ConfigError:
                pass  # report the whole list below
    else:  # pragma: no cover - schema bug
        raise TypeError(f"unsupported type {tp!r} for config key {key!r}")
    raise _type_error(tp, value, key, ctx)


_BOUNDS = (
    ("ge", lambda v, b: v >= b, ">="),
    ("gt", lambda v, b: v > b, ">"),
    ("le", lambda v, b: v <= b, "<="),
    ("lt", lambda v, b: v < b, "<"),
)


def _check_constraints(value: Any, meta: Mapping[str, Any], key: str, ctx: _Ctx) -> Any:
    """Apply choices/length/range metadata; returns the (possibly canonicalised) value.

    Every float must be finite. The bounds apply to a number, or to each element of a list; the message gives
    all bounds of the key (and its ``hint``), not only the one that failed.
    """
    if value is None:
        return value
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        canonical = {c.lower(): c for c in choices}.get(value.lower())
        if canonical is None:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"invalid value {value!r} for {ctx.where(key)}; use one of: {allowed}")
        value = canonical
    length = meta.get("length")
    if length is not None and len(value) != length:
        raise ConfigError(
            f"wrong length for {ctx.where(key)}: expected exactly {length} values, "
            f"got {len(value)} ({value!r}); give a list of {length} numbers"
        )
    is_list = isinstance(value, list)
    bounds = [(ok, sym, meta[name]) for name, ok, sym in _BOUNDS if name in meta]
    for i, item in enumerate(value if is_list else [value]):
        shown = f"{item!r} (element {i} of {value!r})" if is_list else repr(item)
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"non-finite value {shown} for {ctx.where(key)}; give a finite number")
        if all(ok(item, bound) for ok, _, bound in bounds):
            continue
        rule = " and ".join(f"{sym} {bound}" for _, sym, bound in bounds)
        hint = f" ({meta['hint']})" if "hint" in meta else ""
        raise ConfigError(
            f"out-of-range value {shown} for {ctx.where(key)}; {'each element' if is_list else 'it'} must be "
            f"{rule}{hint}"
        )
    return value


def _all_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key and section path of the schema rooted at ``cls``."""
    out: list[str] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == getattr(cls, "_open", None):  # tables named by the user: no fixed paths
            continue
        path = _join(prefix, f.name)
        out.append(path)
        if _is_dataclass_type(hints[f.name]):
            out.extend(_all_paths(hints[f.name], path))
    return out


def _suggest(cls: type, prefix: str, name: str) -> str:
    """A 'did you mean' / 'valid keys are' hint for unknown ``prefix.name``.

    Preference order: the same name in another section (``training.lr`` ->
    ``optimizer.lr``), a close name in this section, a close name anywhere.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    if names == ["modules"]:  # [model] / [parallelism] hold one table per module, named by the config
        return (
            f"a module needs its own TOML tables ([model.{name}] with a type, and [parallelism.{name}]); overrides "
            "only change the modules a config already has"
        )
    wanted = _join(prefix, name)
    everywhere = [p for p in _all_paths(Config) if p != wanted]
    same_name = [p for p in everywhere if p.rsplit(".", 1)[-1] == name]
    if same_name:
        return "did you mean " + " or ".join(f"'{p}'" for p in same_name) + "?"
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        return f"did you mean '{_join(prefix, close[0])}'?"
    by_last: dict[str, list[str]] = {}
    for p in everywhere:
        by_last.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    close = difflib.get_close_matches(name, list(by_last), n=1, cutoff=0.75)
    if close:
        return "did you mean " + " or ".join(f"'{p}'" for p in by_last[close[0]]) + "?"
    where = f"[{prefix}]" if prefix else "the top level"
    valid = ", ".join(f"'{_join(prefix, n)}'" for n in names)
    return f"valid keys in {where} are: {valid}"


def _build(cls: type, data: Any, prefix: str, ctx: _Ctx) -> Any:
    """Recursively convert a raw dict into dataclass ``cls``, validating as we go."""
    if not isinstance(data, dict):
        raise _type_error(cls, data, prefix, ctx)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    open_field = getattr(cls, "_open", None)  # sub-tables with names of the user's choosing (_OpenSections)
    sections: dict[str, Any] = {}
    for name in data:
        key = _join(prefix, name)
        if open_field is not None and (name not in fields or name == open_field) and isinstance(data[name], dict):
            if name == open_field:
                raise ConfigError(f"'{key}' in {ctx.source} is a reserved name; give the table another name")
            section_cls = cast("type[_OpenSections]", cls)._section_class(name, data[name], key, ctx.source)
            sections[name] = _build(section_cls, data[name], key, ctx)
            continue
        if name not in fields:
            raise ConfigError(f"unknown key '{key}' in {ctx.source}; {_suggest(cls, prefix, name)}")
    kwargs: dict[str, Any] = {}
    if open_field is not None:
        kwargs[open_field] = sections
    for name, f in fields.items():
        if name == open_field:
            continue
        key = _join(prefix, name)
        tp = hints[name]
        if name in data:
            value = _coerce(data[name], tp, key, ctx)
            kwargs[name] = _check_constraints(value, f.metadata, key, ctx)
        elif not _has_default(f):
            if _is_dataclass_type(tp):
                required = [g.name for g in dataclasses.fields(tp) if not _has_default(g)]
                if getattr(tp, "_open", None) is not None:  # tables named by the user
                    what = f"one [{key}.<name>] table per module, e.g. [{key}.vision] and [{key}.language]"
                else:
                    what = f"the [{key}] table with at least: {', '.join(required)}"
                raise ConfigError(f"missing required section '{key}' in {ctx.source}; add {what}")
            section = f"[{prefix}]" if prefix else "the top level"
            raise ConfigError(
                f"missing required key '{key}' in {ctx.source}; add '{name} = <{_describe_type(tp)}>' under {section}"
            )
    obj = cls(**kwargs)
    ctx.built.append((obj, prefix))
    return obj


def _check_cross_keys(obj: Any, prefix: str, ctx: _Ctx) -> None:
    """Raise the first problem reported by ``obj._config_problems()``, if it has one.

    A dataclass may define ``_config_problems(self) -> list[tuple[str, str]]``
    for checks that involve several of its keys; each pair is a key relative
    to the table (dotted for sub-tables) and a "problem; fix" text in which
    ``{p}`` stands for the table's dotted path. These checks run after every
    key of the whole config passed its own checks (so they may rely on them),
    innermost tables first. Other keys of the table that the text names and
    that an override set are pointed out too.
    """
    problems = getattr(obj, "_config_problems", None)
    if problems is None:
        return
    for rel, text in problems():
        value: Any = obj
        for part in rel.split("."):
            value = getattr(value, part)
        key = _join(prefix, rel)
        text = text.replace("{p}", prefix)
        notes = [
            f"'{other}' was set by override '{token}'"
            for other, token in ctx.overridden.items()
            if other != key and _names_key(text, other, prefix)
        ]
        note = f" (note: {'; '.join(notes)})" if notes else ""
        if isinstance(value, dict):  # a table of modules: its repr says nothing the text does not
            raise ConfigError(f"{ctx.where(prefix) if prefix else ctx.source}: {text}{note}")
        raise ConfigError(f"invalid value {value!r} for {ctx.where(key)}: {text}{note}")


def _names_key(text: str, key: str, prefix: str) -> bool:
    """Whether ``text`` (a problem of table ``prefix``) names dotted ``key``, in full or relative to the table."""
    names = [key]
    if prefix and key.startswith(prefix + "."):
        names.append(key[len(prefix) + 1 :])
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", text) for n in names)


# --------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------

_TRUE = {"true", "1"}
_FALSE = {"false", "0"}


def _parse_text(text: str, tp: Any) -> Any:
    """Parse an override's text for field type ``tp``; raises ValueError."""
    if _is_str_or_list(tp):  # a string verbatim; a TOML-style list in brackets
        s = text.strip()
        return _parse_text(s, list[str]) if s.startswith("[") and s.endswith("]") else text
    inner = _optional_inner(tp)
    if inner is not None:
        if text.strip().lower() in ("none", "null"):
            return None
        return _parse_text(text, inner)
    if tp is str:
        return text
    s = text.strip()
    if tp is bool:
        if s.lower() in _TRUE:
            return True
        if s.lower() in _FALSE:
            return False
        raise ValueError("expected true/false/1/0")
    if tp is int:
        return int(s)
    if tp is float:
        return float(s)
    if typing.get_origin(tp) is list:
        (elem,) = typing.get_args(tp)
        if s.startswith("[") and s.endswith("]"):
            s = s[1:-1].strip()
        if not s:
            return []
        if elem is str:  # each item trimmed, one pair of matching quotes dropped (["a", 'b'] as TOML writes it)
            items = [part.strip() for part in s.split(",")]
            return [p[1:-1] if len(p) >= 2 and p[0] == p[-1] and p[0] in "'\"" else p for p in items]
        return [_parse_text(part, elem) for part in s.split(",")]
    raise ValueError(f"cannot parse values of type {tp!r}")  # pragma: no cover


def _split_overrides(tokens: Sequence[str], source: str) -> list[tuple[str, str, str]]:
    """Turn override tokens into ``(dotted_key, value_text, shown_token)`` triples."""
    out: list[tuple[str, str, str]] = []
    i = 0
    tokens = list(tokens)
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) <= 2:
            raise ConfigError(
                f"cannot parse override '{tok}' for {source}; "
                "write overrides as '--section.key=value' or '--section.key value'"
            )
        body = tok[2:]
        if "=" in body:
            key, text = body.split("=", 1)
            shown = tok
            i += 1
        else:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ConfigError(f"override '{tok}' for {source} has no value; write '{tok}=VALUE' or '{tok} VALUE'")
            key, text = body, tokens[i + 1]
            shown = f"{tok} {text}"
            i += 2
        out.append((key.strip(), text, shown))
    return out


def _apply_override(raw: dict, key: str, text: str, shown: str, ctx: _Ctx) -> None:
    parts = key.split(".")
    cls: type = Config
    tp: Any = Config
    node: Any = raw  # the raw table at the current depth (open sections take their type from it)
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not _is_dataclass_type(tp):
            raise ConfigError(
                f"unknown key '{key}' in override '{shown}' for {ctx.source}: "
                f"'{prefix}' is a value, not a section; override '--{prefix}=...' instead"
            )
        cls = tp
        names = {f.name for f in dataclasses.fields(cls)}
        child = node.get(part) if isinstance(node, dict) else None
        open_field = getattr(cls, "_open", None)
        if open_field is not None and part not in names and isinstance(child, dict):
            tp = cast("type[_OpenSections]", cls)._section_class(part, child, _join(prefix, part), ctx.source)
            node = child
            continue
        if part not in names or part == open_field:
            raise ConfigError(
                f"unknown key '{key}' in override '{shown}' for {ctx.source}; {_suggest(cls, prefix, part)}"
            )
        tp = _hints(cls)[part]
        node = child
    if _is_dataclass_type(tp):
        raise ConfigError(
            f"override '{shown}' for {ctx.source} targets section '{key}', not a key; "
            f"override one of its keys, e.g. '--{_join(key, dataclasses.fields(tp)[0].name)}=...'"
        )
    try:
        value = _parse_text(text, tp)
    except ValueError as exc:
        raise ConfigError(
            f"cannot parse value {text!r} of override '{shown}' for '{key}' in {ctx.source}: "
            f"expected {_describe_type(tp)} ({exc})"
        ) from None
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            sub = ".".join(parts[: depth + 1])
            raise ConfigError(
                f"cannot apply override '{shown}': '{sub}' in {ctx.source} is "
                f"{_describe_value(child)}, not a table; make '{sub}' a [{sub}] table"
            )
        node = child
    node[parts[-1]] = value
    ctx.overridden[key] = shown


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------


def config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = (), source: str = "<dict>") -> Config:
    """Build a :class:`Config` from an already-parsed TOML-like dict.

    Useful for tests and programmatic construction; :func:`load_config` is a
    thin wrapper that reads the TOML file and calls this.

    Args:
        data: Nested mapping with the same layout as the TOML file. Not mutated.
        overrides: Override tokens such as ``"--training.steps=10"`` or the
            pair ``"--optimizer.lr", "1e-4"``.
        source: Name of the config source used in error messages.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: on unknown keys, wrong types, missing required keys,
            values outside an allowed set or range, or bad overrides.
    """
    ctx = _Ctx(str(source))
    if not isinstance(data, Mapping):
        raise ConfigError(f"config {ctx.source} must be a table, got {_describe_value(data)}")
    raw = copy.deepcopy(dict(data))
    for key, text, shown in _split_overrides(overrides, ctx.source):
        _apply_override(raw, key, text, shown, ctx)
    cfg = _build(Config, raw, "", ctx)
    for obj, prefix in ctx.built:  # every key is in range: now the checks that relate several keys
        _check_cross_keys(obj, prefix, ctx)
    return cfg


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Load a TOML config file (or a ``.json`` one written by :func:`save_config`), apply overrides and validate it.

    Args:
        path: Path to the TOML file, or to a ``config.json`` (any name ending in ``.json``): the resolved config that
            training saves next to its checkpoints (``<checkpoint folder>/config.json``).
        overrides: Override tokens, e.g. ``["--training.steps=10",
            "--optimizer.lr", "1e-4"]``; applied on top of the file's values
            before validation.

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: if the file does not exist, is not valid TOML (JSON), or has an
            unknown key, a wrongly typed value, a missing required key, a
            value outside its allowed set or range; or if an override names an
            unknown key or has an unparsable value.
    """
    source = os.fspath(path)
    if not os.path.exists(source):
        raise ConfigError(f"config file '{source}' does not exist; check the path given to --config")
    if os.path.isdir(source):
        saved = os.path.join(source, "config.json")
        hint = f" (a checkpoint folder's saved config is {saved})" if os.path.isfile(saved) else ""
        raise ConfigError(f"config path '{source}' is a directory; pass a .toml file or a config.json{hint}")
    is_json = source.lower().endswith(".json")
    try:
        if is_json:
            with open(source, encoding="utf-8") as fh:
                data = json.load(fh)
        else:
            with open(source, "rb") as fh:
                data = tomli.load(fh)
    except tomli.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}; fix the syntax") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source} is not valid JSON: {exc}; fix the syntax or pass the TOML config") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file '{source}': {exc}") from None
    return config_from_dict(data, overrides, source=source)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg`` as JSON (:meth:`Config.to_dict`: every key, defaults included, ``none`` as ``null``) to ``path``,
    which :func:`load_config` reads back to an equal :class:`Config`.

    JSON rather than TOML because TOML has no null (``head_dim``, ``training.samples``, ... may be unset). The file is
    written to ``<path>.tmp`` and renamed, so a reader never sees half a file. Relative paths in the config
    (``data.path``, ``data.tokenizer``, ``job.output_dir``) stay relative to the directory training was started in.

    Raises:
        OSError: the file cannot be written.
    """
    target = os.fspath(path)
    tmp = target + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(cfg.to_dict(), fh, indent=2)
        fh.write("\n")
    os.replace(tmp, target)


_USAGE = (
    "usage: train.py --config PATH [--section.key=VALUE | --section.key VALUE ...]\n\n"
    "Load a TOML training config and apply dotted-key overrides, e.g.\n"
    "  --training.steps=10 --optimizer.lr 1e-4 --parallelism.language.dp_shard=2\n"
    "PATH may also be the config.json that a run with checkpoint.enable saves in its checkpoint folder.\n"
)


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse ``--config PATH`` plus overrides from the command line.

    Args:
        argv: Arguments without the program name; defaults to ``sys.argv[1:]``.
            ``--config PATH`` or ``--config=PATH`` is required; every other
            argument is an override (``--section.key=value`` or
            ``--section.key value``). ``-h``/``--help`` prints usage and every config key with its type and
            default (:func:`mimo_titan.config_help.config_keys_help`), and exits.

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: if ``--config`` is missing or given twice, or for any
            error :func:`load_config` raises.
        SystemExit: after printing usage for ``-h``/``--help``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    config_path: str | None = None
    overrides: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if tok in ("-h", "--help"):
            from mimo_titan.config_help import config_keys_help  # imports this module: loaded on demand

            print(_USAGE + "\n" + config_keys_help(), end="")
            raise SystemExit(0)
        if tok == "--config" or tok.startswith("--config="):
            if config_path is not None:
                raise ConfigError("--config given more than once; pass a single config file")
            if tok == "--config":
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise ConfigError("--config needs a path: --config PATH")
                config_path = args[i + 1]
                i += 2
            else:
                config_path = tok.split("=", 1)[1]
                i += 1
            continue
        overrides.append(tok)
        # keep the two-token form's value with its key
        if tok.startswith("--") and "=" not in tok and i + 1 < len(args) and not args[i + 1].startswith("--"):
            overrides.append(args[i + 1])
            i += 1
        i += 1
    if config_path is None:
        raise ConfigError("missing required argument --config PATH (the TOML training config)")
    return load_config(config_path, overrides)
