"""Vision encoder: a pre-norm ViT plus the MLP projector into the language model's hidden size.

Parameter names follow Hugging Face's CLIP / SigLIP vision towers (``vision_model.embeddings.patch_embedding``,
``vision_model.encoder.layers.{i}.self_attn.q_proj``, ...) and LLaVA's projector
(``multi_modal_projector.linear_1`` / ``linear_2``), so a later weight import is a name map.

Method: Dosovitskiy et al., "An Image is Worth 16x16 Words" (2021); projector as in Liu et al., "Visual
Instruction Tuning" (LLaVA-1.5, 2023).

Shape legend: N images, C channels, P patches per image, D ViT width, H language-model hidden size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mimo_titan.models.init import InitRule, init_module_, layer_init_rules, resolve_seed
from mimo_titan.models.moe import MoE

if TYPE_CHECKING:
    from mimo_titan.config import MoEConfig, VisionModelConfig

__all__ = ["VisionEncoder", "ViT", "Projector"]


class _Attention(nn.Module):
    """Bidirectional multi-head self-attention over the patches.

    ``real_patches`` (``None`` by default: every position is a patch) is set by a tensor-parallel plan that pads the
    patch sequence to a multiple of tp (:func:`mimo_titan.parallel.tp.apply_tp_vision`): positions from
    ``real_patches`` on are padding and are masked out as keys, so no real patch attends to them.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"model.vision.hidden_size={dim} must be divisible by model.vision.num_heads={num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.real_patches: int | None = None

    def forward(self, x_NPD: torch.Tensor) -> torch.Tensor:
        n, p, d = x_NPD.shape
        hd = d // self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # under tensor parallelism a rank holds heads / tp heads
            return t.view(n, p, t.shape[-1] // hd, hd).transpose(1, 2)

        q, k, v = heads(self.q_proj(x_NPD)), heads(self.k_proj(x_NPD)), heads(self.v_proj(x_NPD))
        mask = None  # a key-padding mask [1, 1, 1, P_padded] (True: a real patch), only when padding exists
        if self.real_patches is not None and p > self.real_patches:
            mask = (torch.arange(p, device=x_NPD.device) < self.real_patches).view(1, 1, 1, p)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # bidirectional over patches
        return self.out_proj(out.transpose(1, 2).reshape(n, p, out.shape[1] * hd))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``; ``mlp`` may be an MoE."""

    def __init__(self, dim: int, num_heads: int, intermediate_size: int, eps: float, moe_cfg: MoEConfig | None = None):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = _Attention(dim, num_heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MoE(dim, moe_cfg) if moe_cfg is not None else _MLP(dim, intermediate_size)

    def forward(self, x_NPD: torch.Tensor) -> torch.Tensor:
        x_NPD = x_NPD + self.self_attn(self.layer_norm1(x_NPD))
        return x_NPD + self.mlp(self.layer_norm2(x_NPD))


class _Embeddings(nn.Module):
    def __init__(self, cfg: VisionModelConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_patches, cfg.hidden_size)

    def forward(self, pixel_values_NCHW: torch.Tensor) -> torch.Tensor:
        # the stride-p convolution written as patchify + linear (same weights, same result): DTensor's convolution
        # backward over-counts the weight gradient of a replicated conv on torch 2.11 (tensor-parallel encoders)
        conv = self.patch_embedding
        p = conv.kernel_size[0]
        n, c, h, w = pixel_values_NCHW.shape
        # a border that is not a whole patch is dropped, as the stride-p convolution (and HF's SigLIP) does
        x = (
            pixel_values_NCHW[:, :, : h // p * p, : w // p * p]
            .to(conv.weight.dtype)
            .reshape(n, c, h // p, p, w // p, p)
        )
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)  # [N, P, C p p], row-major patches
        x_NPD = F.linear(x, conv.weight.flatten(1), conv.bias)
        return x_NPD + self.position_embedding.weight.unsqueeze(0)


class _Encoder(nn.Module):
    def __init__(self, cfg: VisionModelConfig):
        super().__init__()
        moe = cfg.moe if cfg.moe.num_experts > 0 else None
        # keyed by the global layer index (a pipeline stage keeps a contiguous range under the same names)
        self.layers = nn.ModuleDict(
            {
                str(i): ViTBlock(
                    cfg.hidden_size,
                    cfg.num_heads,
                    cfg.intermediate_size,
                    cfg.norm_eps,
                    moe if moe is not None and moe.is_moe_layer(i) else None,
                )
                for i in range(cfg.num_layers)
            }
        )

    def forward(self, x_NPD: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x_NPD = layer(x_NPD)
        return x_NPD


class ViT(nn.Module):
    """Patch embedding + learned positions + pre-norm blocks + final LayerNorm; returns every patch token."""

    def __init__(self, cfg: VisionModelConfig):
        super().__init__()
        if cfg.image_size < cfg.patch_size:
            raise ValueError(
                f"model.vision.image_size={cfg.image_size} must be at least model.vision.patch_size={cfg.patch_size}"
            )
        self.embeddings: _Embeddings | None = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.post_layernorm: nn.LayerNorm | None = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def mask_padded_patches(self, padded_len: int) -> None:
        """Treat positions ``P .. padded_len - 1`` of the patch sequence as padding: every attention masks them out
        as keys, so the ``P`` real patches' outputs do not depend on them (the padded rows themselves are computed
        but meaningless; the caller drops them). ``padded_len == P`` removes the mask.

        Used by :func:`mimo_titan.parallel.tp.apply_tp_vision`, which pads the sequence to a multiple of tp.
        """
        assert self.embeddings is not None, "the whole ViT (its first pipeline stage) knows its patch count"
        real = self.embeddings.num_patches
        assert padded_len >= real, f"cannot pad {real} patches to {padded_len}"
        for layer in self.encoder.layers.values():
            assert isinstance(layer, ViTBlock)
            layer.self_attn.real_patches = real if padded_len > real else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels ``[N, C, H_img, W_img]`` → ``[N, P, D]``; a pipeline stage without ``embeddings`` takes the previous
        stage's ``[N, P, D]``, one without ``post_layernorm`` returns its last block's output."""
        x_NPD = self.embeddings(x) if self.embeddings is not None else x
        x_NPD = self.encoder(x_NPD)
        return self.post_layernorm(x_NPD) if self.post_layernorm is not None else x_NPD


class Projector(nn.Module):
    """Two-layer GELU MLP from the ViT width D to the language model's hidden size H (LLaVA-1.5)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class VisionEncoder(nn.Module):
    """The vision module of a MIMO model: ViT followed by the projector.

    Args:
        cfg: ``VisionModelConfig`` (image_size, patch_size, num_channels, hidden_size, num_layers, num_heads,
            intermediate_size, norm_eps, projector_intermediate_size).
        out_dim: the language model's hidden size H.

    Forward:
        pixel_values ``[N, C, image_size, image_size]`` float → ``[N, P, H]`` in the parameters' dtype, where
        ``P = (image_size // patch_size) ** 2`` is :attr:`tokens_per_image`.
    """

    def __init__(self, cfg: VisionModelConfig, out_dim: int):
        super().__init__()
        self.vision_model = ViT(cfg)
        self.multi_modal_projector: Projector | None = Projector(
            cfg.hidden_size, cfg.projector_intermediate_size, out_dim
        )
        self.tokens_per_image = (cfg.image_size // cfg.patch_size) ** 2
        self.out_dim = out_dim
        self.cfg = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels → ``[N, P, H]``; a pipeline stage (:func:`~mimo_titan.pipeline.stages.split_vision_encoder`) maps
        pixels or the previous stage's ``[N, P, D]`` to ``[N, P, D]``, the last stage to ``[N, P, H]``."""
        out = self.vision_model(x)
        return self.multi_modal_projector(out) if self.multi_modal_projector is not None else out

    @property
    def is_first_stage(self) -> bool:
        """Whether this (part of the) encoder takes pixels."""
        return self.vision_model.embeddings is not None

    @property
    def is_last_stage(self) -> bool:
        """Whether this (part of the) encoder ends with the projector (its output crosses the bridge)."""
        return self.multi_modal_projector is not None

    def init_rules(self, std: float = 0.02) -> dict[str, InitRule]:
        """Init of every tensor of this (part of the) encoder, names relative to it (:mod:`mimo_titan.models.init`):
        truncated normal(std) weights (linear, patch, position, MoE), zero biases, unit LayerNorm scales."""
        return layer_init_rules(self, std)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise in place (:meth:`init_rules`, :func:`~mimo_titan.models.init.init_module_`) from ``seed``, or
        with None from a seed drawn from the global torch RNG."""
        init_module_(self, resolve_seed(seed))
