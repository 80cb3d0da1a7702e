"""``ua.HttpSource``: snapshots over HTTP Range requests, on real faults, against a real server.

The server is ``tests/_http_server.py`` in its own process on loopback (uvicorn and
Starlette), which counts what it served and misbehaves on request: 5xx, dropped
connections, a 200 to a ranged GET, short bodies, wrong ranges, the object replaced
mid-restore, a 403. Faulting threads touch memory through ctypes (never holding the
GIL); processes that hand their uffd over are in ``test_http_handoff.py``. Each test
checks bytes (every one right, or the fault failed) and the requests the server saw
(at most one per chunk touched); the fixtures check no fd, thread or connection is
left. Every wait is bounded; nothing is asserted about time.
"""

from __future__ import annotations

import functools
import os
import random
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

import uffd_async as ua

from ._support import TIMEOUT, HttpObjectServer, Lab, finished, source_bytes

pytestmark = pytest.mark.anyio
P = ua.PAGE_SIZE
PAGES = 512  # 2 MiB
CHUNK = 64 * 1024  # 16 pages: 32 chunks
SOURCE = source_bytes(PAGES)


def chunk_of(page: int, chunk: int = CHUNK) -> int:
    return page * P // chunk


def served_chunks(server: HttpObjectServer, chunk: int = CHUNK) -> list[int]:
    """The chunks the server answered ranged GETs for, in order (the objects here are whole
    chunks; the open request and identity samples, smaller, are left out)."""
    chunks = []
    for entry in server.stats()["ranges"]:
        start, stop = entry["start"], entry["stop"]
        if start is not None and stop - start == chunk:
            assert start % chunk == 0, entry
            chunks.append(start // chunk)
    return chunks


@asynccontextmanager
async def restoring(
    lab: Lab, source: ua.SnapshotSource, pages: int = PAGES, **server: Any
) -> AsyncIterator[tuple[ua.Region, ua.FaultServer]]:
    """A region of ``pages`` registered MISSING, served from ``source`` by a FaultServer."""
    region = lab.anonymous(pages)
    uffd = lab.uffd(ua.Feature.EVENT_REMOVE)
    uffd.register(region.address, region.length, ua.Mode.MISSING)
    async with ua.FaultServer(uffd, ua.copy_from(source, base=region.address), **server) as fs:
        yield region, fs


async def read_pages(lab: Lab, region: ua.Region, pages: Iterable[int]) -> dict[int, bytes]:
    """Each page read by its own thread (all at once), without the GIL."""
    workers = {page: lab.run(functools.partial(region.read, page * P, P)) for page in pages}
    return {page: await finished(worker) for page, worker in workers.items()}


# -- restoring ---------------------------------------------------------------------


async def test_every_byte_right_and_one_request_per_chunk_touched(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    http_server.put("snap", SOURCE)
    http_server.delay(5)
    rng = random.Random(7)
    touched = sorted({rng.randrange(PAGES) for _ in range(48)})
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        async with restoring(lab, source) as (region, server):
            got = await read_pages(lab, region, touched)
            for page in touched:
                assert got[page] == SOURCE[page * P : (page + 1) * P], page
        chunks = served_chunks(http_server)
        assert sorted(chunks) == sorted(set(chunks)), "a chunk was fetched twice"
        assert set(chunks) == {chunk_of(page) for page in touched}
        assert source.stats.chunks == len(chunks)
        # The fault's chunk filled every page of it: one fault per chunk at most.
        assert server.stats.faults <= len(touched)
        assert server.stats.pages == len(chunks) * (CHUNK // P)
    assert http_server.wait_idle()["connections_open"] == 0


async def test_faults_in_one_chunk_share_one_request(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    http_server.put("snap", SOURCE)
    http_server.delay(1000)  # every thread faults while the one request is under way
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        async with restoring(lab, source) as (region, server):
            pages = range(16, 32)  # chunk 1, a thread per page
            got = await read_pages(lab, region, pages)
            assert all(got[page] == SOURCE[page * P : (page + 1) * P] for page in pages)
            assert served_chunks(http_server) == [1]
            assert server.stats.faults >= 2 and source.stats.joined >= 1
            assert server.stats.errors == 0


async def test_a_whole_restore_from_many_threads(http_server: HttpObjectServer, lab: Lab) -> None:
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK, concurrency=4) as source:
        async with restoring(lab, source) as (region, _):
            workers = [
                lab.run(functools.partial(region.read, n * PAGES // 16 * P, PAGES // 16 * P))
                for n in range(16)
            ]
            got = b"".join([await finished(worker) for worker in workers])
    assert got == SOURCE
    assert sorted(served_chunks(http_server)) == list(range(PAGES * P // CHUNK))


@pytest.mark.parametrize("action", ["500", "503", "drop", "short"])
async def test_transient_failures_are_retried(
    http_server: HttpObjectServer, lab: Lab, action: str
) -> None:
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        http_server.queue(action, action)
        async with restoring(lab, source) as (region, server):
            got = await read_pages(lab, region, [40])
            assert got[40] == SOURCE[40 * P : 41 * P]
            assert server.stats.errors == 0
        assert source.stats.retries == 2 and source.stats.failed == 0


async def test_the_retries_run_out(http_server: HttpObjectServer) -> None:
    http_server.put("snap", SOURCE)
    fail_fast = ua.SourcePolicy(on_error="poison")  # waiting: tests/test_source_outage.py
    url = http_server.url("snap")
    async with ua.HttpSource(url, chunk_size=CHUNK, retries=2, outage=fail_fast) as source:
        http_server.queue("503", "503", "503")
        with pytest.raises(ua.FetchError) as caught:
            await source.chunk(3)
        assert caught.value.status == 503
        assert (caught.value.start, caught.value.end) == (3 * CHUNK, 4 * CHUNK - 1)
        assert "bytes=196608-262143: HTTP 503" in str(caught.value)
        assert "after 3 attempts" in str(caught.value)
        assert source.stats.retries == 2
        assert await source.chunk(3) == SOURCE[3 * CHUNK : 4 * CHUNK]  # and later it works


@pytest.mark.parametrize(
    ("action", "status", "words"),
    [
        ("403", 403, "HTTP 403 Forbidden"),
        ("full", 200, "ignored the Range header"),
        ("wrong_range", 206, "instead"),
        ("range_end_off", 206, "instead"),
        ("short_declared", 206, ""),
        ("gzip", 206, "gzip-encoded body"),
    ],
)
async def test_answers_that_are_not_the_bytes_asked_for_are_refused(
    http_server: HttpObjectServer, action: str, status: int, words: str
) -> None:
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        http_server.queue(action)
        with pytest.raises(ua.FetchError) as caught:
            await source.chunk(5)
        assert caught.value.status == status and words in str(caught.value)
        assert not isinstance(caught.value, ua.SourceChanged)
        assert source.stats.retries == 0, "not retried: it would fail the same way"
        assert source.cached(5) is None
        assert await source.chunk(5) == SOURCE[5 * CHUNK : 6 * CHUNK]


async def test_http2_where_the_server_offers_only_http1(http_server: HttpObjectServer) -> None:
    """``http2=True`` (the h2 extra): over cleartext httpx speaks HTTP/1.1 (HTTP/2 comes
    with TLS's ALPN), and every check still holds."""
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK, http2=True) as source:
        assert await source.chunk(7) == SOURCE[7 * CHUNK : 8 * CHUNK]
    assert http_server.wait_idle()["connections_open"] == 0


async def test_a_presigned_urls_query_is_never_shown(http_server: HttpObjectServer) -> None:
    http_server.put("snap", SOURCE)
    secret = "X-Amz-Signature=0123456789abcdef"
    url = http_server.url("snap").replace("http://", "http://user:pw@") + f"?{secret}"
    async with ua.HttpSource(url, chunk_size=CHUNK) as source:
        http_server.queue("403")
        with pytest.raises(ua.FetchError) as caught:
            await source.chunk(0)
        for text in (str(caught.value), caught.value.url, repr(source), source.url):
            assert "0123456789abcdef" not in text and "pw" not in text, text
        assert caught.value.url == http_server.url("snap")


# -- the object changing under a restore -----------------------------------------------


@pytest.mark.parametrize("etag", [True, False], ids=["etag", "last-modified"])
async def test_an_object_replaced_mid_restore_is_never_mixed_in(
    http_server: HttpObjectServer, etag: bool
) -> None:
    http_server.etag(etag)
    path = http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        assert (source.validator or "").startswith("If-Match" if etag else "If-Unmodified-Since")
        assert await source.chunk(0) == SOURCE[:CHUNK]
        http_server.put("snap", bytes(reversed(SOURCE)))
        later = time.time() + 5  # Last-Modified has whole seconds
        os.utime(path, (later, later))
        with pytest.raises(ua.SourceChanged) as caught:
            await source.chunk(1)
        assert caught.value.status == 412
        requests = http_server.stats()["requests"]
        with pytest.raises(ua.SourceChanged):  # nothing more is fetched
            await source.chunk(2)
        assert http_server.stats()["requests"] == requests


async def test_the_object_replaced_just_before_a_request(
    http_server: HttpObjectServer,
) -> None:
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        http_server.queue("replace")
        with pytest.raises(ua.SourceChanged):
            await source.chunk(0)
        with pytest.raises(ua.SourceChanged):
            await source.read(0, P)


# -- what a chunk fill must not do ------------------------------------------------------


async def test_pages_removed_while_their_chunk_is_fetched_read_zeros(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    http_server.put("snap", SOURCE)
    http_server.delay(400)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        async with restoring(lab, source) as (region, server):
            toucher = lab.run(lambda: region.read(0, P))  # chunk 0's fetch starts
            with anyio.fail_after(TIMEOUT):
                while not source.stats.in_flight:
                    await anyio.sleep(0.002)
            discard = lab.run(lambda: region.discard(5 * P, 3 * P))  # a REMOVE while it waits
            await finished(discard)
            assert await finished(toucher) == SOURCE[:P]
            got = await read_pages(lab, region, range(16))
            for page in range(16):
                want = bytes(P) if 5 <= page < 8 else SOURCE[page * P : (page + 1) * P]
                assert got[page] == want, page
            assert server.stats.events == 1 and server.stats.errors == 0


async def test_an_owner_cancelled_mid_fetch_leaves_the_others_their_chunk(
    http_server: HttpObjectServer,
) -> None:
    http_server.put("snap", SOURCE)
    http_server.delay(300)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        got: list[bytes] = []
        owner = anyio.CancelScope()

        async def own() -> None:
            with owner:
                await source.chunk(2)

        async def join() -> None:
            got.append(await source.chunk(2))

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(own)
                while not source.stats.in_flight:
                    await anyio.sleep(0.002)
                tg.start_soon(join)
                while not source.stats.joined:
                    await anyio.sleep(0.002)
                owner.cancel()
        assert got == [SOURCE[2 * CHUNK : 3 * CHUNK]]
        assert source.stats.abandoned == 1 and source.stats.failed == 0
    assert served_chunks(http_server) == [2]  # the abandoned request never answered


async def test_demand_fetches_go_before_prefetches(http_server: HttpObjectServer) -> None:
    http_server.put("snap", SOURCE)
    http_server.delay(100)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK, concurrency=1) as source:
        async with anyio.create_task_group() as tg:
            for chunk in range(1, 6):
                tg.start_soon(functools.partial(source.chunk, chunk, demand=False))
            with anyio.fail_after(TIMEOUT):
                while source.stats.queued < 4:  # one fetch holds the connection
                    await anyio.sleep(0.002)
            tg.start_soon(lambda: source.chunk(9))
    order = served_chunks(http_server)
    assert order[1] == 9, order  # next after the prefetch that held the one connection
    assert sorted(order) == [1, 2, 3, 4, 5, 9]


async def test_a_demand_joining_a_running_prefetch_loses_no_connection(
    http_server: HttpObjectServer,
) -> None:
    """A fault that joins a prefetch already holding a connection must not queue it for
    a second one: that slot would be handed to nobody, and with one connection, the
    next fetch would wait forever."""
    http_server.put("snap", SOURCE)
    http_server.delay(200)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK, concurrency=1) as source:
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(functools.partial(source.chunk, 0, demand=False))
                while not source.stats.in_flight:
                    await anyio.sleep(0.002)
                assert await source.chunk(0) == SOURCE[:CHUNK]  # joins, promotes
            assert await source.chunk(1) == SOURCE[CHUNK : 2 * CHUNK]
        assert source.stats.joined == 1


async def test_recent_chunks_serve_other_restores_without_a_request(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        for _ in range(2):  # two processes' worth of memory, one source
            async with restoring(lab, source) as (region, _):
                got = await read_pages(lab, region, [3, 100, 300])
                assert got[100] == SOURCE[100 * P : 101 * P]
        assert len(served_chunks(http_server)) == 3 and source.stats.cache_hits >= 3
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK, cache_bytes=0) as source:
        for _ in range(2):
            async with restoring(lab, source) as (region, _):
                await read_pages(lab, region, [3])
        assert source.stats.cache_hits == 0 and source.stats.chunks == 2


# -- prefetching a working set over HTTP ------------------------------------------------


async def test_a_working_set_is_fetched_ahead_by_chunks(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    http_server.put("snap", SOURCE)
    pages = [*range(20, 24), *range(200, 210), 450]
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        working_set = ua.WorkingSet(
            snapshot_size=len(SOURCE), identity=await source.identity(), pages=pages
        )
        with ua.Snapshot(http_server.put("local", SOURCE)) as local:
            assert local.identity == working_set.identity  # the same as the file's
        region = lab.anonymous(PAGES)
        uffd = lab.uffd()
        uffd.register(region.address, region.length, ua.Mode.MISSING)
        resolver = ua.copy_from(source, base=region.address)
        async with ua.FaultServer(uffd, resolver) as server:
            stats = await ua.prefetch(uffd, resolver, working_set)
            got = await read_pages(lab, region, pages)
            assert all(got[page] == SOURCE[page * P : (page + 1) * P] for page in pages)
            assert server.stats.faults == 0
        assert stats.prefetched == 4 * CHUNK // P and stats.runs == 4
        assert sorted(set(served_chunks(http_server))) == [1, 12, 13, 28]


async def test_populate_over_http_fetches_everything_once(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        region = lab.anonymous(PAGES)
        uffd = lab.uffd()
        uffd.register(region.address, region.length, ua.Mode.MISSING)
        resolver = ua.copy_from(source, base=region.address)
        async with ua.FaultServer(uffd, resolver) as server:
            stats = await ua.prefetch(uffd, resolver, None, populate=True)
            assert stats.populated and stats.prefetched == PAGES
            assert (await read_pages(lab, region, [0, PAGES - 1]))[0] == SOURCE[:P]
            assert server.stats.faults == 0
    assert sorted(served_chunks(http_server)) == list(range(PAGES * P // CHUNK))


# -- bad input ----------------------------------------------------------------------


async def test_bad_arguments_are_refused_before_any_request(
    http_server: HttpObjectServer,
) -> None:
    url = http_server.url("snap")
    with pytest.raises(ua.InvalidArgument, match="not an http"):
        ua.HttpSource("ftp://example.com/x")
    with pytest.raises(ua.InvalidArgument, match="multiple of 4096"):
        ua.HttpSource(url, chunk_size=5000)
    for name in ("concurrency", "retries", "chunk_size", "cache_bytes"):
        with pytest.raises(ua.InvalidArgument, match=name):
            bad: dict[str, Any] = {name: -1}
            ua.HttpSource(url, **bad)
    with pytest.raises(ua.InvalidArgument, match="timeout"):
        ua.HttpSource(url, timeout=0)
    source = ua.HttpSource(url)
    with pytest.raises(RuntimeError, match="open the HttpSource first"):
        await source.chunk(0)
    assert http_server.stats()["requests"] == 0


async def test_what_open_refuses(http_server: HttpObjectServer) -> None:
    http_server.put("empty", b"")
    with pytest.raises(ua.FetchError, match=r"416|empty"):
        await ua.HttpSource(http_server.url("empty")).open()
    with pytest.raises(ua.FetchError, match="HTTP 404"):
        await ua.HttpSource(http_server.url("missing")).open()
    http_server.put("snap", SOURCE)
    http_server.queue("full")
    with pytest.raises(ua.FetchError, match="ignored the Range header"):
        await ua.HttpSource(http_server.url("snap")).open()
    closed = http_server.base_url.rsplit(":", 1)[0] + ":9"  # nothing listens on port 9
    source = ua.HttpSource(closed + "/o/snap", retries=1)
    with pytest.raises(ua.FetchError, match="ConnectError") as caught:
        await source.open()
    assert caught.value.status is None and source.closed
    assert http_server.wait_idle()["connections_open"] == 0


async def test_copy_from_an_http_source_refuses_readahead(
    http_server: HttpObjectServer,
) -> None:
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap")) as source:
        with pytest.raises(ua.InvalidArgument, match="readahead does not apply"):
            ua.copy_from(source, base=1 << 30, readahead=4)
    with pytest.raises(ua.SnapshotClosed):
        ua.copy_from(source, base=1 << 30)


@pytest.mark.parametrize(
    "url", ["http://host:notaport/x?X-Amz-Signature=secret", "http://[::1/x?sig=secret"]
)
def test_a_malformed_url_is_an_invalid_argument_without_its_query(url: str) -> None:
    """Not httpx's own InvalidURL (outside the error tree), and never the query."""
    with pytest.raises(ua.InvalidArgument, match="is not a valid URL") as caught:
        ua.HttpSource(url)
    assert "secret" not in str(caught.value)
