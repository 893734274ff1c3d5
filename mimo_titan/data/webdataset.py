"""Streaming reader for WebDataset-style tar shards.

A WebDataset shard is a plain tar archive in which the files of one record sit next
to each other and share a *key*: ``000003.jpg``, ``000003.txt``, ``000003.json``
form the record ``"000003"`` with fields ``{"jpg", "txt", "json"}``. This module only
groups raw bytes; decoding is the job of :mod:`mimo_titan.data.processor`.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator, Sequence

__all__ = ["iter_webdataset", "resolve_shards", "split_member_name"]

_CONFIG_KEY = "data.path"


def resolve_shards(path: str | os.PathLike[str]) -> list[str]:
    """Turn the ``data.path`` setting into a list of tar shards.

    Args:
        path: A ``.tar`` file, or a directory whose ``*.tar`` files (not recursive)
            are the shards.

    Returns:
        The shard paths; for a directory, sorted by file name so that every rank
        sees the same order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a file that is not a ``.tar``, or a directory with no
            ``.tar`` files in it.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(
            f"{_CONFIG_KEY}={p!r} does not exist; set {_CONFIG_KEY} to a WebDataset "
            f".tar shard or to a directory containing .tar shards"
        )
    if os.path.isdir(p):
        shards = sorted(
            os.path.join(p, name)
            for name in os.listdir(p)
            if name.endswith(".tar") and os.path.isfile(os.path.join(p, name))
        )
        if not shards:
            raise ValueError(
                f"{_CONFIG_KEY}={p!r} is a directory without any .tar shards; point "
                f"{_CONFIG_KEY} at a directory containing WebDataset .tar files or at "
                f"one .tar file"
            )
        return shards
    if not p.endswith(".tar"):
        raise ValueError(
            f"{_CONFIG_KEY}={p!r} is not a .tar file; set {_CONFIG_KEY} to a WebDataset "
            f".tar shard or to a directory containing .tar shards"
        )
    return [p]


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


def iter_webdataset(paths: Sequence[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream the records of WebDataset shards, one shard after the other.

    Members are read strictly sequentially (tar streaming mode), so this works on
    pipes and object-store streams as well as files. Consecutive regular-file
    members with the same key are grouped into one record; a key that reappears
    later in the stream starts a new record. Within a record, a repeated extension
    keeps the last member's bytes. Directories, links and members without a key or
    extension are ignored.

    Args:
        paths: Tar shard paths, read in the given order.

    Yields:
        ``(key, fields)`` in tar order, where ``fields`` maps each extension (e.g.
        ``"jpg"``, ``"txt"``, ``"json"``) to the member's raw bytes.

    Raises:
        FileNotFoundError: A shard does not exist.
        ValueError: A shard is not a readable tar archive (the message names it).
    """
    for path in paths:
        try:
            tar = tarfile.open(path, mode="r|*")
        except tarfile.ReadError as exc:
            raise ValueError(f"{path!r} is not a readable tar archive: {exc}") from exc
        with tar:
            current_key: str | None = None
            fields: dict[str, bytes] = {}
            try:
                for member in tar:
                    if not member.isfile():
                        continue
                    parts = split_member_name(member.name)
                    if parts is None:
                        continue
                    key, ext = parts
                    if key != current_key:
                        if current_key is not None and fields:
                            yield current_key, fields
                        current_key, fields = key, {}
                    handle = tar.extractfile(member)
                    fields[ext] = handle.read() if handle is not None else b""
            except (tarfile.TarError, EOFError) as exc:
                raise ValueError(f"{path!r} is not a readable tar archive: {exc}") from exc
            if current_key is not None and fields:
                yield current_key, fields
