"""Scenario 9: one tenant cannot starve another, nor make the server deaf to cancellation.

Two processes hand their memory over to one ``serve_handoffs`` (one event loop),
as two guests of one host would (``tests/_storm_peer.py``):

* the heavy one: ``HEAVY_THREADS`` threads read their share of ``heavy_pages``
  pages as fast as the server answers (one C loop each, ``ua.touch``), discard
  them (MADV_DONTNEED, registered without EVENT_REMOVE: no event, they just
  fault again), and again, without pause;
* the light one: reads a page every millisecond and times each read (the
  fault's latency, from the access to its return, on its own clock).

Measured, per loop (asyncio, uvloop when installed, trio), alternately each
round: the light peer's p50 and p99 fault latency served alone, then beside the
heavy one's storm (as a ratio to alone: what sharing the loop costs it), the
heavy one's fault rate meanwhile, and how long ``serve_handoffs`` takes to
return from a cancel under the storm (from the cancel to its return, the loop's
clock). Every page the light peer reads is checked against the snapshot.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

import uffd_async as ua
from tests._storm_peer import Tenant, tenant  # the peer the fairness tests use too

from ._live import _run, loops
from ._restore import _write_snapshot

HEAVY_PAGES = 4096
QUICK_HEAVY_PAGES = 512
HEAVY_THREADS = 4
LIGHT_FAULTS = 1000  # one a millisecond
QUICK_LIGHT_FAULTS = 100
INTERVAL = 0.001
#: How often the cancel round looks whether the storm has begun (s).
STORM_POLL = 0.01


class FairnessFailed(RuntimeError):
    """A peer failed (a wrong page, a storm that ended on its own bound), or a timeout."""


def _percentile(values: list[int], p: float) -> float:
    """Nearest-rank percentile, ns to ms."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))] / 1e6


class _Setup:
    def __init__(self, where: Path, heavy_pages: int, light_faults: int, timeout: float) -> None:
        self.where = where
        self.snapshot = where / "snapshot.mem"
        self.heavy_pages = heavy_pages
        self.light_faults = light_faults
        self.timeout = timeout
        self._serial = 0

    def socket(self) -> Path:
        self._serial += 1
        return self.where / f"s{self._serial}.sock"

    def peer(self, path: Path, role: str, **config: Any) -> Any:
        return tenant(path, self.snapshot, role, timeout=self.timeout, **config)


async def _light(setup: _Setup, path: Path) -> list[int]:
    """Run the light peer to the end; its fault latencies (ns)."""
    async with setup.peer(
        path, "light", pages=64, interval=INTERVAL, count=setup.light_faults
    ) as p:
        while (line := await p.line()) != "done":
            if not line.startswith(("ready", "served")):  # "wrong I": a page not the snapshot's
                raise FairnessFailed(f"the light peer: {line}")
        with anyio.fail_after(setup.timeout):
            await p.process.wait()
    return [int(line.split()[2]) for line in p.lines if line.startswith("served")]


def _heavy(setup: _Setup, path: Path) -> Any:
    pages, threads = setup.heavy_pages, HEAVY_THREADS
    return setup.peer(
        path, "heavy", pages=pages, threads=threads, bound=setup.timeout, remove=False
    )


async def _storming(heavy: Tenant) -> None:
    while (line := await heavy.line()) != "storming":
        if line != "ready":
            raise FairnessFailed(f"the heavy peer: {line}")


async def _stormed(server: ua.HandoffServer, pages: int) -> None:
    """Return once the server has served ``pages`` faults of the storm (the caller's
    deadline bounds it: a storm that never comes is a timeout)."""
    while server.stats.faults < pages:
        await anyio.sleep(STORM_POLL)


async def _round(setup: _Setup, snapshot: ua.Snapshot) -> dict[str, Any]:
    with anyio.fail_after(setup.timeout):
        async with anyio.create_task_group() as tg:
            path = setup.socket()
            await tg.start(functools.partial(ua.serve_handoffs, path, snapshot))
            alone = await _light(setup, path)
            tg.cancel_scope.cancel()
        async with anyio.create_task_group() as tg:
            path = setup.socket()
            await tg.start(functools.partial(ua.serve_handoffs, path, snapshot))
            async with _heavy(setup, path) as heavy:
                await _storming(heavy)
                began = time.perf_counter_ns()
                beside = await _light(setup, path)
                ended, pages = await heavy.stop()
                stormed_ns = time.perf_counter_ns() - began
            tg.cancel_scope.cancel()
        if ended != "stopped":
            raise FairnessFailed("the heavy peer's storm ended on its own bound")
        path = setup.socket()
        async with _heavy(setup, path) as heavy:
            async with anyio.create_task_group() as tg:
                serving = functools.partial(ua.serve_handoffs, path, snapshot)
                server = await tg.start(serving)
                # Cancel once the storm is well under way, however long a loaded machine
                # took to start it (a fixed delay measured a cancel before any storm).
                await _stormed(server, setup.heavy_pages)
                cancelled_at = anyio.current_time()
                tg.cancel_scope.cancel()
            cancel_s = anyio.current_time() - cancelled_at
    return {
        "alone_ns": alone,
        "beside_ns": beside,
        "heavy_pages": pages,
        "stormed_ns": stormed_ns,
        "cancel_ms": cancel_s * 1e3,
    }


def measure(*, quick: bool, rounds: int, timeout: float) -> dict[str, Any]:
    """Alone, beside the storm, and cancelled under it, on every loop, ``rounds`` times."""
    heavy_pages = QUICK_HEAVY_PAGES if quick else HEAVY_PAGES
    light_faults = QUICK_LIGHT_FAULTS if quick else LIGHT_FAULTS
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    names = loops()
    samples: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="uffd-bench-fair-", dir=shm) as where:
        setup = _Setup(Path(where), heavy_pages, light_faults, timeout)
        _write_snapshot(setup.snapshot, heavy_pages)
        with ua.Snapshot(setup.snapshot) as snapshot:
            for _ in range(rounds):
                for name, loop in names.items():
                    try:
                        sample = _run(_round, setup, snapshot, loop=loop)
                    except FairnessFailed:
                        raise
                    except Exception as exc:
                        raise FairnessFailed(f"scenario 9 on {name}: {exc!r}") from exc
                    samples.setdefault(name, []).append(sample)
    results = []
    for name, runs in samples.items():
        alone = [v for run in runs for v in run["alone_ns"]]
        beside = [v for run in runs for v in run["beside_ns"]]
        results.append(
            {
                "loop": name,
                "alone_p50_ms": _percentile(alone, 50),
                "alone_p99_ms": _percentile(alone, 99),
                "beside_p50_ms": _percentile(beside, 50),
                "beside_p99_ms": _percentile(beside, 99),
                "beside_max_ms": _percentile(beside, 100),
                "p99_ratio": _percentile(beside, 99) / _percentile(alone, 99),
                "light_faults": len(beside),
                "heavy_faults_per_s": statistics.median(
                    r["heavy_pages"] / r["stormed_ns"] * 1e9 for r in runs
                ),
                "cancel_ms": statistics.median(r["cancel_ms"] for r in runs),
                "cancel_max_ms": max(r["cancel_ms"] for r in runs),
            }
        )
    return {
        "key": "9",
        "title": "Two tenants on one loop",
        "heavy_pages": heavy_pages,
        "heavy_threads": HEAVY_THREADS,
        "light_faults": light_faults,
        "rounds": rounds,
        "results": results,
    }


def fairness_table(report: dict[str, Any]) -> str:
    lines = [
        "9. Two tenants on one loop",
        f"   one serve_handoffs; a heavy peer ({report['heavy_threads']} threads over "
        f"{report['heavy_pages']:,} pages, each read then discarded, without pause) beside a "
        f"light one reading a page every ms ({report['light_faults']:,} faults a round)",
        "   ms: the light peer's fault latency, its own clock; x: beside / alone; cancel: "
        "serve_handoffs' return after a cancel under the storm (median, max)",
        f"  {'loop':<8} {'alone p50':>10} {'p99':>7} {'beside p50':>11} {'p99':>7} {'max':>7}"
        f" {'p99 x':>7} {'heavy faults/s':>15} {'cancel ms':>10} {'max':>7}",
    ]
    for r in report["results"]:
        lines.append(
            f"  {r['loop']:<8} {r['alone_p50_ms']:>10.3f} {r['alone_p99_ms']:>7.3f} "
            f"{r['beside_p50_ms']:>11.3f} {r['beside_p99_ms']:>7.3f} {r['beside_max_ms']:>7.1f} "
            f"{r['p99_ratio']:>6.1f}x {r['heavy_faults_per_s']:>15,.0f} "
            f"{r['cancel_ms']:>10.1f} {r['cancel_max_ms']:>7.1f}"
        )
    return "\n".join(lines)
