"""Decoder-only language model in the Llama-3 / Qwen3 style: RMSNorm, RoPE, SwiGLU, grouped-query attention.

Parameter names are Hugging Face's ``LlamaForCausalLM`` names (``model.embed_tokens``,
``model.layers.{i}.self_attn.q_proj``, ``model.layers.{i}.mlp.gate_proj``, ``model.norm``, ``lm_head``), so a
later weight import is a name map. ``model.layers`` is a ``ModuleDict`` keyed by the global layer index, so a
pipeline stage that keeps a subset of layers keeps their global names (torchtitan's convention).

A pipeline stage is this module with some parts set to ``None``: without ``embed_tokens`` the stage takes
hidden states, without ``norm`` / ``lm_head`` it returns hidden states (see
:func:`mimo_titan.pipeline.stages.split_language_model`).

Method: Touvron et al., "Llama 2" (2023) / Dubey et al., "The Llama 3 Herd of Models" (2024); RoPE: Su et al.,
"RoFormer" (2021); GQA: Ainslie et al. (2023); SwiGLU: Shazeer, "GLU Variants Improve Transformer" (2020).

Shape legend: B batch, S sequence, H hidden size, V vocabulary, nh / nkv query / key-value heads, hd head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from mimo_titan.models.init import InitRule, init_module_, layer_init_rules, resolve_seed
from mimo_titan.models.kv_cache import KVCache, LayerKVCache
from mimo_titan.models.mlp import SwiGLU
from mimo_titan.models.moe import MoE
from mimo_titan.models.varlen_attention import PlanCache, VarlenPlan, build_plan, causal_sdpa, varlen_attention

if TYPE_CHECKING:
    from mimo_titan.config import LanguageModelConfig, RopeScalingConfig

__all__ = ["DecoderLM", "RMSNorm", "rope_cos_sin", "rope_inv_freq"]


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``, computed in fp32 and returned in the input dtype (Zhang & Sennrich,
    2019)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(
    head_dim: int, theta: float, scaling: RopeScalingConfig | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Rotary inverse frequencies ``theta ** (-2i / hd)``, ``i = 0 .. hd/2 - 1``, float32 ``[hd / 2]`` (rad/token).

    With ``scaling.type == "llama3"`` (Llama 3.1's long-context RoPE) each frequency is rescaled by its wavelength
    ``w = 2 pi / f`` relative to the pretraining context ``C = original_max_position_embeddings``: wavelengths
    shorter than ``C / high_freq_factor`` are kept, those longer than ``C / low_freq_factor`` are divided by
    ``factor``, and those in between are blended, ``f' = (1 - a) f / factor + a f`` with
    ``a = (C / w - low_freq_factor) / (high_freq_factor - low_freq_factor)``. Semantics of Meta's
    ``apply_scaling`` in llama-models (Llama 3.1) and HF transformers' ``_compute_llama3_parameters``.

    Args:
        head_dim: even head dimension hd.
        theta: RoPE base.
        scaling: a ``RopeScalingConfig`` (``type`` "none" or "llama3"), or None for plain RoPE.
        device: where to build the table.

    Raises:
        ValueError: an unknown ``scaling.type``.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    kind = "none" if scaling is None else scaling.type
    if kind == "none":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"model.language.rope_scaling.type={kind!r}; choose 'none' or 'llama3'")
    assert scaling is not None
    context = scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / scaling.factor, inv_freq)
    blend = (context / wavelen - low) / (high - low)
    blended = (1 - blend) * scaled / scaling.factor + blend * scaled
    middle = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(middle, blended, scaled)


def rope_cos_sin(
    position_ids: torch.Tensor,
    head_dim: int,
    theta: float,
    dtype: torch.dtype,
    scaling: RopeScalingConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for integer positions.

    Args:
        position_ids: ``[B, S]`` or ``[S]`` int64 global positions.
        head_dim: even head dimension hd.
        theta: RoPE base.
        dtype: dtype of the tables.
        scaling: optional RoPE scaling (``model.language.rope_scaling``), see :func:`rope_inv_freq`.

    Returns:
        ``(cos, sin)`` each ``[..., S, hd]`` in ``dtype`` (HF "rotate_half" layout: the two halves share a frequency).
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling, position_ids.device)
    freqs = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Causal grouped-query attention over SDPA (no bias, HF Llama layout).

    With ``cfg.qk_norm`` (Qwen3) queries and keys are RMS-normalised per head (``q_norm`` / ``k_norm``, weight
    ``[hd]``, HF names ``self_attn.q_norm.weight`` / ``self_attn.k_norm.weight``) on the ``[B, S, heads, hd]``
    view of the projections, before RoPE, as ``Qwen3Attention`` in HF transformers'
    ``models/qwen3/modeling_qwen3.py``.

    Plain rows (no ``doc_ids``) run ``F.scaled_dot_product_attention(is_causal=True)`` (flash kernels on CPU and
    CUDA; GQA through ``enable_gqa`` where the kernel takes it). Packed rows (``doc_ids``) run document-causal
    attention without a dense mask: one causal SDPA call per group of equally long documents
    (:mod:`mimo_titan.models.varlen_attention`); the document runs are found once per forward (one host sync) and
    cached across the layers in ``plan_cache`` by the identity and version of the ``positions`` / ``doc_ids``
    tensors.

    Inference passes ``kv_cache`` (a :class:`~mimo_titan.models.kv_cache.LayerKVCache`): the new tokens' keys and
    values (after RoPE) are appended to it and the queries attend over every cached key, causally aligned to the
    last one (query ``i`` of ``s`` new tokens sees the ``length - s + i + 1`` first keys). Plain rows only: neither
    packed rows (``doc_ids``) nor a parallel plan's ``attn_fn`` take a cache.
    """

    def __init__(self, cfg: LanguageModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(
                f"model.language.num_heads={cfg.num_heads} must be a multiple of "
                f"model.language.num_kv_heads={cfg.num_kv_heads}"
            )
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if getattr(cfg, "qk_norm", False):
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        # Replaced by a parallel plan (e.g. context parallelism): ``attn_fn(q, k, v, positions, doc_ids) -> [B, nh, S,
        # hd]`` with q ``[B, nh, S, hd]``, k / v ``[B, nkv, S, hd]``, the tokens' global positions ``[S]`` / ``[B, S]``
        # and their document ids (``[B, S]``, packed sequences) or None.
        self.attn_fn: Callable[..., torch.Tensor] | None = None
        # the document-run plan of packed rows, computed once per forward: DecoderLM shares one cache among its layers
        self.plan_cache = PlanCache()

    def forward(
        self,
        x_BSH: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        *,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        b, s, _ = x_BSH.shape
        q = self.q_proj(x_BSH).view(b, s, -1, self.head_dim)  # [B, S, nh, hd] (nh / tp under TP)
        k = self.k_proj(x_BSH).view(b, s, -1, self.head_dim)  # [B, S, nkv, hd]
        # per-head norm over hd (Qwen3; q_norm and k_norm come together); under TP a plan over the heads dim
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, nh, S, hd], [B, nkv, S, hd]
        v = self.v_proj(x_BSH).view(b, s, -1, self.head_dim).transpose(1, 2)
        if cos.dim() == 3:  # per-row positions (packed sequences): [B, S, hd] -> [B, 1, S, hd]
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if kv_cache is not None:  # inference: attend over the cached prefix and the new tokens
            if self.attn_fn is not None or doc_ids is not None:
                raise ValueError("a KV cache works on plain rows of a single-process model (no doc_ids, no attn_fn)")
            k, v = kv_cache.update(k, v)
            return self.o_proj(causal_sdpa(q, k, v).transpose(1, 2).reshape(b, s, -1))
        if self.attn_fn is not None:
            return self.o_proj(self.attn_fn(q, k, v, positions, doc_ids).transpose(1, 2).reshape(b, s, -1))
        if doc_ids is None:  # plain rows: positions 0 .. S-1
            out = causal_sdpa(q, k, v)
        else:  # packed rows: causal inside each document, never across; no [S, S] mask (see varlen_attention)
            assert positions is not None, "packed rows pass their positions with their doc_ids"
            plan = self.plan_cache.lookup(positions, doc_ids)
            if not isinstance(plan, VarlenPlan) or plan.batch != b:
                plan = build_plan(positions, positions, doc_ids, doc_ids, batch=b, device=q.device)
                self.plan_cache.store(plan, positions, doc_ids)
            out = varlen_attention(q, k, v, plan)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``; ``out = h + mlp(norm(h))``.

    ``mlp`` is a dense SwiGLU, or a :class:`~mimo_titan.models.moe.MoE` where ``cfg.moe`` makes layer
    ``layer_idx`` an MoE layer. ``kv_cache`` (inference) is this layer's
    :class:`~mimo_titan.models.kv_cache.LayerKVCache`, handed to the attention.
    """

    def __init__(self, cfg: LanguageModelConfig, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: MoE | SwiGLU
        if cfg.moe.num_experts > 0 and cfg.moe.is_moe_layer(layer_idx):
            self.mlp = MoE(cfg.hidden_size, cfg.moe)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self,
        x_BSH: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        *,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        # five positional arguments always: a tensor-parallel plan prepares them by position; the cache (inference
        # only) is passed as a keyword and only when there is one, so the training call is untouched
        if kv_cache is None:
            h = x_BSH + self.self_attn(self.input_layernorm(x_BSH), cos, sin, positions, doc_ids)
        else:
            h = x_BSH + self.self_attn(self.input_layernorm(x_BSH), cos, sin, positions, doc_ids, kv_cache=kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class _Backbone(nn.Module):
    def __init__(self, cfg: LanguageModelConfig):
        super().__init__()
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i) for i in range(cfg.num_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderLM(nn.Module):
    """Decoder-only LM (or one pipeline stage of it).

    Args:
        cfg: ``LanguageModelConfig`` (vocab_size, hidden_size, intermediate_size, num_layers, num_heads,
            num_kv_heads, head_dim, rope_theta, rope_scaling, rms_norm_eps, tie_word_embeddings, qk_norm, moe).

    Forward:
        ``x``: ``[B, S]`` int64 token ids when this part has ``embed_tokens``, else ``[B, S, H]`` hidden states.
        ``inputs_embeds``: optional ``[B, S, H]`` replacing the embedding lookup (used by the MIMO merge).
        ``position_ids``: optional ``[S]`` or ``[B, S]`` int64 global positions of the tokens (default ``0..S-1``;
        under context parallelism the positions of this rank's zigzag shard; for packed rows the position inside
        each document), used by RoPE and passed to ``attn_fn``.
        ``doc_ids``: optional ``[B, S]`` int64 document of each token (packed THD rows): attention is causal inside
        a document and never crosses documents (the positions must be distinct inside every document; no
        ``[S, S]`` mask is built, see :class:`Attention`).
        ``kv_cache``: optional :class:`~mimo_titan.models.kv_cache.KVCache` (inference): ``x`` / ``inputs_embeds``
        are then the *new* tokens only, their positions default to ``kv_cache.length + 0 .. S-1``, they attend to
        every cached token, and the cache advances by S. Plain rows only (no ``doc_ids``).
        Returns ``[B, S, V]`` logits when this part has ``lm_head``, else ``[B, S, H]`` hidden states.
        Rows are right-padded; attention is causal.

    Raises:
        ValueError: on an inconsistent config (heads not dividing, an odd head dim).
    """

    def __init__(self, cfg: LanguageModelConfig):
        super().__init__()
        self.cfg = cfg
        if not cfg.head_dim and cfg.hidden_size % cfg.num_heads:  # the config loader reports this first
            raise ValueError(
                f"model.language.hidden_size={cfg.hidden_size} is not divisible by model.language.num_heads="
                f"{cfg.num_heads}, so the head dim would not be an integer; set hidden_size to a multiple of "
                "num_heads or set model.language.head_dim"
            )
        self.head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
        if self.head_dim % 2:
            raise ValueError(
                f"the language head dim ({self.head_dim}) must be even for RoPE: set model.language.head_dim"
            )
        self.model = _Backbone(cfg)
        cache = PlanCache()  # one document-run plan per forward, shared by every layer (and every stage copy)
        for layer in self.model.layers.values():
            assert isinstance(layer, DecoderLayer)
            layer.self_attn.plan_cache = cache
        self.lm_head: nn.Linear | None = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            assert self.model.embed_tokens is not None  # a new backbone has its embedding
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[B, S, H]`` of ids ``[B, S]`` int64."""
        assert self.model.embed_tokens is not None, "only the first pipeline stage embeds tokens"
        return self.model.embed_tokens(input_ids_BS)

    def forward(
        self,
        x: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is not None:
            h = inputs_embeds
        elif self.model.embed_tokens is not None:
            h = self.embed(x)
        else:
            h = x
        past = 0 if kv_cache is None else kv_cache.length
        if position_ids is None:
            position_ids = torch.arange(past, past + h.shape[1], device=h.device)
        scaling = getattr(self.cfg, "rope_scaling", None)
        cos, sin = rope_cos_sin(position_ids, self.head_dim, self.cfg.rope_theta, h.dtype, scaling)
        if kv_cache is None:
            for layer in self.model.layers.values():
                h = layer(h, cos, sin, position_ids, doc_ids)
        else:
            for name, layer in self.model.layers.items():
                h = layer(h, cos, sin, position_ids, doc_ids, kv_cache=kv_cache.layer(name))
            kv_cache.advance(h.shape[1])
        if self.model.norm is not None:
            h = self.model.norm(h)
        if self.lm_head is not None:
            h = self.lm_head(h)
        return h

    def init_rules(self, std: float = 0.02) -> dict[str, InitRule]:
        """Init of every tensor of this (part of the) LM, names relative to it (:mod:`mimo_titan.models.init`):
        truncated normal(std) linear, embedding and MoE weights, unit norm scales. With tied embeddings a pipeline
        stage's own ``lm_head.weight`` copy is drawn as ``model.embed_tokens.weight`` (equal values)."""
        rules = layer_init_rules(self, std, norms=(RMSNorm,))
        if self.cfg.tie_word_embeddings and self.lm_head is not None:
            rules["lm_head.weight"] = InitRule("trunc_normal", std, seed_name="model.embed_tokens.weight")
        return rules

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise in place (:meth:`init_rules`, :func:`~mimo_titan.models.init.init_module_`) from ``seed``, or
        with None from a seed drawn from the global torch RNG."""
        init_module_(self, resolve_seed(seed))
