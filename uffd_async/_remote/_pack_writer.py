"""Writing a pack (``python -m uffd_async pack``) and describing one (``pack show``).

The format is :mod:`._pack_format`'s. What writing relies on:

* Every file goes through :func:`~uffd_async._core._atomic_file.write_atomically`
  (a temporary name, fsync, rename, fsync of the directory): a crash leaves each
  chunk whole or absent, never half-written under its digest's name.
* The index is written last, once every chunk it names is durable: an index
  never names a chunk that is not there.
* A chunk whose file exists already is not compressed nor written again (that is
  the point of naming it by its digest); the index records that file's length,
  whatever level it was compressed at. Its bytes are checked when read, not here.
* All-zero chunks get no file (length 0 in the index).
"""

from __future__ import annotations

import errno
import glob
import os
from collections.abc import Sequence

import attrs

from .._core._atomic_file import write_atomically
from .._core._checks import check_int
from .._core._errors import InvalidArgument
from .._restore._layered import LayeredSnapshot
from .._restore._snapshot import Snapshot
from ._chunked_source import DEFAULT_CHUNK_SIZE
from ._pack_format import (
    CHUNK_DIR,
    INDEX_SUFFIX,
    MAX_CHUNK_SIZE,
    PackIndex,
    chunk_digest,
    chunk_path,
    encode_index,
    read_index,
    zstd,
)

__all__ = ["DEFAULT_LEVEL", "PackResult", "PackSummary", "pack_snapshot", "summarize"]

#: zstd level 3 (zstd's own default): 250 MB/s to compress, within 5% of level 9's ratio.
DEFAULT_LEVEL = 3


@attrs.frozen
class PackResult:
    """What :func:`pack_snapshot` wrote."""

    index: str
    size: int
    chunks: int
    zero: int
    #: Chunk files written now, and chunks found in DEST already (or repeated in the image).
    written: int
    reused: int
    written_bytes: int


def pack_snapshot(
    snapshot: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    layers: Sequence[str | os.PathLike[str]] = (),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int = DEFAULT_LEVEL,
    name: str | None = None,
) -> PackResult:
    """Pack the snapshot file ``snapshot`` (with ``layers`` on top, oldest first) into the
    directory ``dest``; its index is ``dest/NAME.index`` (NAME: ``name``, or the file's)."""
    check_int("chunk_size", chunk_size, minimum=4096, maximum=MAX_CHUNK_SIZE)
    if chunk_size % 4096:
        raise InvalidArgument(errno.EINVAL, f"chunk_size must be a multiple of 4096: {chunk_size}")
    check_int("level", level, minimum=-7, maximum=22)
    module = zstd()  # before anything is written: an ImportError says what to install
    name = name if name is not None else os.path.basename(os.fspath(snapshot))
    if not name or "/" in name or name.startswith("."):
        raise InvalidArgument(errno.EINVAL, f"not a pack name: {name!r}")
    directory = os.fspath(dest)
    os.makedirs(os.path.join(directory, CHUNK_DIR), exist_ok=True)
    source = LayeredSnapshot(snapshot, *layers) if layers else Snapshot(snapshot)
    with source:
        size = source.size
        if size == 0:
            raise InvalidArgument(errno.EINVAL, f"{os.fspath(snapshot)} is empty: nothing to pack")
        identity = source.identity
        zero_chunk = bytes(chunk_size)
        entries: list[tuple[bytes, int]] = []
        zero = written = reused = written_bytes = 0
        for start in range(0, size, chunk_size):
            # A synchronous writer: the file's own mapping (Snapshot._read is a string_at).
            data = source._read(start, min(chunk_size, size - start))
            if data == zero_chunk[: len(data)]:
                entries.append((b"", 0))
                zero += 1
                continue
            digest = chunk_digest(data)
            path = chunk_path(directory, digest)
            try:
                stored = os.stat(path).st_size
            except FileNotFoundError:
                frame = module.compress(data, level=level)
                write_atomically(path, frame)
                stored = len(frame)
                written += 1
                written_bytes += stored
            else:
                reused += 1
            entries.append((digest, stored))
    index = os.path.join(directory, name + INDEX_SUFFIX)
    write_atomically(
        index, encode_index(chunk_size=chunk_size, size=size, identity=identity, entries=entries)
    )
    return PackResult(
        index=index, size=size, chunks=len(entries), zero=zero, written=written, reused=reused,
        written_bytes=written_bytes,
    )  # fmt: skip


@attrs.frozen
class PackSummary:
    """What ``pack show`` prints: one index, and what it shares with the others beside it."""

    index: PackIndex
    zero: int
    #: Distinct non-zero chunks, and how many of them other indexes in the directory name too.
    unique: int
    shared: int
    #: Compressed bytes of the distinct chunks (what the pack costs on disk for this snapshot).
    stored_bytes: int
    others: int

    @property
    def nonzero(self) -> int:
        return self.index.count - self.zero

    @property
    def dedup_ratio(self) -> float:
        """Non-zero chunks per distinct one (1.0: no chunk repeats within the snapshot)."""
        return self.nonzero / self.unique if self.unique else 1.0

    @property
    def compression_ratio(self) -> float:
        """Snapshot bytes per byte stored (zero chunks and repeats cost nothing)."""
        return self.index.size / self.stored_bytes if self.stored_bytes else float("inf")

    def lines(self) -> list[str]:
        index = self.index
        share = 100 * self.zero / index.count
        return [
            f"index: {index.path}",
            f"snapshot: {index.size:,} bytes, identity {index.identity.hex()}",
            f"chunks: {index.count:,} of {index.chunk_size:,} bytes: {self.zero:,} zero "
            f"({share:.1f}%), {self.unique:,} distinct non-zero, {self.shared:,} of them shared "
            f"with {self.others} other index{'es' if self.others != 1 else ''} here",
            f"stored: {self.stored_bytes:,} bytes of zstd; compression ratio "
            f"{self.compression_ratio:.2f} (zero chunks included), dedup ratio "
            f"{self.dedup_ratio:.2f}",
        ]


def summarize(path: str | os.PathLike[str]) -> PackSummary:
    """Describe the index at ``path`` (checked), and what it shares with its neighbours."""
    index = read_index(path)
    mine: dict[bytes, int] = {}
    for n in range(index.count):
        if not index.zero(n):
            mine[index.digests[n]] = index.stored[n]
    others: set[bytes] = set()
    neighbours = [
        other
        for other in glob.glob(os.path.join(glob.escape(index.directory), "*" + INDEX_SUFFIX))
        if not os.path.samefile(other, index.path)
    ]
    for other in neighbours:
        theirs = read_index(other)
        others.update(theirs.digests[n] for n in range(theirs.count) if not theirs.zero(n))
    return PackSummary(
        index=index,
        zero=sum(1 for n in range(index.count) if index.zero(n)),
        unique=len(mine),
        shared=len(mine.keys() & others),
        stored_bytes=sum(mine.values()),
        others=len(neighbours),
    )
