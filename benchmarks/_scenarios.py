"""The scenarios: what is measured, as data. Running them is ``_run``'s job.

Sizes are chosen so a full run (3 rounds, two baselines) takes well under a
minute on 2 cores, and ``quick`` so the smoke test takes a few seconds; the
serial 1 ms "slow source" is sized by its page count, since a serial handler
needs a millisecond per page whatever the machine.
"""

from __future__ import annotations

import attrs

from ._job import Access, Mode

SLOW_US = 1000  # scenario 3: one page fetch takes 1 ms
SLOW_THREADS = 64  # ... with 64 threads faulting at once
ASYNC_LIMIT = 64  # the concurrency an async server would use for it


@attrs.frozen(kw_only=True)
class Case:
    """One measured configuration: every runner runs it, alternately, each round."""

    label: str
    mode: Mode
    pages: int
    threads: int
    access: Access
    readahead: int = 0
    slow_us: int = 0
    wake_separately: bool = False


@attrs.frozen(kw_only=True)
class Scenario:
    """A titled group of cases; ``skipped`` says why a scenario has none yet."""

    key: str
    title: str
    note: str
    cases: tuple[Case, ...]
    skipped: str | None = None


def scenarios(*, quick: bool) -> tuple[Scenario, ...]:
    """All scenarios, full-size or ``quick``."""
    pages = 1024 if quick else 65536
    slow_pages = SLOW_THREADS * (1 if quick else 8)
    ideal = ASYNC_LIMIT * 1_000_000 // SLOW_US
    return (
        Scenario(
            key="1",
            title="Lazy population from memory",
            note="MISSING, one UFFDIO_COPY per fault; threads read each page once",
            cases=tuple(
                Case(label=f"T={t}", mode="missing", pages=pages, threads=t, access="read")
                for t in (1, 4, 16)
            ),
        ),
        Scenario(
            key="2",
            title="Lazy population with readahead 16",
            note="MISSING, each fault copies its page and up to 16 following ones in one ioctl",
            cases=tuple(
                Case(
                    label=f"T={t}",
                    mode="missing",
                    pages=pages,
                    threads=t,
                    access="read",
                    readahead=16,
                )
                for t in (1, 4, 16)
            ),
        ),
        Scenario(
            key="3",
            title="Slow source (1 ms per page fetch)",
            note=(
                f"{SLOW_THREADS} threads fault at once; the C and plain Python handlers fetch "
                f"serially (~1,000 pages/s); an async server with limit {ASYNC_LIMIT} could "
                f"reach {ideal:,} pages/s"
            ),
            cases=(
                Case(
                    label=f"T={SLOW_THREADS}",
                    mode="missing",
                    pages=slow_pages,
                    threads=SLOW_THREADS,
                    access="read",
                    slow_us=SLOW_US,
                ),
            ),
        ),
        Scenario(
            key="4",
            title="Write tracking",
            note=(
                "populated pages write-protected (WP), threads write each page once, the "
                "handler unprotects each fault; every written page must be reported"
            ),
            cases=tuple(
                Case(
                    label=f"T={t} {'dontwake+wake' if separately else 'wake'}",
                    mode="wp",
                    pages=pages,
                    threads=t,
                    access="mark",
                    wake_separately=separately,
                )
                for t in (4,)
                for separately in (False, True)
            ),
        ),
        Scenario(
            key="5",
            title="Memory over many faults",
            note="the server's resident size over 1,000,000 faults (benchmarks/_memory.py)",
            cases=(),
        ),
        Scenario(
            key="6",
            title="Restore to ready",
            note=(
                "a process hands its uffd over as Firecracker does and touches a boot-like "
                "working set; lazy, readahead, prefetch, REAP-style, eager, against the floor "
                "(the set copied alone), and on zero-heavy snapshots (benchmarks/_restore.py)"
            ),
            cases=(),
        ),
        Scenario(
            key="7",
            title="Restore from object storage",
            note=(
                "the same process restored from a snapshot on a loopback HTTP server (2 ms per "
                "response): HttpSource lazy and with prefetch, per-page fetch, download-then-serve "
                "(benchmarks/_http_restore.py)"
            ),
            cases=(),
        ),
        Scenario(
            key="8",
            title="Live snapshot",
            note=(
                "4 C threads write 64 B at random places of 256 MiB without pause: "
                "stop-copy-resume vs snapshot_live, and an incremental layer (benchmarks/_live.py)"
            ),
            cases=(),
        ),
        Scenario(
            key="9",
            title="Two tenants on one loop",
            note=(
                "a peer faulting without pause beside one touching a page every ms, on one "
                "serve_handoffs: the light one's p99 latency vs alone, and a cancel under the "
                "storm (benchmarks/_fairness.py)"
            ),
            cases=(),
        ),
        Scenario(
            key="10",
            title="Restore over a shaped network",
            note=(
                "a real memory image in nginx across a 1 Gbit/s link with 20 ms to the first "
                "byte and 100 MB/s a connection (a namespace, tbf, a proxy; needs root): "
                "download-then-serve, HttpSource lazy and with prefetch, a host cache, 16 "
                "processes at once (benchmarks/_net_restore.py)"
            ),
            cases=(),
        ),
        Scenario(
            key="11",
            title="Takeover under a steady fault stream",
            note=(
                "a peer and its fork child fault at a steady pace while a successor takes over "
                "from the running server: the longest fault wait across the takeover vs "
                "without one (benchmarks/_takeover.py)"
            ),
            cases=(),
        ),
    )
