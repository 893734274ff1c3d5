"""Streaming reader for WebDataset-style tar shards.

A WebDataset shard is a plain tar archive in which the files of one record sit next
to each other and share a *key*: ``000003.jpg``, ``000003.txt``, ``000003.json``
form the record ``"000003"`` with fields ``{"jpg", "txt", "json"}``. This module only
groups raw bytes; decoding is the job of :mod:`mimo_titan.data.processor`.

Damaged shards. A shard is *damaged* when it cannot be opened or read as a tar
archive, when a member's data is cut short, when a header is invalid, or when the
archive ends without its end-of-archive marker (a file cut exactly between two
members). Python's ``tarfile`` silently stops at the last three kinds (they look
like the end of the archive to it); :func:`iter_webdataset` detects them by
checking that the member loop ended at the marker. In a damaged shard the records
completed before the damage are kept, and the record being assembled when the
damage is found is dropped together with the rest of the shard: its remaining
members may be missing, even when the cut falls exactly between two members.
"""

from __future__ import annotations

import glob
import gzip
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from mimo_titan.errors import DataError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["ShardErrorHandler", "expand_braces", "iter_shard", "iter_webdataset", "resolve_shards", "split_member_name"]

_CONFIG_KEY = "data.path"

#: ``on_shard_error(path, records_read, exc)``: called by :func:`iter_webdataset` for a
#: damaged shard, with the number of complete records it yielded from that shard before
#: the damage and the error describing it (a ``tarfile.TarError`` or an ``OSError``).
ShardErrorHandler = Callable[[str, int, Exception], None]


_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Expand brace patterns the way a shell (and WebDataset's shard lists) do, left to right.

    ``{0000..0099}`` is a numeric range, inclusive, zero-padded to the width of its first bound
    (``cc12m-{0000..0002}.tar`` -> ``cc12m-0000.tar``, ``cc12m-0001.tar``, ``cc12m-0002.tar``); ``{a,b}`` is a
    list. Several groups multiply (``{a,b}-{0..1}`` gives 4 names); a brace without ``..`` or ``,`` inside stays
    as written.

    Args:
        pattern: A path, possibly with brace groups.

    Returns:
        The expanded names, in expansion order (not sorted, not de-duplicated).

    Raises:
        DataError: A range whose first bound is greater than its last (names ``data.path``).
    """
    m = next((m for m in _BRACE.finditer(pattern) if ".." in m.group(1) or "," in m.group(1)), None)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    r = _RANGE.match(body)
    if r is not None:
        lo, hi = int(r.group(1)), int(r.group(2))
        if lo > hi:
            raise DataError(
                f"{_CONFIG_KEY}: the range {{{body}}} in {pattern!r} is empty (first bound > last); write it "
                f"as {{{r.group(2)}..{r.group(1)}}}"
            )
        width = len(r.group(1).lstrip("-"))
        items = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def _shards_of_one(entry: str) -> list[str]:
    """The shards one ``data.path`` entry names (after brace expansion): a ``.tar`` file, a directory's ``*.tar``
    files, or a glob's matches (files ending in ``.tar``, and the ``*.tar`` of matched directories)."""
    if glob.has_magic(entry):
        found = sorted(glob.glob(entry))
        out = [p for f in found for p in (_tars_in(f) if os.path.isdir(f) else [f] if f.endswith(".tar") else [])]
        if not out:
            raise DataError(
                f"{_CONFIG_KEY}: the pattern {entry!r} matches no .tar shard; check the pattern (globs *, ?, [..] "
                "and brace ranges {0000..0099} are expanded) or point data.path at a .tar file or a directory"
            )
        return out
    if not os.path.exists(entry):
        raise DataError(
            f"{_CONFIG_KEY}={entry!r} does not exist; set {_CONFIG_KEY} to a WebDataset "
            f".tar shard, a directory containing .tar shards, a glob or a brace pattern (cc12m-{{0000..0099}}.tar)"
        )
    if os.path.isdir(entry):
        shards = _tars_in(entry)
        if not shards:
            raise DataError(
                f"{_CONFIG_KEY}={entry!r} is a directory without any .tar shards; point "
                f"{_CONFIG_KEY} at a directory containing WebDataset .tar files or at "
                f"one .tar file"
            )
        return shards
    if not entry.endswith(".tar"):
        raise DataError(
            f"{_CONFIG_KEY}={entry!r} is not a .tar file; set {_CONFIG_KEY} to a WebDataset "
            f".tar shard or to a directory containing .tar shards"
        )
    return [entry]


def _tars_in(folder: str) -> list[str]:
    return sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if name.endswith(".tar") and os.path.isfile(os.path.join(folder, name))
    )


def resolve_shards(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Turn the ``data.path`` setting into the sorted list of tar shards.

    Args:
        path: One entry or a list of entries; each is a ``.tar`` file, a directory whose ``*.tar`` files (not
            recursive) are shards, a glob (``/data/cc12m-*.tar``) or a brace pattern (``cc12m-{0000..0099}.tar``,
            ``{train,extra}/*.tar``; see :func:`expand_braces`).

    Returns:
        The shard paths, sorted and de-duplicated (every rank sees the same order).

    Raises:
        DataError: An entry (after expansion) that does not exist, a directory without ``.tar`` files, a file
            that is not a ``.tar``, a pattern that matches no shard, or an empty list (messages name
            ``data.path``).
    """
    entries = [os.fspath(path)] if isinstance(path, (str, os.PathLike)) else [os.fspath(p) for p in path]
    if not entries:
        raise DataError(f"{_CONFIG_KEY} is an empty list; give at least one .tar shard, directory or pattern")
    return sorted({shard for entry in entries for name in expand_braces(entry) for shard in _shards_of_one(name)})


def split_member_name(name: str) -> tuple[str, str] | None:
    """Split a tar member name into ``(key, ext)``.

    The key is the basename up to its first dot and the extension is everything after
    that dot, lower-cased (``"a/b/0001.seg.png"`` -> ``("0001", "seg.png")``).

    Args:
        name: The member name as stored in the tar.

    Returns:
        ``(key, ext)``, or ``None`` for names without a key or an extension (such as
        ``.DS_Store`` or ``README``), which are not part of any record.
    """
    base = name.rsplit("/", 1)[-1]
    key, dot, ext = base.partition(".")
    if not key or not dot or not ext:
        return None
    return key, ext.lower()


class _MarkerTarInfo(tarfile.TarInfo):
    """A ``TarInfo`` that notes on its ``TarFile`` why reading the next header failed.

    ``TarFile`` ends its member loop without an error on an empty, truncated or
    invalid header after the first member; only an all-zero block
    (``EOFHeaderError``) is the real end-of-archive marker. The last header error is
    kept as ``tar._mimo_header_error`` so that :func:`iter_shard` can tell the two
    apart.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar._mimo_header_error = exc  # type: ignore[attr-defined]
            raise


def _missing_end_marker(tar: tarfile.TarFile) -> tarfile.ReadError | None:
    """``None`` if ``tar``'s member loop stopped at the end-of-archive marker, else the error."""
    exc = getattr(tar, "_mimo_header_error", None)
    if isinstance(exc, tarfile.EOFHeaderError):  # type: ignore[attr-defined]  # CPython's, not in typeshed
        return None
    if exc is None or isinstance(exc, tarfile.EmptyHeaderError):  # type: ignore[attr-defined]  # as above
        return tarfile.ReadError(f"archive ends at byte {tar.offset} without its end-of-archive marker")
    return tarfile.ReadError(f"{exc} at byte {tar.offset}")


#: bytes a tar may carry after its end-of-archive marker: the padding to its record size (10 KiB by default, a few
#: times that with a larger blocking factor); anything longer is a damaged shard
MAX_TAIL_BYTES = 64 * 1024


def _overlong_tail(tar: tarfile.TarFile) -> tarfile.ReadError | None:
    """``None`` unless more than :data:`MAX_TAIL_BYTES` follow the end-of-archive marker: an all-zero header there
    is how a shard copied onto preallocated (zero-filled) space reads where the copy stopped, so it is damage, not
    an end. (Reads at most that many bytes.)"""
    fileobj = tar.fileobj
    if fileobj is None:
        return None
    tail = len(fileobj.read(MAX_TAIL_BYTES + 1))
    if tail <= MAX_TAIL_BYTES:
        return None
    return tarfile.ReadError(
        f"more than {MAX_TAIL_BYTES} bytes follow the end-of-archive marker at byte {tar.offset} (the copy of the "
        "shard stopped part-way and the rest is zeros or other data)"
    )


def _gzip_damage(path: str) -> None:
    """Raise if ``path`` is a gzip-compressed shard whose CRC-32 or length does not match its data. The tar reader
    stops at the end-of-archive marker and never reaches gzip's trailer, so damaged bytes inside a stored (not
    compressed further, e.g. JPEG) deflate block would pass unnoticed; this decompresses the file once more, to its
    end, and lets :mod:`gzip` check the trailer. Since the damage cannot be located, the whole shard is dropped."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return
    with gzip.open(path, "rb") as g:
        while g.read(1 << 20):
            pass


def iter_shard(
    path: str, on_error: ShardErrorHandler | None = None, wanted: Callable[[int], bool] | None = None
) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """The records of one shard with their index in it: ``(index, key, fields)``.

    ``index`` counts every complete record of the shard (``0, 1, 2, ...`` in tar order), so ``(shard, index)``
    names a record for good: a resumed reader skips to it, and a shuffle buffer is saved as such pairs.

    Args:
        path: The shard.
        on_error: As ``on_shard_error`` of :func:`iter_webdataset` (``None``: raise a ``DataError``).
        wanted: ``wanted(index)`` says whether to read a record's data: the members of unwanted records are
            stepped over without being read into memory and are not yielded, but still counted.

    Yields:
        ``(index, key, fields)`` as :func:`iter_webdataset` describes ``(key, fields)``.

    Raises:
        DataError: Without ``on_error``, the shard is missing or damaged.
    """
    records_read = 0
    try:
        _gzip_damage(path)
        with tarfile.open(path, mode="r|*", tarinfo=_MarkerTarInfo) as tar:
            current_key: str | None = None
            fields: dict[str, bytes] = {}
            seen = False  # the current record has at least one member
            for member in tar:
                if not member.isfile():
                    continue
                parts = split_member_name(member.name)
                if parts is None:
                    continue
                key, ext = parts
                if key != current_key:
                    if current_key is not None and seen:
                        if wanted is None or wanted(records_read):
                            yield records_read, current_key, fields
                        records_read += 1
                    current_key, fields, seen = key, {}, False
                seen = True
                if wanted is not None and not wanted(records_read):
                    continue  # the stream steps over the member's data
                handle = tar.extractfile(member)
                fields[ext] = handle.read() if handle is not None else b""
            damage = _missing_end_marker(tar) or _overlong_tail(tar)
            if damage is not None:
                raise damage  # the record in ``fields`` may lack members: dropped
            if current_key is not None and seen:
                if wanted is None or wanted(records_read):
                    yield records_read, current_key, fields
                records_read += 1
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        if on_error is None:
            raise DataError(
                f"{_CONFIG_KEY}: shard {path!r} is not a readable tar archive (damaged after "
                f"{records_read} complete record(s)): {exc}; replace or remove the shard"
            ) from exc
        on_error(path, records_read, exc)


def iter_webdataset(
    paths: Sequence[str], on_shard_error: ShardErrorHandler | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream the records of WebDataset shards, one shard after the other.

    Members are read strictly sequentially (tar streaming mode), so this works on
    pipes and object-store streams as well as files. Consecutive regular-file
    members with the same key are grouped into one record; a key that reappears
    later in the stream starts a new record. Within a record, a repeated extension
    keeps the last member's bytes. Directories, links and members without a key or
    extension are ignored.

    A damaged shard (see the module docstring: unreadable, cut short, an invalid
    header, no end-of-archive marker) yields the records completed before the
    damage; the record in progress and the rest of that shard are dropped. Then,
    with ``on_shard_error``, the handler is called and reading goes on with the
    next shard; without it, :class:`~mimo_titan.errors.DataError` is raised.

    Args:
        paths: Tar shard paths, read in the given order.
        on_shard_error: ``on_shard_error(path, records_read, exc)``, called once per
            damaged shard (``records_read``: complete records yielded from it;
            ``exc``: the ``tarfile.TarError`` / ``OSError`` / ``EOFError`` met).

    Yields:
        ``(key, fields)`` in tar order, where ``fields`` maps each extension (e.g.
        ``"jpg"``, ``"txt"``, ``"json"``) to the member's raw bytes.

    Raises:
        DataError: Without ``on_shard_error``, a shard is missing or damaged (the
            message names it and the number of records read before the damage).
    """
    for path in paths:
        for _, key, fields in iter_shard(path, on_shard_error):
            yield key, fields
