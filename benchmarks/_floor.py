"""Scenario 6's floor: the time to copy a working set alone, no process running.

Three floors, each on the same snapshot and the same runs the restored process
reads, into a fresh region of this process registered MISSING, that nobody
touches (no fault, no event, nothing to wait for):

* ``c``: ``benchmarks/c/floor.c``, one UFFDIO_COPY per run from the snapshot
  mapped with MAP_POPULATE: the fairest floor, no Python, no loop;
* ``python``: the library's copy path from Python, no loop: the snapshot
  resolver's ``prefetch_pages`` once per run, as the prefetcher calls it;
* ``prefetch``: ``ua.prefetch`` beside ``ua.serve`` on the running loop, no
  process: the prefetcher's own cost (a loop turn and a poll per run) alone.

Every copied page is compared with the snapshot afterwards (untimed); a
difference fails the benchmark.
"""

from __future__ import annotations

import array
import ctypes
import functools
import os
import time

import anyio

import uffd_async as ua

from . import _build

PAGE = ua.PAGE_SIZE


class FloorFailed(RuntimeError):
    """The floor's copy failed or copied a wrong page."""


@functools.cache
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_build.build("floor")))
    lib.bench_floor_copy.argtypes = [
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.c_uint64,
        ctypes.c_uint64,
    ]
    lib.bench_floor_copy.restype = ctypes.c_int64
    return lib


def c_floor(snapshot: str, runs: list[tuple[int, int]], pages: int) -> int:
    """Nanoseconds for C to UFFDIO_COPY ``runs`` of ``snapshot`` into a fresh region."""
    flat = array.array("I", [value for run in runs for value in run])
    address, _ = flat.buffer_info()
    pointer = ctypes.cast(address, ctypes.POINTER(ctypes.c_uint32))
    result = int(_library().bench_floor_copy(os.fsencode(snapshot), pointer, len(runs), pages))
    if result < 0:
        raise FloorFailed(f"the C floor failed: {os.strerror(-result)}")
    return result


def _region(snapshot: ua.Snapshot, pages: int) -> tuple[ua.Region, ua.Userfaultfd, ua.Resolver]:
    region = ua.Region.anonymous(pages * PAGE)
    uffd = ua.Userfaultfd.open()
    uffd.register(region.address, region.length)
    mapping = ua.GuestMapping(
        base_host_virt_addr=region.address, size=pages * PAGE, offset=0, page_size=PAGE
    )
    return region, uffd, snapshot.resolver([mapping])


def _check(region: ua.Region, snapshot: ua.Snapshot, runs: list[tuple[int, int]]) -> None:
    fd = os.open(snapshot.path, os.O_RDONLY)
    try:
        for first, count in runs:
            got = region.read(first * PAGE, count * PAGE)
            if got != os.pread(fd, count * PAGE, first * PAGE):
                raise FloorFailed(f"a page of run {first}+{count} differs from the snapshot")
    finally:
        os.close(fd)


def python_floor(snapshot: ua.Snapshot, runs: list[tuple[int, int]], pages: int) -> int:
    """Nanoseconds for the library's copy path (``prefetch_pages`` per run), no loop."""
    region, uffd, resolver = _region(snapshot, pages)
    with region, uffd:
        copy = resolver.prefetch_pages  # type: ignore[attr-defined]
        start = time.perf_counter_ns()
        for first, count in runs:
            copy(uffd, first, count)
        elapsed = time.perf_counter_ns() - start
        _check(region, snapshot, runs)
    return elapsed


async def prefetch_floor(snapshot: ua.Snapshot, working_set: ua.WorkingSet, pages: int) -> int:
    """Nanoseconds for ``ua.prefetch`` of ``working_set`` beside ``ua.serve``, no process."""
    region, uffd, resolver = _region(snapshot, pages)
    with region, uffd:
        async with anyio.create_task_group() as tg:
            await tg.start(functools.partial(ua.serve, uffd, resolver))
            start = time.perf_counter_ns()
            await ua.prefetch(uffd, resolver, working_set)
            elapsed = time.perf_counter_ns() - start
            tg.cancel_scope.cancel()
        _check(region, snapshot, list(working_set.runs()))
    return elapsed
