"""The MIMO vision-language model: image embeddings replace the text embeddings at ``<|image|>`` placeholders.

The image embeddings travel in a *dense* form ``[B, S, H]`` that holds each image token's embedding at the
position of its placeholder (zeros elsewhere). That form has the text's shape, so it splits into microbatches
and (later) context-parallel shards exactly like the token embeddings, and the merge is a ``where``.

Reference semantics: Megatron-LM ``megatron/core/models/mimo`` (MimoModel: encoder outputs are aligned with
special-token positions in the language model's input embeddings), LLaVA's merge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from kernels import zigzag_position_ids, zigzag_shard, zigzag_shard_thd
from mimo_titan.models.decoder import DecoderLM
from mimo_titan.models.vit import VisionEncoder

if TYPE_CHECKING:
    from mimo_titan.config import ModelConfig

__all__ = [
    "MimoModel",
    "LanguageStage",
    "cp_shard_rows",
    "scatter_image_embeddings",
    "merge_image_embeddings",
    "full_model_key",
]


def full_model_key(module_name: str, key: str) -> str:
    """The :class:`MimoModel` name of ``key`` inside module ``module_name`` (``"vision"`` / ``"language"``), whether
    ``key`` is relative to the module (``vision_model.post_layernorm.weight``) or to a wrapper that already
    starts with it (a :class:`LanguageStage`'s ``language.model.norm.weight``)."""
    return key if key.startswith(module_name + ".") else f"{module_name}.{key}"


def scatter_image_embeddings(
    image_embeds_NH: torch.Tensor, input_ids_BS: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Place image-token embeddings at the placeholder positions of a token batch.

    Args:
        image_embeds_NH: ``[N, H]`` embeddings of every image token of the batch, in row-major placeholder
            order (sample by sample, left to right).
        input_ids_BS: ``[B, S]`` int64 token ids.
        image_token_id: id of ``<|image|>``.

    Returns:
        ``[B, S, H]`` (dtype of ``image_embeds_NH``): row ``(b, t)`` is the next image embedding where
        ``input_ids[b, t]`` is a placeholder, zero elsewhere. Differentiable w.r.t. ``image_embeds_NH``.

    Raises:
        ValueError: if the number of placeholders differs from N.
    """
    mask = input_ids_BS == image_token_id
    n_placeholders = int(mask.sum())
    if n_placeholders != image_embeds_NH.shape[0]:
        raise ValueError(
            f"the batch has {n_placeholders} <|image|> placeholder tokens but {image_embeds_NH.shape[0]} image-token "
            "embeddings were given; each image must have exactly tokens_per_image placeholders in its sample"
        )
    b, s = input_ids_BS.shape
    dense = image_embeds_NH.new_zeros(b, s, image_embeds_NH.shape[-1])
    return dense.masked_scatter(mask.unsqueeze(-1), image_embeds_NH)


def merge_image_embeddings(
    text_embeds_BSH: torch.Tensor, input_ids_BS: torch.Tensor, image_dense_BSH: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """``[B, S, H]``: ``image_dense`` at placeholder positions, ``text_embeds`` elsewhere (dtype of text_embeds)."""
    mask = (input_ids_BS == image_token_id).unsqueeze(-1)
    return torch.where(mask, image_dense_BSH.to(text_embeds_BSH.dtype), text_embeds_BSH)


def cp_shard_rows(x: torch.Tensor, cp_size: int, cp_rank: int, doc_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
    """This CP rank's zigzag shard of every row of ``x`` ``[B, S, ...]`` → ``[B, S / cp_size, ...]``.

    Without ``doc_ids_BS`` each row is one sequence (``kernels.zigzag_shard``: chunks ``r`` and ``2·cp − 1 − r``
    of ``2·cp``). With ``doc_ids_BS`` (``[B, S]`` int64, packed THD rows whose documents are contiguous runs of
    equal ids, every run a multiple of ``2·cp`` long) every document is zigzag-sharded on its own
    (``kernels.zigzag_shard_thd`` over the rows laid end to end), so each row keeps ``S / cp`` tokens.
    Differentiable w.r.t. ``x``.

    Raises:
        ValueError: a sequence or document length not divisible by ``2·cp`` (from the kernels).
    """
    if cp_size == 1:
        return x
    if doc_ids_BS is None:
        return zigzag_shard(x, cp_size, cp_rank, seq_dim=1)
    B, S = doc_ids_BS.shape
    flat = (doc_ids_BS.detach().cpu() + torch.arange(B).unsqueeze(1) * (S + 1)).flatten()  # ids unique per row
    starts = torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), starts, torch.tensor([B * S])]).to(torch.int32)
    local, _ = zigzag_shard_thd(x.flatten(0, 1), cu_seqlens, cp_size, cp_rank)
    return local.view(B, S // cp_size, *x.shape[2:])


class LanguageStage(nn.Module):
    """A pipeline stage of the language module (or the whole of it), with the image merge on the first stage.

    The merge lives here, not in :class:`DecoderLM`, so the language model stays a plain LM; FSDP wraps this
    module as the stage root so the embedding lookup runs inside a sharded module's forward.

    Forward:
        first stage: ``(input_ids [B, S] int64, image_dense [B, S, H] float)``; other stages:
        ``(hidden [B, S / (cp·tp), H])``; every stage also takes, for packed (THD) rows, ``position_ids`` and
        ``doc_ids`` ``[B, S]`` int64 of the full rows (positions inside each document; document index).
        Returns logits ``[B, S / cp, V / tp]`` on the last stage, hidden states ``[B, S / (cp·tp), H]`` otherwise.

        With context parallelism (``cp_size > 1``) the first stage zigzag-shards the merged embeddings over the
        sequence (every packed document on its own), and every stage gives RoPE and attention the global
        positions (and documents) of its shard. With sequence parallelism (``sp_mesh`` set by the tensor-parallel
        plan) the first stage then scatters the embeddings' sequence over the tp ranks; only the embeddings are
        scattered, positions stay those of the whole CP shard (attention all-gathers the sequence).
    """

    def __init__(self, language: DecoderLM, image_token_id: int):
        super().__init__()
        self.language = language
        self.image_token_id = image_token_id
        self.is_first = language.model.embed_tokens is not None
        self.cp_size, self.cp_rank = 1, 0  # set by the context-parallel plan (mimo_titan.parallel.cp)
        # set by the tensor-parallel plan (mimo_titan.parallel.tp): ``[B, S, H]`` -> this rank's ``[B, S / sp, H]``
        self.sp_size = 1
        self.sp_scatter: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(
        self,
        x: torch.Tensor,
        image_dense_BSH: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if position_ids is not None:  # packed rows: this rank's positions and documents, sharded like its tokens
            assert doc_ids is not None, "packed rows pass their doc_ids with their position_ids"
            index = torch.stack([position_ids, doc_ids], dim=-1)  # [B, S, 2]: one shard call for both
            positions, local_doc_ids = cp_shard_rows(index, self.cp_size, self.cp_rank, doc_ids).unbind(-1)
        else:
            seq_len = x.shape[1] if self.is_first else x.shape[1] * self.sp_size * self.cp_size
            positions, local_doc_ids = self._positions(seq_len, x.device), None
        if not self.is_first:
            return self.language(x, position_ids=positions, doc_ids=local_doc_ids)
        embeds = self.language.embed(x)
        if image_dense_BSH is not None:
            embeds = merge_image_embeddings(embeds, x, image_dense_BSH, self.image_token_id)
        # after the merge: this rank keeps its zigzag shard of the sequence, then its SP slice of that
        embeds = cp_shard_rows(embeds, self.cp_size, self.cp_rank, doc_ids)
        if self.sp_scatter is not None:
            embeds = self.sp_scatter(embeds)
        return self.language(x, inputs_embeds=embeds, position_ids=positions, doc_ids=local_doc_ids)

    def _positions(self, seq_len: int, device) -> torch.Tensor:
        """Global positions ``[S / cp]`` of this rank's tokens of a length-``seq_len`` sequence."""
        if self.cp_size == 1:
            return torch.arange(seq_len, device=device)
        return zigzag_position_ids(seq_len, self.cp_size, self.cp_rank, device)


class MimoModel(nn.Module):
    """Single-process vision-language model: ``vision`` (ViT + projector) feeding ``language`` (decoder LM).

    This is the unsharded reference; training splits it into per-module parts (see ``mimo_titan.pipeline``).
    Parameter names are ``vision.*`` and ``language.*``.

    Args:
        model_cfg: ``ModelConfig`` with ``vision`` and ``language`` sections.
        image_token_id: id of ``<|image|>`` in the tokenizer.

    Forward:
        input_ids ``[B, S]`` int64, pixel_values ``[N, C, H_img, W_img]`` float (images in sample order), and for
        packed (THD) rows ``position_ids`` / ``doc_ids`` ``[B, S]`` int64 → logits ``[B, S, V]``.

    Raises:
        ValueError: if the number of placeholders differs from ``N * tokens_per_image``.
    """

    def __init__(self, model_cfg: ModelConfig, image_token_id: int):
        super().__init__()
        self.vision = VisionEncoder(model_cfg.vision, model_cfg.language.hidden_size)
        self.language = DecoderLM(model_cfg.language)
        self.image_token_id = image_token_id

    def init_weights(self, seed: int) -> None:
        """Deterministic init, independent of any parallel layout: module k is drawn from ``seed + k``.

        The CPU RNG state is restored afterwards (initialisation runs on CPU).
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.vision.init_weights()
            torch.manual_seed(seed + 1)
            self.language.init_weights()

    def forward(
        self,
        input_ids_BS: torch.Tensor,
        pixel_values: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        image_embeds = self.vision(pixel_values).flatten(0, 1)  # [N * P, H]
        dense = scatter_image_embeddings(image_embeds, input_ids_BS, self.image_token_id)
        return LanguageStage(self.language, self.image_token_id)(input_ids_BS, dense, position_ids, doc_ids)
