"""``ua.prefetch`` over ``ua.HttpSource``: whole chunks ahead of the faults, never in their way.

The server is ``tests/_http_server.py`` in its own process; what it saw (requests
in flight at once, which chunks, in which order) is what is checked. Faults come
from real threads reading the region through ctypes. Every wait is bounded.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

import uffd_async as ua

from ._support import TIMEOUT, HttpObjectServer, Lab, finished
from .test_http_source import CHUNK, PAGES, SOURCE, read_pages, served_chunks

pytestmark = pytest.mark.anyio
P = ua.PAGE_SIZE
PER_CHUNK = CHUNK // P


def chunk_pages(chunks: Iterable[int]) -> list[int]:
    """A working set: one page in the middle of each chunk (the whole chunk comes)."""
    return [chunk * PER_CHUNK + PER_CHUNK // 2 for chunk in chunks]


async def working_set(source: ua.HttpSource, pages: Iterable[int]) -> ua.WorkingSet:
    return ua.WorkingSet(snapshot_size=source.size, identity=await source.identity(), pages=pages)


@asynccontextmanager
async def replaying(
    lab: Lab, source: ua.HttpSource, **server: Any
) -> AsyncIterator[tuple[ua.Region, ua.Userfaultfd, Any, ua.FaultServer]]:
    region = lab.anonymous(PAGES)
    uffd = lab.uffd()
    uffd.register(region.address, region.length, ua.Mode.MISSING)
    resolver = ua.copy_from(source, base=region.address)
    async with ua.FaultServer(uffd, resolver, **server) as fault_server:
        yield region, uffd, resolver, fault_server


async def until(condition: Any) -> None:
    with anyio.fail_after(TIMEOUT):
        while not condition():
            await anyio.sleep(0.002)


async def test_the_prefetcher_holds_at_most_half_the_connections(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK, concurrency=4) as source:
        ws = await working_set(source, chunk_pages(range(2, 14)))
        http_server.reset()
        http_server.delay(30)  # each request lasts: the prefetcher could pile them up
        async with replaying(lab, source) as (_, uffd, resolver, server):
            stats = await ua.prefetch(uffd, resolver, ws)
            assert server.stats.faults == 0
        assert stats.working_set_done and stats.prefetched == 12 * PER_CHUNK
    seen = http_server.stats()
    assert seen["max_in_flight"] == 2, "not half of the 4 connections"
    assert sorted(served_chunks(http_server)) == list(range(2, 14))


async def test_a_fault_goes_ahead_of_a_queued_prefetch(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    """One connection: a fault's chunk holds it; the prefetch's first chunk queues; a
    second fault's chunk queues after it, and is fetched before it all the same."""
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK, concurrency=1) as source:
        ws = await working_set(source, chunk_pages([1, 2]))
        http_server.reset()
        http_server.queue("hold")  # the first fault's request waits for our release
        async with replaying(lab, source) as (region, uffd, resolver, server):
            first = lab.run(lambda: region.read(20 * CHUNK, P))
            await anyio.to_thread.run_sync(http_server.wait_held)
            async with anyio.create_task_group() as tg:
                tg.start_soon(ua.prefetch, uffd, resolver, ws)
                await until(lambda: source.stats.queued == 1)
                second = lab.run(lambda: region.read(21 * CHUNK, P))
                await until(lambda: source.stats.queued == 2)
                http_server.release()
                assert await finished(first) == SOURCE[20 * CHUNK : 20 * CHUNK + P]
                assert await finished(second) == SOURCE[21 * CHUNK : 21 * CHUNK + P]
            assert server.stats.errors == 0
    assert served_chunks(http_server) == [20, 21, 1, 2]


async def test_a_chunk_already_resident_is_not_fetched_again(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    http_server.put("snap", SOURCE)
    # No cache: a second fetch of a chunk would be a second request.
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK, cache_bytes=0) as source:
        pages = [*chunk_pages([1, 12, 13]), 450]  # 450: the middle of chunk 28
        ws = await working_set(source, pages)
        http_server.reset()
        async with replaying(lab, source) as (region, uffd, resolver, server):
            await read_pages(lab, region, chunk_pages([1, 12]))
            assert server.stats.faults == 2
            stats = await ua.prefetch(uffd, resolver, ws)
            got = await read_pages(lab, region, pages)
            assert all(got[n] == SOURCE[n * P : (n + 1) * P] for n in pages)
            assert server.stats.faults == 2
        assert stats.prefetched == 2 * PER_CHUNK and stats.runs == 2
    assert sorted(served_chunks(http_server)) == [1, 12, 13, 28]


async def test_a_chunk_faulted_in_while_the_prefetch_waits_is_not_fetched_again(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    """No cache, one connection for the prefetch: its first chunk is held, and while it
    waits to fetch the second, a fault brings that one in. The prefetch then skips it:
    each chunk is requested once."""
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(
        http_server.url("snap"), chunk_size=CHUNK, cache_bytes=0, concurrency=2, chunk_readahead=0
    ) as source:
        ws = await working_set(source, chunk_pages([1, 2]))
        http_server.reset()
        http_server.queue("hold")  # the prefetch's first chunk waits for our release
        async with replaying(lab, source) as (region, uffd, resolver, server):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ua.prefetch, uffd, resolver, ws)
                await anyio.to_thread.run_sync(http_server.wait_held)
                got = await read_pages(lab, region, chunk_pages([2]))  # the other connection
                assert got == {n: SOURCE[n * P : (n + 1) * P] for n in chunk_pages([2])}
                http_server.release()
            assert server.stats.faults == 1
    assert sorted(served_chunks(http_server)) == [1, 2], "a chunk was fetched twice"


async def test_a_chunk_that_cannot_be_fetched_leaves_the_rest_to_prefetch(
    http_server: HttpObjectServer, lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(
        http_server.url("snap"), chunk_size=CHUNK, concurrency=2, retries=0
    ) as source:
        ws = await working_set(source, chunk_pages([3, 4, 5]))
        http_server.reset()
        http_server.queue("403")  # the first chunk the prefetcher asks for
        async with replaying(lab, source) as (region, uffd, resolver, server):
            stats = await ua.prefetch(uffd, resolver, ws)
            got = await read_pages(lab, region, chunk_pages([3]))  # a fault fetches it
            assert got == {n: SOURCE[n * P : (n + 1) * P] for n in chunk_pages([3])}
            assert server.stats.faults == 1
        assert stats.working_set_done and stats.prefetched == 2 * PER_CHUNK
    assert any("prefetch: " in r.getMessage() and "403" in r.getMessage() for r in caplog.records)
    assert served_chunks(http_server) == [3, 4, 5, 3]


async def test_the_object_changing_ends_a_replay_quietly_and_says_so(
    http_server: HttpObjectServer, lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK, concurrency=2) as source:
        ws = await working_set(source, chunk_pages(range(1, 9)))
        http_server.reset()
        http_server.delay(20)
        refused = ua.OnError(page="zero", propagate=False)
        async with replaying(lab, source, on_error=refused) as (region, uffd, resolver, server):
            async with anyio.create_task_group() as tg:
                prefetched = await tg.start(ua.prefetch, uffd, resolver, ws)
                await until(lambda: prefetched.prefetched >= 2 * PER_CHUNK)
                http_server.queue("replace")  # the next request meets a new object: 412
            assert not prefetched.working_set_done, "the replay went on past the change"
            assert 2 * PER_CHUNK <= prefetched.prefetched < 8 * PER_CHUNK
            # A fault outside what was prefetched fails: a zero page, never the new bytes.
            assert (await read_pages(lab, region, [300]))[300] == bytes(P)
            assert server.stats.errors == 1
    stopped = [r for r in caplog.records if r.getMessage().startswith("prefetch stopped")]
    assert len(stopped) == 1 and stopped[0].levelno == logging.ERROR
    assert "changed" in stopped[0].getMessage()
    statuses = [e["status"] for e in http_server.stats()["log"] if e["method"] == "GET"]
    assert statuses.count(412) == 1 and statuses[-1] == 412, statuses  # nothing after it
