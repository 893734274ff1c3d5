"""Model FLOPs of one training step, per module, as pure functions of the config (no model, no process group).

The count is the one used for model FLOPs utilisation (MFU): the matrix multiplications the model *needs*, at two
FLOPs per multiply-add, not what a kernel happens to run (no recomputation from activation checkpointing, no causal
or padding savings in attention, no elementwise work).

**Linear layers** (Kaplan et al., "Scaling Laws for Neural Language Models", 2020, sec. 2.1; PaLM, Chowdhery et al.
2022, appendix B): a weight of ``N`` parameters applied to one token costs ``2N`` FLOPs forward and ``4N``
backward (``2N`` for the input gradient, ``2N`` for the weight gradient), so ``6N`` per trained token. Biases and
norm scales are counted with the weights (a rounding error), as torchtitan's ``get_num_flop_per_token`` does;
lookup tables (token embeddings, learned positions) are not matmuls and are left out.

**Attention core** (PaLM appendix B; torchtitan's ``12 · L · H · Q · T``): per token and layer, ``QKᵀ`` and ``AV``
each cost ``2 · H · Q · T`` FLOPs forward (``H`` query heads of width ``Q``, ``T`` keys), and their backward twice
that, so ``12 · H · Q · T`` per trained token; grouped-query attention does not lower it (every query head sees
``T`` keys). The causal mask is not credited (the usual convention).

**Frozen modules** (``model.<name>.frozen``, ``training.trainable``) skip the weight gradients. Each part of the
model runs in one of three modes (:func:`part_modes`), by what trains *upstream* of it in the forward order
encoder → projector → language model:

================  ==============================================  ==============  ================
mode              when                                            per parameter   attention core
================  ==============================================  ==============  ================
``"train"``       some parameter of the part trains               6               12 · H · Q · T
``"backprop"``    frozen, but a part before it trains: its input  4               12 · H · Q · T
                  gradient still flows back (a frozen LM feeding
                  a trained encoder its gradient)
``"forward"``     frozen and nothing before it trains             2               4 · H · Q · T
================  ==============================================  ==============  ================

The attention core has no weights, so its backward is all input gradient (``"backprop"`` costs as much as
``"train"``). A part that trains only some of its parameters (``training.trainable`` globs inside a module) is
counted as ``"train"`` (an upper bound). The parts are an encoder's tower and its projector, and the language
model: LLaVA's stage 1 (only the projectors train) counts the towers ``"forward"``, the projectors ``"train"`` and
the frozen LM ``"backprop"`` (the projectors before it need its input gradient).

**Mixture of experts** (torchtitan's ``get_moe_model_nparams_and_flops``): the active parameters of a token are the
router, the shared expert and ``top_k / num_experts`` of the routed experts.

Units: a *token* of the language model is one position of a row (:func:`lm_flops_per_token`); the ViT is counted
per image of ``P = (image_size / patch_size)²`` patches (:func:`vit_flops_per_image`); the audio encoder per clip
of ``F`` log-mel frames (10 ms), which its stride-2 convolution turns into ``S = ceil(F / 2)`` encoder frames
(:func:`audio_flops_per_clip`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mimo_titan.config import AudioModelConfig, Config, LanguageModelConfig, MoEConfig, VisionModelConfig

__all__ = [
    "TRAIN",
    "BACKPROP",
    "FORWARD",
    "MATMUL_FLOPS_PER_PARAM",
    "ATTENTION_FLOPS_FACTOR",
    "PROJECTOR_PREFIX",
    "ParamCount",
    "lm_params",
    "vit_params",
    "audio_params",
    "audio_conv1_params",
    "module_params",
    "part_modes",
    "lm_flops_per_token",
    "vit_flops_per_image",
    "audio_flops_per_clip",
]

TRAIN, BACKPROP, FORWARD = "train", "backprop", "forward"
#: FLOPs per parameter and token of a linear layer, by mode (forward 2; input gradient 2; weight gradient 2)
MATMUL_FLOPS_PER_PARAM = {TRAIN: 6, BACKPROP: 4, FORWARD: 2}
#: the attention core's FLOPs per token, layer and ``H · Q · T``, by mode (forward 4; backward 8)
ATTENTION_FLOPS_FACTOR = {TRAIN: 12, BACKPROP: 12, FORWARD: 4}
#: an encoder's projector parameters live under this name, by encoder type (the rest is its tower)
PROJECTOR_PREFIX = {"vit": "multi_modal_projector.", "audio": "projector."}


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of one module, as the model builds it.

    Attributes:
        total: every parameter (``numel`` of the built module; a tied embedding counted once).
        lookup: parameters that are table lookups, not matmuls (token embeddings, learned positions).
        active: the parameters that multiply each token (each patch, each encoder frame) in the forward: ``total``
            less ``lookup``, with routed experts scaled by ``top_k / num_experts``, plus the LM head when it is tied
            to the embedding (its matmul still runs). For encoders the projector is not included: see
            ``projector``.
        projector: an encoder's projector parameters (applied per LM token the encoder emits); 0 for the LM.
        attention_width: ``layers · heads · head_dim`` (the attention core's size; ``× T`` per token).
    """

    total: int
    lookup: int
    active: int
    projector: int = 0
    attention_width: int = 0


def _moe_params(hidden: int, moe: MoEConfig) -> tuple[int, int]:
    """``(total, active per token)`` of one MoE layer: router ``[E, H]``, routed SwiGLU experts ``3 · E · H · I``
    (``top_k`` of them active), the shared expert ``3 · H · I_shared``."""
    routed = 3 * hidden * moe.intermediate_size
    shared = 3 * hidden * moe.shared_expert_intermediate_size
    router = moe.num_experts * hidden
    return router + moe.num_experts * routed + shared, router + moe.top_k * routed + shared


def lm_params(cfg: LanguageModelConfig) -> ParamCount:
    """Parameters of the decoder LM of ``[model.<language>]`` (:class:`~mimo_titan.models.decoder.DecoderLM`): per
    layer two RMSNorms, q / k / v / o projections (GQA: k and v have ``num_kv_heads`` heads), optional q / k norms,
    a SwiGLU or MoE MLP; the token embedding, a final norm and the LM head (shared with the embedding when tied).
    """
    h, hd = cfg.hidden_size, cfg.head_dim or cfg.hidden_size // cfg.num_heads
    attn = h * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + (2 * hd if cfg.qk_norm else 0)
    total = active = 0
    for i in range(cfg.num_layers):
        if cfg.moe.num_experts > 0 and cfg.moe.is_moe_layer(i):
            mlp_total, mlp_active = _moe_params(h, cfg.moe)
        else:
            mlp_total = mlp_active = 3 * h * cfg.intermediate_size
        total += 2 * h + attn + mlp_total
        active += 2 * h + attn + mlp_active
    embed = cfg.vocab_size * h
    total += embed + h + (0 if cfg.tie_word_embeddings else embed)
    active += h + embed  # the final norm and the head (a matmul even when it shares the embedding's weight)
    return ParamCount(total, embed, active, 0, cfg.num_layers * cfg.num_heads * hd)


def _projector_params(in_dim: int, hidden: int, out_dim: int) -> int:
    return in_dim * hidden + hidden + hidden * out_dim + out_dim


def vit_params(cfg: VisionModelConfig, lm_hidden_size: int) -> ParamCount:
    """Parameters of a ViT encoder and its projector (:class:`~mimo_titan.models.vit.VisionEncoder`): the patch
    embedding (a ``C·p·p → D`` linear with bias), learned positions (a lookup), per layer two LayerNorms, q / k / v /
    out with biases and a GELU MLP (or an MoE), a final LayerNorm; the projector ``D → I_proj → H``."""
    d, num_patches = cfg.hidden_size, (cfg.image_size // cfg.patch_size) ** 2
    patch = cfg.num_channels * cfg.patch_size**2 * d + d
    attn = 4 * (d * d + d)
    total = active = patch + 2 * d
    for i in range(cfg.num_layers):
        if cfg.moe.num_experts > 0 and cfg.moe.is_moe_layer(i):
            mlp_total, mlp_active = _moe_params(d, cfg.moe)
        else:
            mlp_total = mlp_active = 2 * d * cfg.intermediate_size + cfg.intermediate_size + d
        total += 4 * d + attn + mlp_total
        active += 4 * d + attn + mlp_active
    proj = _projector_params(d, cfg.projector_intermediate_size, lm_hidden_size)
    positions = num_patches * d
    return ParamCount(total + positions + proj, positions, active, proj, cfg.num_layers * d)


def audio_params(cfg: AudioModelConfig, lm_hidden_size: int) -> ParamCount:
    """Parameters of a Whisper encoder and its projector (:class:`~mimo_titan.models.audio.AudioEncoder`).

    ``active`` is the per-encoder-frame part (``conv2``, the layers, the final LayerNorm); ``conv1`` runs at the
    mel-frame rate and is returned by :func:`audio_conv1_params`. The sinusoidal positions are a buffer, not a
    parameter. Per layer: two LayerNorms, q / v / out with bias and k without (Whisper), fc1 / fc2 with biases.
    """
    d, inter = cfg.hidden_size, cfg.intermediate_size
    conv2 = 3 * d * d + d
    layer = 4 * d + (4 * d * d + 3 * d) + (2 * d * inter + inter + d)
    active = conv2 + cfg.num_layers * layer + 2 * d
    proj = _projector_params(d, cfg.projector_intermediate_size, lm_hidden_size)
    return ParamCount(audio_conv1_params(cfg) + active + proj, 0, active, proj, cfg.num_layers * d)


def audio_conv1_params(cfg: AudioModelConfig) -> int:
    """Parameters of Whisper's first convolution (kernel 3, ``num_mel_bins → hidden_size``, with bias), applied at
    every mel frame."""
    return 3 * cfg.num_mel_bins * cfg.hidden_size + cfg.hidden_size


def module_params(cfg: Config, name: str) -> ParamCount:
    """:class:`ParamCount` of module ``name`` of ``cfg`` (``[model.<name>]``, any type).

    Raises:
        ValueError: a module type this model of FLOPs does not know (a new encoder type must add its count here).
    """
    section, lm_hidden = getattr(cfg.model, name), cfg.model.language.hidden_size
    if section.type == "decoder":
        return lm_params(section)
    if section.type == "vit":
        return vit_params(section, lm_hidden)
    if section.type == "audio":
        return audio_params(section, lm_hidden)
    raise ValueError(f"model.{name}.type={section.type!r}: mimo_titan.train.flops has no FLOPs model for it")


def part_modes(cfg: Config) -> dict[str, dict[str, str]]:
    """The mode (``"train"`` / ``"backprop"`` / ``"forward"``, see the module docstring) of every part:
    ``{encoder: {"tower": mode, "projector": mode}, language: {"model": mode}}``.

    Decided from :func:`~mimo_titan.train.freeze.is_trainable` of every parameter name of the meta-device model
    (no memory), the same on every rank.
    """
    from mimo_titan.train.freeze import is_trainable, parameter_names

    trains = {n: is_trainable(cfg, n) for n in parameter_names(cfg)}

    def any_trains(prefix: str, projector: str | None = None, want_projector: bool = False) -> bool:
        keys = (k for k in trains if k.startswith(prefix))
        if projector is not None:
            keys = (k for k in keys if k.startswith(prefix + projector) == want_projector)
        return any(trains[k] for k in keys)

    out: dict[str, dict[str, str]] = {}
    encoder_trains = False
    for name, section in cfg.model.encoders.items():
        proj = PROJECTOR_PREFIX[section.type]
        tower = any_trains(name + ".", proj, want_projector=False)
        projector = any_trains(name + ".", proj, want_projector=True)
        out[name] = {
            "tower": TRAIN if tower else FORWARD,
            "projector": TRAIN if projector else BACKPROP if tower else FORWARD,
        }
        encoder_trains = encoder_trains or tower or projector
    lm = cfg.model.language_name
    out[lm] = {"model": TRAIN if any_trains(lm + ".") else BACKPROP if encoder_trains else FORWARD}
    return out


def lm_flops_per_token(cfg: LanguageModelConfig, seq_len: int, mode: str = TRAIN) -> float:
    """Training FLOPs of one LM token: ``m · N_active + a · L · H · Q · T`` (``6N + 12 L H Q T`` when it trains).

    Args:
        cfg: ``[model.<language>]``.
        seq_len: ``T``, the row length each token attends over (``training.seq_len`` as padded for CP / SP).
        mode: ``"train"`` / ``"backprop"`` / ``"forward"`` (:func:`part_modes`).

    Returns:
        FLOPs (float) per token.
    """
    p = lm_params(cfg)
    return float(MATMUL_FLOPS_PER_PARAM[mode] * p.active + ATTENTION_FLOPS_FACTOR[mode] * p.attention_width * seq_len)


def vit_flops_per_image(
    cfg: VisionModelConfig, lm_hidden_size: int, tower: str = TRAIN, projector: str | None = None
) -> float:
    """Training FLOPs of one image through a ViT encoder and its projector:
    ``P · (m_tower · N_active + a · L · D · P + m_proj · N_proj)`` with ``P`` patches per image (the projector runs
    on every patch; the attention is bidirectional over the image's ``P`` patches).

    Args:
        cfg: ``[model.<vit>]``.
        lm_hidden_size: the LM's hidden size (the projector's output width).
        tower / projector: the parts' modes (:func:`part_modes`); ``projector`` defaults to ``tower``.
    """
    p = vit_params(cfg, lm_hidden_size)
    patches = (cfg.image_size // cfg.patch_size) ** 2
    per_patch = (
        MATMUL_FLOPS_PER_PARAM[tower] * p.active
        + ATTENTION_FLOPS_FACTOR[tower] * p.attention_width * patches
        + MATMUL_FLOPS_PER_PARAM[projector or tower] * p.projector
    )
    return float(patches * per_patch)


def audio_flops_per_clip(
    cfg: AudioModelConfig, lm_hidden_size: int, num_frames: int, tower: str = TRAIN, projector: str | None = None
) -> float:
    """Training FLOPs of one clip of ``F = num_frames`` log-mel frames through a Whisper encoder and its projector:
    ``m_tower · (N_conv1 · F + N_active · S) + a · L · D · S² + m_proj · N_proj · ceil(S / pool)`` with
    ``S = ceil(F / 2)`` encoder frames (each clip attends over its own frames; the batch's padding is not counted).

    Args:
        cfg: ``[model.<audio>]``.
        lm_hidden_size: the LM's hidden size.
        num_frames: ``F`` >= 0.
        tower / projector: the parts' modes (:func:`part_modes`); ``projector`` defaults to ``tower``.
    """
    p = audio_params(cfg, lm_hidden_size)
    s = (num_frames + 1) // 2
    m = MATMUL_FLOPS_PER_PARAM[tower]
    return float(
        m * (audio_conv1_params(cfg) * num_frames + p.active * s)
        + ATTENTION_FLOPS_FACTOR[tower] * p.attention_width * s * s
        + MATMUL_FLOPS_PER_PARAM[projector or tower] * p.projector * math.ceil(s / cfg.pool)
    )
