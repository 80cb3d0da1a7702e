"""Serving a snapshot from a pack: a chunk read, checked and decompressed off the loop.

A pack (:mod:`._pack_format`) holds a snapshot as zstd chunks named by their
SHA-256. :class:`PackSource` serves it a chunk at a time, as the remote sources
do: a fault awaits its chunk, and the chunk fills every missing page of it
(:class:`~._chunked_copy.ChunkedCopy`; one read per chunk however many faults
wait, demand before prefetch, recent chunks kept: :class:`~._chunks.Chunks`).
What differs:

* **Zero chunks are never read.** The index marks them; the copier answers
  their faults with ``UFFDIO_ZEROPAGE`` for every missing page of the chunk,
  inline (no await), and the prefetcher's fill of one does the same.
* **Checked before a guest sees it.** A chunk is read whole, its file's length,
  its decompressed length and its SHA-256 must be the index's; otherwise a
  :class:`~._pack_format.PackError` (a ``FetchError``): the faults waiting on it
  are failed as the server's ``on_error`` says (poison by default), and nothing
  is copied.
* **Off the event loop.** Reading, decompressing and hashing a chunk (a few ms
  for 1 MiB) run in a worker thread (``anyio.to_thread``), at most
  ``concurrency`` at once; each call makes its own decompressor (see the
  format's module on why not a shared one).
* The index is read and checked when the source is made; a pack never changes
  under its index (a chunk's name is its content), so ``wait_changed`` never
  returns, and ``version()`` is the identity the index stores.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

import anyio
import anyio.to_thread
import attrs

from .._core._checks import check_int
from .._core._errors import InvalidArgument, SnapshotClosed
from .._restore._guest_mapping import GuestMapping
from .._restore._source import SnapshotSource
from .._serve._resolvers import CopyFrom
from ._chunked_copy import ChunkedCopy, fill_together
from ._chunked_source import DEFAULT_CACHE_BYTES, refuse_readahead
from ._chunks import Chunks, ChunkStats
from ._pack_format import PackError, PackIndex, chunk_digest, read_index, zstd

__all__ = ["DEFAULT_PACK_CONCURRENCY", "PackSource", "PackStats"]

#: Chunks read and decompressed at once (worker threads): about the cores of a host.
DEFAULT_PACK_CONCURRENCY = 4


@attrs.define(kw_only=True)
class PackStats(ChunkStats):
    """What a pack source did; read it while it runs or after."""

    #: Chunk files read (each checked), and their compressed bytes.
    reads: int = 0
    bytes: int = 0
    #: Zero chunks handed out as bytes, without a read (to a prefetch or a ``read``; a
    #: demand fault in one never asks: it gets zero pages at once).
    zeros: int = 0


class PackSource(SnapshotSource):
    """The snapshot a pack's index (``DEST/NAME.index``, from ``python -m uffd_async pack``)
    names, served a chunk at a time from the chunk files beside it.

    ``concurrency``: chunks read and decompressed at once, in worker threads.
    ``cache_bytes``: decompressed chunks kept for other processes and fork children.
    """

    def __init__(
        self,
        index: str | os.PathLike[str],
        *,
        concurrency: int = DEFAULT_PACK_CONCURRENCY,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        check_int("concurrency", concurrency, minimum=1)
        check_int("cache_bytes", cache_bytes, minimum=0)
        self._zstd = zstd()
        self.index: PackIndex = read_index(index)
        self.path = self.index.path
        self.size = self.index.size
        self.chunk_size = self.index.chunk_size
        self.concurrency = concurrency
        self.stats = PackStats()
        self._chunks = Chunks(
            self._load, concurrency=concurrency, cache_bytes=cache_bytes, stats=self.stats
        )
        self._closed = False

    # -- chunks -----------------------------------------------------------------------

    @property
    def chunk_count(self) -> int:
        return self.index.count

    def zero(self, index: int) -> bool:
        """Whether chunk ``index`` is all zeros: never read, served with UFFDIO_ZEROPAGE."""
        return self.index.zero(index)

    def cached(self, index: int) -> bytes | None:
        """Chunk ``index`` if it is at hand now, without awaiting."""
        return self._chunks.cached(index)

    async def chunk(self, index: int, *, demand: bool = True) -> bytes:
        """Chunk ``index``, decompressed and checked (zeros for a zero chunk, without a
        read); read once however many ask at a time."""
        self.check_open()
        if not 0 <= index < self.index.count:
            raise InvalidArgument(errno.EINVAL, f"no chunk {index}: there are {self.index.count}")
        if self.index.zero(index):
            self.stats.zeros += 1
            start, end = self.index.span(index)
            return bytes(end - start)
        return await self._chunks.get(index, demand=demand)

    async def _load(self, index: int) -> bytes:
        self.stats.reads += 1  # counted here, on the loop, not racing in the threads
        data = await anyio.to_thread.run_sync(self._read_chunk, index)
        self.stats.bytes += self.index.stored[index]
        return data

    def _read_chunk(self, index: int) -> bytes:
        """Chunk ``index`` from its file, checked (in a worker thread)."""
        path = self.index.chunk_path(index)
        start, end = self.index.span(index)

        def bad(why: str, err: int = errno.EIO) -> PackError:
            return PackError(
                f"{path}: chunk {index} (snapshot bytes {start}-{end - 1}) {why}",
                url=path, start=start, end=end - 1, err=err,
            )  # fmt: skip

        try:
            with open(path, "rb") as file:
                frame = file.read(self.index.stored[index] + 1)
        except OSError as exc:
            raise bad(f"cannot be read: {exc.strerror}", exc.errno or errno.EIO) from None
        if len(frame) != self.index.stored[index]:
            raise bad(f"is {len(frame)} bytes, the index says {self.index.stored[index]}")
        try:
            data = self._zstd.ZstdDecompressor().decompress(frame, max_length=end - start + 1)
        except self._zstd.ZstdError as exc:
            raise bad(f"is not a zstd frame: {exc}") from None
        if len(data) != end - start:
            raise bad(f"decompresses to {len(data)} bytes, not {end - start}")
        if chunk_digest(data) != self.index.digests[index]:
            raise bad("does not match its digest (the file is damaged)")
        return bytes(data)

    # -- the SnapshotSource interface -------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def fetch_unit(self) -> int:
        """A chunk: a fault awaits its whole chunk, which fills every missing page of it."""
        return self.chunk_size

    @property
    def mappable(self) -> bool:
        return False

    def check_open(self) -> None:
        if self._closed:
            raise SnapshotClosed(self.path)

    async def version(self) -> bytes:
        """The identity the index stores: the raw image's, so its working sets replay here."""
        return self.index.identity

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``, from the chunks that hold them."""
        self.check_open()
        self.check_span(offset, length)
        first, last = offset // self.chunk_size, (offset + length - 1) // self.chunk_size
        parts = [await self.chunk(n) for n in range(first, last + 1)]
        lo = offset - first * self.chunk_size
        return b"".join(parts)[lo : lo + length]

    def copier(self, mapping: GuestMapping, *, readahead: int = 0, wp: bool = False) -> CopyFrom:
        """The resolver of ``mapping``'s pages, a chunk at a time (zero chunks: zero pages)."""
        refuse_readahead(readahead, self.chunk_size)
        return ChunkedCopy(
            self,
            offset=mapping.offset,
            base=mapping.base_host_virt_addr,
            size=mapping.size,
            page_size=mapping.page_size,
            wp=wp,
            zero=self.index.zero,
        )

    def group(self, copiers: Sequence[CopyFrom]) -> None:
        """A chunk that lands for one mapping fills every mapping's pages within it."""
        fill_together(copiers)

    async def aclose(self) -> None:
        """Close it (drop the chunks kept). Idempotent."""
        self._closed = True
        self._chunks.clear()

    def __repr__(self) -> str:
        return f"<PackSource {self.path} ({self.size} bytes, {self.chunk_size}-byte chunks)>"
