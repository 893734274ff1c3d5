"""Batching of multimodal samples: padding, shifted labels and image / audio-clip bookkeeping."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "Batch", "Sample", "cat_images", "collate", "concat_batches", "pad_clips"]

#: Label value ignored by the loss (``torch.nn.functional.cross_entropy`` default).
IGNORE_INDEX = -100


def cat_images(parts: Sequence[Tensor]) -> Tensor:
    """``torch.cat(parts)`` along dim 0, except that placeholders stay free.

    A rank that does not decode a sample's images gets a placeholder instead: zeros with stride 0 along the image
    dimension (``torch.zeros(1, 3, H, W).expand(k, 3, H, W)``, see
    :class:`~mimo_titan.data.loader.MimoDataLoader`). When every non-empty part is such a placeholder, so is the
    result (no memory); otherwise the placeholders become real zero rows.

    Args:
        parts: ``[k_i, ...]`` tensors with equal trailing shapes (at least one).

    Returns:
        ``[sum k_i, ...]`` float32.
    """
    full = [p for p in parts if p.shape[0]]
    if full and all(p.stride(0) == 0 for p in full):
        return full[0][:1].to(torch.float32).expand(sum(p.shape[0] for p in full), *full[0].shape[1:])
    return torch.cat([p.to(torch.float32) for p in parts], dim=0)


@dataclass(frozen=True)
class Sample:
    """One laid-out sample before batching.

    Attributes:
        tokens: Token ids of the whole sample (see
            :meth:`~mimo_titan.data.processor.ImageTextProcessor.build_sequence`),
            at most ``seq_len + 1`` long.
        pixel_values: ``[k, 3, H, W]`` float32, the sample's images in order (a zero placeholder of stride 0
            along ``k`` where this rank does not decode them, see :func:`cat_images`).
        sample_id: Stable id of the sample in the stream.
        image_token_id: Id of the ``<|image|>`` placeholder (needed for the labels).
        image_tokens_per_image: Placeholders per image (needed for the invariant check).
        audio_features: The sample's audio clips in order, each ``[M, F_i]`` float32 log-mel
            frames (empty without audio).
        audio_token_id: Id of the ``<|audio|>`` placeholder (None without audio encoder).
    """

    tokens: Sequence[int]
    pixel_values: Tensor
    sample_id: int
    image_token_id: int
    image_tokens_per_image: int
    audio_features: tuple[Tensor, ...] = ()
    audio_token_id: int | None = None

    @property
    def num_images(self) -> int:
        """Number of images ``k`` in the sample."""
        return int(self.pixel_values.shape[0])


@dataclass
class Batch:
    """A batch of multimodal samples.

    Sample ``b`` owns the image rows
    ``pixel_values[sum(images_per_sample[:b]) : sum(images_per_sample[:b + 1])]``,
    in the order of its ``<|image|>`` blocks in ``input_ids[b]``.

    Attributes:
        input_ids: ``[B, S]`` int64, right-padded with ``pad_id``.
        labels: ``[B, S]`` int64; ``labels[b, t]`` is the token that follows position
            ``t`` in the unpadded sequence, or ``IGNORE_INDEX`` (-100) where that target
            is an ``<|image|>`` placeholder, padding, or missing (last token).
        pixel_values: ``[N_img, 3, H, W]`` float32, the images of all samples in
            sample order (``N_img = images_per_sample.sum()``). A rank-local loader decodes only the images of
            the samples this rank encodes; the others are zeros (a stride-0 view when none is decoded).
        images_per_sample: ``[B]`` int64.
        sample_ids: ``[B]`` int64, stable id of each sample in the stream.
        audio_features: ``[N_clip, M, T]`` float32 log-mel frames of every audio clip in sample
            order, zero-padded to the batch's longest clip (None: no audio in this run). Sample
            ``b`` owns the clips of ``clips_per_sample`` as it owns its images.
        audio_frames: ``[N_clip]`` int64, each clip's valid frames (``<= T``); exact also for clips this rank
            does not decode (read from the file header), whose features are zeros.
        clips_per_sample: ``[B]`` int64 (zeros for samples without audio).
    """

    input_ids: Tensor
    labels: Tensor
    pixel_values: Tensor
    images_per_sample: Tensor
    sample_ids: Tensor
    audio_features: Tensor | None = None
    audio_frames: Tensor | None = None
    clips_per_sample: Tensor | None = None

    def __len__(self) -> int:
        """Number of samples ``B``."""
        return int(self.input_ids.shape[0])

    def _image_offsets(self) -> list[int]:
        return [0, *torch.cumsum(self.images_per_sample, 0).tolist()]

    def slice(self, start: int, end: int) -> Batch:
        """Samples ``[start, end)`` together with exactly their images.

        Args:
            start: First sample (inclusive), ``0 <= start <= end``.
            end: Last sample (exclusive), ``end <= len(self)``.

        Returns:
            A new :class:`Batch` whose tensors are views into this one.

        Raises:
            ValueError: The range is outside ``[0, len(self)]`` or reversed.
        """
        if not 0 <= start <= end <= len(self):
            raise ValueError(f"invalid sample range [{start}, {end}) for a batch of {len(self)}")
        offsets = self._image_offsets()
        audio = {}
        if self.clips_per_sample is not None:
            assert self.audio_features is not None and self.audio_frames is not None
            c = [0, *torch.cumsum(self.clips_per_sample, 0).tolist()]
            audio = dict(
                audio_features=self.audio_features[c[start] : c[end]],
                audio_frames=self.audio_frames[c[start] : c[end]],
                clips_per_sample=self.clips_per_sample[start:end],
            )
        return Batch(
            input_ids=self.input_ids[start:end],
            labels=self.labels[start:end],
            pixel_values=self.pixel_values[offsets[start] : offsets[end]],
            images_per_sample=self.images_per_sample[start:end],
            sample_ids=self.sample_ids[start:end],
            **audio,
        )

    def num_loss_tokens(self) -> int:
        """Number of label positions that contribute to the loss (``labels != -100``)."""
        return int((self.labels != IGNORE_INDEX).sum().item())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Copy all tensors to ``device`` (dtypes unchanged).

        Args:
            device: Target device.
            non_blocking: Passed to :meth:`torch.Tensor.to`.

        Returns:
            A new :class:`Batch` on ``device``.
        """

        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(
            input_ids=self.input_ids.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            pixel_values=self.pixel_values.to(device, non_blocking=non_blocking),
            images_per_sample=self.images_per_sample.to(device, non_blocking=non_blocking),
            sample_ids=self.sample_ids.to(device, non_blocking=non_blocking),
            audio_features=mv(self.audio_features),
            audio_frames=mv(self.audio_frames),
            clips_per_sample=mv(self.clips_per_sample),
        )


def collate(samples: Sequence[Sample], seq_len: int, pad_id: int) -> Batch:
    """Pad, shift and stack samples into a :class:`Batch`.

    For a sample with tokens ``seq`` (``len(seq) <= seq_len + 1``):
    ``input_ids = seq[:seq_len]`` right-padded with ``pad_id`` and
    ``labels = seq[1:seq_len + 1]`` right-padded with ``IGNORE_INDEX``, with every
    ``<|image|>`` (and ``<|audio|>``) target also set to ``IGNORE_INDEX``. Samples that carry
    an ``audio_token_id`` give the batch its audio fields (:func:`pad_clips`).

    Args:
        samples: The samples, in batch order (at least one).
        seq_len: ``S``, the length of ``input_ids`` rows.
        pad_id: Padding token id for ``input_ids``.

    Returns:
        A :class:`Batch` with ``B = len(samples)`` (shapes as documented there).

    Raises:
        ValueError: No samples, a sample longer than ``seq_len + 1`` tokens, images of
            different shapes, samples disagreeing on the image token, or a row whose
            ``<|image|>`` count differs from ``num_images * image_tokens_per_image``.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    image_token_id = samples[0].image_token_id
    per_image = samples[0].image_tokens_per_image
    batch_size = len(samples)
    input_ids = torch.full((batch_size, seq_len), pad_id, dtype=torch.int64)
    labels = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.int64)
    for b, sample in enumerate(samples):
        if sample.image_token_id != image_token_id or sample.image_tokens_per_image != per_image:
            raise ValueError("samples in one batch must share image_token_id and image_tokens_per_image")
        seq = torch.as_tensor(list(sample.tokens), dtype=torch.int64)
        if seq.numel() > seq_len + 1:
            raise ValueError(
                f"sample {sample.sample_id} has {seq.numel()} tokens, more than "
                f"seq_len + 1 = {seq_len + 1}; truncate it before collating"
            )
        inputs = seq[:seq_len]
        targets = seq[1 : seq_len + 1].clone()
        targets[targets == image_token_id] = IGNORE_INDEX
        if sample.audio_token_id is not None:
            targets[targets == sample.audio_token_id] = IGNORE_INDEX
        input_ids[b, : inputs.numel()] = inputs
        labels[b, : targets.numel()] = targets
        expected = sample.num_images * per_image
        found = int((inputs == image_token_id).sum().item())
        if found != expected:
            raise ValueError(
                f"sample {sample.sample_id}: {found} <|image|> tokens in input_ids but "
                f"{sample.num_images} image(s) x {per_image} = {expected} expected"
            )
    shapes = {tuple(s.pixel_values.shape[1:]) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"all images in a batch must have the same shape, got {sorted(shapes)}")
    pixel_values = cat_images([s.pixel_values for s in samples])
    audio = {}
    if samples[0].audio_token_id is not None:
        clips = [c for s in samples for c in s.audio_features]
        features, frames = pad_clips(clips, mel_bins=_mel_bins(samples))
        audio = dict(
            audio_features=features,
            audio_frames=frames,
            clips_per_sample=torch.tensor([len(s.audio_features) for s in samples], dtype=torch.int64),
        )
    return Batch(
        input_ids=input_ids,
        labels=labels,
        pixel_values=pixel_values,
        images_per_sample=torch.tensor([s.num_images for s in samples], dtype=torch.int64),
        sample_ids=torch.tensor([s.sample_id for s in samples], dtype=torch.int64),
        **audio,
    )


def _mel_bins(samples: Sequence[Sample]) -> int:
    bins = {int(c.shape[0]) for s in samples for c in s.audio_features}
    if len(bins) > 1:
        raise ValueError(f"audio clips of one batch must have the same number of mel bins, got {sorted(bins)}")
    return bins.pop() if bins else 80


def pad_clips(clips: Sequence[Tensor], mel_bins: int = 80) -> tuple[Tensor, Tensor]:
    """Stack audio clips ``[M, F_i]`` into ``[N, M, max F_i]`` float32 (zero-padded) and their lengths ``[N]`` int64.

    With no clip: ``[0, mel_bins, 1]`` and ``[0]``. Clips that are all undecoded placeholders (zeros of stride 0
    along frames) give a stride-0 zero result (no memory).
    """
    if not clips:
        return torch.zeros(0, mel_bins, 1), torch.zeros(0, dtype=torch.int64)
    longest = max(int(c.shape[1]) for c in clips)
    frames = torch.tensor([int(c.shape[1]) for c in clips], dtype=torch.int64)
    if all(c.shape[1] == 0 or c.stride(1) == 0 for c in clips):
        return torch.zeros(1, clips[0].shape[0], 1).expand(len(clips), clips[0].shape[0], max(longest, 1)), frames
    out = torch.zeros(len(clips), clips[0].shape[0], longest)
    for i, c in enumerate(clips):
        out[i, :, : c.shape[1]] = c
    return out, frames


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """Concatenate batches along the sample dimension (images follow their samples).

    Args:
        batches: Batches with the same sequence length and image shape (at least one).

    Returns:
        A :class:`Batch` with ``sum(len(b) for b in batches)`` samples.

    Raises:
        ValueError: ``batches`` is empty, or sequence lengths / image shapes differ.
    """
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    seq_lens = {int(b.input_ids.shape[1]) for b in batches}
    if len(seq_lens) != 1:
        raise ValueError(f"cannot concatenate batches with different sequence lengths {sorted(seq_lens)}")
    image_shapes = {tuple(b.pixel_values.shape[1:]) for b in batches}
    if len(image_shapes) != 1:
        raise ValueError(f"cannot concatenate batches with different image shapes {sorted(image_shapes)}")
    audio = {}
    if batches[0].clips_per_sample is not None:
        clips = [
            b.audio_features[i, :, :n]  # type: ignore[index]
            for b in batches
            for i, n in enumerate(b.audio_frames.tolist())  # type: ignore[union-attr]
        ]
        features, frames = pad_clips(clips, mel_bins=int(batches[0].audio_features.shape[1]))  # type: ignore[union-attr]
        audio = dict(
            audio_features=features,
            audio_frames=frames,
            clips_per_sample=torch.cat([b.clips_per_sample for b in batches], dim=0),  # type: ignore[misc]
        )
    return Batch(
        input_ids=torch.cat([b.input_ids for b in batches], dim=0),
        labels=torch.cat([b.labels for b in batches], dim=0),
        pixel_values=cat_images([b.pixel_values for b in batches]),
        images_per_sample=torch.cat([b.images_per_sample for b in batches], dim=0),
        sample_ids=torch.cat([b.sample_ids for b in batches], dim=0),
        **audio,
    )
