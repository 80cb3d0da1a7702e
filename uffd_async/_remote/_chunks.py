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
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import attrs

__all__ = ["ChunkStats", "Chunks"]


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
