"""The server's C fast path (``ua_resolve_batch`` in ``_native_lib.c``), on real faults.

While a resolver offers ``_fast_path()`` (``copy_from`` from memory, readahead
included, ``zero_fill``), every batch of faults is resolved in C, with no Python per
fault; the Python path (``resolve_now``) sees only what the C loop left. These tests
put the C loop in the two situations where it must do more than one ioctl per fault,
and check, with a spy on ``resolve_now``, that the C loop (not Python) handled them:

* EEXIST: the faulting page was filled behind the resolver's back with DONTWAKE
  (another resolver got there first), so the thread still sleeps, and the kernel does
  not wake it on EEXIST: the C loop must send UFFDIO_WAKE.
* A readahead copy cut short after the faulting page: a concurrent ``mremap`` moves
  the pages behind it while the kernel copies. The faulting page was copied and woken;
  the C loop must count the fault resolved and mark only the pages it copied (and so
  must ``copy_from`` in Python, where the fast path is off: the same test runs there).

Faulting threads touch memory through ctypes (``ua.touch``, ``Region.read``), never
holding the GIL; every wait is bounded.
"""

from __future__ import annotations

import select
from collections.abc import Callable

import anyio
import pytest

import uffd_async as ua

from ._support import TIMEOUT, Lab, Worker, finished, pattern, source_bytes, wait_fault

pytestmark = pytest.mark.anyio
P = ua.PAGE_SIZE


def spy_on_python_path(resolver: ua.Resolver, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pages of the faults that reached ``resolver.resolve_now`` (the Python path)."""
    seen: list[int] = []
    real = resolver.resolve_now

    def resolve_now(fault: ua.PageFault, uffd: ua.Userfaultfd) -> bool:
        seen.append(fault.page)
        return real(fault, uffd)

    monkeypatch.setattr(resolver, "resolve_now", resolve_now)
    return seen


async def until_pending(uffd: ua.Userfaultfd) -> None:
    """Wait (bounded by the caller) until an event is queued in ``uffd``, without reading it."""
    while not select.select([uffd], [], [], 0)[0]:
        await anyio.sleep(0.001)


FAST_RESOLVERS: dict[str, Callable[[bytes, ua.Region], ua.Resolver]] = {
    "copy_from-bytes": lambda source, region: ua.copy_from(source, base=region.address),
    "copy_from-readahead": lambda source, region: ua.copy_from(
        source, base=region.address, readahead=3
    ),
    "zero_fill": lambda source, region: ua.zero_fill(),
}


@pytest.mark.parametrize("kind", [*FAST_RESOLVERS, "copy_from-Region"])
async def test_eexist_on_the_fast_path_wakes_the_thread(
    kind: str, lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault is queued; the page is filled elsewhere with DONTWAKE (the thread sleeps
    on); then the server starts. The C loop's COPY (or ZEROPAGE) finds the page there
    (EEXIST), which wakes nobody: the C loop must wake the thread itself."""
    uffd = lab.uffd()
    region = lab.anonymous(4)
    uffd.register(region.address, region.length)
    source = source_bytes(4)
    if kind == "copy_from-Region":
        held = lab.anonymous(4)
        held.write(0, source)
        resolver: ua.Resolver = ua.copy_from(held, base=region.address)
    else:
        resolver = FAST_RESOLVERS[kind](source, region)
    assert resolver._fast_path() is not None, "this resolver should take the C fast path"
    python_path = spy_on_python_path(resolver, monkeypatch)
    page = region.address + P
    with anyio.fail_after(TIMEOUT):
        toucher = lab.touch(page, 1)
        await until_pending(uffd)  # the fault is queued, and nobody read it
        uffd.copy(page, pattern(7), wake=False)  # "another resolver got there first"
        assert toucher.alive, "DONTWAKE woke the faulting thread"
        async with ua.FaultServer(uffd, resolver) as server:
            await finished(toucher)  # times out (the test fails) if nobody woke it
    assert python_path == [], "the fault went through Python, not the C loop"
    stats = server.stats
    assert (stats.faults, stats.eexist, stats.resolved, stats.errors) == (1, 1, 0, 0)
    assert region.read(P, P) == pattern(7)  # the page kept what was there first


@pytest.mark.parametrize("path", ["C", "Python"])
async def test_readahead_cut_short_by_a_concurrent_mremap(
    path: str, lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault on page 0 of four, served with readahead 3, while a thread mremaps pages
    2-3 away. The kernel copies page 0, then drops its locks to read the source's page 1
    (itself on a userfaultfd, held by this test until the move is done), and finds the
    destination range split: it stops with 1 page copied (and woken). That fault is
    resolved: the C loop (or, with the fast path off, ``copy_from`` in Python) must count
    it so, and mark only page 0 populated. Then pages 1-3 are served where they are now.

    Once counted as a failure (in Python; tested then with a mock ``uffd.copy``)."""
    source = source_bytes(4)
    target = lab.anonymous(4)
    uffd = lab.uffd(ua.Feature.EVENT_REMAP)
    uffd.register(target.address, target.length)
    # The source: page 0 in memory, pages 1-3 missing behind a second, full uffd (the
    # kernel reads them from inside the COPY ioctl, a fault a user-mode-only uffd refuses).
    held = lab.anonymous(4)
    held.write(0, source[:P])
    holder = lab.uffd(user_mode_only=False)
    holder.register(held.address + P, 3 * P)
    tail = lab.adopt_region(ua.Region(target.address + 2 * P, 2 * P))  # pages 2-3, to move
    resolver = ua.copy_from(held, base=target.address, readahead=3)
    assert resolver._fast_path() is not None
    if path == "Python":
        monkeypatch.setattr(resolver, "_fast_path", lambda: None)
    python_path = spy_on_python_path(resolver, monkeypatch)

    def hold_the_source_until_moved() -> Worker:
        # Runs while the event loop's thread is inside the COPY ioctl (the GIL released):
        # nothing here may need the event loop. Whatever happens, the source is released.
        try:
            fault = wait_fault(holder)  # the COPY's own read of the source's page 1
            assert fault.page == held.address + P, fault
            mover = lab.run(tail.move)  # blocks until the server reads the Remap
            # The Remap is queued (so the move is done) once the uffd is readable:
            # its only fault is the one the server read, and is still resolving.
            assert select.select([uffd], [], [], TIMEOUT)[0], "no Remap event queued"
            assert mover.alive
            return mover
        finally:
            holder.copy(held.address + P, source[P:])

    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver, on_error=ua.OnError(page="leave")) as server:
            helper = lab.run(hold_the_source_until_moved)
            await finished(lab.touch(target.address, 1))
            await finished(await finished(helper))  # and the mover, once the Remap is read
            expected_python = [] if path == "C" else [target.address]
            assert python_path == expected_python, f"not resolved once, by the {path} path"
            assert (server.stats.faults, server.stats.resolved, server.stats.eexist) == (1, 1, 0)
            assert bytes(resolver.populated) == b"\1\0\0\0", "only page 0 was copied"
            assert server.stats.events == 1  # the Remap, applied: Python serves from here on
            # Pages 1-3, where they are now: faults served after the Remap.
            assert await finished(lab.run(lambda: target.read(0, 2 * P))) == source[: 2 * P]
            assert await finished(lab.run(lambda: tail.read(0, 2 * P))) == source[2 * P :]
    assert server.stats.errors == 0
