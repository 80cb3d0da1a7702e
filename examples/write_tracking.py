# What this shows: incremental snapshots from collected dirty pages. Writer
# threads scribble on a region (through ctypes memset, so without the GIL) while
# a WriteTracker records which pages they write. Every few milliseconds the
# program collects the dirty pages and copies just those into its snapshot. At
# the end the snapshot (a full base copy plus every increment) must equal the
# memory exactly.
#
# "fault" mode: each first write to a page waits for the tracker once.
# "async" mode: UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN, writers never wait.
#
# Run it: python examples/write_tracking.py --mode async --backend trio
from __future__ import annotations

import argparse
import random
import threading
import time
from typing import Literal

import anyio

import uffd_async as ua

P = ua.PAGE_SIZE


async def track(mode: Literal["fault", "async"], pages: int, writers: int, writes: int) -> bool:
    feature = ua.Feature.WP_ASYNC if mode == "async" else ua.Feature.WP_UNPOPULATED
    with ua.Region.anonymous(pages * P) as region, ua.Userfaultfd.open(feature) as uffd:
        region.fill(0, region.length, 0x2E)
        snapshot = bytearray(region.read(0, region.length))  # the base snapshot
        increments: list[int] = []

        def writer(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(writes):
                page = rng.randrange(pages)
                region.fill(page * P + rng.randrange(P - 256), 256, rng.randrange(256))

        def take(tracker: ua.WriteTracker) -> None:
            dirty = tracker.collect()
            for page in dirty:
                offset = page - region.address
                snapshot[offset : offset + P] = region.read(offset, P)
            increments.append(len(dirty))

        started = time.perf_counter()
        async with ua.WriteTracker(uffd, region.address, region.length, mode=mode) as tracker:
            threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                take(tracker)
                await anyio.sleep(0.005)
            for thread in threads:
                thread.join()
            take(tracker)  # the last increment
        elapsed = time.perf_counter() - started
        ok = bytes(snapshot) == region.read(0, region.length)
        print(
            f"{mode} mode: {writers} writers x {writes} writes over {pages} pages in "
            f"{elapsed:.2f}s; {len(increments)} increments, {sum(increments)} pages copied "
            f"(a full copy each time would have been {len(increments) * pages})"
        )
        print("snapshot matches memory:", ok)
        return ok


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["fault", "async"], default="fault")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--pages", type=int, default=4096)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--writes", type=int, default=20000)
    args = parser.parse_args()
    ok = anyio.run(track, args.mode, args.pages, args.writers, args.writes, backend=args.backend)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
