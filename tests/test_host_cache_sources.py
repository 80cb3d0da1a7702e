"""The host chunk cache under a real source: what a second restore on the same host costs,
and that the cache never serves another version's bytes or a damaged file's.

Real faults (threads reading a registered region, without the GIL), the real loopback HTTP
server counting the ranges it served, a real cache directory; the second restore opens a
new source and a new cache object on the same directory, as a restarted server would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import uffd_async as ua

from ._support import TIMEOUT, HttpObjectServer, Lab, source_bytes
from .test_http_source import CHUNK, PAGES, SOURCE, read_pages, restoring, served_chunks

pytestmark = pytest.mark.anyio
P = ua.PAGE_SIZE
BOUND = 64 << 20
TOUCHED = [0, 1, 17, 40, 200, 511]  # pages in 5 chunks of 16 pages


def chunks_of(pages: list[int]) -> set[int]:
    return {page * P // CHUNK for page in pages}


async def restore(
    lab: Lab, http_server: HttpObjectServer, cache_dir: Path, pages: list[int]
) -> tuple[dict[int, bytes], ua.HostCacheStats]:
    """Pages read from a new source over the cache in ``cache_dir``, as a restarted server."""
    with ua.HostChunkCache(cache_dir, BOUND) as cache:
        source = ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK, host_cache=cache)
        async with source, restoring(lab, source) as (region, _server):
            read = await read_pages(lab, region, pages)
        return read, cache.stats


async def test_a_second_restore_fetches_nothing(
    http_server: HttpObjectServer, lab: Lab, tmp_path: Path
) -> None:
    http_server.put("snap", SOURCE)
    read, stats = await restore(lab, http_server, tmp_path / "cache", TOUCHED)
    assert read == {page: SOURCE[page * P : (page + 1) * P] for page in TOUCHED}
    assert sorted(served_chunks(http_server)) == sorted(chunks_of(TOUCHED))
    assert stats.hits == 0

    http_server.reset()
    read, stats = await restore(lab, http_server, tmp_path / "cache", TOUCHED)
    assert read == {page: SOURCE[page * P : (page + 1) * P] for page in TOUCHED}
    assert served_chunks(http_server) == []  # every chunk came from the host cache
    assert stats.hits == len(chunks_of(TOUCHED))


async def test_a_new_version_is_never_served_from_the_cache(
    http_server: HttpObjectServer, lab: Lab, tmp_path: Path
) -> None:
    http_server.put("snap", SOURCE)
    await restore(lab, http_server, tmp_path / "cache", TOUCHED)
    newer = bytes(b ^ 0x5A for b in SOURCE)
    http_server.put("snap", newer)  # a new ETag: every cached chunk is of another version
    http_server.reset()
    read, stats = await restore(lab, http_server, tmp_path / "cache", TOUCHED)
    assert read == {page: newer[page * P : (page + 1) * P] for page in TOUCHED}
    assert sorted(served_chunks(http_server)) == sorted(chunks_of(TOUCHED))
    assert stats.hits == 0


@pytest.mark.parametrize(
    "where",
    [-100, 12, 28],  # from the end: in the data; the header's checksum kind; its checksum
    ids=["data", "header-check-kind", "header-checksum"],
)
async def test_a_damaged_cache_file_is_fetched_again_never_copied(
    http_server: HttpObjectServer, lab: Lab, tmp_path: Path, where: int
) -> None:
    http_server.put("snap", SOURCE)
    await restore(lab, http_server, tmp_path / "cache", TOUCHED)
    files = sorted((tmp_path / "cache" / "chunks").glob("*/*"))
    assert len(files) == len(chunks_of(TOUCHED))
    for path in files:  # one bit flipped in every chunk file
        with open(path, "r+b") as file:
            file.seek(where % os.path.getsize(path))
            byte = file.read(1)
            file.seek(-1, os.SEEK_CUR)
            file.write(bytes([byte[0] ^ 1]))
    http_server.reset()
    read, stats = await restore(lab, http_server, tmp_path / "cache", TOUCHED)
    assert read == {page: SOURCE[page * P : (page + 1) * P] for page in TOUCHED}
    assert sorted(served_chunks(http_server)) == sorted(chunks_of(TOUCHED))
    assert stats.damaged == len(files) and stats.hits == 0


async def test_a_cache_of_the_older_layout_is_taken_over_and_refilled(
    http_server: HttpObjectServer, lab: Lab, tmp_path: Path
) -> None:
    http_server.put("snap", SOURCE)
    await restore(lab, http_server, tmp_path / "cache", TOUCHED)
    layout = tmp_path / "cache" / "layout"
    layout.write_text("uffd_async host chunk cache\nlayout 1\n")  # as layout 1 left it
    http_server.reset()
    read, stats = await restore(lab, http_server, tmp_path / "cache", TOUCHED)
    assert read == {page: SOURCE[page * P : (page + 1) * P] for page in TOUCHED}
    assert sorted(served_chunks(http_server)) == sorted(chunks_of(TOUCHED))
    assert (stats.hits, stats.damaged, stats.stored) == (0, 0, len(chunks_of(TOUCHED)))
    http_server.reset()
    read, stats = await restore(lab, http_server, tmp_path / "cache", TOUCHED)
    assert read == {page: SOURCE[page * P : (page + 1) * P] for page in TOUCHED}
    assert served_chunks(http_server) == [] and stats.hits == len(chunks_of(TOUCHED))


def test_the_cache_directory_is_refused_for_a_file(tmp_path: Path) -> None:
    image = tmp_path / "guest.mem"
    image.write_bytes(source_bytes(4))
    argv = ["serve", str(image), "--socket", str(tmp_path / "s"), "--cache-dir", str(tmp_path)]
    code = f"import sys\nfrom uffd_async.__main__ import main\nsys.exit(main({argv!r}))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 2, result
    assert "--cache-dir: applies only when SNAPSHOT is an http(s):// URL" in result.stderr


def test_keywords_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ua.InvalidArgument, match="host_cache must be a HostChunkCache"):
        ua.HttpSource("http://127.0.0.1:1/x", host_cache=str(tmp_path))  # type: ignore[arg-type]


assert PAGES * P // CHUNK == 32
