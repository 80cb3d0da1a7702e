"""The leak guard (``no_leaks`` in conftest.py) sees what a test may leave behind.

Each test leaves something on purpose, checks that ``Resources.leaks()`` names
it, then cleans up, so the autouse guard itself finds nothing.
"""

from __future__ import annotations

import threading

import uffd_async as ua

from ._support import TIMEOUT, Lab, Resources, Worker, wait_fault

P = ua.PAGE_SIZE


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
