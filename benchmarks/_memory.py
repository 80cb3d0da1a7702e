"""Scenario 5: does the server's memory stay flat over a million faults?

The same region is faulted in, dropped with MADV_DONTNEED (no EVENT_REMOVE, so
the kernel sends nothing and every page simply faults again), and faulted in
again, round after round. Resident size is read from /proc/self/statm after
each drop, when the region itself holds no pages, so what remains is the
server's (and the interpreter's); ``sys.getallocatedblocks()`` counts the
Python objects left alive per fault. Both are taken after a warm-up round.
After every round, before the drop, every page is compared with the source
(a distinct pattern per page); a wrong page fails the benchmark. The checks
are not counted in faults/s.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import anyio

import uffd_async as ua
from uffd_async._core._loops import choose_backend

from ._async import loops_here
from ._c import native

PAGES = 16384


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * ua.PAGE_SIZE


async def _churn(faults: int, kind: str, pages: int) -> dict[str, Any]:
    rounds = max(2, faults // pages)
    with ua.Region.anonymous(pages * ua.PAGE_SIZE) as source:
        native().fill_pattern(source.address, pages, ua.PAGE_SIZE)
        with ua.Region.anonymous(source.length) as region, ua.Userfaultfd.open() as uffd:
            uffd.register(region.address, region.length)
            resolver: ua.Resolver | Any
            if kind == "inline":
                resolver = ua.copy_from(source, base=region.address)
            else:

                async def resolver(fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
                    await anyio.lowlevel.checkpoint()
                    uffd.copy(fault.page, source.address + fault.page - region.address, 4096)

            async with ua.FaultServer(uffd, resolver) as server:
                start_rss = start_blocks = 0
                began = checking = 0.0
                for round_ in range(rounds + 1):
                    await anyio.to_thread.run_sync(
                        native().workload_run, region.address, pages, ua.PAGE_SIZE, 4, "read"
                    )
                    checked = time.perf_counter()
                    # In a worker thread: a page the workload left unfilled would fault
                    # here, and the server (this thread's event loop) must answer it.
                    bad = await anyio.to_thread.run_sync(
                        native().verify, region.address, source.address, pages, ua.PAGE_SIZE, False
                    )
                    if bad >= 0:
                        raise RuntimeError(
                            f"scenario 5 ({kind}), round {round_}: page {bad} does not hold "
                            "its source bytes"
                        )
                    checking += time.perf_counter() - checked
                    region.discard(0, region.length)
                    if round_ == 0:  # warm-up: caches, worker tasks, the allocator's arenas
                        start_rss, start_blocks = _rss(), sys.getallocatedblocks()
                        began = time.perf_counter()
                        checking = 0.0
                elapsed = time.perf_counter() - began - checking
                end_rss, end_blocks = _rss(), sys.getallocatedblocks()
                counted = server.stats.faults - pages
    return {
        "resolver": kind,
        "faults": counted,
        "faults_per_s": counted / elapsed,
        "rss_start_mib": start_rss / 2**20,
        "rss_growth_mib": (end_rss - start_rss) / 2**20,
        "blocks_per_fault": (end_blocks - start_blocks) / counted,
    }


def measure(*, quick: bool) -> list[dict[str, Any]]:
    """Inline (C fast path) over 1,000,000 faults; awaiting resolvers over 50,000."""
    plan = [("inline", 4_000 if quick else 1_000_000), ("awaiting", 4_000 if quick else 50_000)]
    pages = 1024 if quick else PAGES
    results = []
    for name, loop in loops_here().items():
        backend, options = choose_backend(loop)
        for kind, faults in plan:
            result = anyio.run(
                _churn, faults, kind, pages, backend=backend, backend_options=options
            )
            results.append({"backend": name, **result})
    return results


def memory_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "5. Memory over many faults",
        "   the same pages faulted in and dropped, round after round; target: growth < 10 MiB",
        "  backend    resolver    faults      faults/s   RSS at start  growth    objects/fault",
    ]
    for r in results:
        lines.append(
            f"  {r['backend']:<10} {r['resolver']:<10} {r['faults']:>9,}"
            f"  {r['faults_per_s']:>10,.0f}"
            f"  {r['rss_start_mib']:>9.1f} MiB  {r['rss_growth_mib']:>+6.2f} MiB"
            f"  {r['blocks_per_fault']:>+10.4f}"
        )
    return "\n".join(lines)
