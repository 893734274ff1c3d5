"""The MIMO model: each encoder's embeddings replace the text embeddings at its placeholders (``<|image|>``,
``<|audio|>``, ...).

The encoder embeddings travel in a *dense* form ``[B, S, H]`` that holds each encoder token's embedding at the
position of its placeholder (zeros elsewhere; the encoders' placeholders are disjoint, so their dense forms add).
That form has the text's shape, so it splits into microbatches
and (later) context-parallel shards exactly like the token embeddings, and the merge is a ``where``.

Reference semantics: Megatron-LM ``megatron/core/models/mimo`` (MimoModel: encoder outputs are aligned with
special-token positions in the language model's input embeddings), LLaVA's merge.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from kernels import zigzag_position_ids, zigzag_shard, zigzag_shard_thd
from mimo_titan.models.decoder import DecoderLM
from mimo_titan.models.init import init_module_, module_init_seeds
from mimo_titan.models.specs import encoder_spec, rows_of

if TYPE_CHECKING:
    from mimo_titan.config import ModelConfig

__all__ = [
    "MimoModel",
    "LanguageStage",
    "cp_shard_rows",
    "scatter_image_embeddings",
    "merge_image_embeddings",
    "full_model_key",
    "encoder_inputs",
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
            f"the batch has {n_placeholders} placeholder tokens (id {image_token_id}) but {image_embeds_NH.shape[0]} "
            "encoder rows were given; each image (clip) must have exactly as many placeholders in its sample as "
            "the encoder makes rows of it"
        )
    b, s = input_ids_BS.shape
    dense = image_embeds_NH.new_zeros(b, s, image_embeds_NH.shape[-1])
    return dense.masked_scatter(mask.unsqueeze(-1), image_embeds_NH)


def merge_image_embeddings(
    text_embeds_BSH: torch.Tensor,
    input_ids_BS: torch.Tensor,
    image_dense_BSH: torch.Tensor,
    image_token_id: int | Sequence[int],
) -> torch.Tensor:
    """``[B, S, H]``: ``image_dense`` at placeholder positions (any of the ids ``image_token_id``), ``text_embeds``
    elsewhere (dtype of text_embeds)."""
    mask = _placeholder_mask(input_ids_BS, image_token_id).unsqueeze(-1)
    return torch.where(mask, image_dense_BSH.to(text_embeds_BSH.dtype), text_embeds_BSH)


def _placeholder_mask(input_ids_BS: torch.Tensor, ids: int | Sequence[int]) -> torch.Tensor:
    """``[B, S]`` bool: positions holding any of the placeholder ``ids``."""
    if isinstance(ids, int):
        return input_ids_BS == ids
    return torch.isin(input_ids_BS, torch.tensor(list(ids), device=input_ids_BS.device))


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
    """A pipeline stage of the language module (or the whole of it), with the encoders' merge on the first stage.

    ``image_token_id`` is the placeholder id of every encoder (an int, or a sequence of ints for several encoders:
    the dense input holds every encoder's rows, at their own placeholders).

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

    def __init__(self, language: DecoderLM, image_token_id: int | Sequence[int]):
        super().__init__()
        self.language = language
        ids = (image_token_id,) if isinstance(image_token_id, int) else tuple(image_token_id)
        # one encoder: a plain comparison in the merge; several: torch.isin
        self.image_token_id: int | tuple[int, ...] = ids[0] if len(ids) == 1 else ids
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
    """Single-process MIMO model: the encoders of ``model_cfg.encoders`` (ViT, audio, ...; each with its projector)
    feeding the decoder LM.

    This is the unsharded reference; training splits it into per-module parts (see ``mimo_titan.pipeline``).
    Each module is an attribute named as its ``[model.<name>]`` table, so parameter names are ``vision.*``,
    ``audio.*``, ``language.*`` (whatever the tables are called).

    Args:
        model_cfg: ``ModelConfig`` (one decoder, any number of encoders).
        image_token_id: id of ``<|image|>`` in the tokenizer.
        audio_token_id: id of ``<|audio|>`` (needed when an encoder reads audio).

    Forward:
        input_ids ``[B, S]`` int64; pixel_values ``[N, C, H_img, W_img]`` float (images in sample order, for the
        encoders of media ``image``) or ``encoder_inputs`` (encoder name → its forward arguments, see
        :func:`encoder_inputs`); for packed (THD) rows ``position_ids`` / ``doc_ids`` ``[B, S]`` int64 → logits
        ``[B, S, V]``. An encoder without inputs (none in the batch) encodes one dummy item whose rows are dropped,
        so its parameters still get (zero) gradients, as on a distributed rank with nothing to encode.

    Raises:
        ValueError: an encoder whose rows differ in number from its placeholders; an audio encoder without
            ``audio_token_id``.
    """

    def __init__(self, model_cfg: ModelConfig, image_token_id: int, *, audio_token_id: int | None = None):
        super().__init__()
        self.encoder_names = list(model_cfg.encoders)
        self.language_name = model_cfg.language_name
        lm_cfg = model_cfg.language
        self.placeholder_ids: dict[str, int] = {}
        self._sections = {}
        for name, section in model_cfg.encoders.items():
            spec = encoder_spec(section.type)
            self.add_module(name, spec.build(section, lm_cfg.hidden_size))
            token = image_token_id if spec.media == "image" else audio_token_id
            if token is None:
                raise ValueError(
                    f"model.{name} reads {spec.media}; MimoModel needs its placeholder id ({spec.media}_token_id)"
                )
            self.placeholder_ids[name] = token
            self._sections[name] = section
        self.add_module(self.language_name, DecoderLM(lm_cfg))
        self.image_token_id = image_token_id

    @property
    def lm(self) -> DecoderLM:
        """The decoder LM."""
        return getattr(self, self.language_name)

    def encoder(self, name: str) -> nn.Module:
        """The encoder module of ``[model.<name>]``."""
        return getattr(self, name)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic init, independent of any parallel layout (:mod:`mimo_titan.models.init`): the module at
        position k (encoders in config order, then the LM) has init seed ``seed + k``, every tensor its own seed
        from that and its name here (``vision.*``, ``language.*``), so a rank that materialises only its shards of
        a meta-device model gets exactly these values. The global RNG is not touched."""
        seeds = module_init_seeds(seed, [*self.encoder_names, self.language_name])
        for name, module_seed in seeds.items():
            init_module_(getattr(self, name), module_seed, functools.partial(full_model_key, name))

    def forward(
        self,
        input_ids_BS: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        *,
        encoder_inputs: Mapping[str, tuple[torch.Tensor, ...] | None] | None = None,
    ) -> torch.Tensor:
        dense = self.encode(input_ids_BS, pixel_values, encoder_inputs=encoder_inputs)
        stage = LanguageStage(self.lm, tuple(self.placeholder_ids.values()))
        return stage(input_ids_BS, dense, position_ids, doc_ids)

    def encode(
        self,
        input_ids_BS: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        encoder_inputs: Mapping[str, tuple[torch.Tensor, ...] | None] | None = None,
    ) -> torch.Tensor | None:
        """Every encoder's rows placed at its placeholders of ``input_ids_BS`` ``[B, S]``: the dense form ``[B, S, H]``
        (zeros outside the placeholders) that :func:`merge_image_embeddings` merges into the token embeddings; None
        for a model without encoders. Inputs as :meth:`forward`'s (an encoder without inputs encodes one dummy item
        whose rows are dropped).

        Raises:
            ValueError: an encoder whose rows differ in number from its placeholders.
        """
        given = dict(encoder_inputs or {})
        dense = None
        for name in self.encoder_names:
            section = self._sections[name]
            spec = encoder_spec(section.type)
            if name in given:
                args = given[name]
            elif spec.media == "image" and pixel_values is not None and pixel_values.shape[0]:
                args = (pixel_values,)
            else:
                args = None
            n_rows = None if args is not None else 0
            if args is None:
                first = next(self.encoder(name).parameters())
                args = tuple(t.to(first.device) for t in spec.dummy_inputs(section))
            rows = rows_of(self.encoder(name)(*args))
            if n_rows == 0:
                rows = rows[:0]
            part = scatter_image_embeddings(rows, input_ids_BS, self.placeholder_ids[name])
            dense = part if dense is None else dense + part
        return dense


def encoder_inputs(model_cfg: ModelConfig, batch) -> dict[str, tuple[torch.Tensor, ...] | None]:
    """Every encoder's forward arguments from ``batch`` (a ``Batch``), None for an encoder without items in it."""
    return {name: encoder_spec(sec.type).inputs(batch) for name, sec in model_cfg.encoders.items()}
