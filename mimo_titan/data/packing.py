"""Sequence packing (THD layout) of multimodal samples, for context parallelism.

Instead of one padded sample per row (:func:`~mimo_titan.data.collate.collate`), several
samples ("documents") share a row of ``S`` tokens, as in the packed THD format of
Megatron-LM / NeMo / Transformer Engine: a row is the concatenation of its documents,
described by ``cu_seqlens`` (0, then the cumulative document lengths). Attention must
be block-diagonal causal over the documents (varlen / THD attention, or the mask of
:meth:`PackedBatch.attention_mask`), and RoPE positions restart at 0 in every document
(:attr:`PackedBatch.position_ids`), so a packed document is computed exactly as it
would be alone.

Layout of one row (``multiple = 4``, documents of 6 and 3 tokens, ``S = 16``)::

    tokens      a0 a1 a2 a3 a4 a5 pp pp | b0 b1 b2 pp | pp pp pp pp
    doc_ids      0  0  0  0  0  0  0  0 |  1  1  1  1 |  2  2  2  2
    position_ids 0  1  2  3  4  5  6  7 |  0  1  2  3 |  0  1  2  3
    labels      a1 a2 a3 a4 a5  -  -  - | b1 b2  -  - |  -  -  -  -
    cu_seqlens  [0, 8, 12, 16]          cu_seqlens_unpadded [0, 6, 9, 9]

Every document is padded up to a multiple of ``multiple`` (the semantics of
:func:`kernels.pad_cu_seqlens`: the padding tokens belong to the document, after its
real tokens), so that :func:`kernels.zigzag_shard_thd` with ``2 * cp_size == multiple``
(or a divisor of it) can cut every document into ``2 * cp_size`` equal chunks. The rest
of a row after its last document is one more padding-only document, so
``cu_seqlens[-1] == S``. Real tokens never attend to padding: padding inside a document
comes after its real tokens and continues their positions (hidden by the causal mask)
and the tail padding is a document of its own. So within every segment the positions
are ``0, 1, 2, ...`` along the row, and the mask can be computed from per-token
``(doc_id, position)`` alone, ``doc_q == doc_k and pos_k <= pos_q``, which context
parallelism needs (it reorders the tokens, so the row index is not available there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mimo_titan.data.collate import IGNORE_INDEX, Sample, cat_images
from mimo_titan.errors import ConfigError

__all__ = [
    "PackedBatch",
    "check_pack_multiple",
    "concat_packed_batches",
    "first_fit_row",
    "pack",
    "packed_length",
]


@dataclass
class PackedBatch:
    """Samples packed into rows of ``S`` tokens (THD format, see the module docstring).

    Rows play the role of :class:`~mimo_titan.data.collate.Batch` samples: they are
    the units split over data-parallel ranks and microbatches
    (:func:`~mimo_titan.data.sharding.local_batch`, via :meth:`slice` and
    :func:`concat_packed_batches`) and sent across the bridge, so
    :attr:`images_per_sample` aliases :attr:`images_per_row`.

    Row ``r`` owns the image rows
    ``pixel_values[sum(images_per_row[:r]) : sum(images_per_row[:r + 1])]``, in the order
    of their ``<|image|>`` blocks in ``input_ids[r]`` (documents in row order, each
    document's images in its own order).

    Attributes:
        input_ids: ``[R, S]`` int64; padding is ``pad_id``.
        labels: ``[R, S]`` int64: the next token of the same document, or
            ``IGNORE_INDEX`` (-100) where that target is an ``<|image|>`` placeholder,
            padding, or past the document's last token (no prediction across
            documents). A document truncated to ``S`` tokens keeps its real next token
            as the target of its last kept token, as :func:`collate` does.
        position_ids: ``[R, S]`` int64: position of each token within its own document
            (``0 .. len - 1``), so RoPE restarts per document. Padding inside a
            document continues its positions (``len, len + 1, ...``) and the tail
            padding document gets ``0 .. S - cu_seqlens[-2] - 1``: in every
            ``cu_seqlens`` segment the positions are ``0, 1, 2, ...``, so
            ``doc_q == doc_k and pos_k <= pos_q`` is exactly :meth:`attention_mask`
            (without the row order, e.g. after zigzag reordering).
        doc_ids: ``[R, S]`` int64: index ``d`` of the ``cu_seqlens`` segment holding the
            token (``cu_seqlens[r][d] <= t < cu_seqlens[r][d + 1]``). Padding inside a
            document has that document's id; the tail padding of a row is a document of
            its own (the row's last id), so tokens may attend to each other iff their
            ids are equal (and causally), and real tokens never see padding.
        cu_seqlens: per row, int32 ``[D_r + 1]``: 0, then the cumulative *padded*
            document lengths (every length a multiple of ``multiple``); the last entry
            is ``S``. ``D_r`` counts the tail padding document when there is one.
            Transformer Engine's ``cu_seqlens_q_padded``.
        pixel_values: ``[N_img, 3, H, W]`` float32, images of all documents in
            row-major document order.
        images_per_row: ``[R]`` int64.
        sample_ids: per row, the ``sample_id`` of each real document in row order
            (the tail padding document has none). Unlike :attr:`Batch.sample_ids`
            (an int64 ``[B]`` tensor, one id per row) this is a list of lists, as a
            row holds several samples.
        cu_seqlens_unpadded: per row, int32 ``[D_r + 1]``: the cumulative *real*
            lengths of the same segments (0 for padding-only segments); the real tokens
            of document ``d`` are ``cu_seqlens[d] : cu_seqlens[d] + (cu_seqlens_unpadded[d + 1]
            - cu_seqlens_unpadded[d])``. Transformer Engine's ``cu_seqlens_q``.
    """

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    doc_ids: Tensor
    cu_seqlens: list[Tensor]
    pixel_values: Tensor
    images_per_row: Tensor
    sample_ids: list[list[int]]
    cu_seqlens_unpadded: list[Tensor]

    def __len__(self) -> int:
        """Number of rows ``R``."""
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        """Row length ``S``."""
        return int(self.input_ids.shape[1])

    @property
    def images_per_sample(self) -> Tensor:
        """``[R]`` int64, :attr:`images_per_row` (read-only alias, so code written for
        :class:`~mimo_titan.data.collate.Batch`, whose samples are rows, works)."""
        return self.images_per_row

    def _image_offsets(self) -> list[int]:
        return [0, *torch.cumsum(self.images_per_row, 0).tolist()]

    def slice(self, start: int, end: int) -> PackedBatch:
        """Rows ``[start, end)`` together with exactly their images.

        Args:
            start: First row (inclusive), ``0 <= start <= end``.
            end: Last row (exclusive), ``end <= len(self)``.

        Returns:
            A new :class:`PackedBatch`; its tensors are views into this one and its
            lists are new lists of the same per-row tensors.

        Raises:
            ValueError: The range is outside ``[0, len(self)]`` or reversed.
        """
        if not 0 <= start <= end <= len(self):
            raise ValueError(f"invalid row range [{start}, {end}) for a packed batch of {len(self)} rows")
        offsets = self._image_offsets()
        return PackedBatch(
            input_ids=self.input_ids[start:end],
            labels=self.labels[start:end],
            position_ids=self.position_ids[start:end],
            doc_ids=self.doc_ids[start:end],
            cu_seqlens=list(self.cu_seqlens[start:end]),
            pixel_values=self.pixel_values[offsets[start] : offsets[end]],
            images_per_row=self.images_per_row[start:end],
            sample_ids=[list(s) for s in self.sample_ids[start:end]],
            cu_seqlens_unpadded=list(self.cu_seqlens_unpadded[start:end]),
        )

    def num_loss_tokens(self) -> int:
        """Number of label positions that contribute to the loss (``labels != -100``)."""
        return int((self.labels != IGNORE_INDEX).sum().item())

    def real_token_mask(self) -> Tensor:
        """bool ``[R, S]``: True at the real (non-padding) tokens of every document."""
        mask = torch.zeros(self.input_ids.shape, dtype=torch.bool)
        for r, (cu, cu_real) in enumerate(zip(self.cu_seqlens, self.cu_seqlens_unpadded)):
            starts = cu[:-1].tolist()
            lengths = (cu_real[1:] - cu_real[:-1]).tolist()
            for s, n in zip(starts, lengths):
                mask[r, s : s + n] = True
        return mask.to(self.input_ids.device)

    def attention_mask(self) -> Tensor:
        """bool ``[R, S, S]`` block-diagonal causal mask: ``[r, q, k]`` is True iff query
        ``q`` may attend to key ``k`` (same document and ``k <= q``).

        For reference / small-scale use (``O(S^2)`` memory); THD attention kernels take
        :attr:`cu_seqlens` instead. Usable as ``attn_mask`` of
        :func:`torch.nn.functional.scaled_dot_product_attention` (after ``unsqueeze(1)``).
        """
        S = self.seq_len
        same = self.doc_ids.unsqueeze(2) == self.doc_ids.unsqueeze(1)
        causal = torch.ones(S, S, dtype=torch.bool, device=self.doc_ids.device).tril()
        return same & causal

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """Copy all tensors (``cu_seqlens`` included) to ``device``, dtypes unchanged."""

        def mv(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=non_blocking)

        return PackedBatch(
            input_ids=mv(self.input_ids),
            labels=mv(self.labels),
            position_ids=mv(self.position_ids),
            doc_ids=mv(self.doc_ids),
            cu_seqlens=[mv(c) for c in self.cu_seqlens],
            pixel_values=mv(self.pixel_values),
            images_per_row=mv(self.images_per_row),
            sample_ids=[list(s) for s in self.sample_ids],
            cu_seqlens_unpadded=[mv(c) for c in self.cu_seqlens_unpadded],
        )


def concat_packed_batches(batches: Sequence[PackedBatch]) -> PackedBatch:
    """Concatenate packed batches along the row dimension (images follow their rows).

    Args:
        batches: Packed batches with the same row length and image shape (at least one).

    Returns:
        A :class:`PackedBatch` with ``sum(len(b) for b in batches)`` rows.

    Raises:
        ValueError: ``batches`` is empty, or row lengths / image shapes differ.
    """
    if not batches:
        raise ValueError("concat_packed_batches needs at least one batch")
    seq_lens = {b.seq_len for b in batches}
    if len(seq_lens) != 1:
        raise ValueError(f"cannot concatenate packed batches with different row lengths {sorted(seq_lens)}")
    image_shapes = {tuple(b.pixel_values.shape[1:]) for b in batches}
    if len(image_shapes) != 1:
        raise ValueError(f"cannot concatenate packed batches with different image shapes {sorted(image_shapes)}")
    return PackedBatch(
        input_ids=torch.cat([b.input_ids for b in batches], dim=0),
        labels=torch.cat([b.labels for b in batches], dim=0),
        position_ids=torch.cat([b.position_ids for b in batches], dim=0),
        doc_ids=torch.cat([b.doc_ids for b in batches], dim=0),
        cu_seqlens=[c for b in batches for c in b.cu_seqlens],
        pixel_values=cat_images([b.pixel_values for b in batches]),
        images_per_row=torch.cat([b.images_per_row for b in batches], dim=0),
        sample_ids=[list(s) for b in batches for s in b.sample_ids],
        cu_seqlens_unpadded=[c for b in batches for c in b.cu_seqlens_unpadded],
    )


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def check_pack_multiple(seq_len: int, multiple: int) -> None:
    """Validate the row length and document-length multiple of :func:`pack`.

    Args:
        seq_len: ``training.seq_len``, the row length ``S``.
        multiple: The document-length multiple (e.g. ``2 * cp_size``).

    Raises:
        ValueError: ``multiple`` not a positive int.
        ConfigError: ``seq_len`` not positive, or ``seq_len % multiple != 0`` (names
            ``training.seq_len`` and the nearest valid values).
    """
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    if seq_len <= 0:
        raise ConfigError(f"training.seq_len must be positive, got {seq_len}")
    if seq_len % multiple != 0:
        raise ConfigError(
            f"training.seq_len={seq_len} must be a multiple of {multiple} (every packed "
            f"document is padded to a multiple of {multiple}, e.g. 2 * cp_size); set "
            f"training.seq_len to {_round_up(seq_len, multiple)} or {seq_len // multiple * multiple}"
        )


def packed_length(num_tokens: int, seq_len: int, multiple: int) -> int:
    """Row tokens a document of ``num_tokens`` tokens takes in :func:`pack`.

    Its inputs are truncated to ``seq_len`` tokens and padded to a multiple of
    ``multiple``: ``ceil(min(num_tokens, seq_len) / multiple) * multiple``, which is
    ``<= seq_len`` when ``seq_len % multiple == 0``.
    """
    return _round_up(min(num_tokens, seq_len), multiple)


def first_fit_row(used: Sequence[int], length: int, seq_len: int) -> int:
    """The row first fit puts a document of ``length`` (padded) tokens into.

    Args:
        used: Tokens already used in each existing row, in row creation order.
        length: The document's :func:`packed_length`.
        seq_len: The row length ``S``.

    Returns:
        The first ``r`` with ``used[r] + length <= seq_len``, or ``len(used)`` (a new
        row) when none fits. Adding a document never changes where earlier documents
        went, so first fit can run incrementally over a stream.
    """
    return next((r for r, u in enumerate(used) if u + length <= seq_len), len(used))


def pack(
    samples: Sequence[Sample],
    seq_len: int,
    pad_id: int,
    image_token_id: int,
    multiple: int = 1,
) -> PackedBatch:
    """Pack samples into rows of ``seq_len`` tokens by greedy first fit (THD format).

    Method: each sample is one document. Its tokens (the processor layout, BOS and EOS
    included) are truncated to ``seq_len`` like :func:`collate` does (``tokens[:seq_len]``;
    the first dropped token stays the target of the last kept one), its length ``L`` is
    rounded up to ``P = ceil(L / multiple) * multiple`` (:func:`packed_length`), and it
    goes into the first row (in creation order) whose used length plus ``P`` fits in
    ``seq_len``, or into a new row (:func:`first_fit_row`). Samples are visited in
    order, so the result is deterministic and documents keep their sample order within
    each row. Each row's remainder becomes one padding document. Labels, positions and
    document ids are then laid out as described in :class:`PackedBatch` (Megatron-LM /
    NeMo THD packing with ``cu_seqlens``; per-document ``position_ids`` so RoPE
    restarts per document).

    Args:
        samples: The samples, in stream order (at least one); e.g. built by the loader
            with ``processor.build_sequence(..., seq_len + 1)``.
        seq_len: ``S``, the row length (``training.seq_len``); a multiple of ``multiple``.
        pad_id: Padding token id for ``input_ids``.
        image_token_id: Id of ``<|image|>``; must match every sample's.
        multiple: Every document length (and so every ``cu_seqlens`` step) is padded to
            a multiple of this, e.g. ``2 * cp_size`` for zigzag context parallelism.

    Returns:
        A :class:`PackedBatch` with as many rows ``R`` as first fit needs
        (``R <= len(samples)``).

    Raises:
        ValueError: No samples; ``seq_len`` or ``multiple`` not positive; ``seq_len``
            not a multiple of ``multiple`` (names ``training.seq_len``); samples
            disagreeing on ``image_token_id`` / ``image_tokens_per_image``; an empty
            sample; truncation to ``seq_len`` would cut ``<|image|>`` placeholders;
            a document or row whose ``<|image|>`` count differs from its images x
            ``image_tokens_per_image``; images of different shapes.
    """
    if not samples:
        raise ValueError("pack needs at least one sample")
    check_pack_multiple(seq_len, multiple)
    per_image = samples[0].image_tokens_per_image
    shapes = {tuple(s.pixel_values.shape[1:]) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"all images in a packed batch must have the same shape, got {sorted(shapes)}")

    # -- documents: truncated inputs and targets ------------------------------------
    docs: list[tuple[list[int], list[int]]] = []  # (inputs, targets) of equal length L
    for sample in samples:
        if sample.image_token_id != image_token_id or sample.image_tokens_per_image != per_image:
            raise ValueError(
                f"sample {sample.sample_id}: image_token_id={sample.image_token_id}, "
                f"image_tokens_per_image={sample.image_tokens_per_image} but the packed batch "
                f"uses image_token_id={image_token_id}, image_tokens_per_image={per_image}"
            )
        seq = [int(t) for t in sample.tokens]
        if not seq:
            raise ValueError(f"sample {sample.sample_id} has no tokens")
        expected = sample.num_images * per_image
        found_all = seq.count(image_token_id)
        if found_all != expected:
            raise ValueError(
                f"sample {sample.sample_id}: {found_all} <|image|> tokens but "
                f"{sample.num_images} image(s) x {per_image} = {expected} expected"
            )
        inputs = seq[:seq_len]
        found = inputs.count(image_token_id)
        if found != expected:
            raise ValueError(
                f"sample {sample.sample_id} has {len(seq)} tokens; truncating it to "
                f"training.seq_len={seq_len} would cut {expected - found} <|image|> "
                f"placeholder(s); build it with processor.build_sequence(..., seq_len + 1) "
                f"or raise training.seq_len"
            )
        targets = seq[1 : seq_len + 1] + [IGNORE_INDEX] * (len(inputs) + 1 - min(len(seq), seq_len + 1))
        targets = [IGNORE_INDEX if t == image_token_id else t for t in targets]
        docs.append((inputs, targets))

    # -- first fit ------------------------------------------------------------------
    rows: list[list[int]] = []  # document indices per row
    used: list[int] = []
    for i, (inputs, _) in enumerate(docs):
        padded = packed_length(len(inputs), seq_len, multiple)
        r = first_fit_row(used, padded, seq_len)
        if r == len(rows):
            rows.append([])
            used.append(0)
        rows[r].append(i)
        used[r] += padded

    # -- layout ---------------------------------------------------------------------
    R = len(rows)
    input_ids = torch.full((R, seq_len), pad_id, dtype=torch.int64)
    labels = torch.full((R, seq_len), IGNORE_INDEX, dtype=torch.int64)
    position_ids = torch.empty((R, seq_len), dtype=torch.int64)
    doc_ids = torch.empty((R, seq_len), dtype=torch.int64)
    cu_seqlens: list[Tensor] = []
    cu_seqlens_unpadded: list[Tensor] = []
    images: list[Tensor] = []
    images_per_row: list[int] = []
    sample_ids: list[list[int]] = []
    for r, members in enumerate(rows):
        cu, cu_real = [0], [0]
        n_images = 0
        for d, i in enumerate(members):
            inputs, targets = docs[i]
            start, n = cu[-1], len(inputs)
            input_ids[r, start : start + n] = torch.tensor(inputs, dtype=torch.int64)
            labels[r, start : start + n] = torch.tensor(targets, dtype=torch.int64)
            end = start + packed_length(n, seq_len, multiple)
            position_ids[r, start:end] = torch.arange(end - start, dtype=torch.int64)
            doc_ids[r, start:end] = d
            cu.append(end)
            cu_real.append(cu_real[-1] + n)
            images.append(samples[i].pixel_values)
            n_images += samples[i].num_images
        if cu[-1] < seq_len:  # tail padding document
            doc_ids[r, cu[-1] :] = len(members)
            position_ids[r, cu[-1] :] = torch.arange(seq_len - cu[-1], dtype=torch.int64)
            cu.append(seq_len)
            cu_real.append(cu_real[-1])
        found = int((input_ids[r] == image_token_id).sum().item())
        if found != n_images * per_image:  # invariant of the construction above
            raise ValueError(
                f"packed row {r}: {found} <|image|> tokens but {n_images} image(s) x "
                f"{per_image} = {n_images * per_image} expected"
            )
        cu_seqlens.append(torch.tensor(cu, dtype=torch.int32))
        cu_seqlens_unpadded.append(torch.tensor(cu_real, dtype=torch.int32))
        images_per_row.append(n_images)
        sample_ids.append([int(samples[i].sample_id) for i in members])

    return PackedBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        doc_ids=doc_ids,
        cu_seqlens=cu_seqlens,
        pixel_values=cat_images(images),
        images_per_row=torch.tensor(images_per_row, dtype=torch.int64),
        sample_ids=sample_ids,
        cu_seqlens_unpadded=cu_seqlens_unpadded,
    )
