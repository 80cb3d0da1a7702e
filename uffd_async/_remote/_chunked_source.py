"""What every remote source shares, whatever its client: chunks, a pinned version, retries.

A remote object (over HTTP, in S3, GCS or Azure) is read a chunk at a time; what
differs between kinds is only how one ranged read is sent and checked. So
:class:`ChunkedSource` holds the rest, once, and a kind implements three
methods (the seam):

* ``_open_object()``: learn the object's size and the version every later read
  is pinned to (an ETag, a version id, a generation). Called once, retried.
* ``_fetch(start, end)``: exactly the bytes ``start..end`` (inclusive) *of that
  version*, checked: anything else is an error, never bytes. A read that finds
  another version raises :class:`~uffd_async.SourceChanged`; one worth trying
  again (a connection error, a timeout, a 5xx, a body cut short) raises
  :class:`Retry` around the error to raise when the retries run out; any
  other :class:`~uffd_async.FetchError` is final (the request itself is wrong).
* ``_close_object()``: release the client.

What the base guarantees, for every kind:

* A :class:`~uffd_async.SourceChanged` is sticky: from then on every read and
  every retry raises it at once, before sending anything, and
  :meth:`ChunkedSource.wait_changed` returns it (the handoff server stops taking
  new processes then). A process never holds two versions of a snapshot.
* Retries use exponential backoff with full jitter (a sleep drawn uniformly
  from zero to the bound, so that many processes retrying at once spread out),
  up to ``retries`` times after the first try. A chunk a fault (or a prefetch)
  waits for is then tried again while the source is down, outside its
  connection slot, as its :class:`~._outage.SourcePolicy` says (``outage``: wait,
  by default, until the fault's deadline; see :mod:`._outage`).
* Chunks go through :class:`~._chunks.Chunks` (one fetch per chunk however
  many faults wait on it, demand before prefetch, a bounded cache), and
  resolvers are :class:`~._chunked_copy.ChunkedCopy` (a chunk that lands fills
  every missing page of it, in every mapping of the process).
* With a host chunk cache (:class:`~._chunk_cache.HostChunkCache`), a chunk is
  looked up there first, keyed by the object's name, its pinned version
  (``_pinned()``), the chunk size and the index, and fetched by one process of
  the host at a time. A kind that cannot name its version (an HTTP server that
  sends no validator) is never cached: its chunks could be of any version.
"""

from __future__ import annotations

import abc
import errno
import functools
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import anyio
import attrs

from .._capture._identity import identity_of, identity_samples
from .._core._abi import PAGE_SIZE
from .._core._checks import check_instance, check_int
from .._core._errors import FetchError, InvalidArgument, SnapshotClosed, SourceChanged
from .._restore._guest_mapping import GuestMapping
from .._restore._source import SnapshotSource
from .._serve._resolvers import CopyFrom
from ._chunk_cache import HostChunkCache
from ._chunk_cache_format import ChunkKey
from ._chunked_copy import ChunkedCopy, fill_together
from ._chunks import DEFAULT_READAHEAD_CHUNKS, Chunks
from ._outage import Outage, OutageStats, SourcePolicy

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_READAHEAD_CHUNKS",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT",
    "ChunkedSource",
    "FetchStats",
    "Retry",
    "refuse_readahead",
]

#: The default chunk: one request per MiB (see the README's HTTP benchmark for the choice).
DEFAULT_CHUNK_SIZE = 1 << 20
DEFAULT_CONCURRENCY = 16
DEFAULT_CACHE_BYTES = 64 << 20
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 5
_BACKOFF = 0.05  # seconds before the first retry, doubled at each one
_BACKOFF_CAP = 2.0

_T = TypeVar("_T")
_Source = TypeVar("_Source", bound="ChunkedSource")


def refuse_readahead(readahead: int, chunk_size: int | None = None) -> None:
    """Readahead means nothing for a chunked source: its chunk size plays that part."""
    if readahead:
        size = "" if chunk_size is None else f" ({chunk_size} bytes)"
        raise InvalidArgument(
            errno.EINVAL,
            "readahead does not apply to a source read by chunks (HttpSource, ObjectSource): "
            f"a fault copies every missing page of its chunk{size}; choose chunk_size instead "
            "(and chunk_readahead, chunks fetched ahead of faults in order)",
        )


@attrs.define(kw_only=True)
class FetchStats(OutageStats):
    """What a remote source did; read it while it runs or after (its outages too)."""

    #: Requests sent (retries included) and body bytes received.
    requests: int = 0
    bytes: int = 0
    #: Requests retried (a connection error, a timeout, a cut-short body, a 5xx).
    retries: int = 0


class Retry(Exception):
    """A failure worth trying again; ``error`` is what to raise when the retries run out."""

    def __init__(self, error: FetchError) -> None:
        self.error = error


class ChunkedSource(SnapshotSource):
    """A remote object read a chunk at a time, pinned to the version seen at open.

    Subclasses set ``path`` (the object's name without credentials) and implement
    ``_open_object``, ``_fetch`` and ``_close_object`` (see the module).
    """

    stats: FetchStats

    def __init__(
        self,
        *,
        chunk_size: int,
        concurrency: int,
        retries: int,
        cache_bytes: int,
        stats: FetchStats,
        host_cache: HostChunkCache | None = None,
        chunk_readahead: int = DEFAULT_READAHEAD_CHUNKS,
        outage: SourcePolicy | None = None,
    ) -> None:
        check_int("chunk_size", chunk_size, minimum=PAGE_SIZE)
        outage = SourcePolicy() if outage is None else outage
        check_instance("outage", outage, SourcePolicy)
        check_int("chunk_readahead", chunk_readahead, minimum=0)
        if chunk_size % PAGE_SIZE:
            raise InvalidArgument(
                errno.EINVAL, f"chunk_size must be a multiple of {PAGE_SIZE}: {chunk_size}"
            )
        check_int("concurrency", concurrency, minimum=1)
        check_int("retries", retries, minimum=0)
        check_int("cache_bytes", cache_bytes, minimum=0)
        if host_cache is not None and not isinstance(host_cache, HostChunkCache):
            raise InvalidArgument(
                errno.EINVAL,
                f"host_cache must be a HostChunkCache, not {type(host_cache).__name__}",
            )
        #: The host chunk cache shared with other processes, or None.
        self.host_cache = host_cache
        self.chunk_size = chunk_size
        #: Chunks fetched ahead of faults that walk the chunks in order (0: none).
        self.chunk_readahead = chunk_readahead
        self.concurrency = concurrency
        self.retries = retries
        self.stats = stats
        #: What a fault does when this source fails (see :class:`SourcePolicy`).
        self.outage = outage
        self._outage = Outage(outage, stats, lambda: self.path)
        self._chunks = Chunks(
            self._fetch_chunk, concurrency=concurrency, cache_bytes=cache_bytes, stats=stats
        )
        self._opened = False
        self._closed = False
        self._changed: SourceChanged | None = None
        self._changed_event: anyio.Event | None = None  # made by wait_changed(), in a loop
        self.size = 0
        self._identity: bytes | None = None

    # -- the seam ---------------------------------------------------------------------

    @abc.abstractmethod
    async def _open_object(self) -> None:
        """Set ``size`` and the version later reads are pinned to (raise ``Retry`` to retry)."""

    @abc.abstractmethod
    async def _fetch(self, start: int, end: int) -> bytes:
        """Bytes ``start..end`` (inclusive) of the pinned version, checked (see the module)."""

    @abc.abstractmethod
    async def _close_object(self) -> None:
        """Release the client. Called once, by ``aclose``."""

    def _pinned(self) -> str | None:
        """The version reads are pinned to, as a host cache names it (once open), or None
        when nothing names it (then nothing is cached across processes)."""
        return None

    # -- opening and closing ----------------------------------------------------------

    async def open(self: _Source) -> _Source:
        """Learn the object's size and version (one request). Idempotent."""
        if self._closed:
            raise SnapshotClosed(self.path)
        if self._opened:
            return self
        try:
            await self._retrying(0, 0, self._opening)
        except BaseException:
            await self.aclose()
            raise
        self._opened = True
        return self

    async def _opening(self, start: int, end: int) -> None:
        await self._open_object()

    async def aclose(self) -> None:
        """Close the connections. Idempotent."""
        first = not self._closed
        self._closed = True
        self._chunks.clear()
        if first:
            await self._close_object()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- reading ----------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``: one checked, retried ranged read (no chunking)."""
        self.check_open()
        self.check_span(offset, length)
        return await self._retrying(offset, offset + length - 1, self._fetch)

    async def chunk(self, index: int, *, demand: bool = True) -> bytes:
        """Chunk ``index`` (``chunk_size`` bytes, the last one shorter), fetched once however
        many ask for it at a time. ``demand=False`` (prefetch) yields to demand faults."""
        self.check_open()
        if not 0 <= index < self.chunk_count:
            raise InvalidArgument(errno.EINVAL, f"no chunk {index}: there are {self.chunk_count}")
        get = functools.partial(self._chunks.get, index, demand=demand)
        return await self._outage.fetch(get, demand=demand, retries=self.retries)

    def cached(self, index: int) -> bytes | None:
        """Chunk ``index`` if it is at hand now (recently fetched), without awaiting."""
        return self._chunks.cached(index)

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)

    async def identity(self) -> bytes:
        """What a working set recorded for this object carries (see ``snapshot_identity``):
        the same as the local file's, from 64 small ranged reads."""
        if self._identity is None:
            samples = identity_samples(self.size)
            blocks: list[bytes] = [b""] * len(samples)
            limiter = anyio.Semaphore(self.concurrency)

            async def one(n: int, offset: int, length: int) -> None:
                async with limiter:
                    blocks[n] = await self.read(offset, length)

            async with anyio.create_task_group() as tg:
                for n, (offset, length) in enumerate(samples):
                    tg.start_soon(one, n, offset, length)
            self._identity = identity_of(self.size, blocks)
        return self._identity

    async def wait_changed(self) -> SourceChanged:
        """Return the :class:`~uffd_async.SourceChanged` that stopped this source, once
        one did (at once if one already has): a server stops taking new processes then."""
        if self._changed is None:
            if self._changed_event is None:
                self._changed_event = anyio.Event()
            await self._changed_event.wait()
        assert self._changed is not None
        return self._changed

    # -- the SnapshotSource interface -------------------------------------------------

    @property
    def fetch_unit(self) -> int:
        """A chunk: a fault awaits its whole chunk, which fills every missing page of it."""
        return self.chunk_size

    @property
    def mappable(self) -> bool:
        return False

    async def version(self) -> bytes:
        """Its :meth:`identity`."""
        return await self.identity()

    def copier(self, mapping: GuestMapping, *, readahead: int = 0, wp: bool = False) -> CopyFrom:
        """The resolver of ``mapping``'s pages, a chunk at a time (no readahead: the chunk
        size plays that part)."""
        refuse_readahead(readahead, self.chunk_size)
        return ChunkedCopy(
            self,
            offset=mapping.offset,
            base=mapping.base_host_virt_addr,
            size=mapping.size,
            page_size=mapping.page_size,
            wp=wp,
            ahead=self.chunk_readahead,
            stats=self.stats,
        )

    def group(self, copiers: Sequence[CopyFrom]) -> None:
        """A chunk that lands for one mapping fills every mapping's pages within it."""
        fill_together(copiers)

    def check_open(self) -> None:
        if self._closed or not self._opened:
            name = type(self).__name__
            raise (
                SnapshotClosed(self.path)
                if self._closed
                else RuntimeError(f"open the {name} first: async with {name}(url) as source")
            )
        if self._changed is not None:
            raise self._changed

    # -- errors, named without credentials ------------------------------------------

    def _error(self, what: str, start: int, end: int, status: int | None) -> FetchError:
        return FetchError(
            f"GET {self.path} bytes={start}-{end}: {what}",
            url=self.path,
            start=start,
            end=end,
            status=status,
        )

    def _changed_error(
        self, what: str, start: int, end: int, status: int | None = None
    ) -> SourceChanged:
        return SourceChanged(
            f"GET {self.path} bytes={start}-{end}: {what}; nothing more is fetched from it",
            url=self.path,
            start=start,
            end=end,
            status=status,
        )

    # -- fetching, retried --------------------------------------------------------------

    async def _fetch_chunk(self, index: int) -> bytes:
        start = index * self.chunk_size
        end = min(self.size, start + self.chunk_size) - 1
        pinned = None if self.host_cache is None else self._pinned()
        if self.host_cache is None or pinned is None:
            return await self._retrying(start, end, self._fetch)
        name, size = self.path, self.chunk_size
        key = ChunkKey(object=name, version=pinned, chunk_size=size, index=index)

        async def fetch() -> bytes:
            return await self._retrying(start, end, self._fetch)

        data = await self.host_cache.fetch(key, fetch)
        if len(data) != end - start + 1:  # a file of another size never reaches a guest
            raise FetchError(
                f"{self.path}: the host cache's chunk {index} holds {len(data)} bytes, "
                f"not {end - start + 1}",
                url=self.path,
                start=start,
                end=end,
            )
        kept = data.obj  # a miss's bytes, handed on; a hit's mapping, copied out of
        return kept if type(kept) is bytes and len(kept) == len(data) else bytes(data)

    async def _retrying(
        self, start: int, end: int, attempt: Callable[[int, int], Awaitable[_T]]
    ) -> _T:
        """``attempt(start, end)``, retried as the module says."""
        tries = 0
        while True:
            if self._changed is not None:
                raise self._changed
            try:
                result = await attempt(start, end)
            except Retry as retry:
                if tries >= self.retries:
                    if tries:
                        retry.error.strerror = (
                            f"{retry.error.strerror} (after {tries + 1} attempts)"
                        )
                    raise self._outage.gave_up(retry.error) from None
                if not self._outage.quick_retry():  # it backs off outside its slot
                    raise self._outage.gave_up(retry.error) from None
            except SourceChanged as exc:
                self._changed = exc
                if self._changed_event is not None:
                    self._changed_event.set()
                raise
            else:
                self._outage.succeeded()
                return result
            self.stats.retries += 1
            await anyio.sleep(random.uniform(0, min(_BACKOFF_CAP, _BACKOFF * 2**tries)))
            tries += 1
