"""serve() and FaultServer on asyncio and trio, with real threads taking real faults."""

from __future__ import annotations

import os
import select
import struct

import anyio
import pytest

import uffd_async as ua

from ._support import TIMEOUT, Lab, finished, pattern, source_bytes

pytestmark = pytest.mark.anyio
P = ua.PAGE_SIZE


async def test_copy_from_serves_many_threads(lab: Lab) -> None:
    pages = 256
    source = source_bytes(pages)
    uffd = lab.uffd()
    region = lab.anonymous(pages)
    uffd.register(region.address, region.length)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, ua.copy_from(source, base=region.address)) as server:
            share = region.length // 8
            workers = [lab.touch(region.address + n * share, share) for n in range(8)]
            for worker in workers:
                await finished(worker)
    assert region.read(0, region.length) == source
    assert server.stats.faults == pages and server.stats.resolved == pages
    assert server.stats.errors == 0 and server.stats.in_flight == 0
    assert server.stats.latency_us(50) > 0


async def test_serve_with_task_status_reports_stats(lab: Lab) -> None:
    uffd = lab.uffd()
    region = lab.anonymous(4)
    uffd.register(region.address, region.length)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            server = await tg.start(ua.serve, uffd, ua.zero_fill())
            await finished(lab.touch(region.address, region.length))
            assert server.stats.resolved == 4
            tg.cancel_scope.cancel()
    assert region.read(0, region.length) == bytes(region.length)


async def test_faults_on_one_page_cause_one_resolution(lab: Lab) -> None:
    uffd = lab.uffd()
    region = lab.anonymous(1)
    uffd.register(region.address, region.length)
    calls = 0
    gate = anyio.Event()

    async def slow(fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        nonlocal calls
        calls += 1
        await gate.wait()
        uffd.copy(fault.page, pattern(0))

    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, slow) as server:
            workers = [lab.touch(region.address + 8 * n, 1) for n in range(8)]
            while server.stats.faults < 8:
                await anyio.sleep(0.001)
            gate.set()
            for worker in workers:
                await finished(worker)
    assert calls == 1
    assert server.stats.coalesced == 7 and server.stats.resolved == 1


async def test_limit_bounds_concurrent_resolutions(lab: Lab) -> None:
    uffd = lab.uffd()
    region = lab.anonymous(32)
    uffd.register(region.address, region.length)
    running = peak = 0

    async def resolver(fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.005)
        running -= 1
        uffd.copy(fault.page, pattern((fault.page - region.address) // P))

    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver, limit=4) as server:
            workers = [lab.touch(region.address + n * P) for n in range(32)]
            for worker in workers:
                await finished(worker)
    assert peak == 4
    assert server.stats.resolved == 32
    assert region.read(0, region.length) == source_bytes(32)


async def test_readahead_populates_in_fewer_faults(lab: Lab) -> None:
    pages = 64
    uffd = lab.uffd()
    region = lab.anonymous(pages)
    uffd.register(region.address, region.length)
    resolver = ua.copy_from(source_bytes(pages), base=region.address, readahead=15)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver) as server:
            await finished(lab.touch(region.address, region.length))
    assert server.stats.faults == pages // 16
    assert server.stats.pages == pages  # counted apart from faults, on the C path
    assert region.read(0, region.length) == source_bytes(pages)


async def test_readahead_skips_populated_pages_and_async_sources(lab: Lab) -> None:
    pages = 16
    source = source_bytes(pages)
    fetched: list[tuple[int, int]] = []

    async def fetch(offset: int, length: int) -> bytes:
        fetched.append((offset, length))
        await anyio.sleep(0)
        return source[offset : offset + length]

    uffd = lab.uffd()
    region = lab.anonymous(pages)
    uffd.register(region.address, region.length)
    uffd.copy(region.address + 4 * P, source[4 * P : 5 * P])  # someone populated page 4
    resolver = ua.copy_from(fetch, base=region.address, readahead=7, size=len(source))
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver) as server:
            await finished(lab.touch(region.address, region.length))
    assert region.read(0, region.length) == source
    # Page 4 was populated behind the resolver's back: the first copy stops there
    # (EEXIST after 4 pages is not an error), and the next fault is page 5.
    assert fetched == [(0, 8 * P), (5 * P, 8 * P), (13 * P, 3 * P)]
    assert server.stats.pages == pages - 1  # on the awaiting path, the cut-short copy too


async def test_eexist_race_still_wakes_the_thread(lab: Lab) -> None:
    uffd = lab.uffd()
    region = lab.anonymous(1)
    uffd.register(region.address, region.length)

    async def racing(fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        uffd.copy(fault.page, pattern(1), wake=False)  # "another resolver got there first"
        await anyio.sleep(0)
        uffd.copy(fault.page, pattern(2))  # EEXIST: the kernel wakes no one

    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, racing) as server:
            await finished(lab.touch(region.address))
    assert server.stats.eexist == 1
    assert region.read(0, P) == pattern(1)


async def test_write_protect_faults_with_batched_wakes(lab: Lab) -> None:
    pages = 64
    uffd = lab.uffd(ua.Feature.WP_UNPOPULATED)
    region = lab.anonymous(pages)
    uffd.register(region.address, region.length, ua.Mode.WP)
    uffd.writeprotect(region.address, region.length)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, ua.unprotect(wake=False)) as server:
            share = region.length // 4
            workers = [lab.touch(region.address + n * share, share) for n in range(4)]
            for worker in workers:
                await finished(worker)
    assert server.stats.resolved == pages


async def test_by_kind_routes_missing_and_wp(lab: Lab) -> None:
    uffd = lab.uffd(ua.Feature.PAGEFAULT_FLAG_WP)
    region = lab.anonymous(8)
    uffd.register(region.address, region.length, ua.Mode.MISSING | ua.Mode.WP)
    source = source_bytes(8)
    resolver = ua.by_kind(
        missing=ua.copy_from(source, base=region.address, wp=True), wp=ua.unprotect()
    )
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver) as server:
            await finished(lab.touch(region.address, region.length))
    assert server.stats.resolved == 16  # a missing fault, then a WP fault, per page
    assert region.read(0, region.length) == source


async def test_minor_faults_with_continue(lab: Lab) -> None:
    uffd = lab.uffd()
    region = lab.shared(8)
    assert region.alias is not None
    region.alias.write(0, source_bytes(8))
    uffd.register(region.address, region.length, ua.Mode.MINOR)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, ua.continue_minor()):
            await finished(lab.touch(region.address, region.length, write=False))
    assert region.read(0, region.length) == source_bytes(8)


async def test_removed_pages_are_served_zeros(lab: Lab) -> None:
    pages = 8
    uffd = lab.uffd(ua.Feature.EVENT_REMOVE)
    region = lab.anonymous(pages)
    uffd.register(region.address, region.length)
    source = source_bytes(pages)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, ua.copy_from(source, base=region.address)) as server:
            await finished(lab.touch(region.address, region.length))
            await finished(lab.run(lambda: region.discard(2 * P, 3 * P)))
            await finished(lab.touch(region.address, region.length, write=False))
    expected = source[: 2 * P] + bytes(3 * P) + source[5 * P :]
    assert region.read(0, region.length) == expected
    assert server.stats.events == 1


async def test_remapped_pages_are_served_at_their_new_address(lab: Lab) -> None:
    pages = 8
    uffd = lab.uffd(ua.Feature.EVENT_REMAP)
    region = lab.anonymous(pages)
    uffd.register(region.address, region.length)
    source = source_bytes(pages)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, ua.copy_from(source, base=region.address)):
            await finished(lab.touch(region.address, 2 * P))
            new = await finished(lab.run(region.move))
            await finished(lab.touch(new, region.length))
    assert region.read(0, region.length) == source


class MadviseWhileResolving(ua.Resolver):
    """Makes a REMOVE pending at the worst moment: after the fault was read,
    before its ioctl, so the ioctl must fail with EAGAIN."""

    def __init__(self, lab: Lab, region: ua.Region, source: bytes) -> None:
        self.lab, self.region = lab, region
        self.inner = ua.copy_from(source, base=region.address)
        self.done = False

    def resolve_now(self, fault: ua.PageFault, uffd: ua.Userfaultfd) -> bool:
        if not self.done:
            self.done = True
            self.lab.run(lambda: self.region.discard(7 * P, P))  # blocks until read
            assert select.select([uffd], [], [], TIMEOUT)[0]  # the REMOVE is queued
        return self.inner.resolve_now(fault, uffd)

    def apply(self, event: ua.Remap | ua.Remove | ua.Unmap) -> None:
        self.inner.apply(event)


async def test_eagain_defers_reads_events_and_retries(lab: Lab) -> None:
    pages = 8
    uffd = lab.uffd(ua.Feature.EVENT_REMOVE)
    region = lab.anonymous(pages)
    uffd.register(region.address, region.length)
    source = source_bytes(pages)
    resolver = MadviseWhileResolving(lab, region, source)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver) as server:
            await finished(lab.touch(region.address, 2 * P))
            while server.stats.events < 1:
                await anyio.sleep(0.001)
    assert server.stats.retries >= 1 and server.stats.events == 1
    assert region.read(0, 2 * P) == source[: 2 * P]


async def test_fork_children_are_served(lab: Lab) -> None:
    from uffd_async._core._native import lib

    pages = 4
    uffd = lab.uffd(ua.Feature.EVENT_FORK)
    region = lab.anonymous(pages)
    uffd.register(region.address, region.length)
    source = source_bytes(pages)
    read_end, write_end = os.pipe()
    try:
        with anyio.fail_after(TIMEOUT):
            async with ua.FaultServer(uffd, ua.copy_from(source, base=region.address)) as server:
                await finished(lab.touch(region.address, P))  # page 0 before the fork
                forker = lab.run(
                    lambda: lib.ua_fork_touch(region.address, region.length, P, 0, write_end)
                )
                pid = await finished(forker)
                status = await finished(lab.run(lambda: os.waitpid(pid, 0)[1]))
        assert os.waitstatus_to_exitcode(status) == 0
        (child_hash,) = struct.unpack("=Q", os.read(read_end, 8))
        scratch = lab.anonymous(pages)
        scratch.write(0, source)
        assert child_hash == lib.ua_fnv1a(scratch.address, len(source))
        assert server.stats.forks == 1
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_cancelled_server_hands_unresolved_faults_to_the_next(lab: Lab) -> None:
    """Serving ends by cancellation: the blocked thread stays blocked, and the
    fault it raised (read once, never again by the kernel) goes to the next server."""
    uffd = lab.uffd()
    region = lab.anonymous(1)
    uffd.register(region.address, region.length)
    never = anyio.Event()

    async def stuck(fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        await never.wait()

    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, stuck) as server:
            worker = lab.touch(region.address)
            while server.stats.in_flight < 1:
                await anyio.sleep(0.001)
        assert worker.stays_blocked()
        async with ua.FaultServer(uffd, ua.copy_from(pattern(0), base=region.address)):
            await finished(worker)
    assert region.read(0, P) == pattern(0)


async def test_closing_the_uffd_ends_serving(lab: Lab) -> None:
    """Documented outcome: serve() returns; blocked threads wake and read zeros."""
    uffd = lab.uffd()
    region = lab.anonymous(1)
    uffd.register(region.address, region.length)
    never = anyio.Event()

    async def stuck(fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        await never.wait()

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            server = await tg.start(ua.serve, uffd, stuck)
            worker = lab.touch(region.address, write=False)
            while server.stats.in_flight < 1:
                await anyio.sleep(0.001)
            uffd.close()
        await finished(worker)
    assert region.read(0, P) == bytes(P)


async def test_resolver_error_propagates_after_the_page_is_disposed(lab: Lab) -> None:
    """on_error zero + propagate: the thread reads zeros, serve raises the error."""
    uffd = lab.uffd()
    region = lab.anonymous(1)
    uffd.register(region.address, region.length)

    async def broken(fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        raise KeyError("the page store is down")

    with anyio.fail_after(TIMEOUT):
        with pytest.raises(KeyError, match="page store"):
            async with ua.FaultServer(uffd, broken, on_error=ua.OnError(page="zero")):
                worker = lab.touch(region.address)
                await anyio.sleep(TIMEOUT)
        await finished(worker)
    assert region.read(0, P) == bytes(P)


async def test_fallback_resolver_keeps_serving(lab: Lab) -> None:
    uffd = lab.uffd()
    region = lab.anonymous(4)
    uffd.register(region.address, region.length)
    source = source_bytes(4)

    class Flaky(ua.Resolver):
        def resolve_now(self, fault: ua.PageFault, uffd: ua.Userfaultfd) -> bool:
            if fault.page == region.address + P:
                raise OSError("flaky store")
            uffd.zeropage(fault.page, P)
            return True

    fallback = ua.copy_from(source, base=region.address)
    on_error = ua.OnError(page=fallback, propagate=False)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, Flaky(), on_error=on_error) as server:
            await finished(lab.touch(region.address, region.length))
    assert server.stats.errors == 1
    assert region.read(0, region.length) == bytes(P) + source[P : 2 * P] + bytes(2 * P)


async def test_leave_hands_the_fault_back(lab: Lab) -> None:
    uffd = lab.uffd()
    region = lab.anonymous(1)
    uffd.register(region.address, region.length)

    async def broken(fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        raise RuntimeError("not yet")

    with anyio.fail_after(TIMEOUT):
        with pytest.raises(RuntimeError, match="not yet"):
            async with ua.FaultServer(uffd, broken, on_error=ua.OnError(page="leave")):
                worker = lab.touch(region.address)
                await anyio.sleep(TIMEOUT)
        assert worker.stays_blocked()
        async with ua.FaultServer(uffd, ua.zero_fill()):
            await finished(worker)


def test_default_on_error_poisons_so_the_toucher_gets_sigbus() -> None:
    """The default: the page is poisoned (no wrong bytes, ever) and the error
    propagates; in-process, the SIGBUS ends the process first."""
    import signal
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import anyio, uffd_async as ua, threading
        async def broken(fault, uffd):
            raise KeyError("down")
        async def main():
            uffd = ua.Userfaultfd.open()
            region = ua.Region.anonymous(ua.PAGE_SIZE)
            uffd.register(region.address, region.length)
            async with ua.FaultServer(uffd, broken):
                threading.Thread(target=ua.touch, args=(region.address, 1), daemon=True).start()
                await anyio.sleep(10)
        anyio.run(main)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGBUS, result.stderr


async def test_bad_arguments(lab: Lab) -> None:
    uffd = lab.uffd()
    with pytest.raises(ValueError, match="limit"):
        await ua.serve(uffd, ua.zero_fill(), limit=0)
    with pytest.raises(TypeError, match="OnError"):
        await ua.serve(uffd, ua.zero_fill(), on_error="zero")  # type: ignore[arg-type]
    with pytest.raises(ua.InvalidArgument, match="readahead"):
        ua.copy_from(b"", base=0, readahead=-1)
    with pytest.raises(ua.InvalidArgument, match="readahead from a callable"):
        ua.copy_from(lambda o, n: b"", base=0, readahead=2)
