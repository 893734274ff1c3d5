"""Generation prompts laid out like a training sample up to where its caption starts.

A training sample is ``[BOS] <|begin_of_image|> <|image|>*T <|end_of_image|> [audio] caption [EOS]``
(:meth:`~mimo_titan.data.processor.ImageTextProcessor.build_sequence`, ``[audio]`` =
``<|begin_of_audio|> <|audio|>*R <|end_of_audio|>`` for a clip). A prompt is that layout with the caption replaced
by an optional text prompt and without the EOS: the model continues it with the caption.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mimo_titan.data.processor import CorruptSampleError
from mimo_titan.errors import ConfigError, DataError

if TYPE_CHECKING:
    from mimo_titan.config import Config
    from mimo_titan.data.processor import ImageTextProcessor

__all__ = ["Prompt", "build_prompt", "read_media"]


@dataclass(frozen=True)
class Prompt:
    """One sample's prompt.

    Attributes:
        input_ids: the prompt's token ids (P of them).
        pixel_values: ``[1, 3, image_size, image_size]`` float32, the normalised image.
        audio_features: ``[num_mel_bins, F]`` float32 log-mel frames of the clip, or None.
    """

    input_ids: tuple[int, ...]
    pixel_values: torch.Tensor
    audio_features: torch.Tensor | None = None


def read_media(path: str, what: str) -> bytes:
    """The bytes of the file ``path`` given as ``what`` (e.g. ``"--image"``).

    Raises:
        DataError: the file does not exist or cannot be read (names ``what`` and ``path``).
    """
    if not os.path.isfile(path):
        raise DataError(f"{what} {path}: no such file")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise DataError(f"{what} {path}: cannot read it ({exc})") from exc


def build_prompt(
    cfg: Config,
    processor: ImageTextProcessor,
    *,
    image: bytes,
    image_source: str,
    audio: bytes | None = None,
    audio_ext: str = "wav",
    audio_source: str = "",
    text: str | None = None,
) -> Prompt:
    """The prompt of one image (and optionally one audio clip and a text prompt).

    Args:
        cfg: the run's config (``training.seq_len``, the audio encoder's table name for messages).
        processor: the run's processor (:func:`~mimo_titan.train.trainer.build_processor`).
        image: the encoded image (any format PIL reads).
        image_source: where it comes from (a file, ``shard:key``), for messages.
        audio: the bytes of a ``wav`` / ``flac`` clip, or None (a model without an audio encoder refuses a clip).
        audio_ext: ``"wav"`` or ``"flac"``.
        audio_source: where the clip comes from, for messages.
        text: a text prompt placed where the caption starts (its tokens, as training tokenises captions).

    Returns:
        The :class:`Prompt`.

    Raises:
        DataError: the image or the clip does not decode, or the clip is longer than the audio encoder takes (the
            message names the file).
        ConfigError: a clip for a model without an audio encoder; a prompt longer than ``training.seq_len`` (the
            message gives both lengths).
    """
    try:
        pixels = processor.load_image(image)
    except CorruptSampleError as exc:
        raise DataError(f"{image_source}: {exc}; give an image file PIL can read (jpg, png, webp, ...)") from exc
    clip_tokens = None
    features = None
    if audio is not None:
        if processor.audio_tokens is None:
            raise ConfigError(
                f"{audio_source}: the model has no audio encoder (no [model.<name>] table of type 'audio'), so it "
                "cannot take an audio clip; leave out the audio"
            )
        try:
            features = processor.load_audio(audio, audio_ext, audio_source)
        except CorruptSampleError as exc:
            raise DataError(f"{audio_source}: cannot decode the audio clip: {exc}") from exc
        frames = int(features.shape[1])
        limit = processor.audio_max_frames
        if limit is not None and frames > limit:
            raise DataError(
                f"{audio_source}: the clip has {frames} log-mel frames ({frames / 100:g} s) but the audio encoder "
                f"takes at most {limit} ({processor.audio_key}.max_source_positions = {limit // 2}); shorten the clip"
            )
        clip_tokens = processor.audio_tokens(frames)
    text_ids = processor.tokenize(text) if text else []
    layout = processor.build_sequence([text_ids], 1 << 62, None if clip_tokens is None else [clip_tokens])
    assert layout[-1] == processor.eos_id, "an unbounded layout keeps its EOS"
    ids = tuple(layout[:-1])
    seq_len = cfg.training.seq_len
    if len(ids) > seq_len:
        parts = f"BOS + image block {processor.image_tokens_per_image + 2}"
        if clip_tokens is not None:
            parts += f" + audio block {clip_tokens + 2}"
        parts += f" + text prompt {len(text_ids)}"
        raise ConfigError(
            f"the prompt needs {len(ids)} tokens ({parts}) but the model was trained on training.seq_len = {seq_len}; "
            "shorten the prompt (or the clip)"
        )
    return Prompt(ids, pixels.unsqueeze(0), features)
