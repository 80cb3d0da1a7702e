"""Writing a pack (``python -m uffd_async pack``) and describing one (``pack show``).

The format is :mod:`._pack_format`'s; where it is written, :mod:`._pack_store`'s (a
directory or an object-store prefix). What writing relies on:

* Every chunk and index is written whole or not at all (a directory's files through
  :func:`~uffd_async._core._atomic_file.write_atomically`; an object store's PUT of a
  whole object): a crash leaves each chunk whole or absent, never half-written under
  its digest's name.
* The index is written last, once every chunk it names is durable: an index
  never names a chunk that is not there.
* A chunk the pack has already is not compressed nor written again (that is the
  point of naming it by its digest): one listing of ``chunks/`` says which, and a
  chunk written by another writer meanwhile is found by the conditional create
  (put-if-absent). The index records the length found, whatever level it was
  compressed at. Its bytes are checked when read, not here.
* Writes run in ``uploads`` threads while the next chunks are compressed, with at
  most twice that many compressed chunks held in memory.
* All-zero chunks get no file (length 0 in the index).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import attrs

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
    chunk_name,
    decode_index,
    encode_index,
    zstd,
)
from ._pack_store import PackStore, open_pack_store, split_index

__all__ = [
    "DEFAULT_LEVEL",
    "DEFAULT_UPLOADS",
    "PackResult",
    "PackSummary",
    "pack_snapshot",
    "summarize",
]

#: zstd level 3 (zstd's own default): 250 MB/s to compress, within 5% of level 9's ratio.
DEFAULT_LEVEL = 3
#: Chunks written at once: an object store's PUT is ~20 ms away, a directory's is not.
DEFAULT_UPLOADS = 8


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
    options: Mapping[str, str] | None = None,
    uploads: int = DEFAULT_UPLOADS,
) -> PackResult:
    """Pack the snapshot file ``snapshot`` (with ``layers`` on top, oldest first) into
    ``dest``: a directory, or an object-store prefix (``s3://BUCKET/PREFIX/``, ``gs://``,
    ``az://``; ``options``: its store's settings, as :class:`~uffd_async.ObjectSource`'s).
    Its index is ``dest/NAME.index`` (NAME: ``name``, or the file's). ``uploads``: chunks
    written at once (each in a thread of its own)."""
    check_int("chunk_size", chunk_size, minimum=4096, maximum=MAX_CHUNK_SIZE)
    if chunk_size % 4096:
        raise InvalidArgument(errno.EINVAL, f"chunk_size must be a multiple of 4096: {chunk_size}")
    check_int("level", level, minimum=-7, maximum=22)
    check_int("uploads", uploads, minimum=1, maximum=256)
    module = zstd()  # before anything is written: an ImportError says what to install
    name = name if name is not None else os.path.basename(os.fspath(snapshot))
    if not name or "/" in name or name.startswith("."):
        raise InvalidArgument(errno.EINVAL, f"not a pack name: {name!r}")
    source = LayeredSnapshot(snapshot, *layers) if layers else Snapshot(snapshot)
    with source:
        if source.size == 0:
            raise InvalidArgument(errno.EINVAL, f"{os.fspath(snapshot)} is empty: nothing to pack")
        store = open_pack_store(dest, options=options, create=True)
        try:
            return _Packing(store, module, level, uploads).run(source, chunk_size, name)
        finally:
            store.close()


class _Packing:
    """One run of :func:`pack_snapshot`: chunks compressed here, one at a time, and written
    by ``uploads`` threads, at most twice that many frames held at once."""

    def __init__(self, store: PackStore, module: Any, level: int, uploads: int) -> None:
        self.store = store
        self.module = module
        self.level = level
        self.uploads = uploads
        self.written = 0
        self.written_bytes = 0
        self._counting = threading.Lock()
        self._slots = threading.BoundedSemaphore(2 * uploads)
        self._failed: list[BaseException] = []

    def run(self, source: Snapshot | LayeredSnapshot, chunk_size: int, name: str) -> PackResult:
        size = source.size
        # What the pack has already (one listing): never compressed nor written again.
        have = self.store.sizes(CHUNK_DIR + "/")
        zero_chunk = bytes(chunk_size)
        entries: list[tuple[bytes, int | Future[int]]] = []
        started: dict[str, Future[int]] = {}  # chunks written by this run
        zero = reused = 0
        with ThreadPoolExecutor(self.uploads, thread_name_prefix="uffd-pack") as pool:
            for start in range(0, size, chunk_size):
                if self._failed:
                    break
                # A synchronous writer: the file's own mapping (Snapshot._read is a string_at).
                data = source._read(start, min(chunk_size, size - start))
                if data == zero_chunk[: len(data)]:
                    entries.append((b"", 0))
                    zero += 1
                    continue
                digest = chunk_digest(data)
                key = chunk_name(digest)
                known: int | Future[int] | None = have.get(key, started.get(key))
                if known is not None:
                    reused += 1
                    entries.append((digest, known))
                    continue
                frame = self.module.compress(data, level=self.level)
                self._slots.acquire()
                future = pool.submit(self._write, key, frame)
                future.add_done_callback(self._done)
                started[key] = future
                entries.append((digest, future))
        if self._failed:
            raise self._failed[0]
        stored = [(d, n if isinstance(n, int) else n.result()) for d, n in entries]
        identity = source.identity
        index = name + INDEX_SUFFIX
        # Last, once every chunk it names is there: an index never names a missing chunk.
        self.store.replace(
            index, encode_index(chunk_size=chunk_size, size=size, identity=identity, entries=stored)
        )
        return PackResult(
            index=self.store.url(index), size=size, chunks=len(stored), zero=zero,
            written=self.written, reused=reused, written_bytes=self.written_bytes,
        )  # fmt: skip

    def _write(self, key: str, frame: bytes) -> int:
        """Write one chunk unless it is there already; the length the index records."""
        found = self.store.put_if_absent(key, frame)
        if found is not None:  # another writer's, maybe at another level: its length
            return found
        with self._counting:
            self.written += 1
            self.written_bytes += len(frame)
        return len(frame)

    def _done(self, future: Future[int]) -> None:
        self._slots.release()
        error = future.exception()
        if error is not None:
            self._failed.append(error)


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


def summarize(
    path: str | os.PathLike[str], *, options: Mapping[str, str] | None = None
) -> PackSummary:
    """Describe the index at ``path`` (a file, or an object URL with ``options``), checked,
    and what it shares with the other indexes beside it."""
    place, name = split_index(path)
    store = open_pack_store(place, options=options)
    try:
        index = decode_index(store.read(name), store.url(name))
        mine: dict[bytes, int] = {}
        for n in range(index.count):
            if not index.zero(n):
                mine[index.digests[n]] = index.stored[n]
        others: set[bytes] = set()
        neighbours = [other for other in store.sizes("", INDEX_SUFFIX) if other != name]
        for other in neighbours:
            theirs = decode_index(store.read(other), store.url(other))
            others.update(theirs.digests[n] for n in range(theirs.count) if not theirs.zero(n))
    finally:
        store.close()
    return PackSummary(
        index=index,
        zero=sum(1 for n in range(index.count) if index.zero(n)),
        unique=len(mine),
        shared=len(mine.keys() & others),
        stored_bytes=sum(mine.values()),
        others=len(neighbours),
    )
