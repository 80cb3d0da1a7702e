"""The chunk cache and the connection scheduler behind ``ua.HttpSource``.

What the cache keeps is counted where it costs: requests the real loopback server
(``tests/_http_server.py``) answered. The scheduling properties (priority, a slot
handed on by a waiter cancelled as it was granted one) are checked at the
scheduler itself, ``_chunks._Slots``, stepped with ``wait_all_tasks_blocked``:
no sleep stands in for synchronisation there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import anyio
import pytest

import uffd_async as ua
from uffd_async._remote._chunks import ChunkStats, _Slots, _Waiter

from ._support import TIMEOUT, HttpObjectServer, Lab, finished
from .test_http_source import CHUNK, SOURCE, read_pages, restoring, served_chunks

pytestmark = pytest.mark.anyio
P = ua.PAGE_SIZE
PER_CHUNK = CHUNK // P


async def until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(TIMEOUT):
        while not condition():
            await anyio.sleep(0.002)


def started(source: ua.HttpSource, count: int) -> bool:
    """Whether ``count`` fetches hold or wait for a connection."""
    return source.stats.queued + source.stats.in_flight == count


def chunk_requests(server: HttpObjectServer) -> int:
    return len(served_chunks(server))


# -- the scheduler: who gets a connection first ------------------------------------


async def test_a_demand_fetch_goes_before_queued_prefetches() -> None:
    stats = ChunkStats()
    slots = _Slots(1, stats)
    order: list[str] = []
    release = anyio.Event()

    async def fetch(name: str, demand: bool, hold: anyio.Event | None = None) -> None:
        async with slots.slot(_Waiter(demand)):
            order.append(name)
            if hold is not None:
                await hold.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(fetch, "holder", True, release)
        await anyio.wait_all_tasks_blocked()
        for name, demand in (("p1", False), ("d1", True), ("p2", False), ("d2", True)):
            tg.start_soon(fetch, name, demand)
            await anyio.wait_all_tasks_blocked()
        assert stats.queued == 4 and stats.in_flight == 1
        release.set()
        await anyio.wait_all_tasks_blocked()
        assert order == ["holder", "d1", "d2", "p1", "p2"]
    assert (stats.queued, stats.in_flight) == (0, 0)


@pytest.mark.parametrize("when", ["as it is granted", "while queued"])
async def test_a_cancelled_waiter_never_takes_a_slot_with_it(when: str) -> None:
    """``concurrency=1``: a waiter cancelled in the very tick the holder hands it the
    slot (or earlier, while queued) must leave the slot to the next waiter, and
    later fetches still get one."""
    stats = ChunkStats()
    slots = _Slots(1, stats)
    got: list[str] = []
    release = anyio.Event()
    cancelled = anyio.CancelScope()

    async def holder() -> None:
        async with slots.slot(_Waiter(True)):
            await release.wait()
            cancelled.cancel()  # the same tick as the hand-off, as the block ends

    async def waiter(name: str, scope: anyio.CancelScope | None = None) -> None:
        with scope or anyio.CancelScope():
            async with slots.slot(_Waiter(True)):
                got.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(waiter, "cancelled", cancelled)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(waiter, "next")
        await anyio.wait_all_tasks_blocked()
        assert stats.queued == 2
        if when == "while queued":
            cancelled.cancel()
            await anyio.wait_all_tasks_blocked()
            assert stats.queued == 1
        release.set()
        await anyio.wait_all_tasks_blocked()
        assert got == ["next"], "the slot went with the cancelled waiter"
        tg.start_soon(waiter, "later")
        await anyio.wait_all_tasks_blocked()
        assert got == ["next", "later"], "a slot was lost"
    assert (stats.queued, stats.in_flight) == (0, 0)


# -- what the cache keeps -----------------------------------------------------------


async def test_the_cache_is_bounded_and_least_recently_used(http_server: HttpObjectServer) -> None:
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(
        http_server.url("snap"), chunk_size=CHUNK, cache_bytes=2 * CHUNK
    ) as source:
        a, b, c = 4, 9, 17
        requests = []
        for index in (a, b, a, c, a, b, a, c):
            assert await source.chunk(index) == SOURCE[index * CHUNK : (index + 1) * CHUNK]
            requests.append(chunk_requests(http_server))
        # A, B, A (hit), C (B goes: A was used since), A (hit), B (C goes), A (hit), C.
        assert requests == [1, 2, 2, 3, 3, 4, 4, 5]
        assert source.stats.cache_hits == 3 and source.stats.chunks == 5
    assert served_chunks(http_server) == [a, b, c, b, c]


async def test_the_cache_serves_another_process_within_its_bound(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    """Two regions restored one after the other (a process and its clone): what the
    first fetched and the cache kept costs the second no request."""
    http_server.put("snap", SOURCE)
    first, second = [9, 5, 0], [5, 0, 9]  # chunks; the cache has room for two
    async with ua.HttpSource(
        http_server.url("snap"), chunk_size=CHUNK, cache_bytes=2 * CHUNK
    ) as source:
        for chunks in (first, second):
            async with restoring(lab, source) as (region, _):
                for chunk in chunks:  # one after the other: the order is the point
                    n = chunk * PER_CHUNK + 1
                    got = await read_pages(lab, region, [n])
                    assert got[n] == SOURCE[n * P : (n + 1) * P]
    # 5 and 0 were kept from the first region; 9 was pushed out by 0.
    assert served_chunks(http_server) == [9, 5, 0, 9]


async def test_a_chunk_bigger_than_the_cache_leaves_the_others_be(
    http_server: HttpObjectServer,
) -> None:
    data = SOURCE[: 2 * CHUNK + CHUNK // 2]  # the last chunk is half a chunk
    http_server.put("snap", data)
    async with ua.HttpSource(
        http_server.url("snap"), chunk_size=CHUNK, cache_bytes=CHUNK // 2
    ) as source:
        assert await source.chunk(2) == data[2 * CHUNK :]
        assert await source.chunk(0) == data[:CHUNK]  # too big to keep
        assert source.cached(0) is None
        assert source.cached(2) == data[2 * CHUNK :]
        assert await source.chunk(0) == data[:CHUNK]
    assert served_chunks(http_server) == [0, 0]  # chunk 2, shorter, is not counted there


async def test_a_failed_fetch_fails_its_joiners_and_is_tried_again_later(
    http_server: HttpObjectServer,
) -> None:
    http_server.put("snap", SOURCE)
    http_server.delay(200)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK, retries=0) as source:
        http_server.queue("403")
        errors: list[BaseException] = []

        async def fetch() -> None:
            try:
                await source.chunk(2)
            except ua.FetchError as exc:
                errors.append(exc)

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(fetch)  # one owns the fetch, the other joins it at once
                tg.start_soon(fetch)
                await until(lambda: source.stats.joined == 1)
        assert [getattr(exc, "status", None) for exc in errors] == [403, 403]
        assert source.stats.failed == 1
        assert await source.chunk(2) == SOURCE[2 * CHUNK : 3 * CHUNK]
    assert served_chunks(http_server) == [2, 2]


async def test_a_fault_joining_a_queued_prefetch_promotes_it(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    """Prefetches of chunks 1 to 5 wait for the one connection; a fault in chunk 4 joins
    its queued prefetch, which is then fetched next, not after 2 and 3."""
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK, concurrency=1) as source:
        http_server.queue("hold")  # chunk 1's request waits for our release
        async with restoring(lab, source) as (region, server):
            async with anyio.create_task_group() as tg:
                for chunk in range(1, 6):  # one at a time: trio runs a batch in any order
                    tg.start_soon(functools.partial(source.chunk, chunk, demand=False))
                    await until(functools.partial(started, source, chunk))
                await anyio.to_thread.run_sync(http_server.wait_held)
                faulting = 4 * PER_CHUNK + 3
                worker = lab.run(functools.partial(region.read, faulting * P, P))
                await until(lambda: source.stats.joined == 1)
                http_server.release()
                assert await finished(worker) == SOURCE[faulting * P : (faulting + 1) * P]
            assert source.stats.joined == 1 and server.stats.errors == 0
    assert served_chunks(http_server) == [1, 4, 2, 3, 5]
