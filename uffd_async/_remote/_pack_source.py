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
* A chunk that cannot be read (an I/O error: an NFS cache tier gone, a store
  down) is an outage, waited out as :class:`~uffd_async.SourcePolicy` says (the
  fault waits, by default); a chunk read whole that fails a check is damaged,
  not late: its faults fail at once.
* The index is read and checked when the source is made (a local one) or
  opened (one in an object store: one GET); a pack never changes under its
  index (a chunk's name is its content), so ``wait_changed`` never returns, and
  ``version()`` is the identity the index stores.
* **Wherever it is kept** (:mod:`._pack_store`): a local directory, or an
  object-store prefix read through obstore's blocking API in worker threads
  (on both loops), a chunk's GET bounded to its index's length plus one byte.
* **With a host chunk cache**, keyed by the chunk's digest (not by pack or
  index): two packs that share a chunk share its entry, and an entry can only
  ever hold that content. It keeps the compressed frame, as fetched (several
  times more chunks per byte of cache; decompressing is cheaper than fetching),
  and only once it passed the checks above; a hit goes through the same checks
  (so the cache's own checksum is skipped: one hash, not two), and one that
  fails them is read from the pack again and replaced.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import anyio
import anyio.to_thread
import attrs

from .._core._checks import check_instance, check_int, check_seconds
from .._core._errors import InvalidArgument, SnapshotClosed
from .._restore._guest_mapping import GuestMapping
from .._restore._source import SnapshotSource
from .._serve._resolvers import CopyFrom
from ._chunk_cache import HostChunkCache
from ._chunk_cache_format import ChunkKey
from ._chunked_copy import ChunkedCopy, fill_together
from ._chunked_source import DEFAULT_CACHE_BYTES, refuse_readahead
from ._chunks import DEFAULT_READAHEAD_CHUNKS, Chunks
from ._object_source import is_object_url
from ._outage import Outage, OutageStats, SourcePolicy
from ._pack_format import PackError, PackIndex, chunk_digest, decode_index, read_index, zstd
from ._pack_store import (
    DEFAULT_STORE_RETRIES,
    DEFAULT_STORE_TIMEOUT,
    PackStore,
    open_pack_store,
    split_index,
)

__all__ = ["DEFAULT_PACK_CONCURRENCY", "PackSource", "PackStats"]

#: Chunks read and decompressed at once (worker threads): about the cores of a host.
DEFAULT_PACK_CONCURRENCY = 4
_T = TypeVar("_T")


@attrs.define(kw_only=True)
class PackStats(OutageStats):
    """What a pack source did; read it while it runs or after (its outages too)."""

    #: Chunk files read (each checked), and their compressed bytes.
    reads: int = 0
    bytes: int = 0
    #: Zero chunks handed out as bytes, without a read (to a prefetch or a ``read``; a
    #: demand fault in one never asks: it gets zero pages at once).
    zeros: int = 0
    #: Chunks found in the host chunk cache (no read), and of those, copies found damaged
    #: (read from the pack again, and the cache's copy replaced).
    host_hits: int = 0
    host_damaged: int = 0


class PackSource(SnapshotSource):
    """The snapshot a pack's index names (``DEST/NAME.index``, from ``python -m uffd_async
    pack``), served a chunk at a time from the chunks beside it; use it with ``async with``.

    ``index``: a file's path, or an object URL (``s3://BUCKET/PREFIX/NAME.index``,
    ``gs://``, ``az://``) read with ``options`` (its store's settings, as
    :class:`~uffd_async.ObjectSource`'s; credentials otherwise from the environment),
    ``timeout`` seconds a request and ``retries`` retries of a transient failure. A
    local index is read when the source is made, a remote one when it is opened.
    ``concurrency``: chunks read and decompressed at once, in worker threads.
    ``cache_bytes``: decompressed chunks kept for other processes and fork children.
    ``host_cache``: a :class:`~uffd_async.HostChunkCache` shared by every process of
    the host, which keeps the compressed chunks it fetches, keyed by their digest.
    ``chunk_readahead``: chunks fetched ahead of faults that walk the chunks in order.
    ``outage``: what a fault does while its chunk cannot be read (an I/O error; a
    :class:`~uffd_async.SourcePolicy`: it waits, by default).
    """

    def __init__(
        self,
        index: str | os.PathLike[str],
        *,
        concurrency: int = DEFAULT_PACK_CONCURRENCY,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        options: Mapping[str, str] | None = None,
        host_cache: HostChunkCache | None = None,
        timeout: float = DEFAULT_STORE_TIMEOUT,
        retries: int = DEFAULT_STORE_RETRIES,
        chunk_readahead: int = DEFAULT_READAHEAD_CHUNKS,
        outage: SourcePolicy | None = None,
    ) -> None:
        outage = SourcePolicy() if outage is None else outage
        check_instance("outage", outage, SourcePolicy)
        check_int("concurrency", concurrency, minimum=1)
        check_int("chunk_readahead", chunk_readahead, minimum=0)
        check_int("cache_bytes", cache_bytes, minimum=0)
        check_int("retries", retries, minimum=0)
        check_seconds("timeout", timeout)
        if host_cache is not None and not isinstance(host_cache, HostChunkCache):
            raise InvalidArgument(
                errno.EINVAL,
                f"host_cache must be a HostChunkCache, not {type(host_cache).__name__}",
            )
        if not isinstance(index, (str, os.PathLike)):
            raise InvalidArgument(
                errno.EINVAL, f"index must be a path or a URL, not {type(index).__name__}"
            )
        self._zstd = zstd()
        place, self._index_name = split_index(index)
        local = not is_object_url(os.fspath(index))
        # A local index first: a damaged one is refused before anything else is made.
        found = read_index(index) if local else None
        self._store: PackStore = open_pack_store(
            place, options=options, timeout=timeout, retries=retries
        )
        #: The host chunk cache shared with other processes, or None.
        self.host_cache = host_cache
        self.path = found.path if found is not None else self._store.url(self._index_name)
        self.size = 0
        self.chunk_size = 0
        self._index: PackIndex | None = None
        self.concurrency = concurrency
        #: Chunks fetched ahead of faults that walk the chunks in order (0: none).
        self.chunk_readahead = chunk_readahead
        self.stats = PackStats()
        #: What a fault does while the chunks cannot be read (I/O errors; a damaged chunk
        #: fails its faults at once): see :class:`~uffd_async.SourcePolicy`.
        self.outage = outage
        self._outage = Outage(outage, self.stats, lambda: self.path)
        self._chunks = Chunks(
            self._load, concurrency=concurrency, cache_bytes=cache_bytes, stats=self.stats
        )
        self._limiter: anyio.CapacityLimiter | None = None  # made in a loop, by the first read
        self._closed = False
        if found is not None:
            self._set_index(found)

    def _set_index(self, index: PackIndex) -> None:
        self._index = index
        self.size = index.size
        self.chunk_size = index.chunk_size

    @property
    def index(self) -> PackIndex:
        """What the index says (once open: a remote index is read by ``open``)."""
        if self._index is None:
            raise RuntimeError("open the PackSource first: async with PackSource(url) as source")
        return self._index

    async def open(self) -> PackSource:
        """Read and check a remote index (one request); a local one was read already."""
        self.check_open(opened=False)
        if self._index is None:
            try:
                data = await anyio.to_thread.run_sync(self._store.read, self._index_name)
            except OSError as exc:
                await self.aclose()
                raise PackError(
                    f"{self.path}: cannot read the pack index: {exc.strerror}",
                    url=self.path, start=0, end=0, err=exc.errno or errno.EIO,
                ) from None  # fmt: skip
            except BaseException:
                await self.aclose()
                raise
            try:
                self._set_index(decode_index(data, self.path))
            except PackError:
                await self.aclose()
                raise
        return self

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

    async def chunk(self, index: int, *, demand: bool = True, outage: bool = True) -> bytes:
        """Chunk ``index``, decompressed and checked (zeros for a zero chunk, without a
        read); read once however many ask at a time. ``outage=False`` (``read``: not a
        fault) fails when the read does, whatever the source's policy."""
        self.check_open()
        if not 0 <= index < self.index.count:
            raise InvalidArgument(errno.EINVAL, f"no chunk {index}: there are {self.index.count}")
        if self.index.zero(index):
            self.stats.zeros += 1
            start, end = self.index.span(index)
            return bytes(end - start)
        get = functools.partial(self._chunks.get, index, demand=demand)
        if not outage:
            return await get()
        return await self._outage.fetch(get, demand=demand, retries=0)

    async def _load(self, index: int) -> bytes:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.concurrency)
        if self.host_cache is None:
            frame = await self._read_frame(index)
            return await self._in_thread(self._unpack, index, frame, "")
        digest, stored = self.index.digests[index], self.index.stored[index]
        # Keyed by the content: two packs that share a chunk share its entry, and a
        # key names one content only. The frame as the store has it (the cache holds
        # several times more chunks so), checked as a read's is, before it is kept.
        key = ChunkKey(object=f"sha256:{digest.hex()}", version="zstd", chunk_size=stored, index=0)
        fresh: list[bytes] = []

        async def fetch() -> bytes:
            frame = await self._read_frame(index)
            fresh.append(await self._in_thread(self._unpack, index, frame, ""))
            return frame

        # A hit is checked below (length, zstd, SHA-256): the cache's own checksum of it
        # would be a second hash of the same bytes, so it is skipped (verify=False).
        kept = await self.host_cache.fetch(key, fetch, verify=False)
        if fresh:
            return fresh[0]
        self.stats.host_hits += 1
        try:
            return await self._in_thread(self._unpack, index, kept, "the host cache's copy ")
        except PackError:  # a damaged entry: read from the pack, and replace it
            self.stats.host_damaged += 1
        finally:
            kept.release()  # its mapping and fd go now, not when a traceback lets go of it
        frame = await self._read_frame(index)
        data = await self._in_thread(self._unpack, index, frame, "")
        await self._in_thread(self.host_cache.put, key, frame)
        return data

    async def _in_thread(self, call: Callable[..., _T], *args: object) -> _T:
        return await anyio.to_thread.run_sync(call, *args, limiter=self._limiter)

    async def _read_frame(self, index: int) -> bytes:
        self.stats.reads += 1  # counted here, on the loop, not racing in the threads
        try:
            frame = await self._in_thread(self._read, index)
        except PackError as exc:  # I/O (an NFS tier, a store) may heal: SourcePolicy decides
            raise self._outage.gave_up(exc) from None
        self._outage.succeeded()
        self.stats.bytes += len(frame)
        return frame

    def _bad(self, index: int, why: str, err: int = errno.EIO) -> PackError:
        url = self._store.url(self.index.chunk_name(index))
        start, end = self.index.span(index)
        return PackError(
            f"{url}: chunk {index} (snapshot bytes {start}-{end - 1}) {why}",
            url=url, start=start, end=end - 1, err=err,
        )  # fmt: skip

    def _read(self, index: int) -> bytes:
        """Chunk ``index``'s frame, from its file or object (in a worker thread)."""
        try:
            return self._store.read(self.index.chunk_name(index), self.index.stored[index] + 1)
        except OSError as exc:
            why = f"cannot be read: {exc.strerror}"
            raise self._bad(index, why, exc.errno or errno.EIO) from None

    def _unpack(self, index: int, frame: bytes | memoryview, what: str) -> bytes:
        """Chunk ``index`` from its frame, checked (in a worker thread); ``what``: where
        the frame came from, when not the pack."""
        start, end = self.index.span(index)
        if len(frame) != self.index.stored[index]:
            why = f"is {len(frame)} bytes, the index says {self.index.stored[index]}"
            raise self._bad(index, what + why)
        try:
            data = self._zstd.ZstdDecompressor().decompress(frame, max_length=end - start + 1)
        except self._zstd.ZstdError as exc:
            raise self._bad(index, f"{what}is not a zstd frame: {exc}") from None
        if len(data) != end - start:
            raise self._bad(index, f"{what}decompresses to {len(data)} bytes, not {end - start}")
        if chunk_digest(data) != self.index.digests[index]:
            raise self._bad(index, f"{what}does not match its digest (the file is damaged)")
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

    def check_open(self, *, opened: bool = True) -> None:
        if self._closed:
            raise SnapshotClosed(self.path)
        if opened and self._index is None:
            raise RuntimeError("open the PackSource first: async with PackSource(url) as source")

    async def version(self) -> bytes:
        """The identity the index stores: the raw image's, so its working sets replay here."""
        return self.index.identity

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``, from the chunks that hold them."""
        self.check_open()
        self.check_span(offset, length)
        first, last = offset // self.chunk_size, (offset + length - 1) // self.chunk_size
        parts = [await self.chunk(n, outage=False) for n in range(first, last + 1)]
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
            ahead=self.chunk_readahead,
            stats=self.stats,
        )

    def group(self, copiers: Sequence[CopyFrom]) -> None:
        """A chunk that lands for one mapping fills every mapping's pages within it."""
        fill_together(copiers)

    async def aclose(self) -> None:
        """Close it (drop the chunks kept, and a store's connections). Idempotent."""
        first = not self._closed
        self._closed = True
        self._chunks.clear()
        if first:
            self._store.close()
            if self._store.closing is not None:  # an object store's: see ObjectSource.aclose
                await self._store.closing.wait()

    def __repr__(self) -> str:
        if self._index is None:
            return f"<PackSource {self.path} (not opened)>"
        return f"<PackSource {self.path} ({self.size} bytes, {self.chunk_size}-byte chunks)>"
