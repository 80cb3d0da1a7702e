"""Every resolving ioctl against real faults taken by real threads.

A worker thread touches registered memory through ua.touch (ctypes: no GIL
held while blocked); the test thread reads the fault and answers it.
"""

from __future__ import annotations

import threading

import pytest

import uffd_async as ua

from ._support import TIMEOUT, Lab, pattern, wait_events, wait_fault

P = ua.PAGE_SIZE


def test_missing_fault_resolved_by_copy(lab: Lab) -> None:
    uffd = lab.uffd(ua.Feature.THREAD_ID)
    region = lab.anonymous(4)
    ioctls = uffd.register(region.address, region.length)
    assert ioctls & (ua.Ioctl.COPY | ua.Ioctl.ZEROPAGE | ua.Ioctl.WAKE | ua.Ioctl.WRITEPROTECT)
    thread_ids: list[int] = []

    def toucher() -> None:
        thread_ids.append(threading.get_native_id())
        ua.touch(region.address + 2 * P + 100, 1)

    worker = lab.run(toucher)
    fault = wait_fault(uffd)
    assert fault.address == region.address + 2 * P  # rounded down without EXACT_ADDRESS
    assert fault.page == region.address + 2 * P
    assert fault.is_write and not fault.is_wp and not fault.is_minor
    assert worker.stays_blocked()
    assert fault.thread_id == thread_ids[0]
    assert uffd.copy(fault.page, pattern(2)) == P
    worker.join()
    assert region.read(2 * P, P) == pattern(2)


def test_read_fault_and_exact_address(lab: Lab) -> None:
    uffd = lab.uffd(ua.Feature.EXACT_ADDRESS)
    region = lab.anonymous(1)
    uffd.register(region.address, region.length)
    worker = lab.touch(region.address + 123, write=False)
    fault = wait_fault(uffd)
    assert fault.address == region.address + 123 and fault.page == region.address
    assert not fault.is_write
    assert fault.thread_id is None  # THREAD_ID not negotiated
    uffd.copy(fault.page, pattern(0))
    worker.join()


def test_copy_from_an_address_and_from_a_bytearray(lab: Lab) -> None:
    uffd = lab.uffd()
    region = lab.anonymous(2)
    source = lab.anonymous(1)
    source.write(0, pattern(7))
    uffd.register(region.address, region.length)
    assert uffd.copy(region.address, source.address, P) == P
    assert uffd.copy(region.address + P, bytearray(pattern(8))) == P
    assert region.read(0, 2 * P) == pattern(7) + pattern(8)
    with pytest.raises(ua.InvalidArgument, match="exceeds"):
        uffd.copy(region.address, b"x" * P, 2 * P)
    with pytest.raises(TypeError, match="needs a length"):
        uffd.copy(region.address, source.address)


def test_zeropage_and_eexist_on_retry(lab: Lab) -> None:
    uffd = lab.uffd()
    region = lab.anonymous(2)
    uffd.register(region.address, region.length)
    worker = lab.touch(region.address, write=False)
    fault = wait_fault(uffd)
    assert uffd.zeropage(fault.page, P) == P
    worker.join()
    with pytest.raises(ua.PageExists) as info:
        uffd.zeropage(fault.page, P)
    assert isinstance(info.value, FileExistsError) and info.value.done == 0
    assert "wake()" in str(info.value)
    assert region.read(0, P) == bytes(P)


def test_eexist_leaves_the_faulting_thread_asleep_until_wake(lab: Lab) -> None:
    """The kernel does not wake on EEXIST: a handler must send UFFDIO_WAKE."""
    uffd = lab.uffd()
    region = lab.anonymous(1)
    uffd.register(region.address, region.length)
    worker = lab.touch(region.address)
    fault = wait_fault(uffd)
    uffd.copy(fault.page, pattern(1), wake=False)  # populated by "someone else"
    with pytest.raises(ua.PageExists):
        uffd.copy(fault.page, pattern(2))
    assert worker.stays_blocked()
    uffd.wake(fault.page, P)
    worker.join()
    assert region.read(0, P) == pattern(1)


def test_dontwake_then_wake(lab: Lab) -> None:
    uffd = lab.uffd()
    region = lab.anonymous(1)
    uffd.register(region.address, region.length)
    worker = lab.touch(region.address)
    fault = wait_fault(uffd)
    assert uffd.copy(fault.page, pattern(3), wake=False) == P
    assert worker.stays_blocked()
    uffd.wake(fault.page, P)
    worker.join()
    assert region.read(0, P) == pattern(3)


def test_partial_copy_continues_and_reports_bytes_done(lab: Lab) -> None:
    """The kernel copies pages 0-1, stops at the existing page 2 (EAGAIN with a
    positive count); the library continues from page 2 and gets EEXIST there."""
    uffd = lab.uffd()
    region = lab.anonymous(4)
    uffd.register(region.address, region.length)
    uffd.copy(region.address + 2 * P, pattern(2))
    data = pattern(0) + pattern(1) + pattern(9) + pattern(3)
    with pytest.raises(ua.PageExists) as info:
        uffd.copy(region.address, data)
    assert info.value.done == 2 * P
    assert "8192 bytes were done" in str(info.value)
    assert uffd.copy(region.address + 3 * P, pattern(3)) == P
    assert region.read(0, 4 * P) == pattern(0) + pattern(1) + pattern(2) + pattern(3)


def test_remove_event_makes_ioctls_fail_with_eagain_until_read(lab: Lab) -> None:
    uffd = lab.uffd(ua.Feature.EVENT_REMOVE)
    region = lab.anonymous(4)
    uffd.register(region.address, region.length)
    uffd.copy(region.address, pattern(0))
    madviser = lab.run(lambda: region.discard(0, P))  # blocks until the event is read
    wait_readable(uffd)
    with pytest.raises(ua.MappingChanged) as info:
        uffd.copy(region.address + P, pattern(1) + pattern(2))
    assert info.value.errno == 11 and info.value.done == 0
    assert madviser.stays_blocked()
    assert uffd.read_events() == [ua.Remove(start=region.address, end=region.address + P)]
    madviser.join()
    assert uffd.copy(region.address + P, pattern(1) + pattern(2)) == 2 * P
    # The removed page faults as missing again.
    worker = lab.touch(region.address, write=False)
    fault = wait_fault(uffd)
    assert fault.page == region.address
    uffd.zeropage(fault.page, P)
    worker.join()


def test_remap_event_and_the_registration_moves(lab: Lab) -> None:
    uffd = lab.uffd(ua.Feature.EVENT_REMAP)
    region = lab.anonymous(2)
    old = region.address
    uffd.register(region.address, region.length)
    mover = lab.run(region.move)
    wait_readable(uffd)
    with pytest.raises(ua.MappingChanged):
        uffd.zeropage(old, P)
    [event] = uffd.read_events()
    new = mover.join()
    assert event == ua.Remap(from_address=old, to_address=new, length=2 * P)
    worker = lab.touch(new + P)
    fault = wait_fault(uffd)
    assert fault.page == new + P
    uffd.copy(fault.page, pattern(1))
    worker.join()
    assert region.read(P, P) == pattern(1)


def test_unmap_event(lab: Lab) -> None:
    uffd = lab.uffd(ua.Feature.EVENT_UNMAP)
    region = lab.anonymous(3)
    start = region.address
    uffd.register(region.address, region.length)
    unmapper = lab.run(region.close)
    events = wait_events(uffd)
    unmapper.join()
    assert events == [ua.Unmap(start=start, end=start + 3 * P)]


def test_fork_event_serves_the_child(lab: Lab) -> None:
    import os
    import struct

    from uffd_async._core._native import lib

    uffd = lab.uffd(ua.Feature.EVENT_FORK)
    region = lab.anonymous(2)
    uffd.register(region.address, region.length)
    uffd.copy(region.address, pattern(0))  # present before fork: the child inherits it
    read_end, write_end = os.pipe()
    try:
        forker = lab.run(lambda: lib.ua_fork_touch(region.address, 2 * P, P, 0, write_end))
        [event] = wait_events(uffd)
        assert isinstance(event, ua.Fork)
        pid = forker.join()
        assert pid > 0
        child = event.uffd
        assert child.features == uffd.features and not child.closed
        fault = wait_fault(child)  # the child's fault, on the child's uffd
        assert fault.page == region.address + P
        child.copy(fault.page, pattern(1))
        reaper = lab.run(lambda: os.waitpid(pid, 0))
        _, status = reaper.join()
        assert os.waitstatus_to_exitcode(status) == 0
        (child_hash,) = struct.unpack("=Q", os.read(read_end, 8))
        expected = bytes(pattern(0) + pattern(1))
        scratch = lab.anonymous(2)
        scratch.write(0, expected)
        assert child_hash == lib.ua_fnv1a(scratch.address, 2 * P)
        assert uffd.read_events() == []  # the parent's page 1 is still missing
    finally:
        os.close(read_end)
        os.close(write_end)
    uffd.close()
    assert child.closed  # owned by the handle that read the event


def test_write_protect_copy_mode_wp_then_unprotect(lab: Lab) -> None:
    uffd = lab.uffd(ua.Feature.PAGEFAULT_FLAG_WP)
    region = lab.anonymous(1)
    ioctls = uffd.register(region.address, region.length, ua.Mode.MISSING | ua.Mode.WP)
    assert ioctls & ua.Ioctl.WRITEPROTECT
    worker = lab.touch(region.address)
    missing = wait_fault(uffd)
    assert missing.is_write and not missing.is_wp
    uffd.copy(missing.page, pattern(4), wp=True)  # mapped read-only: the write traps again
    wp = wait_fault(uffd)
    assert wp.is_wp and wp.is_write and wp.page == region.address
    assert worker.stays_blocked()
    uffd.writeprotect(wp.page, P, protect=False)
    worker.join()
    assert region.read(0, P) == pattern(4)


def test_writeprotect_dontwake_then_wake(lab: Lab) -> None:
    uffd = lab.uffd(ua.Feature.PAGEFAULT_FLAG_WP)
    region = lab.anonymous(2)
    uffd.register(region.address, region.length, ua.Mode.MISSING | ua.Mode.WP)
    uffd.copy(region.address, pattern(0) + pattern(1))
    uffd.writeprotect(region.address, 2 * P, protect=True)
    worker = lab.touch(region.address + P)
    fault = wait_fault(uffd)
    assert fault.is_wp and fault.page == region.address + P
    uffd.writeprotect(fault.page, P, protect=False, wake=False)
    assert worker.stays_blocked()
    uffd.wake(fault.page, P)
    worker.join()
    # page 0 is still protected: a write to it traps
    worker = lab.touch(region.address)
    fault = wait_fault(uffd)
    assert fault.is_wp and fault.page == region.address
    uffd.writeprotect(fault.page, P, protect=False)
    worker.join()
    assert region.read(0, 2 * P) == pattern(0) + pattern(1)


def test_wp_unpopulated_traps_writes_to_untouched_pages(lab: Lab) -> None:
    uffd = lab.uffd(ua.Feature.WP_UNPOPULATED)
    region = lab.anonymous(4)
    uffd.register(region.address, region.length, ua.Mode.WP)
    uffd.writeprotect(region.address, region.length, protect=True)
    worker = lab.touch(region.address + 3 * P)
    fault = wait_fault(uffd)
    assert fault.is_wp and fault.page == region.address + 3 * P
    uffd.writeprotect(fault.page, P, protect=False)
    worker.join()
    assert region.read(3 * P, P) == bytes(P)


def test_missing_on_shmem(lab: Lab) -> None:
    uffd = lab.uffd()
    region = lab.shared(2)
    uffd.register(region.address, region.length)
    worker = lab.touch(region.address + P, write=False)
    fault = wait_fault(uffd)
    uffd.copy(fault.page, pattern(5))
    worker.join()
    assert region.read(P, P) == pattern(5)
    assert region.alias is not None and region.alias.read(P, P) == pattern(5)


def test_minor_fault_resolved_by_continue(lab: Lab) -> None:
    uffd = lab.uffd(ua.Feature.MINOR_SHMEM)
    region = lab.shared(2)
    assert region.alias is not None
    region.alias.write(0, pattern(0) + pattern(1))  # in the page cache, not mapped in `region`
    ioctls = uffd.register(region.address, region.length, ua.Mode.MINOR)
    assert ioctls & ua.Ioctl.CONTINUE
    worker = lab.touch(region.address + P, write=False)
    fault = wait_fault(uffd)
    assert fault.is_minor and fault.page == region.address + P
    assert uffd.continue_(fault.page, P) == P
    worker.join()
    assert region.read(P, P) == pattern(1)
    with pytest.raises(ua.PageExists):
        uffd.continue_(fault.page, P)


def test_continue_write_protected(lab: Lab) -> None:
    uffd = lab.uffd(ua.Feature.MINOR_SHMEM | ua.Feature.WP_HUGETLBFS_SHMEM)
    region = lab.shared(1)
    assert region.alias is not None
    region.alias.write(0, pattern(6))
    uffd.register(region.address, region.length, ua.Mode.MINOR | ua.Mode.WP)
    worker = lab.touch(region.address)
    minor = wait_fault(uffd)
    assert minor.is_minor
    uffd.continue_(minor.page, P, wp=True)
    wp = wait_fault(uffd)
    assert wp.is_wp
    uffd.writeprotect(wp.page, P, protect=False)
    worker.join()
    assert region.read(0, P) == pattern(6)


def test_move_resolves_a_fault_with_the_source_page(lab: Lab) -> None:
    uffd = lab.uffd(ua.Feature.MOVE)
    region = lab.anonymous(2)
    source = lab.anonymous(2)
    source.write(0, pattern(8))
    uffd.register(region.address, region.length)
    worker = lab.touch(region.address, write=False)
    fault = wait_fault(uffd)
    assert uffd.move(fault.page, source.address, P) == P
    worker.join()
    assert region.read(0, P) == pattern(8)
    assert source.read(0, P) == bytes(P)  # the page left the source
    with pytest.raises(ua.UffdError) as info:
        uffd.move(region.address + P, source.address + P, P)  # a hole in the source
    assert info.value.errno == 2
    assert uffd.move(region.address + P, source.address + P, P, allow_src_holes=True) == P


def test_closing_the_uffd_wakes_blocked_threads(lab: Lab) -> None:
    """Documented outcome: the thread then faults the ordinary way (zeros)."""
    uffd = lab.uffd()
    region = lab.anonymous(1)
    uffd.register(region.address, region.length)
    worker = lab.touch(region.address, write=False)
    wait_readable(uffd)
    uffd.close()
    worker.join()
    assert region.read(0, P) == bytes(P)


def test_unregister_stops_reporting(lab: Lab) -> None:
    uffd = lab.uffd()
    region = lab.anonymous(2)
    uffd.register(region.address, region.length)
    uffd.unregister(region.address, region.length)
    lab.touch(region.address, 2 * P).join()
    assert uffd.read_events() == []


def test_a_range_belongs_to_one_uffd(lab: Lab) -> None:
    first, second = lab.uffd(), lab.uffd()
    region = lab.anonymous(1)
    first.register(region.address, region.length)
    with pytest.raises(ua.UffdError) as info:
        second.register(region.address, region.length)
    assert info.value.errno == 16  # EBUSY
    assert "another userfaultfd" in str(info.value)


def wait_readable(uffd: ua.Userfaultfd) -> None:
    import select

    readable, _, _ = select.select([uffd], [], [], TIMEOUT)
    assert readable, "no event arrived"
