"""The leak guard (``no_leaks`` in conftest.py) sees what a test may leave behind.

Each test leaves something on purpose, checks that ``Resources.leaks()`` names
it, then cleans up, so the autouse guard itself finds nothing.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time

import uffd_async as ua

from ._support import TIMEOUT, Lab, Resources, Worker, wait_fault

P = ua.PAGE_SIZE

_libc = ctypes.CDLL(None, use_errno=True)  # its own handle: argtypes set here stay here
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
_libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
#: glibc's HEAP_MAX_SIZE on 64-bit: a thread arena's heap is one aligned block of this.
HEAP = 64 << 20
_PROT_NONE, _PROT_RW = 0, 3
_MAP_PRIVATE_ANONYMOUS_NORESERVE = 0x02 | 0x20 | 0x4000


def reserve(length: int) -> int:
    """mmap(NULL, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)."""
    address = _libc.mmap(None, length, _PROT_NONE, _MAP_PRIVATE_ANONYMOUS_NORESERVE, -1, 0)
    assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    return int(address)


def test_a_thread_blocked_on_a_fault(lab: Lab) -> None:
    uffd = lab.uffd()
    region = lab.anonymous(1)
    uffd.register(region.address, region.length)
    before = Resources()
    worker = lab.touch(region.address)
    wait_fault(uffd)
    assert worker.stays_blocked()
    blocked = before.blocked_threads(grace=0)
    assert list(blocked.values()) == [worker._thread.name]
    assert any("still blocked on a userfaultfd fault" in line for line in before.leaks(grace=0))
    uffd.zeropage(region.address, P)
    worker.join()
    assert before.blocked_threads() == {}


def test_a_registration_and_its_uffd() -> None:
    before = Resources()
    with ua.Region.anonymous(4 * P) as region:
        uffd = ua.Userfaultfd.open()
        try:
            uffd.register(region.address + P, 2 * P)
            leaks = list(before.leaks())
            assert any(line.startswith("leaked fd") and "userfaultfd" in line for line in leaks)
            registrations = [line for line in leaks if "leaked registration" in line]
            assert len(registrations) == 1 and f"{region.address + P:#x}" in registrations[0]
        finally:
            uffd.close()
    assert list(before.leaks()) == []


def test_regions_of_every_kind() -> None:
    before = Resources()
    regions = [ua.Region.anonymous(3 * P), ua.Region.shared(2 * P)]
    try:
        leaked = before.leaked_mappings()
        starts = {m.start for m in leaked}
        assert regions[0].address in starts
        assert regions[1].address in starts  # the registered view ...
        assert regions[1].alias is not None and regions[1].alias.address in starts  # ... and alias
        assert any("/memfd:uffd_async" in repr(m) for m in leaked)
    finally:
        for region in regions:
            region.close()
    assert before.leaked_mappings() == []


def test_the_interpreters_own_allocations_are_not_leaks() -> None:
    """Threads that malloc get glibc arenas (MAP_NORESERVE heaps); big objects get mmaps."""
    before = Resources()
    keep: list[bytes | bytearray] = [bytearray(8 << 20)]

    def allocate() -> None:
        keep.append(bytearray(1 << 20))
        keep.extend(bytes(100) for _ in range(10_000))

    workers = [Worker(allocate) for _ in range(8)]
    for worker in workers:
        worker.join(TIMEOUT)
    assert before.leaked_mappings() == []
    assert len(keep) > 8


def worker_blocked(thread: threading.Thread) -> bool:
    thread.join(0.2)
    return thread.is_alive()


def test_threads_are_named_in_the_report(lab: Lab) -> None:
    uffd = lab.uffd()
    region = lab.anonymous(1)
    uffd.register(region.address, region.length)
    before = Resources()
    thread = threading.Thread(target=ua.touch, args=(region.address, 1), name="the toucher")
    thread.start()
    wait_fault(uffd)
    try:
        assert worker_blocked(thread)
        assert "the toucher" in "\n".join(before.leaks(grace=0))
    finally:
        uffd.zeropage(region.address, P)
        thread.join(TIMEOUT)


def test_a_heap_glibc_makes_for_a_new_thread_is_not_a_leak() -> None:
    """A new thread's first malloc (or free) can make a glibc heap: mmap 128 MiB
    PROT_NONE | MAP_NORESERVE, unmap all but one aligned 64 MiB block, mprotect its
    start read-write (glibc's ``new_heap``). A check that ran between the first two
    steps once reported "leaked mapping 128 MiB ---p [anon]". The same steps here,
    from a new thread that waits after the first one while the guard looks."""
    before = Resources(threads=False)
    reserved, go = threading.Event(), threading.Event()
    heaps: list[int] = []

    def make_a_heap() -> None:
        start = reserve(2 * HEAP)
        reserved.set()
        assert go.wait(TIMEOUT)
        time.sleep(0.05)  # so the guard looks (at least) once more before the trim
        aligned = -start % HEAP + start
        if aligned > start:
            _libc.munmap(start, aligned - start)
        _libc.munmap(aligned + HEAP, HEAP - (aligned - start))
        heaps.append(aligned)
        assert _libc.mprotect(aligned, 33 * P, _PROT_RW) == 0

    worker = Worker(make_a_heap)
    try:
        assert reserved.wait(TIMEOUT)
        seen = before.leaked_mappings(grace=0)  # what the flaky check saw
        assert any(m.end - m.start == 2 * HEAP and m.perms == "---p" for m in seen), seen
        go.set()
        assert before.leaked_mappings(grace=TIMEOUT) == []
        worker.join()
        assert before.leaked_mappings(grace=0) == []  # a finished heap is not ours either
    finally:
        go.set()
        worker._thread.join(TIMEOUT)
        for heap in heaps:
            _libc.munmap(heap, HEAP)


def test_a_prot_none_reservation_that_stays_is_reported() -> None:
    """The grace is only a wait: a PROT_NONE reservation still there after it (a
    leaked Region.move target, say) is reported, as a Region would be."""
    before = Resources(threads=False)
    start = reserve(2 * HEAP)
    try:
        leaked = before.leaked_mappings(grace=0.1)
        assert any(m.start <= start and start + 2 * HEAP <= m.end for m in leaked), leaked
        assert any(
            line.startswith("leaked mapping") and "---p" in line for line in before.leaks(0.1)
        )
    finally:
        _libc.munmap(start, 2 * HEAP)
    assert before.leaked_mappings() == []


def test_inner_timeouts_fire_before_the_watchdog() -> None:
    """A hang in a bounded wait fails its own test instead of ending the run: the
    longest inner bound, with room for the teardown's bounded joins, stays below
    the per-test deadline (conftest.py)."""
    from . import _stress, conftest

    assert _stress.ROUND_TIMEOUT + 5 * TIMEOUT < conftest.TEST_DEADLINE
    # A slow stress test runs many rounds before the one that hangs: half its deadline.
    assert _stress.ROUND_TIMEOUT + 5 * TIMEOUT < conftest.SLOW_TEST_DEADLINE / 2
