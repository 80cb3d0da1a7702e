"""Scenario 4b: write tracking with UFFD_FEATURE_WP_ASYNC, where writers never wait.

The kernel resolves write-protect faults itself, so there is nothing for a C or
plain handler to do: the comparison is with scenario 4's C fault-mode handler
(T=4, wake), from the same run. Each run writes every page once from T threads,
then one ``collect()`` (a PAGEMAP_SCAN that re-protects as it reports) must
return every page, and every page must hold its write.
"""

from __future__ import annotations

import ctypes
import statistics
from typing import Any

import anyio

import uffd_async as ua

from ._c import native
from ._job import Workload


async def _run_once(pages: int, threads: int, source: int) -> tuple[int, int]:
    length = pages * ua.PAGE_SIZE
    with ua.Region.anonymous(length) as region, ua.Userfaultfd.open(ua.Feature.WP_ASYNC) as uffd:
        ctypes.memmove(region.address, source, length)
        workload = Workload(
            address=region.address,
            pages=pages,
            page_size=ua.PAGE_SIZE,
            threads=threads,
            access="mark",
        )
        async with ua.WriteTracker(uffd, region.address, length, mode="async") as tracker:
            elapsed = await anyio.to_thread.run_sync(workload.run)
            dirty = tracker.collect()
        if len(dirty) != pages:
            raise RuntimeError(f"WP_ASYNC: {len(dirty)} pages collected, {pages} written")
        bad = native().verify(region.address, source, pages, ua.PAGE_SIZE, True)
        if bad >= 0:
            raise RuntimeError(f"WP_ASYNC: page {bad} does not hold its write")
        return elapsed, len(dirty)


def measure(pages: int, threads: int, rounds: int, source: int) -> list[dict[str, Any]]:
    results = []
    for backend in ("asyncio", "trio"):
        runs = [
            anyio.run(_run_once, pages, threads, source, backend=backend) for _ in range(rounds)
        ]
        elapsed = statistics.median(ns for ns, _ in runs)
        results.append(
            {
                "runner": f"uffd_async/{backend}",
                "pages": pages,
                "pages_per_s": pages / elapsed * 1e9,
            }
        )
    return results


def wp_async_table(results: list[dict[str, Any]], c_pages_per_s: float | None) -> str:
    lines = [
        "4b. Write tracking with WP_ASYNC + PAGEMAP_SCAN (writers never wait)",
        "   vs C: against scenario 4's C fault-mode handler (T=4, wake) in this run",
        "  runner                 pages/s      vs C",
    ]
    for r in results:
        ratio = f"{r['pages_per_s'] / c_pages_per_s:8.2f}" if c_pages_per_s else "       -"
        lines.append(f"  {r['runner']:<20} {r['pages_per_s']:>10,.0f}  {ratio}")
    return "\n".join(lines)
