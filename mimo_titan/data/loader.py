"""Deterministic, resumable, rank-local streaming loader of global multimodal batches.

Every rank reads the same record stream from the WebDataset shards (tar reading is cheap) and tokenises the
captions, so every rank builds the same global token rows; media are decoded lazily, only for the samples whose
encoder data-parallel slice this rank holds (:class:`MediaSlice`). A background thread keeps ``prefetch`` batches
ready. Faults in the data are skipped and counted; see :class:`MimoDataLoader` (:attr:`~MimoDataLoader.stats`,
:meth:`~MimoDataLoader.stats_summary`).
"""

from __future__ import annotations

import atexit
import hashlib
import io
import logging
import os
import queue
import random
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from mimo_titan.data.collate import Batch, Sample, collate
from mimo_titan.data.packing import PackedBatch, check_pack_multiple, first_fit_row, pack, packed_length
from mimo_titan.data.processor import CorruptSampleError, ImageTextProcessor
from mimo_titan.data.sharding import local_indices
from mimo_titan.data.webdataset import iter_shard, resolve_shards
from mimo_titan.errors import ConfigError, DataError

__all__ = ["MediaSlice", "MimoDataLoader"]

logger = logging.getLogger(__name__)

#: Record fields accepted as the image, in order of preference.
IMAGE_FIELDS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
#: Record field holding the caption (UTF-8 text).
CAPTION_FIELD = "txt"
#: Record fields accepted as the audio clip (read only for a model with an audio encoder), in order of preference.
AUDIO_FIELDS: tuple[str, ...] = ("wav", "flac")

#: Counters of shards and records skipped while reading (they grow with the stream and resume with it).
SKIP_COUNTERS: tuple[str, ...] = (
    "corrupt_shards",
    "missing_field",
    "non_utf8_caption",
    "empty_caption",
    "corrupt_image",
    "corrupt_audio",
    "audio_too_long",
)
#: Counters of the stream (saved in :meth:`MimoDataLoader.state_dict`, the same on every rank).
STREAM_COUNTERS: tuple[str, ...] = ("records", *SKIP_COUNTERS, "truncated_captions", "truncated_tokens")
#: Counters of this rank's decoding (not saved: they differ per rank and count since the process started).
DECODE_COUNTERS: tuple[str, ...] = ("decoded_images", "decoded_audio", "undecodable_media")
# (record counter, noun, words after the count) for MimoDataLoader.stats_summary
_SKIP_WORDS: tuple[tuple[str, str, str], ...] = (
    ("missing_field", "record", " missing an image or caption"),
    ("non_utf8_caption", "non-UTF-8 caption", ""),
    ("empty_caption", "empty caption", ""),
    ("corrupt_image", "corrupt image", ""),
    ("corrupt_audio", "corrupt audio clip", ""),
    ("audio_too_long", "audio clip", " too long"),
)
_STATE_VERSION = 2  # 1: the in-memory loader's {"epoch", "position"}


@dataclass(frozen=True)
class MediaSlice:
    """One module-local share of a global batch's media that a rank decodes.

    The rank decodes the media of exactly the samples (rows, with packing) that
    ``local_batch(global_batch, microbatches, dp_rank, dp_size)`` gives it
    (:func:`mimo_titan.data.sharding.local_indices`).

    Attributes:
        medium: ``"image"`` (a ``vit`` encoder) or ``"audio"`` (an ``audio`` encoder).
        dp_rank: The rank's index in the encoder's data-parallel group.
        dp_size: The encoder's data-parallel size (``dp_replicate * dp_shard``).
    """

    medium: str
    dp_rank: int
    dp_size: int


@dataclass(frozen=True)
class _Record:
    """A valid record, its media still encoded. ``(shard, index)`` names it in the shards for good."""

    shard: int
    index: int
    key: str
    tokens: tuple[int, ...]
    image: bytes
    audio: tuple[str, bytes] | None = None  # (field, bytes)
    frames: int | None = None  # log-mel frames of the clip, from its header


@dataclass
class _Item:
    """What the producer hands over per batch: the batch and everything the consumer reports for it."""

    batch: Batch | PackedBatch
    state: dict[str, Any]
    decoded: list[tuple[str, int, str]]
    counts: dict[str, int]
    start_epoch: int  # the epoch of the batch's first record


@dataclass
class _Failure:
    exc: BaseException


def _counted(n: int, noun: str) -> str:
    """``"1 record"``, ``"2 records"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _derive_seed(seed: int, epoch: int, stream: str) -> int:
    """A 64-bit seed that depends only on its arguments (no hash randomisation)."""
    digest = hashlib.sha256(f"mimo_titan.data:{seed}:{epoch}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


class _Stream:
    """The producer's position: epoch, shard cursor, shuffle buffer, RNGs and stream counters.

    ``front`` holds records put back to be read next (records of a sample whose audio placeholders would not fit);
    ``pending`` the sample a packed batch left for the next one. Both, like ``buffer``, are saved as record
    references.
    """

    def __init__(self, seed: int, epoch: int, num_shards: int, shuffle: bool) -> None:
        self.epoch = epoch
        self.order = list(range(num_shards))
        if shuffle:
            random.Random(_derive_seed(seed, epoch, "shards")).shuffle(self.order)
        self.pos = 0  # index into ``order`` of the shard being read
        self.rec = 0  # records of that shard consumed (valid or not)
        self.buffer: list[_Record] = []
        self.front: list[_Record] = []
        self.pending: list[_Record] = []
        self.buf_rng = random.Random(_derive_seed(seed, epoch, "buffer"))
        self.k_rng = random.Random(_derive_seed(seed, epoch, "images_per_sample"))
        self.kept_this_epoch = 0
        self.samples = 0
        self.counters = dict.fromkeys(STREAM_COUNTERS, 0)
        self.reader: Any = None  # iterator over the shard at ``pos`` (not saved: reopened at ``rec``)


class MimoDataLoader:
    """Endless, rank-local stream of global :class:`~mimo_titan.data.collate.Batch` es (or, with ``packing``,
    :class:`~mimo_titan.data.packing.PackedBatch` es).

    Every rank constructs the same loader (apart from ``media``) and receives the same global token rows; ranks
    take their share with :func:`mimo_titan.data.sharding.local_batch`. Nothing depends on the rank, the clock,
    ``PYTHONHASHSEED`` or global RNG state.

    The stream (WebDataset's shard shuffle plus shuffle buffer). Epoch ``e`` reads the shards in a permutation
    seeded by ``(seed, e)``, each shard's records in tar order; valid records pass through a shuffle buffer of
    ``shuffle_buffer`` records (emit a uniformly drawn one once it is full, from an RNG seeded by ``(seed, e)``),
    which drains at the end of the epoch, so an epoch is every valid record once. Consecutive emitted records form
    a sample of ``k`` image-caption pairs, ``k`` drawn uniformly from ``1..max_images_per_sample`` (fewer at the
    end of an epoch). Batches run across epoch boundaries, so the stream never ends. Sample ids are the running
    ordinal of samples produced, hence identical across ranks and resumes. ``shuffle=False`` reads the shards in
    sorted order with no buffer.

    Rank-local media. Records keep their image / clip bytes undecoded; a batch decodes the images (clips) of the
    samples that ``local_batch(batch, microbatches, dp_rank, dp_size)`` gives each :class:`MediaSlice` of
    ``media`` (rows, with packing); the other samples' pixel values are zeros (stride-0 when the rank decodes
    none, so a language-model rank's batch holds no pixel memory) and their clips zero features of the right
    length (the frame count comes from the file header, :func:`~mimo_titan.data.audio.probe_audio`). ``media=None``
    decodes everything (a single process, tests). The decoded counts are in :attr:`stats` (``decoded_images``,
    ``decoded_audio``) and the last batch's decoded records in :attr:`last_decoded`.

    Epochs: :attr:`epoch` is the epoch of the stream position after the last batch returned, and
    :attr:`last_start_epoch` the epoch of that batch's first record. The stream learns that an epoch is over only when
    it reads past its last record, so after a batch that ends exactly at the end of the data :attr:`epoch` is still
    that epoch; the next batch then starts in the next one (``last_start_epoch`` > the previous :attr:`epoch`).

    Faults in the data are skipped and counted in :attr:`stats` as the stream meets them (so every rank skips
    the same records, all checks use only what every rank reads):

    - a damaged shard (unreadable, cut short, an invalid header, no end-of-archive marker; see
      :mod:`mimo_titan.data.webdataset`): the records before the damage are kept, the rest skipped, a warning
      names the shard (``corrupt_shards``; counted every epoch it is read);
    - a record missing an image or the ``txt`` caption (``missing_field``); a caption that is not valid UTF-8
      (``non_utf8_caption``; the first one is logged): skipped rather than decoded with replacement characters,
      which would become training targets; an empty caption (``empty_caption``);
    - an image whose header PIL cannot read (``corrupt_image``), an audio clip whose header does not parse or
      that is shorter than 10 ms (``corrupt_audio``), a clip longer than the audio encoder takes or whose
      placeholders alone exceed ``seq_len + 1`` tokens (``audio_too_long``; skipped and counted, the first one is
      logged naming the record and the key to change; a clip of the first batch's records raises instead, see
      Raises). An image (clip) whose header reads but whose data does not decode is found only by the rank that
      decodes it: it becomes zeros, counted in that rank's ``undecodable_media`` with a warning.

    Captions cut to fit ``seq_len + 1`` tokens are counted per sample (``truncated_captions``,
    ``truncated_tokens``). Samples whose audio placeholders do not fit together are cut before the record that
    does not fit, which starts the next sample.

    Packing (``packing=True``): every batch is a :class:`~mimo_titan.data.packing.PackedBatch` of exactly
    ``global_batch_size`` rows of ``seq_len`` tokens, samples placed by greedy first fit in stream order; the
    sample that would need one row too many starts the next batch. No sample is skipped or repeated.

    Background worker: with ``prefetch > 0`` a thread produces batches ahead (up to ``prefetch`` ready); it
    starts at the first ``next()``. :meth:`state_dict` is the position after the last batch *returned*, not
    after the prefetched ones; an exception in the thread is raised by ``next()`` (the same exception object).
    :attr:`last_wait_s` is the time the last ``next()`` waited.

    Args:
        path: ``data.path``: shards as :func:`~mimo_titan.data.webdataset.resolve_shards` takes them (a file,
            directory, glob, brace pattern, or a list of those).
        processor: Decodes media and tokenises captions.
        global_batch_size: Samples (rows, with packing) per global batch (``B``).
        seq_len: Length ``S`` of ``input_ids`` rows; samples hold up to ``S + 1`` tokens before the shift.
        max_images_per_sample: Upper bound on image-caption pairs per sample.
        shuffle: Shuffle shards and records anew every epoch.
        seed: Seed of all randomness.
        packing: ``data.packing``.
        pack_multiple: With ``packing``, every packed document length is a multiple of this (``2 * cp``).
        shuffle_buffer: ``data.shuffle_buffer``, records in the shuffle buffer (memory: that many encoded
            records).
        prefetch: ``data.prefetch``, batches the background thread keeps ready; 0: no thread.
        media: The media slices this rank decodes; ``None``: every medium of every sample.
        microbatches: ``training.microbatches``, for ``media``.

    Raises:
        DataError: ``path`` names no shard (see ``resolve_shards``), or no shard holds a valid record (the
            message names ``data.path`` and the per-reason skip counts); a model with an audio encoder whose first
            records carry no audio clip.
        ConfigError: Non-positive sizes; ``seq_len`` too small for ``max_images_per_sample`` image blocks plus
            BOS, or (with packing) not a multiple of ``pack_multiple`` (names ``training.seq_len``); a clip among
            the first batch's records longer than the audio encoder takes, or whose placeholders need more than
            ``seq_len`` (names the key to change).
        ValueError: ``pack_multiple`` not a positive int, a bad ``shuffle_buffer`` / ``prefetch`` / ``media``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | Sequence[str],
        processor: ImageTextProcessor,
        global_batch_size: int,
        seq_len: int,
        max_images_per_sample: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        packing: bool = False,
        pack_multiple: int = 1,
        shuffle_buffer: int = 1000,
        prefetch: int = 0,
        media: Sequence[MediaSlice] | None = None,
        microbatches: int = 1,
    ) -> None:
        if global_batch_size <= 0:
            raise ConfigError(f"training.global_batch_size must be positive, got {global_batch_size}")
        if seq_len <= 0:
            raise ConfigError(f"training.seq_len must be positive, got {seq_len}")
        if max_images_per_sample <= 0:
            raise ConfigError(f"data.max_images_per_sample must be positive, got {max_images_per_sample}")
        needed = processor.min_sequence_tokens(max_images_per_sample)
        if needed > seq_len + 1:
            raise ConfigError(
                f"training.seq_len={seq_len} is too small: a sample with "
                f"{max_images_per_sample} image(s) of {processor.image_tokens_per_image} "
                f"tokens needs {needed} tokens (BOS + begin/image/end blocks), i.e. "
                f"training.seq_len >= {needed - 1}; raise training.seq_len or lower "
                f"max_images_per_sample / the image token count"
            )
        if not isinstance(pack_multiple, int) or isinstance(pack_multiple, bool) or pack_multiple < 1:
            raise ValueError(f"pack_multiple must be a positive int, got {pack_multiple!r}")
        if shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1, got {shuffle_buffer}")
        if prefetch < 0:
            raise ValueError(f"data.prefetch must be >= 0, got {prefetch}")
        for m in media or ():
            if m.medium not in ("image", "audio"):
                raise ValueError(f"MediaSlice.medium must be 'image' or 'audio', got {m.medium!r}")
            local_indices(global_batch_size, microbatches, m.dp_rank, m.dp_size)  # raises on a bad split
        if packing:
            check_pack_multiple(seq_len, pack_multiple)
        self.processor = processor
        self.global_batch_size = int(global_batch_size)
        self.seq_len = int(seq_len)
        self.max_images_per_sample = int(max_images_per_sample)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.packing = bool(packing)
        self.pack_multiple = pack_multiple
        self.shuffle_buffer = int(shuffle_buffer)
        self.prefetch = int(prefetch)
        self.media = None if media is None else tuple(media)
        self.microbatches = int(microbatches)
        self.path = path if isinstance(path, (str, os.PathLike)) else list(path)
        self.shards = resolve_shards(path)
        self.shard_sizes = [os.path.getsize(s) for s in self.shards]
        self._warned: set[str] = set()
        self._zero_image = torch.zeros(3, processor.image_size, processor.image_size)

        self.first_keys = self._check_first_records()
        self._stream: _Stream | None = _Stream(self.seed, 0, len(self.shards), self.shuffle)
        self._consumed: dict[str, Any] = self._snapshot(self._stream)
        self._decode_counts = dict.fromkeys(DECODE_COUNTERS, 0)
        self.last_decoded: list[tuple[str, int, str]] = []
        self.last_wait_s = 0.0
        self.last_start_epoch = 0
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ records
    def _warn_once(self, kind: str, msg: str, *args: Any) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(msg, *args)

    def _on_shard_error(
        self, counters: dict[str, int] | None, warn: bool = True
    ) -> Callable[[str, int, Exception], None]:
        def handle(shard: str, records_read: int, exc: Exception) -> None:
            if counters is None:  # re-reading records of a resumed buffer: counted when first read
                return
            counters["corrupt_shards"] += 1
            if not warn:  # the start-up check: the stream warns when it reads the shard
                return
            if records_read:
                logger.warning(
                    "data.path: shard %r is damaged after %d complete record(s) (%s: %s); keeping "
                    "those records and skipping the rest of the shard (counted in "
                    "stats['corrupt_shards'])",
                    shard,
                    records_read,
                    type(exc).__name__,
                    exc,
                )
            else:
                logger.warning(
                    "data.path: shard %r cannot be read, 0 records read (%s: %s); skipping the "
                    "shard (counted in stats['corrupt_shards'])",
                    shard,
                    type(exc).__name__,
                    exc,
                )

        return handle

    def _parse(
        self, shard: int, index: int, key: str, fields: dict[str, bytes], counters: dict[str, int] | None
    ) -> _Record | None:
        """The record, or ``None`` (counted in ``counters`` under its reason) when it is skipped. Uses only what
        every rank reads: the caption and the media headers, never decoded media."""

        def skip(reason: str) -> _Record | None:
            if counters is not None:
                counters[reason] += 1
            return None

        image_field = next((f for f in IMAGE_FIELDS if f in fields), None)
        if image_field is None or CAPTION_FIELD not in fields:
            return skip("missing_field")
        try:
            caption = fields[CAPTION_FIELD].decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            if counters is not None:
                self._warn_once(
                    "utf8",
                    "data.path: record %r in shard %r has a caption that is not valid UTF-8 (%s); skipping it "
                    "(this and later ones are counted in stats['non_utf8_caption'], without further warnings)",
                    key,
                    self.shards[shard],
                    exc,
                )
            return skip("non_utf8_caption")
        tokens = self.processor.tokenize(caption) if caption else []
        if not tokens:
            return skip("empty_caption")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(fields[image_field])) as img:  # the header only, no decode
                    if min(img.size) < 1:
                        raise OSError("empty image")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError):
            return skip("corrupt_image")
        audio, frames = None, None
        audio_field = next((f for f in AUDIO_FIELDS if f in fields), None)
        if self.processor.audio_tokens is not None and audio_field is not None:
            from mimo_titan.data.audio import MissingAudioPackage, probe_audio

            where = f"{self.shards[shard]}:{key}.{audio_field}"
            try:
                frames = probe_audio(fields[audio_field], audio_field, where)
            except MissingAudioPackage:
                raise
            except DataError as exc:
                if counters is not None:
                    logger.warning("data.path: skipping record %r: %s", key, exc)
                return skip("corrupt_audio")
            if frames < 1:
                return skip("corrupt_audio")
            if self._clip_too_long(frames):
                if counters is not None:
                    self._warn_once(
                        "too_long",
                        "data.path: skipping record %r of %r: its %g-s audio clip is longer than %s; raise %s "
                        "(this and later ones are counted in stats['audio_too_long'])",
                        key,
                        self.shards[shard],
                        frames / 100,
                        "the audio encoder takes or training.seq_len holds",
                        f"{self.processor.audio_key}.max_source_positions or training.seq_len",
                    )
                return skip("audio_too_long")
            audio = (audio_field, fields[audio_field])
        if counters is not None:
            counters["records"] += 1
        return _Record(shard, index, key, tuple(tokens), fields[image_field], audio, frames)

    def _clip_too_long(self, frames: int) -> bool:
        limit = self.processor.audio_max_frames
        if limit is not None and frames > limit:
            return True
        assert self.processor.audio_tokens is not None
        fixed = self.processor.min_sequence_tokens(1) + self.processor.audio_tokens(frames) + 2
        return fixed > self.seq_len + 1

    def _check_first_records(self) -> list[str]:
        """The start-up check: read the first ``global_batch_size * max_images_per_sample`` valid records (shards
        in sorted order; all of them only when there are fewer) and check the audio settings against them.

        Returns:
            The keys of those records (for :meth:`fingerprint`).
        """
        want = self.global_batch_size * self.max_images_per_sample
        counters = dict.fromkeys(STREAM_COUNTERS, 0)
        probe: list[tuple[int, str]] = []  # (frames, key) of the clips read, too long ones included
        first: list[str] = []
        audio = self.processor.audio_tokens is not None
        for i, shard in enumerate(self.shards):
            for index, key, fields in iter_shard(shard, self._on_shard_error(counters, warn=False)):
                too_long = counters["audio_too_long"]
                rec = self._parse(i, index, key, fields, counters)
                if rec is not None and rec.frames is not None:
                    probe.append((rec.frames, key))
                elif counters["audio_too_long"] > too_long:
                    from mimo_titan.data.audio import probe_audio

                    field = next(f for f in AUDIO_FIELDS if f in fields)
                    probe.append((probe_audio(fields[field], field), key))
                else:
                    if rec is None:
                        continue
                first.append(key)
                if len(first) >= want:
                    break
            if len(first) >= want:
                break
        if not first:
            skipped = ", ".join(f"{k}={counters[k]}" for k in SKIP_COUNTERS)
            raise DataError(
                f"data.path={self.path!r} holds no valid image-caption record in its "
                f"{len(self.shards)} shard(s) (skipped: {skipped}); point data.path at "
                f"WebDataset shards with <key>.jpg and <key>.txt members (see the "
                f"warnings above for damaged shards)"
            )
        if not audio:
            return first
        proc = self.processor
        limit = proc.audio_max_frames
        if limit is not None and probe and max(probe)[0] > limit:
            frames, key = max(probe)
            too_long = sum(f > limit for f, _ in probe)
            raise ConfigError(
                f"{proc.audio_key}.max_source_positions={limit // 2} holds {limit * 10 / 1000:g} s of audio, "
                f"but {too_long} clip(s) of the first {len(first)} records of data.path={self.path!r} are longer "
                f"(the longest, record {key!r}, {frames * 10 / 1000:g} s); set {proc.audio_key}.max_source_positions "
                f">= {-(-frames // 2)} (encoder frames of 20 ms) or trim the clips"
            )
        if probe:
            k = self.max_images_per_sample
            assert proc.audio_tokens is not None
            longest = sorted((proc.audio_tokens(f) for f, _ in probe), reverse=True)[:k]
            need = proc.min_sequence_tokens(k) + sum(n + 2 for n in longest)
            if need > self.seq_len + 1:
                raise ConfigError(
                    f"training.seq_len={self.seq_len} is too small for the data: a sample of {k} image(s) of "
                    f"{proc.image_tokens_per_image} tokens with the longest audio clips of the first records of "
                    f"data.path ({longest} tokens) needs {need} tokens for its placeholders and markers alone; set "
                    f"training.seq_len >= {need - 1}, or raise {proc.audio_key}.pool (fewer tokens per clip)"
                )
        else:
            raise DataError(
                f"data.path={self.path!r}: the model has an audio encoder but none of the first {len(first)} "
                f"records carries an audio clip ({' / '.join(AUDIO_FIELDS)} member beside the image and caption); "
                "point data.path at shards with <key>.wav members (e.g. ../shared/data/speech/cc12m-speech-0000.tar) "
                "or remove the audio encoder's [model.<name>] and [parallelism.<name>] tables"
            )
        return first

    # ------------------------------------------------------------- the stream
    def _read_valid(self, s: _Stream) -> _Record | None:
        """The next valid record of the epoch's shards, or ``None`` when they are all read."""
        while s.pos < len(s.order):
            if s.reader is None:
                shard = s.order[s.pos]
                s.reader = iter_shard(self.shards[shard], self._on_shard_error(s.counters), s.rec.__le__)
            try:
                index, key, fields = next(s.reader)
            except StopIteration:
                s.pos, s.rec, s.reader = s.pos + 1, 0, None
                continue
            s.rec = index + 1
            rec = self._parse(s.order[s.pos], index, key, fields, s.counters)
            if rec is not None:
                s.kept_this_epoch += 1
                return rec
        return None

    def _take_record(self, s: _Stream) -> _Record | None:
        """The next record of the epoch (put-back records first, then the shuffle buffer); ``None`` at the end of
        the epoch, which then moves ``s`` to the next one."""
        if s.front:
            return s.front.pop(0)
        capacity = self.shuffle_buffer if self.shuffle else 1
        while len(s.buffer) < capacity:
            rec = self._read_valid(s)
            if rec is None:
                break
            s.buffer.append(rec)
        if not s.buffer:
            if s.kept_this_epoch == 0:
                skipped = ", ".join(f"{k}={s.counters[k]}" for k in SKIP_COUNTERS)
                raise DataError(
                    f"data.path={self.path!r} holds no valid image-caption record in its {len(self.shards)} "
                    f"shard(s) in epoch {s.epoch} (skipped so far: {skipped}); point data.path at WebDataset "
                    "shards with <key>.jpg and <key>.txt members"
                )
            self._next_epoch(s)
            return None
        if not self.shuffle:
            return s.buffer.pop(0)
        i = s.buf_rng.randrange(len(s.buffer))
        s.buffer[i], s.buffer[-1] = s.buffer[-1], s.buffer[i]
        return s.buffer.pop()

    def _next_epoch(self, s: _Stream) -> None:
        fresh = _Stream(self.seed, s.epoch + 1, len(self.shards), self.shuffle)
        s.epoch, s.order, s.pos, s.rec, s.reader = fresh.epoch, fresh.order, 0, 0, None
        s.buf_rng, s.k_rng, s.kept_this_epoch = fresh.buf_rng, fresh.k_rng, 0

    def _fixed_tokens(self, group: Sequence[_Record]) -> int:
        fn = self.processor.audio_tokens
        clips = sum(fn(r.frames) + 2 for r in group if r.frames is not None) if fn is not None else 0
        return self.processor.min_sequence_tokens(len(group)) + clips

    def _next_group(self, s: _Stream) -> list[_Record]:
        """The records of the next sample."""
        if s.pending:
            pending, s.pending = s.pending, []
            return pending
        while True:
            k = s.k_rng.randint(1, self.max_images_per_sample) if self.max_images_per_sample > 1 else 1
            group: list[_Record] = []
            while len(group) < k:
                rec = self._take_record(s)
                if rec is None:
                    break
                if group and self._fixed_tokens([*group, rec]) > self.seq_len + 1:
                    s.front.insert(0, rec)  # its placeholders do not fit beside the others: it starts the next sample
                    break
                group.append(rec)
            if group:
                return group

    def _tokens(self, group: Sequence[_Record]) -> tuple[list[int], int]:
        """The sample's token ids and the caption tokens cut."""
        captions = [r.tokens for r in group]
        fn = self.processor.audio_tokens
        audio = None if fn is None else [None if r.frames is None else fn(r.frames) for r in group]
        tokens = self.processor.build_sequence(captions, self.seq_len + 1, audio)
        fixed = sum(n + 2 for n in audio or [] if n is not None)
        cut = self.processor.caption_tokens_cut([len(c) for c in captions], self.seq_len + 1, fixed)
        return tokens, cut

    # -------------------------------------------------------------- decoding
    def _needed(self, medium: str, units: int) -> set[int] | None:
        """The batch units (samples, or packed rows) whose ``medium`` this rank decodes; ``None``: all."""
        if self.media is None:
            return None
        out: set[int] = set()
        for m in self.media:
            if m.medium == medium:
                out.update(local_indices(units, self.microbatches, m.dp_rank, m.dp_size))
        return out

    def _sample(
        self,
        group: Sequence[_Record],
        tokens: list[int],
        sample_id: int,
        images: bool,
        audio: bool,
        decoded: list[tuple[str, int, str]],
        counts: dict[str, int],
    ) -> Sample:
        proc = self.processor
        if images:
            pixels = []
            for r in group:
                try:
                    pixels.append(proc.load_image(r.image))
                    counts["decoded_images"] += 1
                except CorruptSampleError as exc:
                    counts["undecodable_media"] += 1
                    logger.warning("data.path: the image of record %r does not decode (%s); using zeros", r.key, exc)
                    pixels.append(self._zero_image.clone())
                decoded.append(("image", sample_id, r.key))
            pixel_values = torch.stack(pixels)
        else:
            pixel_values = _placeholder(self._zero_image, len(group))
        clips: list[Tensor] = []
        for r in group:
            if r.audio is None or r.frames is None:
                continue
            bins = proc.num_mel_bins
            if audio:
                try:
                    feats = proc.load_audio(r.audio[1], r.audio[0], f"{self.shards[r.shard]}:{r.key}")
                    counts["decoded_audio"] += 1
                    if feats.shape[1] != r.frames:
                        raise DataError(
                            f"record {r.key!r}: the audio header gives {r.frames} frames but decoding gave "
                            f"{feats.shape[1]}; the file is inconsistent, drop it from data.path"
                        )
                except CorruptSampleError as exc:
                    counts["undecodable_media"] += 1
                    logger.warning("data.path: the clip of record %r does not decode (%s); using zeros", r.key, exc)
                    feats = torch.zeros(bins, r.frames)
                decoded.append(("audio", sample_id, r.key))
                clips.append(feats)
            else:
                clips.append(_placeholder(torch.zeros(bins), r.frames, dim=1))
        return Sample(
            tokens=tokens,
            pixel_values=pixel_values,
            sample_id=sample_id,
            image_token_id=proc.image_token_id,
            image_tokens_per_image=proc.image_tokens_per_image,
            audio_features=tuple(clips),
            audio_token_id=proc.audio_token_id if proc.audio_tokens is not None else None,
        )

    def _produce(self) -> _Item:
        """Advance the stream by one batch (in the background thread when ``prefetch > 0``)."""
        s = self._ensure_stream()
        decoded: list[tuple[str, int, str]] = []
        counts = dict.fromkeys(DECODE_COUNTERS, 0)
        groups: list[tuple[list[_Record], list[int]]] = []
        units: list[int] = []  # the batch unit (sample, or packed row) of every sample
        # the epoch of the batch's first record: a group never spans two epochs, and a pending group was read in the
        # epoch the stream is still in
        start_epoch: int | None = None
        if self.packing:
            used: list[int] = []
            while True:
                group = self._next_group(s)
                start_epoch = s.epoch if start_epoch is None else start_epoch
                tokens, cut = self._tokens(group)
                length = packed_length(len(tokens), self.seq_len, self.pack_multiple)
                r = first_fit_row(used, length, self.seq_len)
                if r == self.global_batch_size:  # needs one row too many: the first sample of the next batch
                    s.pending = group
                    break
                if r == len(used):
                    used.append(0)
                used[r] += length
                groups.append((group, tokens))
                units.append(r)
                self._count_cut(s, cut)
            n_units = self.global_batch_size
        else:
            for b in range(self.global_batch_size):
                group = self._next_group(s)
                start_epoch = s.epoch if start_epoch is None else start_epoch
                tokens, cut = self._tokens(group)
                groups.append((group, tokens))
                units.append(b)
                self._count_cut(s, cut)
            n_units = self.global_batch_size
        need_images, need_audio = self._needed("image", n_units), self._needed("audio", n_units)
        samples = []
        for (group, tokens), unit in zip(groups, units):
            samples.append(
                self._sample(
                    group,
                    tokens,
                    s.samples,
                    need_images is None or unit in need_images,
                    need_audio is None or unit in need_audio,
                    decoded,
                    counts,
                )
            )
            s.samples += 1
        proc = self.processor
        if self.packing:
            batch: Batch | PackedBatch = pack(
                samples, self.seq_len, proc.pad_id, proc.image_token_id, multiple=self.pack_multiple
            )
            assert len(batch) <= self.global_batch_size
        else:
            batch = collate(samples, self.seq_len, proc.pad_id)
        assert start_epoch is not None, "a batch holds at least one sample"
        return _Item(batch, self._snapshot(s), decoded, counts, start_epoch)

    def _next_sample(self) -> Sample:
        """The next sample of the stream alone, media decoded (for tests: the samples batches are made of)."""
        s = self._ensure_stream()
        group = self._next_group(s)
        tokens, cut = self._tokens(group)
        self._count_cut(s, cut)
        sample = self._sample(group, tokens, s.samples, True, True, [], dict.fromkeys(DECODE_COUNTERS, 0))
        s.samples += 1
        self._consumed = self._snapshot(s)
        return sample

    @staticmethod
    def _count_cut(s: _Stream, cut: int) -> None:
        if cut:
            s.counters["truncated_captions"] += 1
            s.counters["truncated_tokens"] += cut

    # ----------------------------------------------------------- state
    def _snapshot(self, s: _Stream) -> dict[str, Any]:
        ref = lambda recs: [[r.shard, r.index] for r in recs]  # noqa: E731
        return {
            "version": _STATE_VERSION,
            "epoch": s.epoch,
            "shard_position": s.pos,
            "shard_records": s.rec,
            "buffer": ref(s.buffer),
            "front": ref(s.front),
            "pending": ref(s.pending),
            "buffer_rng": _rng_state(s.buf_rng),
            "images_rng": _rng_state(s.k_rng),
            "kept_this_epoch": s.kept_this_epoch,
            "samples_produced": s.samples,
            **s.counters,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "max_images_per_sample": self.max_images_per_sample,
            "num_shards": len(self.shards),
            "packing": self.packing,
            "pack_multiple": self.pack_multiple,
        }

    def _ensure_stream(self) -> _Stream:
        """The producer's stream, rebuilt from the consumed state after :meth:`load_state_dict`."""
        if self._stream is not None:
            return self._stream
        st = self._consumed
        s = _Stream(self.seed, int(st["epoch"]), len(self.shards), self.shuffle)
        s.pos, s.rec = int(st["shard_position"]), int(st["shard_records"])
        _set_rng_state(s.buf_rng, st["buffer_rng"])
        _set_rng_state(s.k_rng, st["images_rng"])
        s.kept_this_epoch, s.samples = int(st["kept_this_epoch"]), int(st["samples_produced"])
        s.counters = {k: int(st.get(k, 0)) for k in STREAM_COUNTERS}
        refs = [tuple(x) for part in ("buffer", "front", "pending") for x in st[part]]
        found = self._fetch(refs)
        s.buffer = [found[tuple(x)] for x in st["buffer"]]
        s.front = [found[tuple(x)] for x in st["front"]]
        s.pending = [found[tuple(x)] for x in st["pending"]]
        self._stream = s
        return s

    def _fetch(self, refs: Sequence[tuple[int, int]]) -> dict[tuple[int, int], _Record]:
        """Read the records ``(shard, index)`` again (a resumed shuffle buffer), one pass per shard."""
        by_shard: dict[int, set[int]] = {}
        for shard, index in refs:
            by_shard.setdefault(shard, set()).add(index)
        out: dict[tuple[int, int], _Record] = {}
        for shard, wanted in sorted(by_shard.items()):
            for index, key, fields in iter_shard(self.shards[shard], self._on_shard_error(None), wanted.__contains__):
                rec = self._parse(shard, index, key, fields, None)
                if rec is not None:
                    out[shard, index] = rec
        missing = [r for r in refs if r not in out]
        if missing:
            shard, index = missing[0]
            raise DataError(
                f"cannot resume the data stream: record {index} of shard {self.shards[shard]!r} (and "
                f"{len(missing) - 1} more), which the checkpoint's shuffle buffer holds, is gone or no longer valid; "
                "data.path must hold the same shards as when the checkpoint was saved"
            )
        return out

    def state_dict(self) -> dict[str, Any]:
        """The stream position after the last batch returned by ``next()`` (prefetched batches do not count).

        Returns:
            Plain JSON-able values: ``epoch``, the shard cursor (``shard_position`` in the epoch's shard order,
            ``shard_records`` read from that shard), the shuffle buffer, put-back and pending records as
            ``[shard, index]`` references, both RNG states, ``samples_produced``, the stream counters (see
            :attr:`stats`) and the settings that fix the stream (``seed``, ``shuffle``, ``shuffle_buffer``,
            ``max_images_per_sample``, ``num_shards``, ``packing``, ``pack_multiple``). The rank's decode
            counters are not included.
        """
        return dict(self._consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` output; the next batch continues exactly.

        Cheap: the records of the saved shuffle buffer are read again at the next ``next()``. Only assigns
        attributes, so a shallow copy of the loader can be used to validate a state. ``global_batch_size`` may
        differ from the saved run.

        Args:
            state: A dict produced by :meth:`state_dict`.

        Raises:
            ValueError: The state came from a stream with other settings (seed, shuffle, shuffle_buffer,
                max_images_per_sample, number of shards, packing, pack_multiple) or from the earlier in-memory
                loader (no ``version``), or its position is out of range.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                "cannot resume data loader: the checkpoint's data position was written by the earlier in-memory "
                "loader (epoch/position over all records), which the streaming loader cannot continue"
            )
        for key, mine in (
            ("seed", self.seed),
            ("shuffle", self.shuffle),
            ("shuffle_buffer", self.shuffle_buffer),
            ("max_images_per_sample", self.max_images_per_sample),
            ("num_shards", len(self.shards)),
            ("packing", self.packing),
            ("pack_multiple", self.pack_multiple),
        ):
            if state.get(key) != mine:
                raise ValueError(
                    f"cannot resume data loader: checkpoint has {key}={state.get(key)!r} but this loader has "
                    f"{key}={mine!r}"
                )
        refs = [x for part in ("buffer", "front", "pending") for x in state[part]]
        if int(state["epoch"]) < 0 or not 0 <= int(state["shard_position"]) <= len(self.shards):
            raise ValueError(f"invalid data loader position epoch={state['epoch']} shard={state['shard_position']}")
        if any(not 0 <= int(shard) < len(self.shards) for shard, _ in refs):
            raise ValueError("invalid data loader state: a buffered record names a shard out of range")
        self._stop_worker()
        self._stream = None
        self._consumed = dict(state)
        self.last_start_epoch = int(state["epoch"])

    # --------------------------------------------------------- the worker
    # A daemon thread still inside a torch op when the interpreter finalises aborts the process ("terminate called
    # without an active exception", exit status 134): every live worker is stopped and joined at exit.
    def _worker(self, q: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                item: _Item | _Failure = self._produce()
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer: next() raises it
            while not stop.is_set():
                try:
                    q.put(_Failure(exc), timeout=0.1)
                    break
                except queue.Full:
                    continue

    def _stop_worker(self) -> None:
        if self._thread is not None:
            assert self._stop is not None
            self._stop.set()
            self._thread.join()
            self._stream = None  # it ran ahead of the batches returned: rebuilt from state_dict()
        self._thread = self._queue = self._stop = None

    def close(self) -> None:
        """Stop the background thread (``next()`` starts it again from :meth:`state_dict`)."""
        self._stop_worker()

    def __copy__(self) -> MimoDataLoader:
        """A copy without the background thread, positioned at :meth:`state_dict` (shares nothing mutable)."""
        new = object.__new__(MimoDataLoader)
        new.__dict__.update(self.__dict__)
        new._thread = new._queue = new._stop = None
        new._stream = None
        new._decode_counts = dict(self._decode_counts)
        new._warned = set(self._warned)
        return new

    # ------------------------------------------------------------- public
    def __iter__(self) -> MimoDataLoader:
        return self

    def __next__(self) -> Batch | PackedBatch:
        """The next global batch (see the class docstring); :attr:`last_wait_s` is how long this call waited.

        Raises:
            Whatever producing the batch raised (e.g. ``DataError``), also from the background thread.
        """
        start = time.perf_counter()
        if self.prefetch == 0:
            item = self._produce()
        else:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._worker, args=(self._queue, self._stop), name="mimo-data", daemon=True
                )
                self._thread.start()
                _LIVE_WORKERS.add(self)
            assert self._queue is not None
            got = self._queue.get()
            if isinstance(got, _Failure):
                self._stop_worker()
                raise got.exc
            item = got
        self.last_wait_s = time.perf_counter() - start
        self._consumed = item.state
        self.last_decoded = item.decoded
        self.last_start_epoch = item.start_epoch
        for k, v in item.counts.items():
            self._decode_counts[k] += v
        return item.batch

    @property
    def epoch(self) -> int:
        """Epoch of the stream position after the last batch returned."""
        return int(self._consumed["epoch"])

    def fingerprint(self) -> tuple[int, int]:
        """``(shards, 63-bit hash)`` of the shard names and sizes and the keys of the first records: equal on
        ranks that read the same data (cheap; :func:`mimo_titan.train.trainer.check_same_data`)."""
        text = "\n".join(
            [f"{os.path.basename(p)}:{n}" for p, n in zip(self.shards, self.shard_sizes)] + self.first_keys
        )
        digest = hashlib.sha256(text.encode()).digest()
        return len(self.shards), int.from_bytes(digest[:8], "little") >> 1

    @property
    def stats(self) -> dict[str, int]:
        """Data counters (a new dict of ints on every call; cheap, safe to call every step).

        Of the stream up to the last batch returned (the same on every rank, restored by
        :meth:`load_state_dict`): ``shards`` (shards under ``data.path``), ``epoch``, ``samples`` (samples
        produced), ``records`` (valid records read; a record counts again in each epoch), the skip counters
        ``corrupt_shards``, ``missing_field``, ``non_utf8_caption``, ``empty_caption``, ``corrupt_image``,
        ``corrupt_audio``, ``audio_too_long`` (see the class docstring), ``truncated_captions`` (samples with a
        caption token cut) and ``truncated_tokens``.

        Of this rank since the loader was built: ``decoded_images``, ``decoded_audio`` (media decoded; 0 on a
        rank that encodes nothing), ``undecodable_media`` (decoded as zeros).
        """
        st = self._consumed
        return {
            "shards": len(self.shards),
            "epoch": int(st["epoch"]),
            "samples": int(st["samples_produced"]),
            **{k: int(st.get(k, 0)) for k in STREAM_COUNTERS},
            **self._decode_counts,
        }

    def stats_summary(self) -> str:
        """:attr:`stats` as one compact line for the training log, e.g. ``"data: 32 records read (epoch 1);
        skipped 1 corrupt image; 1 of 3 shards damaged; 5 samples with truncated captions (40 tokens cut);
        decoded here: 24 images"``; the parts after the first only when non-zero.

        Returns:
            The line, starting with ``"data: "``.
        """
        s = self.stats
        parts = [f"data: {_counted(s['records'], 'record')} read (epoch {s['epoch']})"]
        skipped = [_counted(s[key], noun) + words for key, noun, words in _SKIP_WORDS if s[key]]
        if skipped:
            parts.append("skipped " + ", ".join(skipped))
        if s["corrupt_shards"]:
            parts.append(f"{s['corrupt_shards']} of {_counted(s['shards'], 'shard')} damaged")
        if s["truncated_captions"]:
            parts.append(
                f"{_counted(s['truncated_captions'], 'sample')} with truncated captions "
                f"({_counted(s['truncated_tokens'], 'token')} cut)"
            )
        decoded = [
            _counted(s[k], noun)
            for k, noun in (
                ("decoded_images", "image"),
                ("decoded_audio", "audio clip"),
                ("undecodable_media", "zeroed file"),
            )
            if s[k]
        ]
        if decoded:
            parts.append("decoded here: " + ", ".join(decoded))
        return "; ".join(parts)


def _placeholder(zeros: Tensor, n: int, dim: int = 0) -> Tensor:
    """``n`` copies of ``zeros`` stacked along ``dim`` without memory: stride 0 along ``dim``, also for ``n == 1``
    (how :func:`~mimo_titan.data.collate.cat_images` and :func:`~mimo_titan.data.collate.pad_clips` tell an
    undecoded item)."""
    shape = [*zeros.shape[:dim], n, *zeros.shape[dim:]]
    stride = [*zeros.stride()[:dim], 0, *zeros.stride()[dim:]]
    return zeros.as_strided(shape, stride)


#: Loaders whose background thread may be running (stopped and joined at interpreter exit).
_LIVE_WORKERS: weakref.WeakSet[MimoDataLoader] = weakref.WeakSet()


@atexit.register
def _stop_live_workers() -> None:
    for loader in list(_LIVE_WORKERS):
        loader.close()
