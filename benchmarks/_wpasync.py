"""Scenario 4b: write tracking with UFFD_FEATURE_WP_ASYNC, where writers never wait.

The kernel resolves write-protect faults itself, so there is nothing for a C or
plain handler to do: the comparison is with scenario 4's C fault-mode handler
(T=4, wake), from the same run. Each run writes every page once from T threads,
then one ``collect()`` (a PAGEMAP_SCAN that re-protects as it reports) must
return every page, and every page must hold its write.

Both parts are timed: the writes (in C, as in every scenario) and the
``collect()`` (the PAGEMAP_SCAN this scenario is named after). The rate and
"vs C" use their sum, the cost of tracking the pages; the writes alone are
shown too, since a tracker collects once per many writes.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from typing import Any

import anyio

import uffd_async as ua
from uffd_async._core._loops import choose_backend

from ._async import loops_here
from ._c import native
from ._job import Workload


async def _run_once(pages: int, threads: int, source: int) -> tuple[int, int]:
    """One run: (nanoseconds writing, nanoseconds in collect())."""
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
            writing = await anyio.to_thread.run_sync(workload.run)
            began = time.perf_counter_ns()
            dirty = tracker.collect()
            collecting = time.perf_counter_ns() - began
        if len(dirty) != pages:
            raise RuntimeError(f"WP_ASYNC: {len(dirty)} pages collected, {pages} written")
        bad = native().verify(region.address, source, pages, ua.PAGE_SIZE, True)
        if bad >= 0:
            raise RuntimeError(f"WP_ASYNC: page {bad} does not hold its write")
        return writing, collecting


def measure(pages: int, threads: int, rounds: int, source: int) -> list[dict[str, Any]]:
    results = []
    for name, loop in loops_here().items():
        backend, options = choose_backend(loop)
        runs = [
            anyio.run(_run_once, pages, threads, source, backend=backend, backend_options=options)
            for _ in range(rounds)
        ]
        total = statistics.median(writing + collecting for writing, collecting in runs)
        writes = statistics.median(writing for writing, _ in runs)
        results.append(
            {
                "runner": f"uffd_async/{name}",
                "pages": pages,
                "write_ms": writes / 1e6,
                "collect_ms": statistics.median(collecting for _, collecting in runs) / 1e6,
                # writes + collect(): what tracking the pages costs
                "pages_per_s": pages / total * 1e9,
                "writes_pages_per_s": pages / writes * 1e9,
                "samples": [
                    {"write_ns": writing, "collect_ns": collecting} for writing, collecting in runs
                ],
            }
        )
    return results


def wp_async_table(results: list[dict[str, Any]], c_pages_per_s: float | None) -> str:
    lines = [
        "4b. Write tracking with WP_ASYNC + PAGEMAP_SCAN (writers never wait)",
        "   timed: the writes, then one collect() (PAGEMAP_SCAN: report and re-protect);",
        "   vs C: against scenario 4's C fault-mode handler (T=4, wake) in this run",
        f"  {'runner':<20} {'writes ms':>10} {'collect ms':>11} {'pages/s':>10}  {'vs C':>6}"
        f"  {'writes only pages/s':>20}  {'vs C':>6}",
    ]
    for r in results:
        both = r["pages_per_s"]
        writes = r["writes_pages_per_s"]
        ratio = f"{both / c_pages_per_s:6.2f}" if c_pages_per_s else "     -"
        ratio_writes = f"{writes / c_pages_per_s:6.2f}" if c_pages_per_s else "     -"
        lines.append(
            f"  {r['runner']:<20} {r['write_ms']:>10.1f} {r['collect_ms']:>11.1f} "
            f"{both:>10,.0f}  {ratio}  {writes:>20,.0f}  {ratio_writes}"
        )
    return "\n".join(lines)
