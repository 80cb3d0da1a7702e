"""Chunk readahead: faults that walk a remote source's chunks in order get the next chunks
fetched ahead; any other faults do not.

Real faults (threads reading the region through ctypes, never holding the GIL) against
the real loopback HTTP server of ``tests/_http_server.py``, which says which chunks it
served and in which order. Every wait is bounded; nothing is asserted about time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
import pytest

import uffd_async as ua
from uffd_async._remote._chunks import Sequential

from ._support import HttpObjectServer, Lab, finished
from .test_http_prefetch import chunk_pages, until, working_set
from .test_http_source import CHUNK, PAGES, SOURCE, read_pages, served_chunks

pytestmark = pytest.mark.anyio
P = ua.PAGE_SIZE
PER_CHUNK = CHUNK // P
COUNT = PAGES // PER_CHUNK  # 32 chunks


@asynccontextmanager
async def serving(
    lab: Lab, source: Any
) -> AsyncIterator[tuple[ua.Region, ua.Userfaultfd, Any, ua.FaultServer]]:
    region = lab.anonymous(PAGES)
    uffd = lab.uffd()
    uffd.register(region.address, region.length, ua.Mode.MISSING)
    resolver = ua.copy_from(source, base=region.address)
    async with ua.FaultServer(uffd, resolver) as server:
        yield region, uffd, resolver, server


async def read_in_order(lab: Lab, region: ua.Region, first: int, count: int) -> bytes:
    """One thread reads chunks ``first .. first + count - 1``, page after page."""
    return bytes(await finished(lab.run(lambda: region.read(first * CHUNK, count * CHUNK))))


def ranges_asked(server: HttpObjectServer) -> list[tuple[int, int]]:
    return [
        (entry["start"], entry["stop"])
        for entry in server.stats()["ranges"]
        if entry["start"] is not None
    ]


async def test_a_reader_in_order_gets_the_chunks_ahead_each_once(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    http_server.put("snap", SOURCE)
    url = http_server.url("snap")
    async with ua.HttpSource(url, chunk_size=CHUNK, chunk_readahead=4) as source:
        http_server.reset()
        http_server.delay(5)  # so that a chunk ahead is still on its way at times
        async with serving(lab, source) as (region, _, _, server):
            assert await read_in_order(lab, region, 0, COUNT) == SOURCE
            assert server.stats.errors == 0
            # Chunks 0, 1 and 2 fault; the rest were asked for ahead, and their faults
            # (a marker page each, or a join of the fetch) are at most one per chunk.
            assert server.stats.faults <= COUNT
        assert source.stats.readahead == COUNT - 3
    assert sorted(served_chunks(http_server)) == list(range(COUNT)), "a chunk twice"
    assert all(stop <= len(SOURCE) for _, stop in ranges_asked(http_server))


async def test_without_readahead_every_chunk_is_a_demand_fault(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    http_server.put("snap", SOURCE)
    url = http_server.url("snap")
    async with ua.HttpSource(url, chunk_size=CHUNK, chunk_readahead=0) as source:
        http_server.reset()
        async with serving(lab, source) as (region, _, _, server):
            assert await read_in_order(lab, region, 0, COUNT) == SOURCE
            assert server.stats.faults == COUNT
        assert source.stats.readahead == 0
    assert served_chunks(http_server) == list(range(COUNT))


async def test_faults_out_of_order_fetch_nothing_ahead(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    http_server.put("snap", SOURCE)
    order = [5, 20, 3, 17, 9, 28, 1, 12, 13, 27, 26]  # 12, 13: in order, but two only
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        http_server.reset()
        async with serving(lab, source) as (region, _, _, _):
            for chunk in order:  # each at its chunk's first page, one after the other
                got = await read_pages(lab, region, [chunk * PER_CHUNK])
                assert got[chunk * PER_CHUNK] == SOURCE[chunk * CHUNK : chunk * CHUNK + P]
        assert source.stats.readahead == 0
    assert served_chunks(http_server) == order


async def test_faults_in_order_but_not_at_a_chunks_start_fetch_nothing_ahead(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    """Threads faulting at random may hit chunks in order by chance, in their middles."""
    http_server.put("snap", SOURCE)
    chunks = [4, 5, 6, 7, 8]
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        http_server.reset()
        async with serving(lab, source) as (region, _, _, _):
            for chunk in chunks:
                await read_pages(lab, region, [chunk * PER_CHUNK + 3])
        assert source.stats.readahead == 0
    assert served_chunks(http_server) == chunks


async def test_readahead_stops_at_the_end_of_the_object(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    http_server.put("snap", SOURCE)
    url = http_server.url("snap")
    async with ua.HttpSource(url, chunk_size=CHUNK, chunk_readahead=8) as source:
        http_server.reset()
        async with serving(lab, source) as (region, _, _, _):
            first = COUNT - 6
            tail = await read_in_order(lab, region, first, 6)
            assert tail == SOURCE[first * CHUNK :]
        # The third fault (chunk 28) asks for 29, 30 and 31: 8 wanted, 3 exist.
        assert source.stats.readahead == 3
    assert sorted(served_chunks(http_server)) == list(range(COUNT - 6, COUNT))
    assert max(stop for _, stop in ranges_asked(http_server)) == len(SOURCE)


async def test_a_prefetched_chunk_is_not_fetched_again_by_readahead(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    http_server.put("snap", SOURCE)
    url = http_server.url("snap")
    # No in-memory cache: a chunk fetched twice would be a second request.
    async with ua.HttpSource(url, chunk_size=CHUNK, chunk_readahead=4, cache_bytes=0) as source:
        ws = await working_set(source, chunk_pages(range(4, 12)))
        http_server.reset()
        async with serving(lab, source) as (region, uffd, resolver, _):
            await ua.prefetch(uffd, resolver, ws)
            assert await read_in_order(lab, region, 0, COUNT) == SOURCE
        # Asked for ahead: 3 (after 0-2; 4-7 were there), then, the reader having crossed
        # 4-11 without a fault, a new sequence from 12: 15-31. Only chunks fetched count.
        assert source.stats.readahead == 1 + 17
    assert sorted(served_chunks(http_server)) == list(range(COUNT)), "a chunk twice"


async def test_a_chunk_prefetched_meanwhile_is_fetched_once(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    """The prefetcher and the readahead ask for the same chunks at the same time: each
    chunk's one fetch is shared (joined while in flight, then from the in-memory cache:
    the prefetcher checks what is missing before it waits for a slot)."""
    http_server.put("snap", SOURCE)
    url = http_server.url("snap")
    async with ua.HttpSource(url, chunk_size=CHUNK, chunk_readahead=6) as source:
        ws = await working_set(source, chunk_pages(range(COUNT)))
        http_server.reset()
        http_server.delay(10)
        async with serving(lab, source) as (region, uffd, resolver, _):
            reader = lab.run(lambda: region.read(0, PAGES * P))
            await ua.prefetch(uffd, resolver, ws)
            assert await finished(reader) == SOURCE
    assert sorted(served_chunks(http_server)) == list(range(COUNT)), "a chunk twice"


async def test_a_chunk_ahead_that_fails_is_fetched_again_by_its_fault(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    """One connection: chunk 2's fault holds it, chunk 3 (asked for ahead) waits, then
    gets a 403 and is dropped; the reader's fault in chunk 3 later fetches it again.
    (A fault that joins a fetch ahead while it runs shares its outcome, as with any
    fetch: the source retried what was worth retrying.)"""
    http_server.put("snap", SOURCE)
    url = http_server.url("snap")
    async with ua.HttpSource(
        url, chunk_size=CHUNK, chunk_readahead=1, retries=0, concurrency=1
    ) as source:
        http_server.reset()
        async with serving(lab, source) as (region, _, _, server):
            assert await read_in_order(lab, region, 0, 2) == SOURCE[: 2 * CHUNK]
            http_server.queue("hold", "403")  # chunk 2's request; then chunk 3's
            reader = lab.run(lambda: region.read(2 * CHUNK, CHUNK))
            await anyio.to_thread.run_sync(http_server.wait_held)
            http_server.release()
            assert await finished(reader) == SOURCE[2 * CHUNK : 3 * CHUNK]
            await until(lambda: source.stats.failed == 1)
            assert await read_in_order(lab, region, 3, 3) == SOURCE[3 * CHUNK : 6 * CHUNK]
            assert server.stats.errors == 0
        assert source.stats.readahead >= 1
    statuses = [e["status"] for e in http_server.stats()["log"] if e["method"] == "GET"]
    assert statuses.count(403) == 1, statuses


async def test_a_demand_fault_goes_ahead_of_the_chunks_asked_for_ahead(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    """One connection, held by chunk 2's fetch (the third in order: 3-5 are asked for
    ahead and queue); a fault far away queues after them, and is fetched before them."""
    http_server.put("snap", SOURCE)
    url = http_server.url("snap")
    async with ua.HttpSource(url, chunk_size=CHUNK, chunk_readahead=3, concurrency=1) as source:
        http_server.reset()
        async with serving(lab, source) as (region, _, _, _):
            assert await read_in_order(lab, region, 0, 2) == SOURCE[: 2 * CHUNK]
            http_server.queue("hold")
            reader = lab.run(lambda: region.read(2 * CHUNK, P))
            await anyio.to_thread.run_sync(http_server.wait_held)
            await until(lambda: source.stats.queued == 3)
            far = lab.run(lambda: region.read(20 * CHUNK, P))
            await until(lambda: source.stats.queued == 4)
            http_server.release()
            assert await finished(reader) == SOURCE[2 * CHUNK : 2 * CHUNK + P]
            assert await finished(far) == SOURCE[20 * CHUNK : 20 * CHUNK + P]
            await until(lambda: source.stats.queued == source.stats.in_flight == 0)
    served = served_chunks(http_server)  # 3-5 in any order: trio starts tasks in any
    assert served[:4] == [0, 1, 2, 20] and sorted(served[4:]) == [3, 4, 5], served


async def test_chunks_left_with_a_marker_are_not_fetched_again_by_a_prefetch(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    """A reader stops at chunk 9: 10-13 were fetched ahead and filled but for their
    first pages. A prefetch of them fetches nothing, and those pages, read later, come
    from the bytes kept for them (no cache here: a fetch would be a request)."""
    http_server.put("snap", SOURCE)
    url = http_server.url("snap")
    async with ua.HttpSource(url, chunk_size=CHUNK, chunk_readahead=4, cache_bytes=0) as source:
        ws = await working_set(source, chunk_pages(range(10, 14)))
        http_server.reset()
        async with serving(lab, source) as (region, uffd, resolver, _):
            assert await read_in_order(lab, region, 0, 10) == SOURCE[: 10 * CHUNK]
            await until(lambda: source.stats.queued == source.stats.in_flight == 0)
            await ua.prefetch(uffd, resolver, ws)
            got = await read_in_order(lab, region, 10, 4)
            assert got == SOURCE[10 * CHUNK : 14 * CHUNK]
    chunks = served_chunks(http_server)  # and, the sequence going on, some past 13
    assert len(chunks) == len(set(chunks)) and set(range(14)) <= set(chunks), chunks


@pytest.mark.parametrize("value", [-1, 1.5, "8", True])
def test_a_bad_chunk_readahead_is_refused(value: Any) -> None:
    with pytest.raises((ua.InvalidArgument, TypeError), match="chunk_readahead"):
        ua.HttpSource("http://127.0.0.1:1/snap", chunk_readahead=value)


def test_the_option_reaches_every_chunked_source_from_open_source() -> None:
    from uffd_async._remote._open_source import open_source

    http = open_source("http://127.0.0.1:9/snap", http={"chunk_readahead": 3})
    store = open_source("s3://bucket/snap", http={"chunk_readahead": 0})
    assert isinstance(http, ua.HttpSource) and http.chunk_readahead == 3
    assert isinstance(store, ua.ObjectSource) and store.chunk_readahead == 0
    assert ua.HttpSource("http://127.0.0.1:9/snap").chunk_readahead == 8  # the default


# -- the sequence alone ------------------------------------------------------------------


def test_the_sequence_starts_at_the_third_chunk_in_order_and_slides() -> None:
    seq = Sequential(4, 100)
    assert list(seq.note(10, True)) == []
    assert list(seq.note(11, True)) == []
    assert list(seq.note(12, True)) == [13, 14, 15, 16]
    assert list(seq.note(13, True)) == [17]  # a marker: one more, the window slides
    assert list(seq.note(13, False)) == []  # the same chunk again: nothing
    assert list(seq.note(17, True)) == [18, 19, 20, 21]  # 14-16 did not fault: ahead
    assert list(seq.note(22, True)) == [23, 24, 25, 26]
    assert list(seq.note(40, True)) == []  # past what was asked: a new start
    assert list(seq.note(41, True)) == []
    assert list(seq.note(42, True)) == [43, 44, 45, 46]


def test_the_sequence_ends_where_the_chunks_do() -> None:
    seq = Sequential(4, 10)
    for chunk in (5, 6):
        assert list(seq.note(chunk, True)) == []
    assert list(seq.note(7, True)) == [8, 9]
    assert list(seq.note(8, True)) == []
    assert list(seq.note(9, True)) == []


def test_backwards_or_mid_chunk_ends_the_sequence() -> None:
    seq = Sequential(2, 100)
    for chunk in (1, 2, 3):
        seq.note(chunk, True)
    assert list(seq.note(2, True)) == []
    assert list(seq.note(3, True)) == []
    assert list(seq.note(4, False)) == []  # mid-chunk: a new start (not counted)
    assert list(seq.note(5, True)) == []
    assert list(seq.note(6, True)) == [7, 8]


def test_no_readahead_asks_nothing() -> None:
    seq = Sequential(0, 100)
    assert all(not seq.note(chunk, True) for chunk in range(10))
