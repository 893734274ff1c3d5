"""Multimodal data pipeline: WebDataset shards -> processed samples -> global batches.

Public API:
    - :func:`resolve_shards`, :func:`iter_webdataset`: read WebDataset tar shards
      (damaged shards: records before the damage kept, then reported or raised).
    - :class:`ImageTextProcessor`, :class:`CorruptSampleError`: image decoding,
      tokenisation and token layout.
    - :class:`Sample`, :class:`Batch`, :func:`collate`, :func:`concat_batches`,
      :data:`IGNORE_INDEX`: batching.
    - :class:`PackedBatch`, :func:`pack`: packed (THD) rows with ``cu_seqlens``.
    - :class:`MimoDataLoader`: deterministic, resumable streaming global batches (padded or packed rows) with
      a shuffle buffer and a background thread; media decoded only for this rank's encoder slices
      (:class:`MediaSlice`); data faults skipped and counted in ``stats`` (one log line: ``stats_summary()``).

User errors (bad ``data.path`` / ``data.tokenizer``, no valid record) raise
:class:`~mimo_titan.errors.DataError`; bad ``training.*`` sizes raise
:class:`~mimo_titan.errors.ConfigError`.
    - :func:`dp_sample_range`, :func:`local_batch`, :func:`check_batch_divisibility`:
      per-rank/microbatch splitting.
"""

from mimo_titan.data.collate import IGNORE_INDEX, Batch, Sample, collate, concat_batches
from mimo_titan.data.loader import MediaSlice, MimoDataLoader
from mimo_titan.data.packing import PackedBatch, pack
from mimo_titan.data.processor import CLIP_MEAN, CLIP_STD, CorruptSampleError, ImageTextProcessor
from mimo_titan.data.sharding import check_batch_divisibility, dp_sample_range, local_batch, local_indices
from mimo_titan.data.webdataset import expand_braces, iter_webdataset, resolve_shards

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IGNORE_INDEX",
    "Batch",
    "CorruptSampleError",
    "ImageTextProcessor",
    "MediaSlice",
    "MimoDataLoader",
    "PackedBatch",
    "Sample",
    "check_batch_divisibility",
    "collate",
    "concat_batches",
    "dp_sample_range",
    "expand_braces",
    "iter_webdataset",
    "local_batch",
    "local_indices",
    "pack",
    "resolve_shards",
]
