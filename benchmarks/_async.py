"""The uffd_async runners: the library's async server on asyncio, asyncio + uvloop, and trio.

Each serves the job with what a user of the library would write: ``FaultServer``
with ``copy_from`` (missing faults; ``readahead``; an async source that sleeps
for the slow scenario) or an unprotecting resolver (write tracking), while the
C workload runs in a worker thread (GIL released throughout). The contract
(serve, run the workload once, mark ``job.seen``, ``job.abort()`` on failure)
is in ``benchmarks/_job.py``.
"""

from __future__ import annotations

import ctypes
import os

import anyio

import uffd_async as ua
from uffd_async._core._loops import choose_backend, uvloop_available

from ._job import Job, Runner, Served

#: UFFD_BENCH_SPIN=seconds overrides the server's default busy-poll window.
_SPIN = float(os.environ.get("UFFD_BENCH_SPIN", ua.DEFAULT_SPIN))


def _copy_resolver(job: Job) -> ua.resolvers.CopyFrom:
    source = (ctypes.c_char * job.length).from_address(job.source)
    if not job.slow_us:
        return ua.copy_from(source, base=job.address, readahead=job.readahead)
    delay = job.slow_us / 1e6

    async def fetch(offset: int, length: int) -> bytes:
        await anyio.sleep(delay)  # a network or disk read, overlapping with others
        return bytes(memoryview(source)[offset : offset + length])

    return ua.copy_from(fetch, base=job.address, size=job.length, readahead=job.readahead)


async def _track_writes(job: Job) -> Served:
    """Write tracking with the library's WriteTracker (fault mode).

    ``job.seen`` is what ``collect()`` reported; the faults are counted where
    they were handled, by the tracker's server (WriteTracker has no public
    counters, hence the private attribute), so that the harness's check of
    faults against written pages is independent of what was collected.
    """
    async with ua.WriteTracker(
        job.uffd, job.address, job.length, register=False, wake=not job.wake_separately
    ) as tracker:
        server = tracker._server
        if server is None:
            raise RuntimeError("a fault-mode WriteTracker without its FaultServer")
        await anyio.to_thread.run_sync(job.workload.run)
        dirty = tracker.collect()
    for page in dirty:
        job.seen[(page - job.address) // job.page_size] = 1
    return Served(faults=server.stats.faults, resolved=server.stats.resolved)


async def _populate(job: Job) -> Served:
    resolver = _copy_resolver(job)
    async with ua.FaultServer(job.uffd, resolver, limit=64, spin=_SPIN) as server:
        await anyio.to_thread.run_sync(job.workload.run)
    job.seen[:] = resolver.populated
    return Served(faults=server.stats.faults, resolved=sum(job.seen))


async def _serve(job: Job) -> Served:
    try:
        return await (_track_writes(job) if job.mode == "wp" else _populate(job))
    except BaseException as exc:
        job.abort(f"the uffd_async server failed: {exc!r}")
        raise


def _runner(loop: str) -> Runner:
    def run(job: Job) -> Served:
        if loop != "trio" and "uvloop" in loop and not uvloop_available():
            raise NotImplementedError("uvloop is not installed (pip install 'uffd_async[uvloop]')")
        backend, options = choose_backend(loop)
        result: Served = anyio.run(_serve, job, backend=backend, backend_options=options)
        return result

    return run


#: The loops the library is measured on: name in the report -> loop (see uffd_async._core._loops).
LOOPS = {"asyncio": "asyncio", "uvloop": "asyncio+uvloop", "trio": "trio"}

UFFD_ASYNC_RUNNERS: dict[str, Runner] = {
    f"uffd_async/{name}": _runner(loop) for name, loop in LOOPS.items()
}


def loops_here() -> dict[str, str]:
    """``LOOPS`` without uvloop when it is not installed (scenarios 4b and 5 loop over these)."""
    return {name: loop for name, loop in LOOPS.items() if name != "uvloop" or uvloop_available()}
