"""Deterministic, resumable loader of global multimodal batches.

Faults in the data (damaged shards, records with a missing field, a non-UTF-8 or
empty caption, an undecodable image) are skipped and counted, and captions cut to
fit ``training.seq_len`` are counted as samples are produced; see
:class:`MimoDataLoader` (:attr:`~MimoDataLoader.stats`,
:meth:`~MimoDataLoader.stats_summary`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mimo_titan.data.collate import Batch, Sample, collate
from mimo_titan.data.packing import (
    PackedBatch,
    check_pack_multiple,
    first_fit_row,
    pack,
    packed_length,
)
from mimo_titan.data.processor import CorruptSampleError, ImageTextProcessor
from mimo_titan.data.webdataset import iter_webdataset, resolve_shards
from mimo_titan.errors import ConfigError, DataError

__all__ = ["MimoDataLoader"]

logger = logging.getLogger(__name__)

#: Record fields accepted as the image, in order of preference.
IMAGE_FIELDS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
#: Record field holding the caption (UTF-8 text).
CAPTION_FIELD = "txt"
#: Record fields accepted as the audio clip (read only for a model with an audio encoder), in order of preference.
AUDIO_FIELDS: tuple[str, ...] = ("wav", "flac")

#: Counters of shards and records skipped while reading, fixed once the loader is built.
SKIP_COUNTERS: tuple[str, ...] = (
    "corrupt_shards",
    "missing_field",
    "non_utf8_caption",
    "empty_caption",
    "corrupt_image",
    "corrupt_audio",
)
# (record counter, noun, words after the count) for MimoDataLoader.stats_summary
_SKIP_WORDS: tuple[tuple[str, str, str], ...] = (
    ("missing_field", "record", " missing an image or caption"),
    ("non_utf8_caption", "non-UTF-8 caption", ""),
    ("empty_caption", "empty caption", ""),
    ("corrupt_image", "corrupt image", ""),
    ("corrupt_audio", "corrupt audio clip", ""),
)


@dataclass(frozen=True)
class _Record:
    key: str
    pixel_values: Tensor  # [3, H, W] float32
    caption_tokens: tuple[int, ...]
    audio_features: Tensor | None = None  # [M, F] float32 log-mel frames (a model with an audio encoder only)


def _counted(n: int, noun: str) -> str:
    """``"1 record"``, ``"2 records"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _derive_seed(seed: int, epoch: int, stream: str) -> int:
    """A 64-bit seed that depends only on its arguments (no hash randomisation)."""
    digest = hashlib.sha256(f"mimo_titan.data:{seed}:{epoch}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class MimoDataLoader:
    """Endless iterator of global :class:`~mimo_titan.data.collate.Batch` es (or, with
    ``packing``, :class:`~mimo_titan.data.packing.PackedBatch` es).

    Every rank constructs the same loader with the same arguments and receives the
    same sequence of global batches; ranks then take their share with
    :func:`mimo_titan.data.sharding.local_batch`. Nothing depends on the rank, the
    clock, ``PYTHONHASHSEED`` or global RNG state: the record order of epoch ``e`` is
    a permutation drawn from a generator seeded by ``(seed, e)`` only, and the
    number of images per sample from another generator seeded the same way.

    An epoch is one pass over the valid records: they are (optionally) permuted,
    then grouped consecutively into samples of ``k`` pairs, with ``k`` drawn
    uniformly from ``1..max_images_per_sample`` (clipped to the records left at the
    end of the epoch). Batches run across epoch boundaries, so the stream never
    ends. Sample ids are the running ordinal of samples produced since the start of
    epoch 0, hence unique within a run and identical across ranks and resumes.

    Faults in the data are skipped and counted in :attr:`stats`, never raised (the
    one exception: no valid record at all, see Raises):

    - a damaged shard (unreadable, cut short, an invalid header, no end-of-archive
      marker; see :mod:`mimo_titan.data.webdataset`): the records completed before
      the damage are kept, the record in progress and the rest of the shard are
      skipped, reading goes on with the next shard; a warning names the shard, the
      records read from it and the tar error (``corrupt_shards``);
    - a record missing an image (``jpg``/``jpeg``/``png``/``webp``) or the ``txt``
      caption (``missing_field``);
    - a caption that is not valid UTF-8 (``non_utf8_caption``; the first one is
      logged as a warning naming its key and shard). Such a record is skipped rather
      than decoded with replacement characters: the bytes are in an unknown encoding
      or damaged, so the text cannot be trusted, and ``U+FFFD`` characters would
      become training targets that teach the model to emit them; guessing an
      encoding (Latin-1, CP1252, ...) could silently produce wrong text. One skipped
      record costs little, and the counter makes the problem visible;
    - an empty or whitespace-only caption, or one that tokenises to nothing
      (``empty_caption``);
    - an undecodable image (``corrupt_image``).

    Captions cut because a sample does not fit ``seq_len + 1`` tokens (see
    :meth:`~mimo_titan.data.processor.ImageTextProcessor.build_sequence`) are counted
    as the samples are produced (``truncated_captions``, ``truncated_tokens``), each
    sample once, also with packing. :meth:`stats_summary` formats all counters as one
    log line.

    Implementation note: this version reads and decodes all shards once into memory
    (fine for small shards). The epoch logic only needs the number of valid records
    and random access by index, so a streaming version can replace ``_read_records``
    with a per-shard index (or shard-level permutation plus a shuffle buffer) while
    keeping the ``(seed, epoch)``-only dependence and the ``(epoch, position)`` state.

    Packing (``packing=True``): every batch is a
    :class:`~mimo_titan.data.packing.PackedBatch` of exactly ``global_batch_size`` rows
    of ``seq_len`` tokens (``input_ids``/``labels``/``position_ids``/``doc_ids``
    ``[global_batch_size, seq_len]`` int64, per-row int32 ``cu_seqlens``), each row
    holding one or more whole samples (THD format; attention never crosses samples).
    Samples are drawn in stream order and placed by greedy first fit, each document
    padded to a multiple of ``pack_multiple``; the batch ends before the first sample
    that would need row ``global_batch_size + 1``. That sample is not consumed: it is
    the first sample of the next batch. So no sample is skipped or repeated, sample ids
    stay ``0, 1, 2, ...`` across batches, a batch holds a variable number of samples,
    and :meth:`state_dict` after any batch resumes exactly.

    Args:
        path: ``data.path``: a ``.tar`` shard or a directory of ``.tar`` shards.
        processor: Decodes images and tokenises captions.
        global_batch_size: Samples per global batch (``B``).
        seq_len: Length ``S`` of ``input_ids`` rows; samples hold up to ``S + 1``
            tokens before the shift.
        max_images_per_sample: Upper bound on image-caption pairs per sample.
        shuffle: Permute the records anew every epoch.
        seed: Seed of all randomness.
        packing: ``data.packing``: yield packed batches of ``global_batch_size`` rows
            (see above) instead of one padded sample per row.
        pack_multiple: With ``packing``, every packed document length (every
            ``cu_seqlens`` step) is a multiple of this, e.g. ``2 * cp_size`` for zigzag
            context parallelism. Unused without ``packing``.

    Raises:
        DataError: ``path`` does not exist, is not a ``.tar``, is a directory without
            ``.tar`` shards, or holds no valid record in any shard (the message names
            ``data.path`` and the per-reason skip counts).
        ConfigError: Non-positive ``global_batch_size``, ``seq_len`` or
            ``max_images_per_sample``; ``seq_len`` too small for
            ``max_images_per_sample`` image blocks plus BOS (message names
            ``training.seq_len`` and the minimum); with ``packing``, ``seq_len`` not a
            multiple of ``pack_multiple`` (message names ``training.seq_len``).
        ValueError: ``pack_multiple`` not a positive int.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        processor: ImageTextProcessor,
        global_batch_size: int,
        seq_len: int,
        max_images_per_sample: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        packing: bool = False,
        pack_multiple: int = 1,
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
        self.path = os.fspath(path)
        self.shards = resolve_shards(path)

        self._skipped = dict.fromkeys(SKIP_COUNTERS, 0)
        self._warned_non_utf8 = False
        self._records = self._read_records()
        if not self._records:
            skipped = ", ".join(f"{k}={v}" for k, v in self._skipped.items())
            raise DataError(
                f"data.path={self.path!r} holds no valid image-caption record in its "
                f"{len(self.shards)} shard(s) (skipped: {skipped}); point data.path at "
                f"WebDataset shards with <key>.jpg and <key>.txt members (see the "
                f"warnings above for damaged shards)"
            )

        limit = processor.audio_max_frames
        clips = [(r.audio_features.shape[1], r.key) for r in self._records if r.audio_features is not None]
        if limit is not None and clips and max(clips)[0] > limit:
            frames, key = max(clips)
            too_long = sum(f > limit for f, _ in clips)
            raise ConfigError(
                f"{processor.audio_key}.max_source_positions={limit // 2} holds {limit * 10 / 1000:g} s of audio, "
                f"but {too_long} clip(s) of data.path={self.path!r} are longer (the longest, record {key!r}, "
                f"{frames * 10 / 1000:g} s); set {processor.audio_key}.max_source_positions >= {-(-frames // 2)} "
                "(encoder frames of 20 ms) or trim the clips"
            )
        if processor.audio_tokens is not None and clips:
            # the worst sample: max_images_per_sample records with the longest clips; placeholders are never cut
            k = self.max_images_per_sample
            longest = sorted((processor.audio_tokens(f) for f, _ in clips), reverse=True)[:k]
            need = processor.min_sequence_tokens(k) + sum(n + 2 for n in longest)
            if need > self.seq_len + 1:
                raise ConfigError(
                    f"training.seq_len={self.seq_len} is too small for the data: a sample of {k} image(s) of "
                    f"{processor.image_tokens_per_image} tokens with the longest audio clips of data.path ({longest} "
                    f"tokens) needs {need} tokens for its placeholders and markers alone; set training.seq_len >= "
                    f"{need - 1}, or raise {processor.audio_key}.pool (fewer tokens per clip)"
                )
        if processor.audio_tokens is not None and not clips:
            raise DataError(
                f"data.path={self.path!r}: the model has an audio encoder but none of the {len(self._records)} "
                f"records carries an audio clip ({' / '.join(AUDIO_FIELDS)} member beside the image and caption); "
                "point data.path at shards with <key>.wav members (e.g. ../shared/data/speech/cc12m-speech-0000.tar) "
                "or remove the audio encoder's [model.<name>] and [parallelism.<name>] tables"
            )

        self._epoch = 0
        self._position = 0  # index of the next sample within the epoch's plan
        self._samples_produced = 0
        # Stream counters: plain ints (a shallow copy of the loader never shares them).
        self._truncated_captions = 0  # samples with at least one caption token cut
        self._truncated_tokens = 0  # caption tokens cut, summed over those samples
        self._plan_cache: tuple[int, list[tuple[int, ...]]] | None = None

    # ------------------------------------------------------------ reading
    def _on_shard_error(self, shard: str, records_read: int, exc: Exception) -> None:
        self._skipped["corrupt_shards"] += 1
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

    def _read_records(self) -> list[_Record]:
        """Read and decode every shard; skipped records are counted in ``self._skipped``."""
        records: list[_Record] = []
        for shard in self.shards:
            for key, fields in iter_webdataset([shard], on_shard_error=self._on_shard_error):
                image_field = next((f for f in IMAGE_FIELDS if f in fields), None)
                if image_field is None or CAPTION_FIELD not in fields:
                    self._skipped["missing_field"] += 1
                    continue
                try:
                    caption = fields[CAPTION_FIELD].decode("utf-8").strip()
                except UnicodeDecodeError as exc:
                    self._skipped["non_utf8_caption"] += 1
                    if not self._warned_non_utf8:
                        self._warned_non_utf8 = True
                        logger.warning(
                            "data.path: record %r in shard %r has a caption that is not valid "
                            "UTF-8 (%s); skipping it (this and later ones are counted in "
                            "stats['non_utf8_caption'], without further warnings)",
                            key,
                            shard,
                            exc,
                        )
                    continue
                tokens = self.processor.tokenize(caption) if caption else []
                if not tokens:
                    self._skipped["empty_caption"] += 1
                    continue
                try:
                    pixels = self.processor.load_image(fields[image_field])
                except CorruptSampleError:
                    self._skipped["corrupt_image"] += 1
                    continue
                features = None
                audio_field = next((f for f in AUDIO_FIELDS if f in fields), None)
                if self.processor.audio_tokens is not None and audio_field is not None:
                    try:
                        features = self.processor.load_audio(fields[audio_field], audio_field, f"{shard}:{key}")
                    except CorruptSampleError as exc:
                        self._skipped["corrupt_audio"] += 1
                        logger.warning("data.path: skipping record %r: %s", key, exc)
                        continue
                records.append(_Record(key, pixels, tuple(tokens), features))
        logger.debug("read %d records from %d shard(s); skipped %s", len(records), len(self.shards), self._skipped)
        return records

    # ------------------------------------------------------------- public
    @property
    def stats(self) -> dict[str, int]:
        """Data counters (a new dict of ints on every call; cheap, safe to call every step).

        Fixed once the loader is built (they come from reading the shards, so a
        resumed run has the same values):

        - ``samples``: valid image-caption records kept (one epoch);
        - ``shards``: shards under ``data.path``;
        - ``corrupt_shards``: shards that could not be opened or were cut short or
          damaged (the rest of each was skipped; see the class docstring);
        - ``missing_field``, ``non_utf8_caption``, ``empty_caption``,
          ``corrupt_image``, ``corrupt_audio`` (an audio clip that does not decode, with an
          audio encoder only): records skipped for that reason (each record counts
          once, under the first reason found, in this order).

        Growing with the stream (restored by :meth:`load_state_dict`):

        - ``truncated_captions``: produced samples with at least one caption token cut
          to fit ``seq_len + 1`` tokens (a sample counts once, however many of its
          captions were cut; a sample that only lost its EOS is not counted);
        - ``truncated_tokens``: caption tokens cut from those samples.
        """
        return {
            "samples": len(self._records),
            "shards": len(self.shards),
            **self._skipped,
            "truncated_captions": self._truncated_captions,
            "truncated_tokens": self._truncated_tokens,
        }

    def stats_summary(self) -> str:
        """:attr:`stats` as one compact line for the training log.

        The kept records always appear; the other parts only when non-zero, e.g.
        ``"data: 32 records kept; skipped 2 non-UTF-8 captions, 1 corrupt image; 1 of
        3 shards damaged; 5 samples with truncated captions (40 tokens cut)"`` (a
        damaged shard was cut short or could not be read; its rest was skipped).

        Returns:
            The line, starting with ``"data: "``.
        """
        s = self.stats
        parts = [f"data: {_counted(s['samples'], 'record')} kept"]
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
        return "; ".join(parts)

    @property
    def num_records(self) -> int:
        """Number of valid image-caption records per epoch."""
        return len(self._records)

    @property
    def record_keys(self) -> list[str]:
        """Keys of the valid records, in shard order (record index -> key)."""
        return [r.key for r in self._records]

    @property
    def epoch(self) -> int:
        """Epoch the next sample comes from."""
        return self._epoch

    def epoch_plan(self, epoch: int) -> list[tuple[int, ...]]:
        """The samples of ``epoch`` as tuples of record indices (deterministic).

        Args:
            epoch: Epoch number (``>= 0``).

        Returns:
            One tuple per sample, each with ``1..max_images_per_sample`` record
            indices; together they cover every valid record exactly once.
        """
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        n = len(self._records)
        order = list(range(n))
        if self.shuffle:
            random.Random(_derive_seed(self.seed, epoch, "permutation")).shuffle(order)
        k_rng = random.Random(_derive_seed(self.seed, epoch, "images_per_sample"))
        plan: list[tuple[int, ...]] = []
        i = 0
        while i < n:
            k = k_rng.randint(1, self.max_images_per_sample) if self.max_images_per_sample > 1 else 1
            k = min(k, n - i)
            plan.append(tuple(order[i : i + k]))
            i += k
        self._plan_cache = (epoch, plan)
        return plan

    def _next_sample(self) -> Sample:
        plan = self.epoch_plan(self._epoch)
        group = plan[self._position]
        records = [self._records[i] for i in group]
        captions = [r.caption_tokens for r in records]
        audio_fn = self.processor.audio_tokens
        clips = [r.audio_features for r in records if r.audio_features is not None]
        audio_tokens = None
        if audio_fn is not None:
            audio_tokens = [None if r.audio_features is None else audio_fn(r.audio_features.shape[1]) for r in records]
        tokens = self.processor.build_sequence(captions, self.seq_len + 1, audio_tokens)
        audio_fixed = sum(n + 2 for n in audio_tokens or [] if n is not None)
        cut = self.processor.caption_tokens_cut([len(c) for c in captions], self.seq_len + 1, audio_fixed)
        if cut:
            self._truncated_captions += 1
            self._truncated_tokens += cut
        sample = Sample(
            tokens=tokens,
            pixel_values=torch.stack([r.pixel_values for r in records]),
            sample_id=self._samples_produced,
            image_token_id=self.processor.image_token_id,
            image_tokens_per_image=self.processor.image_tokens_per_image,
            audio_features=tuple(clips),
            audio_token_id=self.processor.audio_token_id if audio_fn is not None else None,
        )
        self._samples_produced += 1
        self._position += 1
        if self._position >= len(plan):
            self._epoch += 1
            self._position = 0
        return sample

    def _next_packed(self) -> PackedBatch:
        samples: list[Sample] = []
        used: list[int] = []  # tokens used per row, as pack's first fit fills them
        while True:
            before = self._cursor()
            sample = self._next_sample()
            length = packed_length(len(sample.tokens), self.seq_len, self.pack_multiple)
            r = first_fit_row(used, length, self.seq_len)
            if r == self.global_batch_size:  # needs one row too many: leave it for the next batch
                self._restore(before)  # position and truncation counters: counted when it is used
                break
            if r == len(used):
                used.append(0)
            used[r] += length
            samples.append(sample)
        return pack(
            samples, self.seq_len, self.processor.pad_id, self.processor.image_token_id, multiple=self.pack_multiple
        )

    def _cursor(self) -> tuple[int, ...]:
        """Everything :meth:`_next_sample` advances (position and stream counters)."""
        return (self._epoch, self._position, self._samples_produced, self._truncated_captions, self._truncated_tokens)

    def _restore(self, cursor: tuple[int, ...]) -> None:
        (self._epoch, self._position, self._samples_produced, self._truncated_captions, self._truncated_tokens) = cursor

    def __iter__(self) -> Iterator[Batch | PackedBatch]:
        return self

    def __next__(self) -> Batch | PackedBatch:
        """The next global batch.

        Returns:
            Without packing, a :class:`~mimo_titan.data.collate.Batch` with
            ``global_batch_size`` samples and ``seq_len`` columns; with packing, a
            :class:`~mimo_titan.data.packing.PackedBatch` with ``global_batch_size``
            rows of ``seq_len`` tokens holding the next samples of the stream (see the
            class docstring).
        """
        if self.packing:
            return self._next_packed()
        samples = [self._next_sample() for _ in range(self.global_batch_size)]
        return collate(samples, self.seq_len, self.processor.pad_id)

    # ------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Position in the stream, for checkpointing.

        Returns:
            ``{"epoch", "position", "samples_produced"}``, the stream counters
            ``truncated_captions`` and ``truncated_tokens`` (see :attr:`stats`), and
            the settings that fix the stream (``seed``, ``shuffle``,
            ``max_images_per_sample``, ``num_records``, ``packing``,
            ``pack_multiple``), all plain ints/bools. With packing the position is
            that of the first sample of the next batch. The skip counters are not
            included: they come from reading the shards again.
        """
        return {
            "epoch": self._epoch,
            "position": self._position,
            "samples_produced": self._samples_produced,
            "truncated_captions": self._truncated_captions,
            "truncated_tokens": self._truncated_tokens,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "max_images_per_sample": self.max_images_per_sample,
            "num_records": len(self._records),
            "packing": self.packing,
            "pack_multiple": self.pack_multiple,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` output; the next batch continues exactly.

        ``global_batch_size`` may differ from the saved run (the position is kept in
        samples). A state without ``truncated_captions`` / ``truncated_tokens`` (a
        checkpoint written before they existed) sets them to 0: they then count from
        the resume on.

        Args:
            state: A dict produced by :meth:`state_dict`.

        Raises:
            ValueError: The state came from a stream with a different seed, shuffle
                flag, ``max_images_per_sample``, number of valid records, ``packing``
                flag or ``pack_multiple``, or its position is out of range.
        """
        for key, mine in (
            ("seed", self.seed),
            ("shuffle", self.shuffle),
            ("max_images_per_sample", self.max_images_per_sample),
            ("num_records", len(self._records)),
            ("packing", self.packing),
            ("pack_multiple", self.pack_multiple),
        ):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"cannot resume data loader: checkpoint has {key}={state[key]!r} but this loader has {key}={mine!r}"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.epoch_plan(epoch)):
            raise ValueError(f"invalid data loader position epoch={epoch} position={position}")
        self._epoch = epoch
        self._position = position
        self._samples_produced = int(state["samples_produced"])
        self._truncated_captions = int(state.get("truncated_captions", 0))
        self._truncated_tokens = int(state.get("truncated_tokens", 0))
