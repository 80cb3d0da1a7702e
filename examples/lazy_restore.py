# What this shows: restoring a memory snapshot lazily. A region starts empty and
# each page is read from the snapshot file the first time anything touches it,
# by a resolver coroutine under anyio (asyncio or trio). Worker threads hash the
# region meanwhile: hashlib releases the GIL on large buffers, so the threads
# fault on registered memory without holding it, and the event loop serves them.
# At the end every byte is checked against the file.
#
# Run it: make demo   (or: python examples/lazy_restore.py --backend trio --size-mib 64)
from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import tempfile
import threading
import time

import anyio

import uffd_async as ua

CHUNK = 1 << 20  # bytes hashed per update: large enough for hashlib to drop the GIL


def make_snapshot(path: str, size: int) -> None:
    with open(path, "wb") as snapshot:
        for _ in range(size // CHUNK):
            snapshot.write(os.urandom(CHUNK))


def hash_range(address: int, length: int) -> str:
    """Hash memory in place: the faults happen inside hashlib, without the GIL."""
    digest = hashlib.sha256()
    for offset in range(0, length, CHUNK):
        view = memoryview((ctypes.c_char * CHUNK).from_address(address + offset))
        digest.update(view)
    return digest.hexdigest()


def hash_file(path: str, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as snapshot:
        snapshot.seek(offset)
        for _ in range(length // CHUNK):
            digest.update(snapshot.read(CHUNK))
    return digest.hexdigest()


async def restore(path: str, size: int, threads: int, readahead: int) -> bool:
    fd = os.open(path, os.O_RDONLY)

    def read_page(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)  # the page cache makes this a memcpy

    with ua.Region.anonymous(size) as region, ua.Userfaultfd.open() as uffd:
        uffd.register(region.address, region.length)
        resolver = ua.copy_from(read_page, base=region.address, size=size, readahead=readahead)
        share = size // threads
        digests: dict[int, str] = {}

        def worker(n: int) -> None:
            digests[n] = hash_range(region.address + n * share, share)

        started = time.perf_counter()
        async with ua.FaultServer(uffd, resolver) as server:
            workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
            for thread in workers:
                thread.start()
            while any(thread.is_alive() for thread in workers):
                await anyio.sleep(0.25)
                stats = server.stats
                elapsed = time.perf_counter() - started
                print(
                    f"  {elapsed:5.2f}s  faults {stats.faults:7,}  "
                    f"({stats.faults / elapsed:9,.0f}/s)  p50 {stats.latency_us(50):6.1f} us"
                )
            for thread in workers:
                thread.join()
        elapsed = time.perf_counter() - started
        os.close(fd)
        expected = {n: hash_file(path, n * share, share) for n in range(threads)}
        ok = digests == expected
        print(
            f"restored {size >> 20} MiB with {server.stats.faults:,} faults "
            f"(readahead {readahead}) in {elapsed:.2f}s; {threads} threads hashed it"
        )
        print("every byte matches the snapshot:", ok)
        return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--readahead", type=int, default=15)
    args = parser.parse_args()
    size = args.size_mib << 20
    support = ua.probe()
    if not support.available:
        raise SystemExit(f"userfaultfd is not usable here: {support.reason}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "snapshot.bin")
        make_snapshot(path, size)
        print(f"snapshot: {size >> 20} MiB at {path}; serving on {args.backend}")
        ok = anyio.run(restore, path, size, args.threads, args.readahead, backend=args.backend)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
