"""The host chunk cache (``_remote._chunk_cache``): real files, real processes.

What is checked where it costs: chunks read back verified or not at all (a flipped
byte, a truncation, a file of another key), the exact order of evictions and the bound,
a restart with a smaller bound, the one fetch of a chunk many processes miss at once
(counted in a file every fetcher appends to), a fetcher killed mid-fetch, and
filesystems that are full or read-only (tmpfs mounts, as root).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from uffd_async._core._errors import InvalidArgument
from uffd_async._remote import _chunk_cache_format as fmt
from uffd_async._remote._chunk_cache import HostChunkCache
from uffd_async._remote._chunk_cache_format import HEADER_SIZE, CacheLayoutError, ChunkKey

from ._cache_peer import KEY, chunk_bytes, fill_key
from ._processes import read_until
from ._support import TIMEOUT
from .conftest import is_root

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[1]
SMALL = 4096
#: The size of one file holding a SMALL chunk: what the bound counts.
FILE = HEADER_SIZE + SMALL


def key(index: int, version: str = "v1", chunk_size: int = SMALL) -> ChunkKey:
    return ChunkKey(object="s3://bucket/snap", version=version, chunk_size=chunk_size, index=index)


def stored(cache: HostChunkCache, indexes: range) -> list[int]:
    """Which of ``indexes`` have a file (no touch, no verification)."""
    return [i for i in indexes if key(i) in cache]


def files(directory: Path) -> list[Path]:
    return sorted(p for p in (directory / "chunks").rglob("*") if p.is_file())


def read(cache: HostChunkCache, k: ChunkKey) -> bytes | None:
    view = cache.get(k)
    if view is None:
        return None
    with view:
        return bytes(view)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[HostChunkCache]:
    with HostChunkCache(tmp_path / "cache", 64 * FILE) as cache:
        yield cache


# -- hits, misses, versions ------------------------------------------------------------


def test_a_stored_chunk_is_read_back_verified_and_read_only(cache: HostChunkCache) -> None:
    assert cache.get(key(0)) is None
    assert cache.put(key(0), chunk_bytes(key(0)))
    view = cache.get(key(0))
    assert view is not None
    assert view.readonly and bytes(view) == chunk_bytes(key(0))
    view.release()
    assert (cache.stats.hits, cache.stats.misses, cache.stats.stored) == (1, 1, 1)


def test_a_short_last_chunk_and_an_empty_one(cache: HostChunkCache) -> None:
    assert cache.put(key(1), b"tail")
    assert cache.put(key(2), b"")
    assert read(cache, key(1)) == b"tail"
    assert read(cache, key(2)) == b""


def test_a_view_outlives_the_eviction_of_its_file(tmp_path: Path) -> None:
    with HostChunkCache(tmp_path, 2 * FILE) as cache:
        cache.put(key(0), chunk_bytes(key(0)))
        view = cache.get(key(0))
        assert view is not None
        cache.put(key(1), chunk_bytes(key(1)))
        cache.put(key(2), chunk_bytes(key(2)))
        assert key(0) not in cache
        assert bytes(view) == chunk_bytes(key(0))
        view.release()


def test_another_version_or_chunk_size_is_another_chunk(cache: HostChunkCache) -> None:
    old, new = key(3, "etag-1"), key(3, "etag-2")
    other_size = key(3, "etag-1", chunk_size=2 * SMALL)
    cache.put(old, b"A" * SMALL)
    assert cache.get(new) is None
    assert cache.get(other_size) is None
    cache.put(new, b"B" * SMALL)
    assert read(cache, old) == b"A" * SMALL  # both versions kept, each under its own key
    assert read(cache, new) == b"B" * SMALL


def test_a_file_of_another_key_under_this_keys_name_is_never_returned(
    cache: HostChunkCache,
) -> None:
    cache.put(key(4, "v1"), b"1" * SMALL)
    cache.put(key(4, "v2"), b"2" * SMALL)
    os.replace(cache.path_of(key(4, "v1")), cache.path_of(key(4, "v2")))
    assert cache.get(key(4, "v2")) is None
    assert cache.stats.damaged == 1
    assert not os.path.exists(cache.path_of(key(4, "v2")))


# -- damage ---------------------------------------------------------------------------


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize(
    "offset",
    [0, 8, 12, 16, 20, 28, 44, HEADER_SIZE, HEADER_SIZE + SMALL // 2, HEADER_SIZE + SMALL - 1],
    ids=[
        "magic",
        "layout",
        "check-kind",
        "key-length",
        "length",
        "digest",
        "key",
        "data-first",
        "data-mid",
        "data-last",
    ],
)
def test_a_flipped_bit_is_a_miss_and_the_file_goes(cache: HostChunkCache, offset: int) -> None:
    cache.put(key(5), chunk_bytes(key(5)))
    flip(cache.path_of(key(5)), offset)
    assert cache.get(key(5)) is None
    assert (cache.stats.damaged, cache.stats.misses) == (1, 1)
    assert key(5) not in cache
    assert cache.put(key(5), chunk_bytes(key(5)))
    assert read(cache, key(5)) == chunk_bytes(key(5))


def set_check_kind(path: str, kind: int) -> None:
    with open(path, "r+b") as file:
        file.seek(12)
        file.write(kind.to_bytes(4, "little"))


def check_kind(path: str) -> int:
    with open(path, "rb") as file:
        file.seek(12)
        return int.from_bytes(file.read(4), "little")


def test_files_carry_xxh3_when_xxhash_is_installed(cache: HostChunkCache) -> None:
    assert fmt.can_check(fmt.XXH3_128)  # the test extra installs xxhash
    cache.put(key(1), chunk_bytes(key(1)))
    assert check_kind(cache.path_of(key(1))) == fmt.XXH3_128
    assert read(cache, key(1)) == chunk_bytes(key(1))


@pytest.mark.parametrize("kind", [fmt.BLAKE2B_128, fmt.XXH3_128])
def test_a_digest_read_as_the_other_kind_is_a_miss(cache: HostChunkCache, kind: int) -> None:
    with pytest.MonkeyPatch.context() as patch:
        if kind == fmt.BLAKE2B_128:
            patch.setattr(fmt, "xxhash", None)
        cache.put(key(2), chunk_bytes(key(2)))
    path = cache.path_of(key(2))
    assert check_kind(path) == kind
    set_check_kind(path, fmt.BLAKE2B_128 + fmt.XXH3_128 - kind)
    assert cache.get(key(2)) is None
    assert cache.stats.damaged == 1 and key(2) not in cache


def test_without_xxhash_files_carry_blake2b_and_every_kind_is_read_that_can_be(
    cache: HostChunkCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache.put(key(3), chunk_bytes(key(3)))  # xxh3, while xxhash is there
    monkeypatch.setattr(fmt, "xxhash", None)
    cache.put(key(4), chunk_bytes(key(4)))
    assert check_kind(cache.path_of(key(4))) == fmt.BLAKE2B_128
    assert read(cache, key(4)) == chunk_bytes(key(4))
    assert cache.get(key(3)) is None  # an xxh3 file this process cannot check: a miss
    assert cache.stats.damaged == 1 and key(3) not in cache
    monkeypatch.undo()
    assert read(cache, key(4)) == chunk_bytes(key(4))  # blake2b, read where xxh3 is written
    assert cache.stats.hits == 2


def layout_1_directory(top: Path, chunks: int) -> None:
    """A directory as layout 1 left it: its layout file, a lock, chunk files."""
    top.mkdir(mode=0o700)
    (top / "layout").write_text("uffd_async host chunk cache\nlayout 1\n")
    (top / "lock").write_bytes((chunks * FILE).to_bytes(8, "little"))
    for n in range(chunks):
        shard = top / "chunks" / f"{n:02x}"
        shard.mkdir(parents=True, exist_ok=True)
        (shard / ("0" * 30)).write_bytes(bytes(FILE))


def test_a_layout_1_directory_is_taken_over_its_chunks_dropped(tmp_path: Path) -> None:
    top = tmp_path / "cache"
    layout_1_directory(top, 3)
    with HostChunkCache(top, 64 * FILE) as cache:
        assert (top / "layout").read_text() == fmt.LAYOUT_TEXT
        assert files(top) == []
        assert cache.get(key(1)) is None and cache.stats.damaged == 0
        assert cache.put(key(1), chunk_bytes(key(1)))
        assert read(cache, key(1)) == chunk_bytes(key(1))
        assert int.from_bytes((top / "lock").read_bytes()[:8], "little") == FILE
    with HostChunkCache(top, 64 * FILE) as cache:  # now a directory of this layout
        assert read(cache, key(1)) == chunk_bytes(key(1))


@pytest.mark.parametrize("size", [0, HEADER_SIZE - 1, HEADER_SIZE, FILE - 1, FILE + 1])
def test_a_truncated_or_extended_file_is_a_miss(cache: HostChunkCache, size: int) -> None:
    cache.put(key(6), chunk_bytes(key(6)))
    os.truncate(cache.path_of(key(6)), size)
    assert cache.get(key(6)) is None
    assert cache.stats.damaged == 1
    assert key(6) not in cache


async def test_a_damaged_file_is_fetched_again(cache: HostChunkCache) -> None:
    fetched: list[int] = []

    async def fetch() -> bytes:
        fetched.append(1)
        return chunk_bytes(key(8))

    cache.put(key(8), chunk_bytes(key(8)))
    flip(cache.path_of(key(8)), HEADER_SIZE + 100)
    view = await cache.fetch(key(8), fetch)
    assert bytes(view) == chunk_bytes(key(8))
    view.release()
    assert fetched == [1]
    assert read(cache, key(8)) == chunk_bytes(key(8))  # stored again, whole


# -- the bound -------------------------------------------------------------------------


def test_evictions_follow_least_recent_use_exactly(tmp_path: Path) -> None:
    with HostChunkCache(tmp_path, 3 * FILE) as cache:
        for i in (0, 1, 2):
            cache.put(key(i), chunk_bytes(key(i)))
        assert read(cache, key(0)) is not None  # 0 is now the most recent: 1 goes first
        steps = []
        for new, touch in ((3, None), (4, 3), (5, None), (6, None)):
            cache.put(key(new), chunk_bytes(key(new)))
            steps.append(stored(cache, range(7)))
            if touch is not None:
                assert read(cache, key(touch)) is not None
        assert steps == [[0, 2, 3], [0, 3, 4], [3, 4, 5], [3, 5, 6]]  # 3, touched, outlives 4
        assert cache.stats.evicted == 4
        assert sum(p.stat().st_size for p in files(tmp_path)) == 3 * FILE


def test_a_cache_with_room_for_one_chunk_keeps_one(tmp_path: Path) -> None:
    with HostChunkCache(tmp_path, FILE) as cache:
        cache.put(key(0), chunk_bytes(key(0)))
        assert stored(cache, range(2)) == [0]
        cache.put(key(1), chunk_bytes(key(1)))
        assert stored(cache, range(2)) == [1]


def test_storing_a_chunk_again_counts_it_once(tmp_path: Path) -> None:
    with HostChunkCache(tmp_path, 2 * FILE) as cache:
        cache.put(key(0), chunk_bytes(key(0)))
        cache.put(key(1), chunk_bytes(key(1)))
        cache.put(key(1), chunk_bytes(key(1)))  # replaces its file: no eviction needed
        assert stored(cache, range(2)) == [0, 1]
        assert cache.stats.evicted == 0


def test_a_chunk_bigger_than_the_cache_is_not_stored_and_evicts_nothing(tmp_path: Path) -> None:
    with HostChunkCache(tmp_path, 2 * FILE) as cache:
        cache.put(key(0), chunk_bytes(key(0)))
        big = key(1, chunk_size=4 * SMALL)  # a file of 5 pages, in a cache of 4
        assert not cache.put(big, b"x" * 4 * SMALL)
        assert stored(cache, range(1)) == [0] and big not in cache


def test_a_restart_with_a_smaller_bound_evicts_the_oldest_at_open(tmp_path: Path) -> None:
    with HostChunkCache(tmp_path, 8 * FILE) as cache:
        for i in range(5):
            cache.put(key(i), chunk_bytes(key(i)))
        assert read(cache, key(1)) is not None
    with HostChunkCache(tmp_path, 2 * FILE) as cache:
        assert stored(cache, range(5)) == [1, 4]
        assert cache.stats.evicted == 3
        cache.put(key(5), chunk_bytes(key(5)))
        assert stored(cache, range(6)) == [1, 5]  # 1 was read after 4 was stored


def test_the_cache_reopens_with_what_it_held(tmp_path: Path) -> None:
    with HostChunkCache(tmp_path, 8 * FILE) as cache:
        cache.put(key(0), chunk_bytes(key(0)))
    with HostChunkCache(tmp_path, 8 * FILE) as cache:
        assert read(cache, key(0)) == chunk_bytes(key(0))
        assert cache.stats.evicted == 0


def test_a_crashed_writers_leftovers_are_cleaned_at_open(tmp_path: Path) -> None:
    with HostChunkCache(tmp_path, 8 * FILE) as cache:
        cache.put(key(0), chunk_bytes(key(0)))
        shard = Path(cache.path_of(key(0))).parent
    old = shard / ".x.0000.partial"
    new = shard / ".y.0000.partial"
    old.write_bytes(b"half")
    new.write_bytes(b"half")
    day_ago = time.time_ns() - 86400 * 10**9
    os.utime(old, ns=(day_ago, day_ago))
    with HostChunkCache(tmp_path, 8 * FILE):
        assert not old.exists() and new.exists()  # the new one may be a live writer's


def test_processes_filling_at_once_stay_within_the_bound(tmp_path: Path) -> None:
    bound = 10 * FILE
    HostChunkCache(tmp_path, bound).close()
    peers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests._cache_peer",
                "fill",
                str(tmp_path),
                str(bound),
                str(i * 25),
                "25",
            ],
            cwd=ROOT,
            env=peer_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(4)
    ]
    for peer in peers:
        out, err = peer.communicate(timeout=TIMEOUT * 3)
        assert peer.returncode == 0 and out == b"filled\n", err.decode()
    sizes = [p.stat().st_size for p in files(tmp_path)]
    assert sum(sizes) <= bound and len(sizes) >= 1
    with HostChunkCache(tmp_path, bound) as cache:
        assert cache.stats.evicted == 0  # the count each process kept was right
        survivors = [i for i in range(100) if fill_key(i) in cache]
        for i in survivors:
            view = cache.get(fill_key(i))
            assert view is not None and bytes(view) == chunk_bytes(fill_key(i))
            view.release()


# -- the directory ----------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277], ids=oct)
def test_the_directory_is_0700_and_every_file_0600(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        with HostChunkCache(tmp_path / "cache", 8 * FILE) as cache:
            cache.put(key(0), chunk_bytes(key(0)))
    finally:
        os.umask(old)
    top = tmp_path / "cache"
    directories = [top, top / "chunks", top / "claims", Path(cache.path_of(key(0))).parent]
    assert {oct(stat.S_IMODE(d.stat().st_mode)) for d in directories} == {"0o700"}
    every_file = [top / "layout", top / "lock", *files(top)]
    assert {oct(stat.S_IMODE(f.stat().st_mode)) for f in every_file} == {"0o600"}


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    for bound in (0, -1, HEADER_SIZE):
        with pytest.raises(InvalidArgument, match="max_bytes"):
            HostChunkCache(tmp_path, bound)
    with pytest.raises(TypeError, match="max_bytes"):
        HostChunkCache(tmp_path, True)
    with pytest.raises(TypeError, match="max_bytes"):
        HostChunkCache(tmp_path, "1000000")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="directory must be a path"):
        HostChunkCache(3, FILE * 2)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="NUL"):
        HostChunkCache(str(tmp_path) + "/a\0b", FILE * 2)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(InvalidArgument, match="not a directory"):
        HostChunkCache(tmp_path / "file", FILE * 2)
    with pytest.raises(InvalidArgument, match="mode"):
        HostChunkCache(tmp_path / "c", FILE * 2, mode=0o777)
    with pytest.raises(InvalidArgument, match="claim_timeout"):
        HostChunkCache(tmp_path / "c", FILE * 2, claim_timeout=0)


def test_bad_keys_and_oversized_puts_are_refused(cache: HostChunkCache) -> None:
    bad = [
        ChunkKey(object="", version="v", chunk_size=1, index=0),
        ChunkKey(object="o", version="", chunk_size=1, index=0),
        ChunkKey(object="o", version="v", chunk_size=0, index=0),
        ChunkKey(object="o", version="v", chunk_size=1, index=-1),
        ChunkKey(object="o" * HEADER_SIZE, version="v", chunk_size=1, index=0),
    ]
    for k in bad:
        with pytest.raises(InvalidArgument):
            cache.get(k)
    with pytest.raises(InvalidArgument, match="bytes for a chunk of"):
        cache.put(key(0), b"x" * (SMALL + 1))


def test_a_directory_of_another_layout_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "layout").write_text("uffd_async host chunk cache\nlayout 3\n")
    (tmp_path / "chunks").mkdir()
    with pytest.raises(CacheLayoutError, match=rf"{tmp_path}.*layout '3'"):
        HostChunkCache(tmp_path, 8 * FILE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunks", "layout"]


def test_a_directory_that_is_not_a_cache_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "precious").write_bytes(b"x" * 3 * FILE)
    with pytest.raises(CacheLayoutError, match="no 'layout' file"):
        HostChunkCache(tmp_path, FILE * 2)
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]


def test_a_world_writable_directory_is_refused(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o777)
    with pytest.raises(InvalidArgument, match="world-writable"):
        HostChunkCache(tmp_path, FILE * 2)


# -- fetching: one process fetches, the others wait for its file -------------------------


async def test_a_miss_is_fetched_once_and_stored(cache: HostChunkCache) -> None:
    calls: list[int] = []

    async def fetch() -> bytes:
        calls.append(1)
        return chunk_bytes(key(9))

    for _ in range(3):
        view = await cache.fetch(key(9), fetch)
        assert bytes(view) == chunk_bytes(key(9))
        view.release()
    assert calls == [1]
    assert (cache.stats.fetched, cache.stats.hits) == (1, 2)


async def test_a_failed_fetch_frees_the_claim_at_once(cache: HostChunkCache) -> None:
    async def failing() -> bytes:
        raise OSError("the network is down")

    async def working() -> bytes:
        return chunk_bytes(key(10))

    with pytest.raises(OSError, match="network is down"):
        await cache.fetch(key(10), failing)
    with anyio.fail_after(1):
        view = await cache.fetch(key(10), working)
    view.release()
    assert cache.stats.waited == 0


async def test_a_stale_claim_file_does_not_block(cache: HostChunkCache) -> None:
    name = hashlib.blake2b(key(11).encoded(), digest_size=16).hexdigest()
    # A crashed fetcher's claim: the file is there, nobody holds its lock.
    Path(cache.directory, "claims", name).write_text("12345\n")

    async def fetch() -> bytes:
        return chunk_bytes(key(11))

    with anyio.fail_after(1):
        view = await cache.fetch(key(11), fetch)
    view.release()
    assert cache.stats.waited == 0
    assert not Path(cache.directory, "claims", name).exists()


async def test_where_no_claim_can_be_made_a_miss_is_fetched_without_waiting(
    cache: HostChunkCache,
) -> None:
    claims = Path(cache.directory, "claims")
    claims.rmdir()
    claims.write_bytes(b"")  # claims/NAME is now ENOTDIR: no claim can be made

    async def fetch() -> bytes:
        return chunk_bytes(key(14))

    with anyio.fail_after(2):  # far below the claim timeout
        view = await cache.fetch(key(14), fetch)
    assert bytes(view) == chunk_bytes(key(14))
    view.release()
    assert (cache.stats.fetched, cache.stats.waited, cache.stats.write_errors) == (1, 0, 1)
    assert read(cache, key(14)) == chunk_bytes(key(14))  # stored all the same


async def test_two_handles_missing_together_fetch_once(tmp_path: Path) -> None:
    calls: list[int] = []

    async def fetch() -> bytes:
        calls.append(1)
        await anyio.sleep(0.2)
        return chunk_bytes(key(12))

    results: list[bytes] = []

    async def one(cache: HostChunkCache) -> None:
        view = await cache.fetch(key(12), fetch)
        results.append(bytes(view))
        view.release()

    with HostChunkCache(tmp_path, 8 * FILE) as a, HostChunkCache(tmp_path, 8 * FILE) as b:
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(one, a)
                tg.start_soon(one, b)
        assert a.stats.waited + b.stats.waited == 1
    assert calls == [1]
    assert results == [chunk_bytes(key(12))] * 2


async def test_a_hung_fetcher_is_taken_over_after_the_claim_timeout(tmp_path: Path) -> None:
    release = anyio.Event()
    claimed = anyio.Event()

    async def hanging() -> bytes:
        claimed.set()
        await release.wait()
        return chunk_bytes(key(13))

    async def quick() -> bytes:
        return chunk_bytes(key(13))

    with (
        HostChunkCache(tmp_path, 8 * FILE) as holder,
        HostChunkCache(tmp_path, 8 * FILE, claim_timeout=0.3) as waiter,
    ):
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder.fetch, key(13), hanging)
            await claimed.wait()
            started = time.monotonic()
            with anyio.fail_after(TIMEOUT):
                view = await waiter.fetch(key(13), quick)
            took = time.monotonic() - started
            assert bytes(view) == chunk_bytes(key(13))
            view.release()
            release.set()
        assert 0.3 <= took < 0.3 + 2
        assert waiter.stats.took_over == 1 and waiter.stats.fetched == 1


# -- processes racing on one chunk ---------------------------------------------------------


def peer_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")


@contextlib.contextmanager
def peers(
    directory: Path, count_file: Path, count: int, *extra: str
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` fetch peers, each ready (cache open) when this yields; killed after."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(count):
            backend = ("asyncio", "trio")[i % 2]
            started.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests._cache_peer",
                        "fetch",
                        str(directory),
                        str(count_file),
                        backend,
                        *extra,
                    ],
                    cwd=ROOT,
                    env=peer_env(),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            )
        for peer in started:
            assert peer.stdout is not None
            read_until(peer.stdout, b"ready\n")
        yield started
    finally:
        for peer in started:
            if peer.poll() is None:
                peer.kill()
            peer.communicate(timeout=TIMEOUT)


def go(peer: subprocess.Popen[bytes]) -> None:
    assert peer.stdin is not None
    peer.stdin.write(b"go\n")
    peer.stdin.flush()


def result(peer: subprocess.Popen[bytes]) -> list[str]:
    """What the peer printed after ``digest`` (it may print ``fetching`` first)."""
    assert peer.stdout is not None
    seen = b""
    while not re.search(rb"digest [^\n]*\n", seen):
        seen += read_until(peer.stdout, b"\n", TIMEOUT * 2)
    return seen.split(b"digest ", 1)[1].split(b"\n", 1)[0].decode().split()


def expected_result() -> list[str]:
    data = chunk_bytes(KEY)
    return [hashlib.blake2b(data).hexdigest(), str(len(data)), "took_over", "0"]


def fetches(count_file: Path) -> list[str]:
    return count_file.read_text().split() if count_file.exists() else []


@pytest.mark.parametrize("count", [2, 8])
def test_processes_missing_one_chunk_together_fetch_it_once(tmp_path: Path, count: int) -> None:
    directory, count_file = tmp_path / "cache", tmp_path / "fetches"
    HostChunkCache(directory, 64 << 20).close()
    with peers(directory, count_file, count) as started:
        for peer in started:
            go(peer)
        results = [result(peer) for peer in started]
    assert results == [expected_result()] * count
    assert len(fetches(count_file)) == 1  # the issue allows two; the claim gives one
    with HostChunkCache(directory, 64 << 20) as cache:
        assert read(cache, KEY) == chunk_bytes(KEY)


def test_a_fetcher_killed_mid_fetch_is_taken_over_at_once(tmp_path: Path) -> None:
    directory, count_file = tmp_path / "cache", tmp_path / "fetches"
    HostChunkCache(directory, 64 << 20).close()
    with (
        peers(directory, count_file, 1, "--hang") as (doomed,),
        peers(directory, count_file, 1) as (survivor,),
    ):
        go(doomed)
        assert doomed.stdout is not None
        read_until(doomed.stdout, b"fetching\n")
        go(survivor)
        time.sleep(0.3)  # the survivor waits on the claim meanwhile
        assert len(fetches(count_file)) == 1
        doomed.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        got = result(survivor)
        took = time.monotonic() - killed
    assert got == expected_result()  # took_over 0: the claim freed itself, no timeout
    assert took < 5  # a poll interval and the fetch's pause; far below the claim timeout (60 s)
    assert fetches(count_file) == [str(doomed.pid), str(survivor.pid)]


# -- filesystems that refuse -------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted after (root only: skipped otherwise)."""
    if not is_root():
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        timeout=TIMEOUT,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True, timeout=TIMEOUT)


def remount_read_only(mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, timeout=TIMEOUT)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_full_filesystem_makes_misses_logged_once(
    tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    big = 64 << 10
    with HostChunkCache(tmpfs / "cache", 64 << 20) as cache:
        results = [cache.put(key(i, chunk_size=big), b"x" * big) for i in range(24)]
        assert results[0] and not results[-1]
        assert cache.stats.write_errors >= 2
        assert len(warnings_of(caplog)) == 1
        assert "No space left" in warnings_of(caplog)[0]
        assert read(cache, key(0, chunk_size=big)) == b"x" * big
        assert cache.get(key(23, chunk_size=big)) is None

        async def fetch() -> bytes:
            return b"y" * big

        view = await cache.fetch(key(30, chunk_size=big), fetch)  # served, though not kept
        assert bytes(view) == b"y" * big
        view.release()
    leftovers = [p for p in (tmpfs / "cache").rglob("*.partial")]
    assert leftovers == []


async def test_a_read_only_filesystem_serves_what_it_has(
    tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with HostChunkCache(tmpfs / "cache", 64 * FILE) as cache:
        cache.put(key(0), chunk_bytes(key(0)))
        cache.put(key(1), chunk_bytes(key(1)))
    flip(cache.path_of(key(1)), HEADER_SIZE)
    remount_read_only(tmpfs)
    with HostChunkCache(tmpfs / "cache", 64 * FILE) as cache:
        assert cache.usable and not cache.writable
        assert read(cache, key(0)) == chunk_bytes(key(0))
        assert cache.get(key(1)) is None  # damaged: a miss, though it cannot be removed
        assert not cache.put(key(2), chunk_bytes(key(2)))

        async def fetch() -> bytes:
            return chunk_bytes(key(2))

        view = await cache.fetch(key(2), fetch)
        assert bytes(view) == chunk_bytes(key(2))
        view.release()
    assert len([m for m in warnings_of(caplog) if "Read-only" in m]) == 1


def test_a_cache_that_cannot_be_created_is_a_cache_of_misses(
    tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    remount_read_only(tmpfs)
    with HostChunkCache(tmpfs / "cache", 64 * FILE) as cache:
        assert not cache.usable and not cache.writable
        assert cache.get(key(0)) is None
        assert not cache.put(key(0), chunk_bytes(key(0)))
    assert len(warnings_of(caplog)) == 1
    assert "unusable" in warnings_of(caplog)[0]
