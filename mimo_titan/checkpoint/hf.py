"""Hugging Face weight import / export: pure functions on plain state dicts (``dict[str, torch.Tensor]``).

No process group is involved; everything works on full (unsharded) tensors on any device, in the tensors' own
dtype (import casts to the dtype of the state it overlays; export keeps ours, fp32 in training).

Supported:

- Language model: Llama-3 (``LlamaForCausalLM``, ``model_type = "llama"``), Qwen3 (``Qwen3ForCausalLM``,
  ``"qwen3"``: per-head q / k RMSNorm) and Qwen3-MoE (``Qwen3MoeForCausalLM``, ``"qwen3_moe"``). Our
  :class:`~mimo_titan.models.decoder.DecoderLM` already uses HF's parameter names (``model.embed_tokens.weight``,
  ``model.layers.{i}.self_attn.q_proj.weight``, ..., ``model.norm.weight``, ``lm_head.weight``); only the MoE
  experts differ (ours stacked and transposed, see :func:`lm_state_from_hf`).
- Vision encoder: SigLIP (``SiglipVisionModel``, ``model_type = "siglip_vision_model"``, or the vision tower of a
  full ``SiglipModel``, ``"siglip"``). Our :class:`~mimo_titan.models.vit.ViT` uses SigLIP's names under
  ``vision_model.``. SigLIP's attention-pooling ``head.*`` is dropped on import (our encoder returns every patch
  token, the pooled vector is never used) and absent on export (``vision_use_head = false``). The projector has no
  SigLIP counterpart: it travels in its own file (``multi_modal_projector.safetensors``, LLaVA's names). The image
  normalisation (``model.<vision>.image_mean`` / ``image_std``) is read from the directory's
  ``preprocessor_config.json`` (SigLIP's 0.5 / 0.5 without one) and written there on export
  (``SiglipImageProcessor``).
- Directories as written by ``save_pretrained``: ``config.json`` plus ``model.safetensors`` or a sharded
  ``model.safetensors.index.json``.

Anything our modules cannot represent exactly (RoPE scalings other than Llama-3.1's ``llama3``, biases, other
activations, sliding windows, CLIP's class embedding and pre-layernorm, ...) is rejected with a ``ValueError``
naming the HF field and the fix.

Sources of the HF semantics: transformers' ``models/llama/modeling_llama.py``, ``models/qwen3/modeling_qwen3.py``,
``models/qwen3_moe/modeling_qwen3_moe.py`` and ``models/siglip/modeling_siglip.py`` (and their configuration
files). Shape legend: V vocabulary, H hidden, I (expert) intermediate width, E experts, D ViT width.
"""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from mimo_titan.config import LanguageModelConfig, ModelConfig, MoEConfig, VisionModelConfig

__all__ = [
    "LM_ARCHS",
    "lm_config_from_hf",
    "lm_state_from_hf",
    "lm_state_to_hf",
    "hf_lm_config",
    "vision_config_from_hf",
    "load_hf_preprocessor",
    "hf_vision_preprocessor_config",
    "vision_state_from_hf",
    "vision_state_to_hf",
    "hf_vision_config",
    "load_hf_dir",
    "save_hf_dir",
    "import_hf",
    "export_hf",
    "PROJECTOR_FILE",
]

#: ``arch`` name → (``architectures[0]``, ``model_type``) of the HF config we write.
LM_ARCHS = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
}
#: file name of the projector weights beside the ``language/`` and ``vision/`` directories of an export
PROJECTOR_FILE = "multi_modal_projector.safetensors"
_SAFETENSORS, _INDEX = "model.safetensors", "model.safetensors.index.json"
#: the image processor's settings beside a vision tower's config.json (``save_pretrained`` of an image processor)
PREPROCESSOR_FILE = "preprocessor_config.json"
# our LanguageModelConfig / MoEConfig field -> the HF config field it comes from (for error messages)
_LM_HF_NAMES = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling / rope_parameters",
    "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
    "qk_norm": "model_type (qwen3 / qwen3_moe have q/k norms)",
}
_MOE_HF_NAMES = {
    "num_experts": "num_experts",
    "top_k": "num_experts_per_tok",
    "intermediate_size": "moe_intermediate_size",
    "layer_freq": "decoder_sparse_step / mlp_only_layers",
    "first_layer": "decoder_sparse_step / mlp_only_layers",
    "score_func": "(softmax router)",
    "norm_topk_prob": "norm_topk_prob",
    "shared_expert_intermediate_size": "(no shared expert)",
}
_VISION_HF_NAMES = {
    "image_size": "image_size",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "norm_eps": "layer_norm_eps",
    "image_mean": f"{PREPROCESSOR_FILE} image_mean",
    "image_std": f"{PREPROCESSOR_FILE} image_std",
}
# the fields that live in preprocessor_config.json, not config.json
_NORM_FIELDS = ("image_mean", "image_std")
# SiglipVisionConfig's defaults (a config.json written with ``use_diff`` may omit them)
_SIGLIP_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
}


# ----------------------------------------------------------------------------------------------------- language
def _require(hf: dict, name: str) -> Any:
    if hf.get(name) is None:
        raise ValueError(
            f"HF config.json has no '{name}'; it is needed to build the language model "
            f"(model_type={hf.get('model_type')!r}); add it to config.json"
        )
    return hf[name]


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(hf: dict) -> tuple[float, dict]:
    """RoPE base and our ``rope_scaling`` fields of an HF config (transformers 5's ``rope_parameters`` or 4's
    ``rope_theta`` + ``rope_scaling``).

    ``rope_type`` "default" (or no scaling) gives ``{"type": "none"}``; "llama3" gives ``{"type": "llama3",
    factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}`` (the last falls back to
    ``max_position_embeddings``, as transformers does).

    Raises:
        ValueError: another RoPE scaling (yarn, linear, dynamic, longrope, ...), or a llama3 scaling without its
            factors.
    """
    params = hf.get("rope_parameters") or {}
    scaling: dict = {"type": "none"}
    for field, value in (("rope_scaling", hf.get("rope_scaling") or {}), ("rope_parameters", params)):
        kind = value.get("rope_type", value.get("type", "default"))
        if kind == "llama3":
            fallback = {"original_max_position_embeddings": hf.get("max_position_embeddings")}
            missing = [k for k in _LLAMA3_KEYS if value.get(k, fallback.get(k)) is None]
            if missing:
                raise ValueError(
                    f"HF config.json has {field} with rope_type='llama3' but no {', '.join(missing)} ({value}); "
                    "add them (Llama 3.1: factor 8.0, low_freq_factor 1.0, high_freq_factor 4.0, "
                    "original_max_position_embeddings 8192)"
                )
            got: dict[str, Any] = {k: value.get(k, fallback.get(k)) for k in _LLAMA3_KEYS}
            scaling = {
                "type": "llama3",
                **{k: float(got[k]) for k in _LLAMA3_KEYS[:3]},
                "original_max_position_embeddings": int(got["original_max_position_embeddings"]),
            }
        elif kind != "default":
            raise ValueError(
                f"HF config.json has {field} with rope_type={kind!r} ({value}); our decoder implements the "
                "plain rotary embedding and Llama 3.1's scaling (rope_type 'default' or 'llama3' = "
                "model.language.rope_scaling.type), so this model's positions would differ. Import a checkpoint "
                "with one of those"
            )
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta), scaling


def _moe_layers_hf(hf: dict, num_layers: int) -> list[int]:
    """MoE layer indices of a Qwen3-MoE config: ``i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0``."""
    step = int(hf.get("decoder_sparse_step") or 1)
    dense = set(hf.get("mlp_only_layers") or [])
    return [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]


def _moe_first_and_freq(hf: dict, num_layers: int) -> tuple[int, int]:
    """Our ``(first_layer, layer_freq)`` giving exactly the MoE layers of a Qwen3-MoE config.

    Raises:
        ValueError: ``mlp_only_layers`` / ``decoder_sparse_step`` select layers no arithmetic progression gives.
    """
    layers = _moe_layers_hf(hf, num_layers)
    step = int(hf.get("decoder_sparse_step") or 1)
    if not layers:
        raise ValueError(
            f"HF config.json: mlp_only_layers={hf.get('mlp_only_layers')} and decoder_sparse_step="
            f"{step} leave no MoE layer; import this model as a dense one (it has no experts)"
        )
    first = layers[0]
    freq = layers[1] - layers[0] if len(layers) > 1 else max(step, num_layers - first)
    if [i for i in range(num_layers) if i >= first and (i - first) % freq == 0] != layers:
        raise ValueError(
            f"HF config.json: mlp_only_layers={hf.get('mlp_only_layers')} with decoder_sparse_step={step} makes "
            f"layers {layers} MoE, which model.language.moe.first_layer / layer_freq (every layer_freq-th layer from "
            "first_layer on) cannot express; only dense layers before the first MoE layer, or a regular stride, "
            "are supported"
        )
    return first, freq


def _check_lm_supported(hf: dict) -> str:
    """Raise on HF features our decoder cannot represent; returns the model_type."""
    model_type = hf.get("model_type")
    if model_type not in LM_ARCHS:
        raise ValueError(
            f"HF config.json model_type={model_type!r} is not a supported language model; supported: "
            f"{sorted(LM_ARCHS)} (LlamaForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM)"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"HF config.json hidden_act={hf['hidden_act']!r}: our MLPs are SwiGLU with silu; only "
            "hidden_act 'silu' can be imported"
        )
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise ValueError(
                f"HF config.json {field}=true: our decoder's projections have no bias; only models "
                f"with {field} false can be imported"
            )
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or []):
        raise ValueError(
            "HF config.json use_sliding_window / layer_types ask for sliding-window attention; our "
            "decoder attends over the whole causal context: set use_sliding_window false (only if the "
            "model was trained without it)"
        )
    return model_type


def lm_config_from_hf(hf_config: dict) -> dict:
    """``LanguageModelConfig`` fields (a plain dict, ``moe`` a dict of ``MoEConfig`` fields) of an HF LM config.

    Args:
        hf_config: the ``config.json`` dict of a ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` /
            ``Qwen3MoeForCausalLM`` (transformers 4 or 5 layout: ``rope_theta`` or ``rope_parameters``,
            ``num_experts`` or ``num_local_experts``).

    Returns:
        ``{vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim, rope_theta,
        rope_scaling, rms_norm_eps, tie_word_embeddings, qk_norm, moe}``; ``head_dim`` is always explicit;
        ``rope_scaling`` a dict of ``RopeScalingConfig`` fields (``{"type": "none"}`` or the llama3 factors). For
        Qwen3-MoE, ``moe = {num_experts, top_k, intermediate_size, layer_freq, first_layer, score_func="softmax",
        norm_topk_prob, shared_expert_intermediate_size=0}``, else ``{"num_experts": 0}``.

    Raises:
        ValueError: naming the HF field we cannot represent (``rope_scaling`` other than llama3,
            ``attention_bias``, ``mlp_bias``, ``hidden_act``, sliding windows, ``mlp_only_layers``, an unknown
            ``model_type``) and the fix.
    """
    hf = hf_config
    model_type = _check_lm_supported(hf)
    heads = int(_require(hf, "num_attention_heads"))
    hidden = int(_require(hf, "hidden_size"))
    num_layers = int(_require(hf, "num_hidden_layers"))
    rope_theta, rope_scaling = _rope(hf)
    out = {
        "vocab_size": int(_require(hf, "vocab_size")),
        "hidden_size": hidden,
        "intermediate_size": int(_require(hf, "intermediate_size")),
        "num_layers": num_layers,
        "num_heads": heads,
        "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": int(hf.get("head_dim") or hidden // heads),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "qk_norm": model_type in ("qwen3", "qwen3_moe"),
        "moe": {"num_experts": 0},
    }
    if model_type == "qwen3_moe":
        out["moe"] = _moe_config_from_hf(hf, num_layers)
    return out


def _moe_config_from_hf(hf: dict, num_layers: int) -> dict:
    """``MoEConfig`` fields of a Qwen3-MoE config (softmax router, no shared expert)."""
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    if not experts:
        raise ValueError(
            "HF config.json of a qwen3_moe model has no num_experts (or num_local_experts) > 0; "
            "set it, or import the model as a dense qwen3"
        )
    top_k = int(_require(hf, "num_experts_per_tok"))
    norm = bool(hf.get("norm_topk_prob", False))
    if top_k == 1 and norm:
        raise ValueError(
            "HF config.json num_experts_per_tok=1 with norm_topk_prob=true gives every token weight 1, "
            "while our router keeps the softmax score for top_k = 1; this model cannot be imported"
        )
    first, freq = _moe_first_and_freq(hf, num_layers)
    return {
        "num_experts": int(experts),
        "top_k": top_k,
        "intermediate_size": int(_require(hf, "moe_intermediate_size")),
        "layer_freq": freq,
        "first_layer": first,
        "score_func": "softmax",
        "norm_topk_prob": norm,
        "shared_expert_intermediate_size": 0,
    }


def _lm_cfg(lm_cfg: LanguageModelConfig | dict[str, Any]) -> LanguageModelConfig:
    """A ``LanguageModelConfig`` from itself or from a dict such as :func:`lm_config_from_hf` returns."""
    if not isinstance(lm_cfg, dict):
        return lm_cfg
    from mimo_titan.config import LanguageModelConfig, MoEConfig, RopeScalingConfig

    return LanguageModelConfig(
        **{
            **lm_cfg,
            "moe": MoEConfig(**lm_cfg.get("moe", {})),
            "rope_scaling": RopeScalingConfig(**lm_cfg.get("rope_scaling", {})),
        }
    )


def _layer_of(key: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def lm_state_from_hf(
    hf_state: dict[str, torch.Tensor], lm_cfg: LanguageModelConfig | dict[str, Any]
) -> dict[str, torch.Tensor]:
    """HF causal-LM weights → our :class:`~mimo_titan.models.decoder.DecoderLM` state (keys of its ``state_dict()``).

    Args:
        hf_state: an HF ``*ForCausalLM`` state: ``model.embed_tokens.weight [V, H]``,
            ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``, ``...self_attn.{q,k}_norm.weight [hd]`` (Qwen3),
            ``...mlp.{gate,up,down}_proj.weight`` (dense), ``model.norm.weight``, ``lm_head.weight [V, H]`` (absent
            when tied). MoE layers: ``mlp.gate.weight [E, H]`` and the experts either as saved on disk
            (``mlp.experts.{e}.{gate,up}_proj.weight [I, H]``, ``mlp.experts.{e}.down_proj.weight [H, I]``) or fused
            as transformers 5 holds them in memory (``mlp.experts.gate_up_proj [E, 2I, H]``, gate rows first;
            ``mlp.experts.down_proj [E, H, I]``). Legacy ``rotary_emb.inv_freq`` buffers are ignored.
        lm_cfg: our ``LanguageModelConfig`` (or a dict of its fields).

    Returns:
        Our keys (the same names, except MoE experts stacked and transposed: ``mlp.experts.w_gate`` / ``w_up``
        ``[E, H, I]`` with ``w_gate[e] = gate_proj_e.T``, ``w_down [E, I, H]``; ``mlp.gate.e_score_correction_bias``
        zeros ``[E]``); with ``tie_word_embeddings`` ``lm_head.weight`` is the embedding tensor. Tensors keep their
        dtype; non-transposed ones are the inputs themselves.

    Raises:
        ValueError: HF keys left over or ours missing (the message lists them).
    """
    cfg = _lm_cfg(lm_cfg)
    src = {k: v for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for i in cfg.moe.moe_layers(cfg.num_layers):
        out.update(_experts_from_hf(src, f"model.layers.{i}.mlp.", cfg.moe.num_experts, used))
    for key, value in src.items():
        if key in used or (key == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        out[key] = value
    if cfg.tie_word_embeddings and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    _check_keys(out, _lm_expected_keys(cfg), "HF language model", "lm_config")
    return out


def _experts_from_hf(src: dict, prefix: str, num_experts: int, used: set[str]) -> dict[str, torch.Tensor]:
    """Our stacked experts (and zero routing bias) of one MoE layer from per-expert or fused HF keys."""
    fused = prefix + "experts.gate_up_proj"
    if fused in src:
        gate_up, down = src[fused], src[prefix + "experts.down_proj"]
        used.update({fused, prefix + "experts.down_proj"})
        inter = gate_up.shape[1] // 2
        w_gate, w_up = gate_up[:, :inter].transpose(1, 2), gate_up[:, inter:].transpose(1, 2)
        w_down = down.transpose(1, 2)
    else:

        def stack(name: str) -> torch.Tensor:
            keys = [f"{prefix}experts.{e}.{name}.weight" for e in range(num_experts)]
            missing = [k for k in keys if k not in src]
            if missing:
                raise ValueError(
                    f"HF MoE weights missing: {missing[:4]}{' ...' if len(missing) > 4 else ''}; the "
                    f"checkpoint does not have num_experts={num_experts} experts in this layer"
                )
            used.update(keys)
            return torch.stack([src[k].transpose(0, 1) for k in keys])

        w_gate, w_up, w_down = stack("gate_proj"), stack("up_proj"), stack("down_proj")
    bias = torch.zeros(num_experts, dtype=torch.float32, device=w_gate.device)  # HF routers have no selection bias
    return {
        prefix + "experts.w_gate": w_gate.contiguous(),
        prefix + "experts.w_up": w_up.contiguous(),
        prefix + "experts.w_down": w_down.contiguous(),
        prefix + "gate.e_score_correction_bias": bias,
    }


def _lm_expected_keys(cfg: LanguageModelConfig) -> set[str]:
    """The ``state_dict()`` keys of a full ``DecoderLM(cfg)`` (built on the meta device: no memory, no init)."""
    from mimo_titan.models.decoder import DecoderLM

    with torch.device("meta"):
        return set(DecoderLM(cfg).state_dict())


def _check_keys(got: dict, expected: set[str], what: str, fix_field: str) -> None:
    """Raise listing the unexpected and the missing keys of a converted state."""
    extra, missing = sorted(set(got) - expected), sorted(expected - set(got))
    if extra or missing:

        def show(keys):
            return f"{keys[:6]}{f' ... ({len(keys)} in all)' if len(keys) > 6 else ''}"

        raise ValueError(
            f"{what} weights do not match the config: unexpected {show(extra)}, missing {show(missing)}; "
            f"the checkpoint and its {fix_field} disagree (layers, q/k norms, MoE layers, tied "
            "embeddings?)"
        )


def lm_state_to_hf(
    state: dict[str, torch.Tensor], lm_cfg: LanguageModelConfig | dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Our ``DecoderLM`` state → HF on-disk state (exact inverse of :func:`lm_state_from_hf`).

    Args:
        state: keys of ``DecoderLM.state_dict()`` (no ``language.`` prefix).
        lm_cfg: our ``LanguageModelConfig`` (or a dict of its fields).

    Returns:
        HF keys; MoE experts per expert as saved on disk (``mlp.experts.{e}.gate_proj.weight [I, H]``, ...,
        contiguous copies), no ``lm_head.weight`` when the embeddings are tied, no routing bias. Other tensors are
        the inputs themselves.

    Raises:
        ValueError: keys not matching ``lm_cfg``; a shared expert, sigmoid router or nonzero aux-loss-free routing
            bias (``e_score_correction_bias``), which Qwen3-MoE has no field for.
    """
    cfg = _lm_cfg(lm_cfg)
    _check_keys(state, _lm_expected_keys(cfg), "our language model", "model.language config")
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        m = re.match(r"(.*\.mlp\.)experts\.w_(gate|up|down)$", key)
        if m:
            for e in range(value.shape[0]):
                out[f"{m.group(1)}experts.{e}.{m.group(2)}_proj.weight"] = value[e].transpose(0, 1).contiguous()
        elif key.endswith("mlp.gate.e_score_correction_bias"):
            if torch.count_nonzero(value):
                raise ValueError(
                    f"{key} is nonzero (aux-loss-free balancing, model.language.moe.load_balance = "
                    "'aux_free'): Qwen3-MoE's router has no selection bias, so the export would route "
                    "differently; export a model trained with load_balance 'aux_loss' or 'none'"
                )
        elif ".mlp.shared_expert." in key:
            raise ValueError(
                "model.language.moe.shared_expert_intermediate_size > 0: Qwen3-MoE has no shared "
                "expert; set it to 0 to export"
            )
        else:
            out[key] = value
    return out


def _check_exportable(cfg: LanguageModelConfig, arch: str) -> None:
    """Raise if ``cfg`` has features HF ``arch`` lacks (or lacks ones it has)."""
    if arch not in LM_ARCHS:
        raise ValueError(f"language arch {arch!r} is not supported; choose one of {sorted(LM_ARCHS)}")
    want_norm, want_moe = arch != "llama", arch == "qwen3_moe"
    if bool(cfg.qk_norm) != want_norm:
        raise ValueError(
            f"model.language.qk_norm={cfg.qk_norm} but HF {arch} {'has' if want_norm else 'has no'} "
            f"q/k norms: export as {'qwen3 / qwen3_moe' if cfg.qk_norm else 'llama'}"
        )
    if (cfg.moe.num_experts > 0) != want_moe:
        raise ValueError(
            f"model.language.moe.num_experts={cfg.moe.num_experts} does not fit HF {arch}: export MoE "
            "models as qwen3_moe and dense ones as llama / qwen3"
        )
    if want_moe:
        moe = cfg.moe
        problems = []
        if moe.score_func != "softmax":
            problems.append(f"moe.score_func={moe.score_func!r} (Qwen3-MoE routes with softmax)")
        if moe.shared_expert_intermediate_size:
            problems.append(
                f"moe.shared_expert_intermediate_size={moe.shared_expert_intermediate_size} "
                "(Qwen3-MoE has no shared expert)"
            )
        if moe.top_k == 1 and moe.norm_topk_prob:
            problems.append("moe.top_k=1 with norm_topk_prob=true (HF would give every token weight 1)")
        if problems:
            raise ValueError(f"model.language cannot be exported as qwen3_moe: {'; '.join(problems)}")


def hf_lm_config(
    lm_cfg: LanguageModelConfig | dict[str, Any], arch: str, dtype: str = "float32", max_position_embeddings: int = 4096
) -> dict:
    """An HF ``config.json`` dict for our language model as ``arch`` (``"llama"``, ``"qwen3"``, ``"qwen3_moe"``).

    Written for transformers 5 (``rope_parameters``, ``dtype``) and 4 (``rope_theta``, ``rope_scaling``,
    ``torch_dtype``) alike. Qwen3-MoE layers: ``decoder_sparse_step = layer_freq`` with the skipped layers below
    ``first_layer`` in ``mlp_only_layers`` when ``first_layer + 1`` is a multiple of ``layer_freq``, else
    ``decoder_sparse_step = 1`` with every dense layer listed in ``mlp_only_layers``.

    Args:
        lm_cfg: our ``LanguageModelConfig`` (or a dict of its fields).
        arch: the HF architecture.
        dtype: the weights' dtype name.
        max_position_embeddings: informational for plain RoPE (no length limit of ours to copy); with llama3
            RoPE scaling at least ``original_max_position_embeddings * factor`` is written (transformers expects
            it above the original context).

    Raises:
        ValueError: ``lm_cfg`` has features ``arch`` cannot represent (q/k norm for llama, MoE for dense archs,
            sigmoid routers or shared experts for qwen3_moe), naming the field.
    """
    cfg = _lm_cfg(lm_cfg)
    _check_exportable(cfg, arch)
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
    rs = cfg.rope_scaling
    if rs.type == "llama3":
        max_position_embeddings = max(max_position_embeddings, int(rs.original_max_position_embeddings * rs.factor))
    out = {
        "architectures": [LM_ARCHS[arch][0]],
        "model_type": LM_ARCHS[arch][1],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta,
        **_hf_rope_fields(cfg),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if arch == "llama":
        out.update(mlp_bias=False, pretraining_tp=1)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    if arch == "qwen3_moe":
        out.update(_hf_moe_fields(cfg))
    return out


def _hf_rope_fields(cfg: LanguageModelConfig) -> dict:
    """``rope_scaling`` (transformers 4) and ``rope_parameters`` (5) of our ``rope_theta`` / ``rope_scaling``."""
    rs = cfg.rope_scaling
    if rs.type == "none":
        return {"rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    factors = {k: getattr(rs, k) for k in _LLAMA3_KEYS}
    return {
        "rope_scaling": {"rope_type": rs.type, **factors},
        "rope_parameters": {"rope_type": rs.type, "rope_theta": cfg.rope_theta, **factors},
    }


def _hf_moe_fields(cfg: LanguageModelConfig) -> dict:
    """Qwen3-MoE config fields of our ``moe`` (see :func:`hf_lm_config`)."""
    moe = cfg.moe
    layers = set(moe.moe_layers(cfg.num_layers))
    step = moe.layer_freq if (moe.first_layer + 1) % moe.layer_freq == 0 else 1
    dense = [i for i in range(cfg.num_layers) if (i + 1) % step == 0 and i not in layers]
    return {
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.intermediate_size,
        "decoder_sparse_step": step,
        "mlp_only_layers": dense,
        "norm_topk_prob": moe.norm_topk_prob,
        "router_aux_loss_coef": moe.aux_loss_coeff,
        "output_router_logits": False,
    }


# ------------------------------------------------------------------------------------------------------- vision
def _siglip_vision_section(hf: dict) -> dict:
    """The SigLIP vision config inside ``hf`` (itself, or ``vision_config`` of a full SiglipModel)."""
    model_type = hf.get("model_type")
    if model_type in ("clip", "clip_vision_model"):
        raise ValueError(
            f"HF config.json model_type={model_type!r}: CLIP's vision tower has a class embedding, a pre-layernorm "
            "and quick_gelu, which our ViT (SigLIP layout: patch tokens only, no pre-layernorm, tanh GELU) cannot "
            "represent; use a SigLIP vision model (model_type 'siglip_vision_model' or 'siglip')"
        )
    if model_type == "siglip":
        return {**(hf.get("vision_config") or {}), "model_type": "siglip_vision_model"}
    if model_type != "siglip_vision_model":
        raise ValueError(
            f"HF config.json model_type={model_type!r} is not a supported vision encoder; supported: "
            "'siglip_vision_model' (SiglipVisionModel) and 'siglip' (the vision tower of SiglipModel)"
        )
    return hf


def vision_config_from_hf(hf_config: dict, preprocessor: dict | None = None) -> dict:
    """``VisionModelConfig`` fields (without ``projector_intermediate_size``, which SigLIP lacks) of a SigLIP config.

    Args:
        hf_config: ``config.json`` of a ``SiglipVisionModel`` (or of a ``SiglipModel``: its ``vision_config``);
            missing fields take ``SiglipVisionConfig``'s defaults.
        preprocessor: its ``preprocessor_config.json`` (:func:`load_hf_preprocessor`), or None: SigLIP's image
            normalisation, mean = std = 0.5 per channel (``SiglipImageProcessor``'s defaults).

    Returns:
        ``{image_size, patch_size, num_channels, hidden_size, num_layers, num_heads, intermediate_size, norm_eps,
        image_mean, image_std}``.

    Raises:
        ValueError: CLIP (``model_type`` clip / clip_vision_model), another model type, or ``hidden_act`` other than
            tanh GELU; a preprocessor that does not scale pixels by 1 / 255 or whose mean / std are not three
            numbers.
    """
    from mimo_titan.config import IMAGE_NORMALIZATION

    hf = {**_SIGLIP_DEFAULTS, **{k: v for k, v in _siglip_vision_section(hf_config).items() if v is not None}}
    if hf["hidden_act"] not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ValueError(
            f"HF config.json hidden_act={hf['hidden_act']!r}: our ViT MLP uses the tanh GELU; only "
            "'gelu_pytorch_tanh' can be imported"
        )
    out: dict[str, Any] = {
        ours: (float if ours == "norm_eps" else int)(hf[theirs])
        for ours, theirs in _VISION_HF_NAMES.items()
        if ours not in _NORM_FIELDS
    }
    mean, std = (list(v) for v in IMAGE_NORMALIZATION["siglip"])
    if preprocessor is not None:
        pre = preprocessor
        if not pre.get("do_rescale", True) or abs(float(pre.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
            raise ValueError(
                f"HF {PREPROCESSOR_FILE} do_rescale={pre.get('do_rescale')} rescale_factor="
                f"{pre.get('rescale_factor')}: our image processor scales pixels to [0, 1] (by 1 / 255) before "
                "normalising; only such a preprocessor can be imported"
            )
        if pre.get("do_normalize", True):
            mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
        else:  # no normalisation: the [0, 1] pixels themselves
            mean, std = [0.0] * 3, [1.0] * 3
        for name, value in (("image_mean", mean), ("image_std", std)):
            if not isinstance(value, list) or len(value) != 3:
                raise ValueError(f"HF {PREPROCESSOR_FILE} {name}={value!r}: give three per-channel RGB numbers")
    out["image_mean"], out["image_std"] = [float(m) for m in mean], [float(s) for s in std]
    return out


def _vision_expected_keys(num_layers: int) -> set[str]:
    """``ViT`` ``state_dict()`` keys under ``vision_model.`` (dense MLPs)."""
    keys = {
        f"vision_model.{n}.{w}" for n in ("embeddings.patch_embedding", "post_layernorm") for w in ("weight", "bias")
    }
    keys.add("vision_model.embeddings.position_embedding.weight")
    for i in range(num_layers):
        for n in (
            "layer_norm1",
            "layer_norm2",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "mlp.fc1",
            "mlp.fc2",
        ):
            keys |= {f"vision_model.encoder.layers.{i}.{n}.{w}" for w in ("weight", "bias")}
    return keys


def _vis_num_layers(vis_cfg: VisionModelConfig | dict[str, Any]) -> int:
    if isinstance(vis_cfg, dict):
        return int(vis_cfg["num_layers"])
    if vis_cfg.moe.num_experts > 0:
        raise ValueError(
            f"model.vision.moe.num_experts={vis_cfg.moe.num_experts}: SigLIP has dense MLPs only; "
            "HF SigLIP weights need model.vision.moe.num_experts = 0"
        )
    return vis_cfg.num_layers


def vision_state_from_hf(
    hf_state: dict[str, torch.Tensor], vis_cfg: VisionModelConfig | dict[str, Any]
) -> dict[str, torch.Tensor]:
    """SigLIP vision weights → our ``VisionEncoder`` keys under ``vision_model.`` (no projector).

    Args:
        hf_state: a ``SiglipVisionModel`` state, with or without the ``vision_model.`` prefix (transformers 5's
            ``state_dict()`` has none, files saved by transformers 4 have it), or a full ``SiglipModel`` state
            (``text_model.*``, ``logit_scale`` / ``logit_bias`` are ignored). The pooling head ``head.*`` is dropped:
            our encoder returns all ``P`` patch tokens ``[N, P, D]`` and never pools. Shapes are SigLIP's (the
            patch embedding a Conv2d ``[D, C, p, p]`` + bias, ``position_embedding.weight [P, D]``).
        vis_cfg: our ``VisionModelConfig`` (or a dict with ``num_layers``).

    Returns:
        ``{"vision_model." + SigLIP name: tensor}`` (the input tensors themselves).

    Raises:
        ValueError: keys left over or missing.
    """
    full_model = any(k.startswith("text_model.") for k in hf_state)
    out = {}
    for key, value in hf_state.items():
        if full_model and not key.startswith("vision_model."):
            continue  # the text tower and logit scale of a full SiglipModel
        name = key.removeprefix("vision_model.")
        if name.startswith("head.") or name == "embeddings.position_ids":
            continue
        out["vision_model." + name] = value
    _check_keys(out, _vision_expected_keys(_vis_num_layers(vis_cfg)), "HF SigLIP vision", "model.vision config")
    return out


def vision_state_to_hf(
    state: dict[str, torch.Tensor], vis_cfg: VisionModelConfig | dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Our encoder's ``vision_model.*`` weights → a ``SiglipVisionModel`` file state (keys ``vision_model.*``).

    The ``vision_model.`` prefix is kept (transformers 4 and 5 both load it); projector keys
    (``multi_modal_projector.*``) are skipped: see :func:`export_hf`. Exact inverse of
    :func:`vision_state_from_hf`.

    Raises:
        ValueError: keys not matching ``vis_cfg`` (e.g. an MoE encoder).
    """
    out = {k: v for k, v in state.items() if k.startswith("vision_model.")}
    _check_keys(out, _vision_expected_keys(_vis_num_layers(vis_cfg)), "our vision encoder", "model.vision config")
    return out


def hf_vision_config(vis_cfg: VisionModelConfig, dtype: str = "float32") -> dict:
    """An HF ``config.json`` dict (``SiglipVisionModel``, no pooling head) for our ViT.

    Raises:
        ValueError: an MoE encoder (SigLIP has dense MLPs only).
    """
    _vis_num_layers(vis_cfg)
    out = {theirs: getattr(vis_cfg, ours) for ours, theirs in _VISION_HF_NAMES.items() if ours not in _NORM_FIELDS}
    return {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        **out,
        "hidden_act": "gelu_pytorch_tanh",
        "attention_dropout": 0.0,
        "vision_use_head": False,
        "dtype": dtype,
        "torch_dtype": dtype,
    }


def hf_vision_preprocessor_config(vis_cfg: VisionModelConfig) -> dict:
    """An HF ``preprocessor_config.json`` dict (``SiglipImageProcessor``) doing what our processor does: resize to
    ``image_size`` (bicubic, aspect ratio not kept), scale to ``[0, 1]``, normalise with ``image_mean`` /
    ``image_std`` (:meth:`mimo_titan.data.processor.ImageTextProcessor.load_image`)."""
    return {
        "image_processor_type": "SiglipImageProcessor",
        "processor_class": "SiglipProcessor",
        "do_resize": True,
        "size": {"height": vis_cfg.image_size, "width": vis_cfg.image_size},
        "resample": 3,  # PIL bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(vis_cfg.image_mean),
        "image_std": list(vis_cfg.image_std),
        "do_convert_rgb": True,
    }


def load_hf_preprocessor(path: str) -> dict | None:
    """The ``preprocessor_config.json`` dict of an HF directory, or None without one.

    Raises:
        ValueError: the file is not a JSON object.
    """
    file = os.path.join(path, PREPROCESSOR_FILE)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        try:
            out = json.load(f)
        except ValueError as exc:
            raise ValueError(f"{file} is not valid JSON ({exc}); fix or remove it") from exc
    if not isinstance(out, dict):
        raise ValueError(f"{file} holds a JSON {type(out).__name__}, not an object; fix or remove it")
    return out


# --------------------------------------------------------------------------------------------------- directories
def load_hf_dir(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json dict, state)`` of a ``save_pretrained`` directory (safetensors, single file or sharded).

    Raises:
        FileNotFoundError: no ``config.json``, or neither ``model.safetensors`` nor ``model.safetensors.index.json``
            (PyTorch ``.bin`` files are not read: re-save with ``save_pretrained(dir, safe_serialization=True)``).
    """
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} has no config.json; pass a directory written by save_pretrained")
    with open(cfg_path) as f:
        config = json.load(f)
    single, index = os.path.join(path, _SAFETENSORS), os.path.join(path, _INDEX)
    if os.path.isfile(single):
        return config, load_file(single)
    if not os.path.isfile(index):
        raise FileNotFoundError(
            f"{path} has neither {_SAFETENSORS} nor {_INDEX}; only safetensors weights are read "
            "(re-save the model with save_pretrained(dir, safe_serialization=True))"
        )
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return config, state


def save_hf_dir(path: str, config: dict, state: dict[str, torch.Tensor], max_shard_bytes: int | None = None) -> None:
    """Write ``config.json`` and the weights as ``save_pretrained`` would (safetensors, ``{"format": "pt"}``).

    Args:
        path: directory (created).
        config: the ``config.json`` dict.
        state: HF keys → tensors (copied to contiguous CPU tensors; shared storage is split).
        max_shard_bytes: if set and the weights exceed it, write ``model-0000k-of-0000n.safetensors`` shards of at
            most about this size plus ``model.safetensors.index.json``; else one ``model.safetensors``.
    """
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        n = tensors[key].numel() * tensors[key].element_size()
        if max_shard_bytes and shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += n
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, _SAFETENSORS), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, _INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------- MIMO
def _mismatches(
    section: str, ours: LanguageModelConfig | VisionModelConfig | MoEConfig, theirs: dict, hf_names: dict
) -> list[str]:
    """``model.<section>.<field>=ours vs HF <name>=theirs`` for every differing field of ``theirs``."""
    out = []
    for field, value in theirs.items():
        if field == "moe":
            continue
        mine = getattr(ours, field)
        if field == "head_dim" and mine is None:  # a language-model field
            lm = cast("LanguageModelConfig", ours)
            mine = lm.hidden_size // lm.num_heads
        if field == "rope_scaling":  # a language-model sub-table, as lm_config_from_hf writes it
            mine = {"type": mine.type, **({k: getattr(mine, k) for k in _LLAMA3_KEYS} if mine.type != "none" else {})}
        if mine != value:
            out.append(f"model.{section}.{field}={mine!r} vs HF {hf_names[field]}={value!r}")
    return out


def _lm_mismatches(lm: LanguageModelConfig, hf_fields: dict) -> list[str]:
    out = _mismatches("language", lm, hf_fields, _LM_HF_NAMES)
    hf_moe = hf_fields["moe"]
    if lm.moe.num_experts != hf_moe["num_experts"]:
        out.append(f"model.language.moe.num_experts={lm.moe.num_experts} vs HF num_experts={hf_moe['num_experts']}")
    elif hf_moe["num_experts"] > 0:
        out += _mismatches(
            "language.moe", lm.moe, {k: v for k, v in hf_moe.items() if k != "num_experts"}, _MOE_HF_NAMES
        )
    return out


def _overlay(full: dict, module: str, part: dict[str, torch.Tensor]) -> None:
    """``full[module + "." + k] = v`` (cast to the existing dtype / device), checking names and shapes."""
    problems = []
    for key, value in part.items():
        name = f"{module}.{key}"
        if name not in full:
            problems.append(f"{name} (not in the model)")
        elif tuple(full[name].shape) != tuple(value.shape):
            problems.append(f"{name} shape {tuple(value.shape)} vs ours {tuple(full[name].shape)}")
        else:
            full[name] = value.to(dtype=full[name].dtype, device=full[name].device)
    if problems:
        raise ValueError(f"HF weights do not fit the model: {problems[:6]}; check model.{module} in the config")


def _load_projector(path: str) -> dict[str, torch.Tensor]:
    """Projector weights (keys ``multi_modal_projector.*``, an optional ``vision.`` prefix stripped)."""
    from safetensors.torch import load_file

    state = {k.removeprefix("vision."): v for k, v in load_file(path).items()}
    bad = [k for k in state if not k.startswith("multi_modal_projector.")]
    if bad:
        raise ValueError(f"{path}: unexpected keys {bad[:6]}; a projector file holds multi_modal_projector.* only")
    return state


def _audio_projector_file(name: str) -> str:
    """File name of an audio encoder's projector in an export (``<name>_projector.safetensors``)."""
    return f"{name}_projector.safetensors"


def _load_audio_projector(path: str) -> dict[str, torch.Tensor]:
    """An audio encoder's projector weights (keys ``projector.*``)."""
    from safetensors.torch import load_file

    state = load_file(path)
    bad = [k for k in state if not k.startswith("projector.")]
    if bad:
        raise ValueError(f"{path}: unexpected keys {bad[:6]}; an audio projector file holds projector.* only")
    return state


def _encoder_of_type(model_cfg: ModelConfig, type_: str) -> tuple[str, Any] | None:
    return next(((n, sec) for n, sec in model_cfg.encoders.items() if sec.type == type_), None)


def import_hf(
    model_cfg: ModelConfig,
    full_state: dict[str, torch.Tensor],
    language_dir: str | None = None,
    vision_dir: str | None = None,
    projector_path: str | None = None,
    *,
    audio_dir: str | None = None,
    audio_projector_path: str | None = None,
) -> dict[str, torch.Tensor]:
    """Overlay HF weights on a full single-process MIMO state (keys of ``MimoModel.state_dict()``).

    Args:
        model_cfg: our ``ModelConfig``; the HF configs must describe exactly the same modules.
        full_state: ``<module>.*`` tensors (e.g. a freshly initialised model); not mutated.
        language_dir: an HF causal-LM directory (Llama-3 / Qwen3 / Qwen3-MoE); None keeps the decoder's weights.
        vision_dir: a SigLIP directory for the ``vit`` encoder; None keeps its ``vision_model.*``. Its
            ``preprocessor_config.json`` (SigLIP's 0.5 / 0.5 without one) must match ``image_mean`` / ``image_std``.
        projector_path: the ViT's projector file (``multi_modal_projector.*`` keys, as :func:`export_hf` writes);
            when None, ``<vision_dir>/../multi_modal_projector.safetensors`` is used if it exists (the layout of an
            export), else the projector keeps its values from ``full_state``.
        audio_dir: a Whisper directory for the ``audio`` encoder (its encoder half); None keeps its weights.
        audio_projector_path: the audio encoder's projector file (``projector.*`` keys); when None,
            ``<audio_dir>/../<name>_projector.safetensors`` if it exists.

    Returns:
        A new dict with the same keys, shapes and dtypes as ``full_state``.

    Raises:
        ValueError: HF configs differing from ``model_cfg`` (every mismatch listed as
            ``model.<module>.<field>=ours vs HF <name>=theirs``), unsupported HF features, weights not fitting, or
            a directory given for an encoder type the model lacks.
    """
    from mimo_titan.checkpoint import hf_whisper

    out = dict(full_state)
    lm_name = model_cfg.language_name
    vit = _encoder_of_type(model_cfg, "vit")
    audio = _encoder_of_type(model_cfg, "audio")
    for given, enc, what in ((vision_dir, vit, "vit"), (audio_dir, audio, "audio")):
        if given is not None and enc is None:
            raise ValueError(f"an HF directory for a '{what}' encoder was given, but the model has none")
    configs = {}
    if language_dir is not None:
        configs["language"] = load_hf_dir(language_dir)
    if vision_dir is not None:
        configs["vision"] = load_hf_dir(vision_dir)
    if audio_dir is not None:
        configs["audio"] = load_hf_dir(audio_dir)
    problems = []
    if "language" in configs:
        problems += _lm_mismatches(model_cfg.language, lm_config_from_hf(configs["language"][0]))
    if "vision" in configs:
        assert vit is not None
        _vis_num_layers(vit[1])
        assert vision_dir is not None
        preprocessor = load_hf_preprocessor(vision_dir)
        names = dict(_VISION_HF_NAMES)
        if preprocessor is None:  # the family default
            names.update({f: f"{f} (SigLIP's; the directory has no {PREPROCESSOR_FILE})" for f in _NORM_FIELDS})
        theirs = vision_config_from_hf(configs["vision"][0], preprocessor)
        problems += _mismatches(vit[0], vit[1], theirs, names)
    if "audio" in configs:
        assert audio is not None
        theirs = hf_whisper.audio_config_from_hf(configs["audio"][0])
        names = {**hf_whisper._AUDIO_HF_NAMES, "layer_norm_eps": "(Whisper's fixed LayerNorm eps)"}
        problems += _mismatches(audio[0], audio[1], theirs, names)
    if problems:
        raise ValueError(
            "the HF checkpoint does not match the model config: "
            + "; ".join(problems)
            + ". Set these fields of the TOML config to the HF values"
        )
    if "language" in configs:
        _overlay(out, lm_name, lm_state_from_hf(configs["language"][1], model_cfg.language))
    if vit is not None:
        if "vision" in configs:
            _overlay(out, vit[0], vision_state_from_hf(configs["vision"][1], vit[1]))
        if projector_path is None and vision_dir is not None:
            beside = os.path.join(os.path.dirname(os.path.abspath(vision_dir)), PROJECTOR_FILE)
            projector_path = beside if os.path.isfile(beside) else None
        if projector_path is not None:
            _overlay(out, vit[0], _load_projector(projector_path))
    if audio is not None:
        if "audio" in configs:
            _overlay(out, audio[0], hf_whisper.audio_state_from_hf(configs["audio"][1], audio[1]))
        if audio_projector_path is None and audio_dir is not None:
            beside = os.path.join(os.path.dirname(os.path.abspath(audio_dir)), _audio_projector_file(audio[0]))
            audio_projector_path = beside if os.path.isfile(beside) else None
        if audio_projector_path is not None:
            _overlay(out, audio[0], _load_audio_projector(audio_projector_path))
    return out


def export_hf(
    model_cfg: ModelConfig,
    full_state: dict[str, torch.Tensor],
    out_dir: str,
    language_arch: str,
    max_shard_bytes: int | None = None,
) -> None:
    """Write a full MIMO state as HF directories, one per module, named as the module: the decoder as
    ``out_dir/<language>/`` (``language_arch``: llama / qwen3 / qwen3_moe); the ``vit`` encoder as
    ``out_dir/<vision>/`` (``SiglipVisionModel`` plus a ``SiglipImageProcessor``'s ``preprocessor_config.json`` with
    its ``image_mean`` / ``image_std``) with its projector in ``out_dir/multi_modal_projector.safetensors``
    (keys ``multi_modal_projector.linear_{1,2}.{weight,bias}``); an ``audio`` encoder as ``out_dir/<audio>/`` (a
    ``WhisperEncoder``) with its projector in ``out_dir/<audio>_projector.safetensors`` (keys ``projector.*``).
    Frozen modules are written like the others. :func:`import_hf` of these restores ``full_state`` exactly.

    Raises:
        ValueError: the model has features the HF formats lack (see :func:`hf_lm_config`, :func:`lm_state_to_hf`,
            :func:`hf_vision_config`, :func:`mimo_titan.checkpoint.hf_whisper.hf_audio_config`); nothing is
            written then.
    """
    from safetensors.torch import save_file

    from mimo_titan.checkpoint import hf_whisper

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in full_state.items() if k.startswith(prefix)}

    lm_name = model_cfg.language_name
    lm = part(lm_name + ".")
    dtype = str(lm["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    # every config and state first: a model HF cannot represent writes nothing
    dirs = [
        (lm_name, hf_lm_config(model_cfg.language, language_arch, dtype=dtype), lm_state_to_hf(lm, model_cfg.language))
    ]
    files: list[tuple[str, dict[str, torch.Tensor]]] = []
    for name, section in model_cfg.encoders.items():
        enc = part(name + ".")
        if section.type == "vit":
            dirs.append((name, hf_vision_config(section, dtype=dtype), vision_state_to_hf(enc, section)))
            files.append((PROJECTOR_FILE, {k: v for k, v in enc.items() if k.startswith("multi_modal_projector.")}))
        elif section.type == "audio":
            config = hf_whisper.hf_audio_config(section, dtype=dtype)
            dirs.append((name, config, hf_whisper.audio_state_to_hf(enc, section)))
            files.append((_audio_projector_file(name), {k: v for k, v in enc.items() if k.startswith("projector.")}))
        else:
            raise ValueError(f"model.{name}: no HF format for encoder type '{section.type}'")
    for name, config, state in dirs:
        save_hf_dir(os.path.join(out_dir, name), config, state, max_shard_bytes)
        section = model_cfg.encoders.get(name)
        if section is not None and section.type == "vit":
            with open(os.path.join(out_dir, name, PREPROCESSOR_FILE), "w") as f:
                json.dump(hf_vision_preprocessor_config(section), f, indent=2, sort_keys=True)
    for file, state in files:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
