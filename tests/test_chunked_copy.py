"""``ChunkedCopy`` (HttpSource's resolver): what a chunk fill must do when memory changes
under a fetch, and huge pages, on real faults against the real loopback server.

A fetch is held open with the server's ``hold`` action (``tests/_http_server.py``):
the request waits until the test releases it, so the discard or the mremap surely
happens while the chunk is in flight, whatever the machine's load. Bytes are
asserted (the source's, or zeros where a page was discarded), and that every
faulting thread ends; never time.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

import uffd_async as ua
from uffd_async._core._native import libc

from ._stress import fnv1a, fork_and_hash, fork_features
from ._support import HttpObjectServer, Lab, finished, source_bytes, with_huge_pages

pytestmark = pytest.mark.anyio
P = ua.PAGE_SIZE
PAGES = 128  # 512 KiB
CHUNK = 64 * 1024  # 16 pages
SOURCE = source_bytes(PAGES)
_MREMAP_MAYMOVE_FIXED = 3


def page(n: int, source: bytes = SOURCE, size: int = P) -> bytes:
    return source[n * size : (n + 1) * size]


@asynccontextmanager
async def serving(
    lab: Lab,
    source: ua.HttpSource,
    region: ua.Region,
    features: ua.Feature,
    page_size: int = P,
    **open_options: Any,
) -> AsyncIterator[ua.FaultServer]:
    uffd = lab.uffd(features, **open_options)
    uffd.register(region.address, region.length, ua.Mode.MISSING)
    resolver = ua.copy_from(source, base=region.address, page_size=page_size)
    async with ua.FaultServer(uffd, resolver) as server:
        yield server


async def held(server: HttpObjectServer) -> None:
    """Until a fetch waits on the server's ``hold`` (bounded)."""
    await anyio.to_thread.run_sync(server.wait_held)


def hold_next_fetch(server: HttpObjectServer) -> None:
    """The next ranged GET waits until ``release()`` (queued once the source is open:
    its first request, the open's, is ranged too)."""
    server.queue("hold")


# -- memory that changes while its chunk is fetched ------------------------------------


async def test_the_faulting_page_discarded_while_its_chunk_is_fetched_reads_zeros(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    http_server.put("snap", SOURCE)
    region = lab.anonymous(PAGES)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        async with serving(lab, source, region, ua.Feature.EVENT_REMOVE) as server:
            hold_next_fetch(http_server)
            reader = lab.run(functools.partial(region.read, 3 * P, P))
            await held(http_server)
            await finished(lab.run(functools.partial(region.discard, 3 * P, P)))
            http_server.release()
            assert await finished(reader) == bytes(P)  # discarded after it faulted: zeros
            got = await finished(lab.run(functools.partial(region.read, 0, CHUNK)))
            assert server.stats.errors == 0
    want = SOURCE[:CHUNK]
    assert got == want[: 3 * P] + bytes(P) + want[4 * P :]


async def test_the_faulting_page_moved_while_its_chunk_is_fetched_is_filled_where_it_went(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    """The page a thread faulted on is moved by mremap (EVENT_REMAP) while its chunk is
    in flight: nothing is copied at the address it left, its thread is not left waiting
    (it faults again there and, the page being gone, fails), and the moved pages read
    the source's bytes."""
    http_server.put("snap", SOURCE)
    region = lab.anonymous(PAGES)
    target = lab.anonymous(16)
    features = ua.Feature.EVENT_REMOVE | ua.Feature.EVENT_REMAP
    zero = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
    try:
        async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
            # A fault from inside the kernel (read() into the page): once the page is gone
            # from there, the thread gets EFAULT instead of a SIGSEGV. A user-mode-only
            # uffd refuses such faults, so this needs a full one (skipped without it).
            async with serving(lab, source, region, features, user_mode_only=False) as server:
                hold_next_fetch(http_server)
                stale = region.address + 3 * P
                reader = lab.run(lambda: libc.read(zero, ctypes.c_void_p(stale), 1))
                await held(http_server)

                def move() -> int:
                    old, new = ctypes.c_void_p(region.address), ctypes.c_void_p(target.address)
                    return int(libc.mremap(old, 16 * P, 16 * P, _MREMAP_MAYMOVE_FIXED, new))

                assert await finished(lab.run(move)) == target.address
                http_server.release()
                assert await finished(reader) == -1  # EFAULT: its page is gone from there
                got = await finished(lab.run(functools.partial(target.read, 0, 16 * P)))
                assert got == SOURCE[: 16 * P]
                assert server.stats.errors == 0
                rest = await finished(lab.run(functools.partial(region.read, 16 * P, P)))
                assert rest == page(16)
    finally:
        os.close(zero)


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "fetched-again"])
async def test_a_page_zapped_without_an_event_faults_again_and_is_served(
    http_server: HttpObjectServer, lab: Lab, cached: bool
) -> None:
    """MADV_DONTNEED with no EVENT_REMOVE registered: the resolver still takes the page
    for populated, but its next fault must be served (from the cached chunk, or from a
    new fetch once the chunk left the cache), not left waiting."""
    http_server.put("snap", SOURCE)
    region = lab.anonymous(PAGES)
    cache = 8 * CHUNK if cached else CHUNK  # room for one chunk: reading chunk 1 evicts 0
    async with ua.HttpSource(
        http_server.url("snap"), chunk_size=CHUNK, cache_bytes=cache
    ) as source:
        async with serving(lab, source, region, ua.Feature(0)) as server:
            assert await finished(lab.run(functools.partial(region.read, 0, P))) == page(0)
            if not cached:
                assert await finished(lab.run(functools.partial(region.read, 16 * P, P))) == page(
                    16
                )
            await finished(lab.run(functools.partial(region.discard, 5 * P, 2 * P)))  # no event
            got = await finished(lab.run(functools.partial(region.read, 0, CHUNK)))
            assert got == SOURCE[:CHUNK]
            assert server.stats.errors == 0
    chunk0 = [e for e in http_server.stats()["ranges"] if (e["start"], e["stop"]) == (0, CHUNK)]
    assert len(chunk0) == (1 if cached else 2)


# -- huge pages --------------------------------------------------------------------------

HUGE = 2 << 20
HUGE_PAGES = 4


@with_huge_pages(HUGE_PAGES)
@pytest.mark.parametrize("chunk", [HUGE // 4, 2 * HUGE], ids=["chunks-of-512k", "chunks-of-4m"])
async def test_huge_pages_from_http(http_server: HttpObjectServer, lab: Lab, chunk: int) -> None:
    """Chunks smaller than a huge page (each huge page takes four requests, at once) and
    larger (one request fills two huge pages); a second restore from the same source
    (the same memory, emptied and registered again) is served from the cached chunks."""
    data = source_bytes(HUGE_PAGES * HUGE // P)
    http_server.put("huge", data)
    region = lab.adopt_region(ua.Region.hugetlb(HUGE_PAGES * HUGE))
    async with ua.HttpSource(http_server.url("huge"), chunk_size=chunk,
                             cache_bytes=len(data)) as source:  # fmt: skip
        for _ in range(2):  # then again from the cache
            async with serving(lab, source, region, ua.Feature(0), page_size=HUGE) as server:
                order = [2, 0, 3, 1]
                readers = [
                    lab.run(functools.partial(region.read, n * HUGE + HUGE // 2 + 5, 100))
                    for n in order
                ]
                for n, reader in zip(order, readers, strict=True):
                    start = n * HUGE + HUGE // 2 + 5
                    assert await finished(reader) == data[start : start + 100], n
                got = await finished(lab.run(functools.partial(region.read, 0, region.length)))
                assert got == data
                assert server.stats.errors == 0
                server.uffd.unregister(region.address, region.length)
            region.discard(0, region.length)  # missing again, for the next round
    ranges = http_server.stats()["ranges"]
    requests = [(e["start"], e["stop"]) for e in ranges if e["stop"] - e["start"] == chunk]
    assert sorted(requests) == [(n, n + chunk) for n in range(0, len(data), chunk)]  # once each


@with_huge_pages(HUGE_PAGES)
@pytest.mark.parametrize("chunk", [HUGE // 4, 2 * HUGE], ids=["chunks-of-512k", "chunks-of-4m"])
async def test_huge_pages_populated_over_http(
    http_server: HttpObjectServer, lab: Lab, chunk: int
) -> None:
    """Prefetching fills a huge page only from bytes that hold all of it: a chunk smaller
    than a huge page fills none (its faults then fetch what they need), a larger one
    fills every huge page it holds whole."""
    data = source_bytes(HUGE_PAGES * HUGE // P)
    http_server.put("huge", data)
    async with ua.HttpSource(http_server.url("huge"), chunk_size=chunk) as source:
        region = lab.adopt_region(ua.Region.hugetlb(HUGE_PAGES * HUGE))
        uffd = lab.uffd()
        uffd.register(region.address, region.length, ua.Mode.MISSING)
        resolver = ua.copy_from(source, base=region.address, page_size=HUGE)
        async with ua.FaultServer(uffd, resolver) as server:
            await ua.prefetch(uffd, resolver, None, populate=True)
            got = await finished(lab.run(functools.partial(region.read, 0, region.length)))
            assert got == data
            assert server.stats.errors == 0
            if chunk > HUGE:
                assert server.stats.faults == 0


# -- recording, and prefetching around what is there ----------------------------------------


async def test_while_recording_every_page_faults_once(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    """A chunk fill would hide the pages it brings in from the working set: while one is
    recorded, a fault copies its own page only (the chunk stays cached: no new request)."""
    http_server.put("snap", SOURCE)
    region = lab.anonymous(PAGES)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        recorder = ua.WorkingSetRecorder(len(SOURCE), await source.identity())
        uffd = lab.uffd()
        uffd.register(region.address, region.length, ua.Mode.MISSING)
        resolver = ua.copy_from(source, base=region.address, recorder=recorder)
        async with ua.FaultServer(uffd, resolver) as server:
            for n in (3, 7, 2, 20):
                assert await finished(lab.run(functools.partial(region.read, n * P, P))) == page(n)
            assert server.stats.faults == 4
    assert recorder.working_set().pages == (3, 7, 2, 20)
    fetched = sorted(
        {e["start"] for e in http_server.stats()["ranges"] if e["stop"] - e["start"] == CHUNK}
    )
    assert fetched == [0, CHUNK]


async def test_a_chunk_missing_only_its_last_page_is_prefetched(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    """Pages 0-14 came in one fault at a time (recorded), page 15 did not: populating
    fills it too (from the cached chunk), so reading it faults no more."""
    http_server.put("snap", SOURCE[: 2 * CHUNK])
    region = lab.anonymous(32)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        recorder = ua.WorkingSetRecorder(2 * CHUNK, await source.identity())
        uffd = lab.uffd()
        uffd.register(region.address, region.length, ua.Mode.MISSING)
        resolver = ua.copy_from(source, base=region.address, recorder=recorder)
        async with ua.FaultServer(uffd, resolver) as server:
            for n in range(15):
                assert await finished(lab.run(functools.partial(region.read, n * P, P))) == page(n)
            await ua.prefetch(uffd, resolver, None, populate=True)
            faults = server.stats.faults
            got = await finished(lab.run(functools.partial(region.read, 0, region.length)))
            assert got == SOURCE[: 2 * CHUNK]
            assert server.stats.faults == faults == 15


async def test_a_fork_childs_chunk_fills_its_own_memory_only(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    """A child forked (EVENT_FORK) before anything was populated touches every page: it
    reads the source's bytes, and its chunk fills never mark the parent's pages as
    there: the parent's first read of a chunk still fills all of it (one fault)."""
    features = fork_features()
    if not features:
        pytest.skip("EVENT_FORK needs CAP_SYS_PTRACE")
    http_server.put("snap", SOURCE[: 2 * CHUNK])
    region = lab.anonymous(32)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        async with serving(lab, source, region, features) as server:
            child = lab.run(functools.partial(fork_and_hash, region.address, region.length,
                                              write=False))  # fmt: skip
            assert await finished(child) == fnv1a(SOURCE[: 2 * CHUNK])
            faults = server.stats.faults
            got = await finished(lab.run(functools.partial(region.read, 0, region.length)))
            assert got == SOURCE[: 2 * CHUNK]
            assert server.stats.faults - faults == 2  # one per chunk
