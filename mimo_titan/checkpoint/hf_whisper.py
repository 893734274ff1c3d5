"""Hugging Face Whisper-encoder import / export: pure functions on plain state dicts (``dict[str, torch.Tensor]``).

The audio module (:class:`mimo_titan.models.audio.AudioEncoder`) holds Whisper's encoder under ``encoder.`` with
HF's names (``encoder.conv1.weight``, ``encoder.embed_positions.weight``, ``encoder.layers.{i}.self_attn.k_proj
.weight``, ..., ``encoder.layer_norm.bias``), so import and export are a prefix map, as
:mod:`mimo_titan.checkpoint.hf` does for the SigLIP vision tower. Read: a ``WhisperModel`` (keys ``encoder.*``),
a ``WhisperForConditionalGeneration`` (``model.encoder.*``) or a bare ``WhisperEncoder`` state (``conv1.*``, ...);
the decoder and ``proj_out`` are ignored. Written: a ``WhisperEncoder`` state (or, with ``prefix``, the encoder
part of the other two). The projector (``projector.*``) has no Whisper counterpart: import leaves it out (initialize
it, or load it from our own checkpoint) and export skips it.

Anything our encoder cannot represent (another activation than exact GELU, a non-Whisper model) is rejected with a
``ValueError`` naming the HF field and the fix. Whisper's LayerNorms have no eps field: it is always 1e-5.

Source of the HF semantics: transformers' ``models/whisper/modeling_whisper.py`` and
``configuration_whisper.py``. Method: Radford et al., "Robust Speech Recognition via Large-Scale Weak Supervision"
(Whisper, 2022). Shape legend: D encoder width, M mel bins, I MLP width, P max_source_positions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mimo_titan.config import AudioModelConfig

__all__ = ["audio_config_from_hf", "audio_state_from_hf", "audio_state_to_hf", "hf_audio_config"]

# our AudioModelConfig field -> the WhisperConfig field it comes from
_AUDIO_HF_NAMES = {
    "num_mel_bins": "num_mel_bins",
    "hidden_size": "d_model",
    "num_layers": "encoder_layers",
    "num_heads": "encoder_attention_heads",
    "intermediate_size": "encoder_ffn_dim",
    "max_source_positions": "max_source_positions",
}
# WhisperConfig's defaults (a config.json written with ``use_diff`` may omit them)
_WHISPER_DEFAULTS = {
    "num_mel_bins": 80,
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "max_source_positions": 1500,
    "activation_function": "gelu",
}
#: the epsilon of every LayerNorm of HF's Whisper (``nn.LayerNorm``'s default; WhisperConfig has no field for it)
WHISPER_LAYER_NORM_EPS = 1e-5
_LAYER_PARTS = (
    "self_attn_layer_norm",
    "self_attn.q_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "final_layer_norm",
    "fc1",
    "fc2",
)


def audio_config_from_hf(hf_config: dict) -> dict:
    """``AudioModelConfig`` fields of a Whisper ``config.json`` (the encoder's; ``pool`` and
    ``projector_intermediate_size`` are ours and not in it).

    Args:
        hf_config: ``config.json`` of a ``WhisperModel`` / ``WhisperForConditionalGeneration`` (``model_type``
            ``"whisper"``); missing fields take ``WhisperConfig``'s defaults.

    Returns:
        ``{num_mel_bins, hidden_size, num_layers, num_heads, intermediate_size, max_source_positions,
        layer_norm_eps}`` (``hidden_size`` from ``d_model``, ``num_layers`` from ``encoder_layers``, ``num_heads``
        from ``encoder_attention_heads``, ``intermediate_size`` from ``encoder_ffn_dim``; ``layer_norm_eps`` is
        Whisper's fixed 1e-5).

    Raises:
        ValueError: another ``model_type`` than ``"whisper"``, or ``activation_function`` other than ``"gelu"``.
    """
    model_type = hf_config.get("model_type")
    if model_type != "whisper":
        raise ValueError(
            f"HF config.json model_type={model_type!r} is not a supported audio encoder; supported: 'whisper' "
            "(WhisperModel, WhisperForConditionalGeneration or WhisperEncoder)"
        )
    hf = {**_WHISPER_DEFAULTS, **{k: v for k, v in hf_config.items() if v is not None}}
    if hf["activation_function"] != "gelu":
        raise ValueError(
            f"HF config.json activation_function={hf['activation_function']!r}: our audio encoder's MLP uses the "
            "exact (erf) GELU; only 'gelu' can be imported"
        )
    out: dict[str, Any] = {ours: int(hf[theirs]) for ours, theirs in _AUDIO_HF_NAMES.items()}
    out["layer_norm_eps"] = WHISPER_LAYER_NORM_EPS
    return out


def _audio_expected_keys(num_layers: int) -> set[str]:
    """``AudioEncoder`` ``state_dict()`` keys under ``encoder.`` (the Whisper encoder, no projector)."""
    keys = {f"encoder.{n}.{w}" for n in ("conv1", "conv2", "layer_norm") for w in ("weight", "bias")}
    keys.add("encoder.embed_positions.weight")
    for i in range(num_layers):
        keys.add(f"encoder.layers.{i}.self_attn.k_proj.weight")  # Whisper's k_proj has no bias
        keys |= {f"encoder.layers.{i}.{n}.{w}" for n in _LAYER_PARTS for w in ("weight", "bias")}
    return keys


def _check_keys(got: dict, expected: set[str], what: str) -> None:
    """Raise listing the unexpected and the missing keys of a converted state."""
    extra, missing = sorted(set(got) - expected), sorted(expected - set(got))
    if extra or missing:

        def show(keys: list[str]) -> str:
            return f"{keys[:6]}{f' ... ({len(keys)} in all)' if len(keys) > 6 else ''}"

        raise ValueError(
            f"{what} weights do not match the config: unexpected {show(extra)}, missing {show(missing)}; the "
            "checkpoint and the model.<audio> config disagree (num_layers? a state that is not a Whisper "
            "encoder?): take the sizes from audio_config_from_hf(config.json)"
        )


def _num_layers(cfg: AudioModelConfig | dict[str, Any]) -> int:
    return int(cfg["num_layers"]) if isinstance(cfg, dict) else cfg.num_layers


def _check_shapes(state: dict[str, torch.Tensor], cfg: AudioModelConfig | dict[str, Any], what: str) -> None:
    """Raise naming the first tensor whose shape differs from ``AudioEncoder(cfg)``'s (an ``AudioModelConfig``
    only: a dict of fields is checked by name)."""
    if isinstance(cfg, dict):
        return
    from mimo_titan.models.audio import AudioEncoder

    with torch.device("meta"):
        ours = AudioEncoder(cfg, 1).state_dict()
    for key, value in state.items():
        if tuple(value.shape) != tuple(ours[key].shape):
            raise ValueError(
                f"{what} tensor {key!r} has shape {list(value.shape)} but the model.<audio> config gives "
                f"{list(ours[key].shape)}; the checkpoint and its config disagree (hidden_size, intermediate_size, "
                "num_mel_bins, max_source_positions?): take them from audio_config_from_hf(config.json)"
            )


def audio_state_from_hf(
    hf_state: dict[str, torch.Tensor], cfg: AudioModelConfig | dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Whisper encoder weights → our ``AudioEncoder`` keys under ``encoder.`` (no projector).

    Args:
        hf_state: a ``WhisperForConditionalGeneration`` state (encoder keys under ``model.encoder.``), a
            ``WhisperModel`` state (``encoder.``) or a bare ``WhisperEncoder`` state (``conv1.weight``, ...). The
            decoder (``model.decoder.*`` / ``decoder.*``) and ``proj_out.weight`` are ignored. Shapes are Whisper's:
            ``conv1.weight [D, M, 3]``, ``conv2.weight [D, D, 3]``, ``embed_positions.weight [P, D]``, linear
            weights ``[out, in]``.
        cfg: our ``AudioModelConfig`` (names and shapes checked) or a dict with ``num_layers`` (names checked).

    Returns:
        ``{"encoder." + Whisper encoder name: tensor}`` (the input tensors themselves). The projector
        (``projector.linear_1`` / ``linear_2``) is not in Whisper and not returned: load the result with
        ``strict=False`` over an initialized ``AudioEncoder``, or overlay it on a full state.

    Raises:
        ValueError: encoder keys left over or missing (naming them), or a shape that does not fit ``cfg``.
    """
    if any(k.startswith("model.encoder.") for k in hf_state):
        prefix = "model.encoder."
    elif any(k.startswith("encoder.") for k in hf_state):
        prefix = "encoder."
    else:
        prefix = ""  # a bare WhisperEncoder: every key is the encoder's
    out = {}
    for key, value in hf_state.items():
        if prefix and not key.startswith(prefix):
            continue  # the decoder, proj_out
        out["encoder." + key[len(prefix) :]] = value
    _check_keys(out, _audio_expected_keys(_num_layers(cfg)), "HF Whisper encoder")
    _check_shapes(out, cfg, "HF Whisper encoder")
    return out


def audio_state_to_hf(
    state: dict[str, torch.Tensor], cfg: AudioModelConfig | dict[str, Any], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Our ``AudioEncoder`` weights → a Whisper encoder state: the exact inverse of :func:`audio_state_from_hf`.

    Args:
        state: our ``AudioEncoder`` state (``encoder.*``; ``projector.*`` is skipped: Whisper has no projector).
        cfg: our ``AudioModelConfig`` (or a dict with ``num_layers``).
        prefix: prepended to Whisper's encoder names: ``""`` (default) for a ``WhisperEncoder``
            (``load_state_dict(..., strict=True)`` / ``WhisperEncoder.from_pretrained``), ``"encoder."`` for the
            encoder part of a ``WhisperModel``, ``"model.encoder."`` for a ``WhisperForConditionalGeneration``.

    Returns:
        ``{prefix + Whisper encoder name: tensor}`` (the input tensors themselves).

    Raises:
        ValueError: encoder keys that do not match ``cfg`` (naming them).
    """
    ours = {k: v for k, v in state.items() if k.startswith("encoder.")}
    _check_keys(ours, _audio_expected_keys(_num_layers(cfg)), "our audio encoder")
    return {prefix + k.removeprefix("encoder."): v for k, v in ours.items()}


def hf_audio_config(cfg: AudioModelConfig, dtype: str = "float32") -> dict:
    """An HF ``config.json`` dict (``model_type = "whisper"``) for our encoder, to save beside
    :func:`audio_state_to_hf`'s state and read with ``WhisperEncoder.from_pretrained``.

    The decoder fields (unused by the encoder) copy the encoder's sizes, so the config also builds a
    ``WhisperModel``; dropout is off and the activation is the exact GELU.

    Raises:
        ValueError: ``layer_norm_eps`` other than 1e-5 (HF's Whisper has no field for it: 1e-5 is fixed).
    """
    if cfg.layer_norm_eps != WHISPER_LAYER_NORM_EPS:
        raise ValueError(
            f"model.<audio>.layer_norm_eps={cfg.layer_norm_eps:g}: HF's Whisper LayerNorms always use 1e-5 (its "
            "config has no eps field), so this encoder cannot be exported exactly; set layer_norm_eps = 1e-5"
        )
    out = {theirs: getattr(cfg, ours) for ours, theirs in _AUDIO_HF_NAMES.items()}
    return {
        "architectures": ["WhisperEncoder"],
        "model_type": "whisper",
        **out,
        "decoder_layers": cfg.num_layers,
        "decoder_attention_heads": cfg.num_heads,
        "decoder_ffn_dim": cfg.intermediate_size,
        "activation_function": "gelu",
        "scale_embedding": False,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
