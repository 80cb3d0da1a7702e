"""One fetch per chunk, however many faults wait on it; recent chunks kept for others.

A remote source is read a chunk at a time (1 MiB, say): a request costs
milliseconds whatever its size, so every fault in a chunk awaits the one
request for it, and when it lands the resolver copies every page of the chunk
that is still missing, so the rest of the chunk never faults. Facts this
relies on:

* The task that starts a fetch owns it; the others wait on an event. If the
  owner is cancelled (its fault was abandoned), the waiters do not inherit a
  cancellation that is not theirs: one of them starts the fetch again. If the
  fetch fails, every waiter gets the error (each of their faults then fails as
  the server's ``on_error`` says).
* A fetch waits for one of ``concurrency`` slots. A demand fault's fetch goes
  before every prefetch still waiting for a slot, and a fault that joins a
  queued prefetch of its chunk promotes it: the faulting thread is stopped,
  the prefetch was only a guess.
* Once copied, a chunk is needed again only by whoever else maps the same
  bytes: a fork child, or another process restored from the same source. A
  bounded LRU (``cache_bytes``) keeps the most recent chunks for them; the
  rest are dropped as soon as their waiters are done.
* One thread reading in order keeps one chunk in flight, so it pays a first
  byte and a chunk's transfer per chunk, serially. :class:`Sequential` notices
  faults that walk chunks in order and names the next ``ahead`` chunks to fetch
  (as prefetches: behind every demand fetch), never past the last chunk; the
  copier fetches them and tells it what it skipped. Any other fault stops it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import attrs

__all__ = ["DEFAULT_READAHEAD_CHUNKS", "ChunkStats", "Chunks", "Sequential"]

#: Chunks kept in flight ahead of a sequential reader. A request to an object store costs
#: about 20 ms to its first byte and 10 ms per MiB on one connection (~100 MB/s), so four
#: 1 MiB chunks in flight fill a 1 Gbit/s link; eight leave room for jitter, and bound what
#: a sequence that stops early wastes to 8 chunks per mapping.
DEFAULT_READAHEAD_CHUNKS = 8


@attrs.define(kw_only=True)
class ChunkStats:
    """What a chunked source did; read it while it runs or after."""

    #: Chunks fetched (requests that succeeded).
    chunks: int = 0
    #: Fetches waited on by more than their owner: faults or prefetches that joined one.
    joined: int = 0
    #: Chunks found in the cache (no request).
    cache_hits: int = 0
    #: Fetches that failed for good (after the retries), and fetches abandoned (cancelled).
    failed: int = 0
    abandoned: int = 0
    #: Chunks asked for ahead of a sequential reader (see :class:`Sequential`).
    readahead: int = 0
    #: Fetches running, and waiting for a slot, right now.
    in_flight: int = 0
    queued: int = 0


class _Abandoned(Exception):
    """The fetch's owner was cancelled: someone else must fetch it."""


class _Waiter:
    __slots__ = ("demand", "event", "granted")

    def __init__(self, demand: bool) -> None:
        self.demand = demand
        self.event = anyio.Event()
        self.granted = False


class _Slots:
    """``limit`` concurrent fetches; demand first, then prefetch, each in arrival order."""

    def __init__(self, limit: int, stats: ChunkStats) -> None:
        self._free = limit
        self._demand: deque[_Waiter] = deque()
        self._prefetch: deque[_Waiter] = deque()
        self._stats = stats

    def promote(self, waiter: _Waiter) -> None:
        if not waiter.demand and not waiter.granted:
            waiter.demand = True  # left in the prefetch queue, skipped there
            self._demand.append(waiter)

    def _waiting(self, queue: deque[_Waiter]) -> bool:
        """Whether ``queue`` holds a live waiter (stale ones at its head are dropped)."""
        while queue and (queue[0].granted or (queue is self._prefetch and queue[0].demand)):
            queue.popleft()
        return bool(queue)

    @asynccontextmanager
    async def slot(self, waiter: _Waiter) -> AsyncIterator[None]:
        if (
            self._free
            and not self._waiting(self._demand)
            and (waiter.demand or not self._waiting(self._prefetch))
        ):
            self._free -= 1
            waiter.granted = True  # it holds a slot: promote() must not queue it for another
        else:
            (self._demand if waiter.demand else self._prefetch).append(waiter)
            self._stats.queued += 1
            try:
                await waiter.event.wait()
            except BaseException:
                if waiter.granted:  # handed a slot just as it was cancelled: pass it on
                    self._release()
                else:
                    waiter.granted = True  # so the queues skip it
                raise
            finally:
                self._stats.queued -= 1
        self._stats.in_flight += 1
        try:
            yield
        finally:
            self._stats.in_flight -= 1
            self._release()

    def _release(self) -> None:
        for queue in (self._demand, self._prefetch):
            while queue:
                waiter = queue.popleft()
                if not waiter.granted and (queue is self._demand or not waiter.demand):
                    waiter.granted = True
                    waiter.event.set()
                    return
        self._free += 1


class _Flight:
    __slots__ = ("data", "done", "error", "waiter")

    def __init__(self, demand: bool) -> None:
        self.done = anyio.Event()
        self.data: bytes | None = None
        self.error: Exception | None = None
        self.waiter = _Waiter(demand)


class Chunks:
    """Chunk ``index`` -> its bytes, through ``fetch``: single-flight, recent ones kept."""

    def __init__(
        self,
        fetch: Callable[[int], Awaitable[bytes]],
        *,
        concurrency: int,
        cache_bytes: int,
        stats: ChunkStats | None = None,
    ) -> None:
        self._fetch = fetch
        self.stats = stats if stats is not None else ChunkStats()
        self._flights: dict[int, _Flight] = {}
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cached_bytes = 0
        self._cache_bytes = cache_bytes
        self._slots = _Slots(concurrency, self.stats)

    def cached(self, index: int) -> bytes | None:
        """The chunk if the cache has it (no await: a fault can be resolved inline)."""
        data = self._cache.get(index)
        if data is not None:
            self._cache.move_to_end(index)
            self.stats.cache_hits += 1
        return data

    def fetching(self, index: int) -> bool:
        return index in self._flights

    async def get(self, index: int, *, demand: bool = True) -> bytes:
        """The chunk's bytes: from the cache, from a fetch under way, or fetched now.

        ``demand=False`` (a prefetch) queues behind every demand fetch.
        """
        while True:
            data = self.cached(index)
            if data is not None:
                return data
            flight = self._flights.get(index)
            if flight is None:
                return await self._own(index, demand)
            self.stats.joined += 1
            if demand:
                self._slots.promote(flight.waiter)
            await flight.done.wait()
            if isinstance(flight.error, _Abandoned):
                continue  # its owner was cancelled, not us: fetch it again
            if flight.error is not None:
                raise flight.error
            assert flight.data is not None
            return flight.data

    async def _own(self, index: int, demand: bool) -> bytes:
        flight = self._flights[index] = _Flight(demand)
        try:
            async with self._slots.slot(flight.waiter):
                data = await self._fetch(index)
        except Exception as exc:
            self.stats.failed += 1
            flight.error = exc
            raise
        except BaseException:
            self.stats.abandoned += 1
            flight.error = _Abandoned()
            raise
        else:
            flight.data = data
            self.stats.chunks += 1
            self._keep(index, data)
        finally:
            del self._flights[index]
            flight.done.set()
        return data

    def _keep(self, index: int, data: bytes) -> None:
        if len(data) > self._cache_bytes:
            return
        self._cache[index] = data
        self._cached_bytes += len(data)
        while self._cached_bytes > self._cache_bytes:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= len(dropped)

    def clear(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0


class Sequential:
    """Which chunks to fetch ahead of faults that walk a source's chunks in order.

    ``note(chunk, first)`` is told each fault's chunk, and whether the fault is in
    the chunk's first page (where a reader walking in order enters it), in the
    order the faults come, and answers the chunks to fetch now. Three faults at
    the start of chunks that follow each other (or that skip only chunks fetched
    ahead: their pages did not fault) make a sequence; from then on each fault
    in it keeps the ``ahead`` chunks after it asked for, each once, never past
    chunk ``count - 1``. Any other fault (elsewhere in a chunk, backwards, or
    past what was asked for) ends the sequence; faults in the same chunk as the
    last one change nothing (they join its fetch). Asking for the first page
    keeps threads faulting at random from making a sequence by chance.
    """

    __slots__ = ("_ahead", "_count", "_end", "_last", "_streak")

    #: Faults in chunks in order before fetching ahead: two could be chance, with many
    #: threads faulting at once in scattered places.
    START = 3

    def __init__(self, ahead: int, count: int) -> None:
        self._ahead = ahead
        self._count = count
        self._last = -1  # the chunk of the last fault noted, or -1
        self._end = -1  # the last chunk asked for ahead (or the last fault's chunk)
        self._streak = 0  # faults in a row in the sequence

    def note(self, chunk: int, first: bool) -> range:
        """The chunks to fetch now, after a fault in ``chunk`` (in its first page: ``first``)."""
        if self._ahead <= 0 or chunk == self._last:
            return range(0)
        if first and self._last >= 0 and self._last < chunk <= max(self._last, self._end) + 1:
            self._streak += 1
        else:
            self._streak = 1
            self._end = chunk
        self._last = chunk
        if self._streak < self.START:
            self._end = max(self._end, chunk)
            return range(0)
        begin = max(self._end, chunk) + 1
        stop = min(chunk + self._ahead + 1, self._count)
        if begin >= stop:
            return range(0)
        self._end = stop - 1
        return range(begin, stop)
