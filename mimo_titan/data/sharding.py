"""Splitting global batches across data-parallel ranks and pipeline microbatches.

The global batch of ``B`` samples is ``microbatches`` consecutive microbatches of
``B // microbatches`` samples. Each module (e.g. the vision encoder and the language
model) may have its own data-parallel size; a rank of data-parallel size ``dp`` owns,
in every microbatch, the contiguous share ``dp_sample_range(mb_size, dp_rank, dp)``.
Because each module's share is carved per microbatch, the samples of microbatch
``m`` are the same set for every module, whatever its dp size.

A :class:`~mimo_titan.data.packing.PackedBatch` (sequence packing) is split the same
way with its rows in place of samples: ``B`` is then the number of packed rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from mimo_titan.data.collate import Batch, concat_batches
from mimo_titan.data.packing import PackedBatch, concat_packed_batches
from mimo_titan.errors import ConfigError

__all__ = ["check_batch_divisibility", "dp_sample_range", "local_batch", "local_indices"]


def dp_sample_range(num_samples: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """This data-parallel rank's contiguous share of ``num_samples`` samples.

    Args:
        num_samples: Samples to split (``>= 0``).
        dp_rank: Rank within the data-parallel group, ``0 <= dp_rank < dp_size``.
        dp_size: Size of the data-parallel group (``>= 1``).

    Returns:
        ``(start, end)`` with ``end - start == num_samples // dp_size``.

    Raises:
        ValueError: ``dp_size < 1``, ``dp_rank`` out of range, ``num_samples < 0``
            or ``num_samples % dp_size != 0``.
    """
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if num_samples % dp_size != 0:
        raise ValueError(f"{num_samples} samples cannot be split evenly across {dp_size} data-parallel ranks")
    per_rank = num_samples // dp_size
    return dp_rank * per_rank, (dp_rank + 1) * per_rank


def local_indices(total: int, microbatches: int, dp_rank: int, dp_size: int) -> list[int]:
    """The global samples (rows) :func:`local_batch` gives this rank, in its order.

    Args:
        total: Samples (rows) of the global batch.
        microbatches: Microbatches the global batch is split into.
        dp_rank: This rank's index in the module's data-parallel group.
        dp_size: The module's data-parallel size.

    Returns:
        ``[m * mb + i for m in range(microbatches) for i in range(*dp_sample_range(mb, dp_rank, dp_size))]``
        with ``mb = total // microbatches``.

    Raises:
        ValueError: As :func:`local_batch`.
    """
    return [i for a, b in _local_ranges(total, microbatches, dp_rank, dp_size) for i in range(a, b)]


def _local_ranges(total: int, microbatches: int, dp_rank: int, dp_size: int) -> list[tuple[int, int]]:
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}")
    if total % microbatches != 0:
        raise ValueError(f"a batch of {total} samples cannot be split into {microbatches} microbatches")
    mb_size = total // microbatches
    start, end = dp_sample_range(mb_size, dp_rank, dp_size)
    return [(m * mb_size + start, m * mb_size + end) for m in range(microbatches)]


def local_batch(
    global_batch: Batch | PackedBatch, microbatches: int, dp_rank: int, dp_size: int
) -> Batch | PackedBatch:
    """This rank's part of a global batch, microbatch by microbatch.

    With ``mb = len(global_batch) // microbatches``, the result is the concatenation
    over ``m = 0..microbatches-1`` of the global samples
    ``m * mb + dp_sample_range(mb, dp_rank, dp_size)``; so chunk ``m`` of size
    ``mb // dp_size`` of the local batch is this rank's slice of microbatch ``m``.
    Images travel with their samples. For a :class:`PackedBatch` the units are its
    rows (each with all its documents, ``cu_seqlens`` and images).

    Args:
        global_batch: The global batch (identical on every rank): a :class:`Batch`
            or a :class:`PackedBatch`.
        microbatches: Number of microbatches the global batch is split into.
        dp_rank: This rank's index in the module's data-parallel group.
        dp_size: The module's data-parallel size (``dp_replicate * dp_shard``).

    Returns:
        A batch of the same type with ``len(global_batch) // dp_size`` samples (rows).

    Raises:
        ValueError: ``microbatches < 1``, the batch size is not divisible by
            ``microbatches``, or the microbatch size by ``dp_size``.
    """
    ranges = _local_ranges(len(global_batch), microbatches, dp_rank, dp_size)
    if isinstance(global_batch, PackedBatch):
        rows = [global_batch.slice(a, b) for a, b in ranges]
        return rows[0] if len(rows) == 1 else concat_packed_batches(rows)
    parts = [global_batch.slice(a, b) for a, b in ranges]
    return parts[0] if len(parts) == 1 else concat_batches(parts)


def check_batch_divisibility(global_batch_size: int, microbatches: int, dp_sizes: Mapping[str, int]) -> None:
    """Validate that every module can split every microbatch evenly.

    Args:
        global_batch_size: ``training.global_batch_size``.
        microbatches: ``training.microbatches``.
        dp_sizes: Module name -> data-parallel size (``dp_replicate * dp_shard``).

    Raises:
        ConfigError: Non-positive sizes; ``global_batch_size`` not divisible by
            ``microbatches``; or a module whose dp size does not divide the
            microbatch size. Messages name the config keys, the module, and the fix
            (the microbatch size must be a multiple of the lcm of all dp sizes).
        ValueError: A dp size below 1.
    """
    if global_batch_size < 1:
        raise ConfigError(f"training.global_batch_size must be >= 1, got {global_batch_size}")
    if microbatches < 1:
        raise ConfigError(f"training.microbatches must be >= 1, got {microbatches}")
    for name, dp in dp_sizes.items():
        if dp < 1:
            raise ValueError(f"module {name!r} has data-parallel size {dp}; it must be >= 1")
    lcm = math.lcm(*dp_sizes.values()) if dp_sizes else 1
    if global_batch_size % microbatches != 0:
        suggestion = microbatches * lcm * max(1, math.ceil(global_batch_size / (microbatches * lcm)))
        raise ConfigError(
            f"training.global_batch_size={global_batch_size} is not divisible by "
            f"training.microbatches={microbatches}; set training.global_batch_size to a "
            f"multiple of training.microbatches * {lcm} (lcm of dp sizes), e.g. {suggestion}, "
            f"or change training.microbatches"
        )
    mb_size = global_batch_size // microbatches
    for name, dp in dp_sizes.items():
        if mb_size % dp != 0:
            suggestion = microbatches * lcm * math.ceil(mb_size / lcm)
            raise ConfigError(
                f"module {name!r}: data-parallel size {dp} (dp_replicate * dp_shard) does not "
                f"divide the microbatch size {mb_size} = training.global_batch_size="
                f"{global_batch_size} / training.microbatches={microbatches}; the smallest "
                f"valid microbatch size is lcm of all dp sizes {dict(dp_sizes)} = {lcm}, so "
                f"set training.global_batch_size to a multiple of "
                f"training.microbatches * {lcm} = {microbatches * lcm} (e.g. {suggestion}) "
                f"or lower training.microbatches"
            )
