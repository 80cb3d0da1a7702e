"""``ua.HttpSource`` against servers that misbehave: never a byte of the wrong version.

The server is ``tests/_http_server.py`` in its own process, told to cut chunked
bodies short, to label or encode a range wrongly, to send weak ETags only, or to
ignore ``If-Match``/``If-Unmodified-Since`` (a lax server or cache) while the
object is replaced under a restore. Faults come from real threads; a fault whose
chunk is refused gets a zero page (``OnError(page="zero", propagate=False)``), so a test can tell
"refused" from "served" by the bytes. Every wait is bounded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest

import uffd_async as ua

from ._support import TIMEOUT, HttpObjectServer, Lab
from .test_http_source import CHUNK, SOURCE, read_pages, restoring, served_chunks

pytestmark = pytest.mark.anyio
P = ua.PAGE_SIZE
PER_CHUNK = CHUNK // P
ZERO = bytes(P)
REFUSED = ua.OnError(page="zero", propagate=False)


def page(number: int, data: bytes = SOURCE) -> bytes:
    return data[number * P : (number + 1) * P]


def object_requests(server: HttpObjectServer) -> list[dict[str, object]]:
    return [entry for entry in server.stats()["log"] if entry["method"] == "GET"]


def swap(server: HttpObjectServer, data: bytes, mtime: float) -> Path:
    """Replace the object "snap" (a new inode, so a new ETag) and set its mtime."""
    path = server.put("snap", data)
    os.utime(path, (mtime, mtime))
    return path


# -- bodies that are not the bytes asked for --------------------------------------------


@pytest.mark.parametrize("action", ["chunked_short", "chunked_cut"])
async def test_a_chunked_body_that_ends_early_is_never_cached_or_copied(
    http_server: HttpObjectServer, lab: Lab, action: str
) -> None:
    http_server.put("snap", SOURCE)
    fail_fast = ua.SourcePolicy(on_error="poison")  # a fault fails at its first failure
    url = http_server.url("snap")
    async with ua.HttpSource(url, chunk_size=CHUNK, retries=0, outage=fail_fast) as source:
        async with restoring(lab, source, on_error=REFUSED) as (region, server):
            http_server.queue(action)
            first = 3 * PER_CHUNK + 1  # in the half of the chunk that did arrive
            assert (await read_pages(lab, region, [first]))[first] == ZERO
            assert server.stats.errors == 1
            assert source.cached(3) is None and source.stats.chunks == 0
            # The chunk is fetched again, whole, for the next fault in it.
            got = await read_pages(lab, region, [first + 1, first + 4])
            assert got == {first + 1: page(first + 1), first + 4: page(first + 4)}
        assert source.stats.failed == 1 and source.stats.chunks == 1
    taken = [entry for entry in object_requests(http_server) if entry["action"] == action]
    assert len(taken) == 1 and taken[0]["status"] == 206, "the server did not misbehave"
    assert served_chunks(http_server) == [3, 3]


async def test_a_chunked_body_that_ends_early_is_retried(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK, retries=2) as source:
        http_server.queue("chunked_short", "chunked_cut")
        assert await source.chunk(6) == SOURCE[6 * CHUNK : 7 * CHUNK]
        assert source.stats.retries == 2 and source.stats.failed == 0


@pytest.mark.parametrize("action", ["gzip", "range_end_off", "wrong_range"])
async def test_a_fault_in_a_refused_answer_reads_none_of_it(
    http_server: HttpObjectServer, lab: Lab, action: str
) -> None:
    """A gzip-encoded 206, or one whose Content-Range is not the range asked (the
    refusals themselves: ``test_http_source``), copies nothing into the process."""
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        async with restoring(lab, source, on_error=REFUSED) as (region, server):
            http_server.queue(action)
            assert (await read_pages(lab, region, [5]))[5] == ZERO
            assert server.stats.errors == 1 and source.stats.retries == 0
            assert (await read_pages(lab, region, [6]))[6] == page(6)
    assert [e["action"] for e in object_requests(http_server)].count(action) == 1


async def test_every_request_asks_for_the_bytes_as_they_are(
    http_server: HttpObjectServer,
) -> None:
    """``Accept-Encoding: identity``: httpx would offer gzip, and a server that compresses
    on request would answer with ranges of the compressed representation."""
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        await source.chunk(1)
        await source.read(10, 20)
    requests = object_requests(http_server)
    assert len(requests) == 3
    assert {entry["accept_encoding"] for entry in requests} == {"identity"}


async def test_the_last_shorter_chunk(http_server: HttpObjectServer, lab: Lab) -> None:
    pages = 2 * PER_CHUNK + PER_CHUNK // 2  # two and a half chunks
    data = SOURCE[: pages * P]
    http_server.put("snap", data)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        assert source.chunk_count == 3
        assert await source.read(len(data) - 10, 10) == data[-10:]
        async with restoring(lab, source, pages, on_error=REFUSED) as (region, server):
            assert (await read_pages(lab, region, [pages - 1]))[pages - 1] == page(pages - 1)
            assert server.stats.errors == 0
    last = [entry for entry in object_requests(http_server) if entry["start"] == 2 * CHUNK]
    assert [(entry["stop"], entry["status"]) for entry in last] == [(len(data), 206)]


# -- the object replaced under a restore ------------------------------------------------


@pytest.mark.parametrize("changed", ["etag", "size", "last-modified"])
async def test_a_lax_server_serving_a_replaced_object_is_refused(
    http_server: HttpObjectServer, lab: Lab, changed: str
) -> None:
    """The server ignores If-Match/If-Unmodified-Since and answers 206 with the new
    object; one validator differs each time, and that one must be enough."""
    http_server.preconditions(False)
    http_server.etag(changed == "etag")
    path = http_server.put("snap", SOURCE)
    mtime = os.stat(path).st_mtime
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        async with restoring(lab, source, on_error=REFUSED) as (region, server):
            assert (await read_pages(lab, region, [1]))[1] == page(1)
            new = bytes(reversed(SOURCE))
            if changed == "etag":  # same size and mtime, a new inode
                swap(http_server, new, mtime)
            elif changed == "size":  # same bytes and mtime, one page more
                swap(http_server, SOURCE + page(0), mtime)
            else:  # same size, a later mtime
                swap(http_server, new, mtime + 5)
            with anyio.fail_after(TIMEOUT):
                got = await read_pages(lab, region, [PER_CHUNK + 1])
            assert got[PER_CHUNK + 1] == ZERO, "a page of the new object was served"
            assert server.stats.errors == 1
        with pytest.raises(ua.SourceChanged) as caught:
            await source.chunk(4)
    assert caught.value.status == 206  # the server said nothing: the client saw it
    words = {"etag": "ETag is now", "size": "bytes, not", "last-modified": "Last-Modified"}
    assert words[changed] in str(caught.value)
    assert served_chunks(http_server) == [0, 1], "a request was sent after the change"


async def test_an_older_file_of_the_same_size_swapped_in_without_etags(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    """``mv``/``rsync -a`` of an older file under a server with ETags off (nginx
    ``etag off``): If-Unmodified-Since holds (the new file is older), so the server
    answers 206 with the other file's bytes. Last-Modified tells them apart."""
    http_server.etag(False)
    path = http_server.put("snap", SOURCE)
    mtime = os.stat(path).st_mtime
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        assert (source.validator or "").startswith("If-Unmodified-Since")
        async with restoring(lab, source, on_error=REFUSED) as (region, server):
            assert (await read_pages(lab, region, [2]))[2] == page(2)
            swap(http_server, bytes(reversed(SOURCE)), mtime - 86400)
            got = await read_pages(lab, region, [3 * PER_CHUNK])
            assert got[3 * PER_CHUNK] == ZERO, "the older file's bytes were served"
            assert server.stats.errors == 1
        with pytest.raises(ua.SourceChanged, match="Last-Modified"):
            await source.chunk(5)
    last = object_requests(http_server)[-1]
    assert last["if_unmodified_since"] and last["status"] == 206  # the server saw no change
    assert served_chunks(http_server) == [0, 3]


async def test_weak_etags_still_restore(http_server: HttpObjectServer, lab: Lab) -> None:
    """A weak ETag cannot go in If-Match (a strong comparison: it never matches), so
    requests carry If-Unmodified-Since, and each answer's weak ETag is compared."""
    http_server.etag(True, weak=True)
    path = http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        assert (source.validator or "").startswith("If-Unmodified-Since")
        async with restoring(lab, source, on_error=REFUSED) as (region, server):
            pages = [0, 40, 100, 300, 511]
            got = await read_pages(lab, region, pages)
            assert all(got[number] == page(number) for number in pages)
            assert server.stats.errors == 0
            # Same size and mtime (If-Unmodified-Since holds), a new inode: a new weak tag.
            swap(http_server, bytes(reversed(SOURCE)), os.stat(path).st_mtime)
            assert (await read_pages(lab, region, [200]))[200] == ZERO
            assert server.stats.errors == 1
    requests = object_requests(http_server)
    assert all(entry["if_match"] is None for entry in requests)
    assert all(entry["if_unmodified_since"] for entry in requests[1:])


async def test_a_fetch_queued_when_the_object_changes_is_never_sent(
    http_server: HttpObjectServer,
) -> None:
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK, concurrency=1) as source:
        http_server.queue("replace")  # the first fetch meets a replaced object: 412
        http_server.delay(100)
        errors: list[BaseException] = []

        async def fetch(index: int) -> None:
            try:
                await source.chunk(index)
            except ua.SourceChanged as exc:
                errors.append(exc)

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(fetch, 1)
                while not source.stats.in_flight:
                    await anyio.sleep(0.002)
                tg.start_soon(fetch, 2)
                tg.start_soon(fetch, 3)
        assert len(errors) == 3
    assert [entry["status"] for entry in object_requests(http_server)] == [206, 412]


async def test_the_object_replaced_after_open_with_a_later_mtime(
    http_server: HttpObjectServer,
) -> None:
    """The honest server's answer: 412 to If-Unmodified-Since (no ETags)."""
    http_server.etag(False)
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        swap(http_server, bytes(reversed(SOURCE)), time.time() + 5)
        with pytest.raises(ua.SourceChanged) as caught:
            await source.chunk(0)
        assert caught.value.status == 412
