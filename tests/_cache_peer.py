"""A serving process's share of the host chunk cache, for tests/test_host_cache.py.

    python -m tests._cache_peer fetch DIR COUNT_FILE BACKEND [--hang] [--claim-timeout S]
    python -m tests._cache_peer fill DIR MAX_BYTES FIRST COUNT

``fetch``: opens the cache, prints ``ready``, waits for a line on stdin (so that every
peer starts at once), then fetches :data:`KEY` through ``HostChunkCache.fetch`` on
BACKEND (asyncio or trio). Its fetcher appends the pid to COUNT_FILE (one line per
fetch, ``O_APPEND``: a count across processes), prints ``fetching``, and returns
:func:`chunk_bytes` after a pause that lets the others pile up behind it (``--hang``:
never returns, for a test that kills it). Then prints ``digest HEX LENGTH took_over N``.

``fill``: stores chunks FIRST.. FIRST+COUNT-1 of :data:`FILL_KEY`'s object, each
verified after its put, and prints ``filled``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import anyio

from uffd_async._remote._chunk_cache import HostChunkCache
from uffd_async._remote._chunk_cache_format import ChunkKey

CHUNK = 64 << 10
KEY = ChunkKey(
    object="https://objects.test/snapshot.mem", version='"etag-1"', chunk_size=CHUNK, index=7
)
#: How long the fetcher holds its claim: long enough for every peer to miss meanwhile.
FETCH_PAUSE = 0.3


def chunk_bytes(key: ChunkKey, length: int | None = None) -> bytes:
    """The bytes a source would give for ``key``: different for every key."""
    seed = hashlib.blake2b(key.encoded()).digest()
    length = key.chunk_size if length is None else length
    return (seed * (length // len(seed) + 1))[:length]


def fill_key(index: int) -> ChunkKey:
    return ChunkKey(object="s3://bucket/fill", version="v1", chunk_size=4096, index=index)


async def fetch(cache: HostChunkCache, count_file: str, hang: bool) -> bytes:
    async def fetcher() -> bytes:
        fd = os.open(count_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        print("fetching", flush=True)
        if hang:
            await anyio.sleep_forever()
        await anyio.sleep(FETCH_PAUSE)
        return chunk_bytes(KEY)

    return bytes(await cache.fetch(KEY, fetcher))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("fetch")
    one.add_argument("directory")
    one.add_argument("count_file")
    one.add_argument("backend", choices=["asyncio", "trio"])
    one.add_argument("--hang", action="store_true")
    one.add_argument("--claim-timeout", type=float, default=60.0)
    fill = sub.add_parser("fill")
    fill.add_argument("directory")
    fill.add_argument("max_bytes", type=int)
    fill.add_argument("first", type=int)
    fill.add_argument("count", type=int)
    args = parser.parse_args()
    if args.command == "fill":
        with HostChunkCache(args.directory, args.max_bytes) as cache:
            for index in range(args.first, args.first + args.count):
                key = fill_key(index)
                assert cache.put(key, chunk_bytes(key))
                view = cache.get(key)
                assert view is None or bytes(view) == chunk_bytes(key)  # evicted by now: fine
        print("filled", flush=True)
        return
    with HostChunkCache(args.directory, 64 << 20, claim_timeout=args.claim_timeout) as cache:
        print("ready", flush=True)
        sys.stdin.readline()
        data = anyio.run(fetch, cache, args.count_file, args.hang, backend=args.backend)
        digest = hashlib.blake2b(data).hexdigest()
        print(f"digest {digest} {len(data)} took_over {cache.stats.took_over}", flush=True)


if __name__ == "__main__":
    main()
