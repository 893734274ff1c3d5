"""The MIMO vision-language model: image embeddings replace the text embeddings at ``<|image|>`` placeholders.

The image embeddings travel in a *dense* form ``[B, S, H]`` that holds each image token's embedding at the
position of its placeholder (zeros elsewhere). That form has the text's shape, so it splits into microbatches
and (later) context-parallel shards exactly like the token embeddings, and the merge is a ``where``.

Reference semantics: Megatron-LM ``megatron/core/models/mimo`` (MimoModel: encoder outputs are aligned with
special-token positions in the language model's input embeddings), LLaVA's merge.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import zigzag_position_ids, zigzag_shard
from mimo_titan.models.decoder import DecoderLM
from mimo_titan.models.vit import VisionEncoder

__all__ = ["MimoModel", "LanguageStage", "scatter_image_embeddings", "merge_image_embeddings"]


def scatter_image_embeddings(image_embeds_NH: torch.Tensor, input_ids_BS: torch.Tensor, image_token_id: int) -> torch.Tensor:
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


class LanguageStage(nn.Module):
    """A pipeline stage of the language module (or the whole of it), with the image merge on the first stage.

    The merge lives here, not in :class:`DecoderLM`, so the language model stays a plain LM; FSDP wraps this
    module as the stage root so the embedding lookup runs inside a sharded module's forward.

    Forward:
        first stage: ``(input_ids [B, S] int64, image_dense [B, S, H] float)``; other stages:
        ``(hidden [B, S / cp, H])``. Returns logits ``[B, S / cp, V]`` on the last stage, hidden states otherwise.
        With context parallelism (``cp_size > 1``) the first stage zigzag-shards the merged embeddings over the
        sequence, and every stage gives RoPE and attention the global positions of its shard.
    """

    def __init__(self, language: DecoderLM, image_token_id: int):
        super().__init__()
        self.language = language
        self.image_token_id = image_token_id
        self.is_first = language.model.embed_tokens is not None
        self.cp_size, self.cp_rank = 1, 0  # set by the context-parallel plan (mimo_titan.parallel.cp)

    def forward(self, x: torch.Tensor, image_dense_BSH: torch.Tensor | None = None) -> torch.Tensor:
        if not self.is_first:
            return self.language(x, position_ids=self._positions(x.shape[1] * self.cp_size, x.device))
        embeds = self.language.embed(x)
        if image_dense_BSH is not None:
            embeds = merge_image_embeddings(embeds, x, image_dense_BSH, self.image_token_id)
        if self.cp_size > 1:  # after the merge: this rank keeps its zigzag shard of the sequence
            embeds = zigzag_shard(embeds, self.cp_size, self.cp_rank, seq_dim=1)
        return self.language(x, inputs_embeds=embeds, position_ids=self._positions(x.shape[1], x.device))

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
        input_ids ``[B, S]`` int64, pixel_values ``[N, C, H_img, W_img]`` float (images in sample order) →
        logits ``[B, S, V]``.

    Raises:
        ValueError: if the number of placeholders differs from ``N * tokens_per_image``.
    """

    def __init__(self, model_cfg, image_token_id: int):
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

    def forward(self, input_ids_BS: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values).flatten(0, 1)  # [N * P, H]
        dense = scatter_image_embeddings(image_embeds, input_ids_BS, self.image_token_id)
        return LanguageStage(self.language, self.image_token_id)(input_ids_BS, dense)
