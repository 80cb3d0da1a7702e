"""What a copier fed a chunk at a time offers: its source's chunks, and filling from them.

A source that costs a request per read (an HTTP object; an object store) is read a
chunk at a time, and a chunk that lands fills every missing page within it (see
:mod:`uffd_async._remote._chunked_copy`). The prefetcher fetches such chunks ahead
and fills them through the same two calls a demand fault's fetch uses, so these
protocols are the whole of what it needs beyond a copier's own. A copier from memory
has no chunks: its ``chunk_fill`` is None.
"""

from __future__ import annotations

from typing import Protocol

from .._core._uffd import Userfaultfd

__all__ = ["ChunkFill", "ChunkSource"]


class ChunkSource(Protocol):
    """Bytes ``[i * chunk_size, ...)`` as chunk ``i``, fetched once however many ask at a time
    (an :class:`~uffd_async.HttpSource`)."""

    #: Bytes per chunk (the last one may be shorter), of a source of ``size`` bytes.
    chunk_size: int
    size: int
    #: Fetches at once; the prefetcher leaves half of them to demand faults.
    concurrency: int

    def cached(self, index: int) -> bytes | None:
        """Chunk ``index`` if it is at hand now, without awaiting."""

    async def chunk(self, index: int, *, demand: bool = True) -> bytes:
        """Chunk ``index``; ``demand=False`` (a prefetch) yields to demand faults."""


class ChunkFill(Protocol):
    """A copier (or a process's copiers) served from a :class:`ChunkSource`."""

    @property
    def chunk_source(self) -> ChunkSource: ...

    def fill_span(self, uffd: Userfaultfd, lo: int, data: bytes) -> None:
        """Copy every missing page whose bytes lie within ``data`` (the source's bytes
        from ``lo``), where it still is."""

    def chunk_missing(self, chunk: int) -> bool:
        """Whether a page within chunk ``chunk`` is still missing."""
