# What this shows: memory that fills itself on first touch. Worker threads hash a
# 64 MiB region that starts empty; every page they touch faults, and the main
# thread answers each fault with UFFDIO_COPY from a "snapshot" held elsewhere.
# The workers never hold the GIL while they fault (hashlib releases it on large
# buffers, and Region.read copies through ctypes), which is what lets the handler,
# Python code in the same process, run at all.
#
# Run it: make demo   (or: python examples/demo.py, with uffd_async installed)
from __future__ import annotations

import hashlib
import select
import threading
import time

import uffd_async as ua

PAGES = 16384  # 64 MiB of 4 KiB pages
THREADS = 4
P = ua.PAGE_SIZE


def snapshot_page(index: int) -> bytes:
    seed = hashlib.sha256(index.to_bytes(8, "little")).digest()
    return seed * (P // len(seed))


def main() -> None:
    support = ua.probe()
    if not support.available:
        raise SystemExit(f"userfaultfd is not usable here: {support.reason}")
    snapshot = ua.Region.anonymous(PAGES * P)  # the "remote" copy, filled up front
    for index in range(PAGES):
        snapshot.write(index * P, snapshot_page(index))
    expected = hashlib.sha256(snapshot.read(0, PAGES * P)).hexdigest()

    region = ua.Region.anonymous(PAGES * P)
    uffd = ua.Userfaultfd.open()
    uffd.register(region.address, region.length)
    digests: dict[int, str] = {}
    chunk = PAGES * P // THREADS

    def worker(n: int) -> None:
        # Region.read copies without the GIL; each first touch of a page faults.
        digests[n] = hashlib.sha256(region.read(n * chunk, chunk)).hexdigest()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    faults = 0
    while any(thread.is_alive() for thread in threads):
        if not select.select([uffd], [], [], 0.1)[0]:
            continue
        for event in uffd.read_events():
            if isinstance(event, ua.PageFault):
                offset = event.page - region.address
                try:
                    uffd.copy(event.page, snapshot.address + offset, P)
                except ua.PageExists:
                    uffd.wake(event.page, P)
                faults += 1
    elapsed = time.perf_counter() - started
    for thread in threads:
        thread.join()
    whole = hashlib.sha256(region.read(0, PAGES * P)).hexdigest()
    uffd.close()
    print(f"{faults} faults served in {elapsed:.2f}s ({faults / elapsed:,.0f} faults/s)")
    print(f"{THREADS} threads hashed their chunks: {sorted(digests)}")
    print("contents match the snapshot:", whole == expected)
    region.close()
    snapshot.close()
    if whole != expected:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
