# What this shows: restoring memory lazily from object storage. The snapshot is an
# object behind an HTTP(S) URL (S3, GCS, MinIO, presigned or public, or any server that
# answers Range requests). A "program" (a thread in C code: hashlib, which never holds
# the GIL on large buffers) reads scattered parts of it as if it had been restored; each
# fault awaits one Range request for its whole chunk, and every missing page of that
# chunk is copied in when it lands, so the rest of the chunk never faults. Then the
# same parts are fetched again directly, to check every byte the program read.
#
# Run it: python examples/http_restore.py URL [--backend trio] [--chunk-kib 1024]
# (pip install 'uffd_async[http]'). An object that cannot be read (a 404, a 403) is one
# line on stderr and exit status 1: FetchError says the URL (never its query) and why.
from __future__ import annotations

import argparse
import ctypes
import hashlib
import random
import sys
import time

import anyio

import uffd_async as ua

P = ua.PAGE_SIZE
PIECE = 64 * P  # the program reads 256 KiB pieces: large enough for hashlib to drop the GIL


def pieces(size: int) -> list[int]:
    """Where the program reads: 10% of the object, scattered."""
    rng = random.Random(2026)
    return rng.sample(range(0, size - PIECE + 1, PIECE), max(1, size // PIECE // 10))


def program(address: int, offsets: list[int]) -> str:
    """The restored program: hashes its pieces in place (the faults happen inside hashlib)."""
    digest = hashlib.sha256()
    for offset in offsets:
        digest.update(memoryview((ctypes.c_char * PIECE).from_address(address + offset)))
    return digest.hexdigest()


async def main(url: str, chunk_size: int) -> None:
    async with ua.HttpSource(url, chunk_size=chunk_size) as source:
        print(f"object: {source.url}, {source.size:,} bytes, checked by {source.validator}")
        offsets = pieces(source.size)
        size = -(-source.size // P) * P
        with ua.Region.anonymous(size) as memory, ua.Userfaultfd.open() as uffd:
            uffd.register(memory.address, memory.length)
            async with anyio.create_task_group() as tg:
                server = await tg.start(ua.serve, uffd, ua.copy_from(source, base=memory.address))
                started = time.perf_counter()
                digest = await anyio.to_thread.run_sync(program, memory.address, offsets)
                elapsed = time.perf_counter() - started
                tg.cancel_scope.cancel()
        http = source.stats
        print(
            f"restored lazily: {server.stats.faults} faults, {elapsed * 1000:.1f} ms, "
            f"{http.requests} requests ({http.bytes / 2**20:.1f} MiB, {http.retries} retried)"
        )
        direct = hashlib.sha256()
        for offset in offsets:
            direct.update(await source.read(offset, PIECE))
        print(f"every byte the program read matches the object: {digest == direct.hexdigest()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Restore memory lazily from an HTTP object.")
    parser.add_argument("url", help="an http:// or https:// URL that answers Range requests")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--chunk-kib", type=int, default=1024)
    args = parser.parse_args()
    try:
        anyio.run(main, args.url, args.chunk_kib * 1024, backend=args.backend)
    except (ua.FetchError, ua.InvalidArgument) as exc:  # a 404, a 403, a bad URL: one line
        sys.exit(f"cannot restore: {exc}")
