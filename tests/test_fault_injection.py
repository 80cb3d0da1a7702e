"""Faults injected into serving, and the outcome README.md documents for each
("When serving stops, or a resolver fails"): no wrong bytes, no thread blocked
forever, and the error (if any) raised where structured concurrency puts it.

Injected: resolvers that raise (inline and after awaiting), that hang past a
deadline, that are cancelled at each of their await points; a uffd closed under
the server; the handler process killed with SIGKILL mid-run; the served process
killed mid-run. Every server test runs on asyncio and trio.
"""

from __future__ import annotations

import functools
import logging
import select
import signal
import socket
import subprocess
import sys
import textwrap
from typing import Any, Literal

import anyio
import pytest
from anyio.abc import TaskStatus

import uffd_async as ua

from ._support import TIMEOUT, Lab, finished, pattern, source_bytes

pytestmark = pytest.mark.anyio
P = ua.PAGE_SIZE


class Broken(Exception):
    """What the injected resolvers raise."""


def failing_resolver(
    how: Literal["inline", "async"], bad_page: int, source: bytes, base: int
) -> ua.resolvers.AnyResolver:
    """Serves ``source``, except that the page at ``bad_page`` raises :class:`Broken`."""
    good = ua.copy_from(source, base=base)

    class Inline(ua.Resolver):
        def resolve_now(self, fault: ua.PageFault, uffd: ua.Userfaultfd) -> bool:
            if fault.page == bad_page:
                raise Broken(f"injected at {fault.page:#x}")
            return good.resolve_now(fault, uffd)

    async def after_awaiting(fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        await anyio.sleep(0)
        if fault.page == bad_page:
            raise Broken(f"injected at {fault.page:#x}")
        await anyio.sleep(0)
        good.resolve_now(fault, uffd)

    return Inline() if how == "inline" else after_awaiting


# -- a resolver raises --------------------------------------------------------------


@pytest.mark.parametrize("how", ["inline", "async"])
@pytest.mark.parametrize("page", ["zero", "fallback", "function", "leave"])
@pytest.mark.parametrize("propagate", [True, False], ids=["propagate", "log"])
async def test_a_raising_resolver(
    lab: Lab,
    how: Literal["inline", "async"],
    page: Literal["zero", "fallback", "function", "leave"],
    propagate: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The failed page gets what ``on_error.page`` says, the others their bytes; the
    error leaves the block (propagate) or is logged while serving goes on. A fallback is a
    ``Resolver`` or a plain async function (``"function"``)."""
    pages = 5  # page 4 is first touched after the error, to show that serving went on
    uffd = lab.uffd()
    region = lab.anonymous(pages)
    uffd.register(region.address, region.length)
    source = source_bytes(pages)
    bad = region.address + 2 * P
    fallback = ua.copy_from(bytes(reversed(source)), base=region.address)

    async def plain_fallback(fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        await anyio.sleep(0)
        index = (fault.page - region.address) // P
        uffd.copy(fault.page, fallback_page(source, index))

    actions: dict[str, Any] = {"fallback": fallback, "function": plain_fallback}
    on_error = ua.OnError(page=actions.get(page, page), propagate=propagate)
    resolver = failing_resolver(how, bad, source, region.address)
    caplog.set_level(logging.ERROR, logger="uffd_async")
    with anyio.fail_after(TIMEOUT):
        try:
            async with ua.FaultServer(uffd, resolver, on_error=on_error) as server:
                good = [lab.touch(region.address + n * P, write=False) for n in (0, 1, 3)]
                for worker in good:
                    await finished(worker)
                victim = lab.run(lambda: region.read(2 * P, P))
                while server.stats.errors < 1:
                    await anyio.sleep(0.001)
                if not propagate:
                    if page != "leave":
                        assert await finished(victim) == expected_victim_page(page, source)
                    # Serving went on: a fault taken after the error is served as usual.
                    fresh = await finished(lab.run(lambda: region.read(4 * P, P)))
                    assert fresh == source[4 * P :]
                    assert server.stats.errors == 1
                await anyio.sleep(TIMEOUT if propagate else 0)
            assert not propagate, "the error should have left the block"
        except Broken:
            assert propagate
    assert region.read(0, 2 * P) == source[: 2 * P]
    assert region.read(3 * P, P) == source[3 * P : 4 * P]
    if not propagate:
        assert "resolver failed" in caplog.text and "Broken" in caplog.text
    if page == "leave":
        # The thread stays blocked; its fault was handed back to the uffd.
        assert victim.stays_blocked()
        async with ua.FaultServer(uffd, ua.copy_from(source, base=region.address)) as next_one:
            got = await finished(victim)
        assert next_one.stats.faults == 1
        assert got == source[2 * P : 3 * P]
    else:
        assert await finished(victim) == expected_victim_page(page, source)


def expected_victim_page(page: Literal["zero", "fallback", "function"], source: bytes) -> bytes:
    """What the failed page (page 2) holds under ``on_error.page``."""
    return bytes(P) if page == "zero" else fallback_page(source, 2)


def fallback_page(source: bytes, index: int) -> bytes:
    reversed_source = bytes(reversed(source))
    return reversed_source[index * P : (index + 1) * P]


POISONED = textwrap.dedent(
    """
    import anyio, sys, threading, uffd_async as ua
    P = ua.PAGE_SIZE
    how, propagate = sys.argv[1], sys.argv[2] == "1"
    class Broken(Exception):
        pass
    class Inline(ua.Resolver):
        def resolve_now(self, fault, uffd):
            raise Broken("injected")
    async def after_awaiting(fault, uffd):
        await anyio.sleep(0)
        raise Broken("injected")
    async def main():
        uffd = ua.Userfaultfd.open()
        region = ua.Region.anonymous(P)
        uffd.register(region.address, region.length)
        resolver = Inline() if how == "inline" else after_awaiting
        try:
            async with ua.FaultServer(uffd, resolver, on_error=ua.OnError(propagate=propagate)):
                threading.Thread(target=region.read, args=(0, P), daemon=True).start()
                await anyio.sleep(30)
        except Broken:
            # The error surfaced before the SIGBUS ended the process: sleep until it does.
            print("propagated", flush=True)
            await anyio.sleep(30)
    anyio.run(main)
    """
)


@pytest.mark.parametrize("how", ["inline", "async"])
@pytest.mark.parametrize("propagate", [True, False], ids=["propagate", "log"])
def test_the_default_poisons_the_page(how: str, propagate: bool) -> None:
    """on_error's default: UFFDIO_POISON, so the access raises SIGBUS and reads
    nothing (in-process, that ends the process), whatever ``propagate`` says."""
    result = subprocess.run(
        [sys.executable, "-c", POISONED, how, "1" if propagate else "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == -signal.SIGBUS, result.stderr


# -- a resolver hangs ------------------------------------------------------------------


async def test_a_resolver_past_its_own_deadline_is_a_failure(lab: Lab) -> None:
    """A resolver that bounds its own wait (fail_after) fails like any other: its page
    gets on_error's answer and the TimeoutError leaves the block."""
    uffd = lab.uffd()
    region = lab.anonymous(1)
    uffd.register(region.address, region.length)
    never = anyio.Event()

    async def hangs(fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        with anyio.fail_after(0.05):
            await never.wait()

    with anyio.fail_after(TIMEOUT):
        with pytest.raises(TimeoutError):
            async with ua.FaultServer(uffd, hangs, on_error=ua.OnError(page="zero")):
                victim = lab.run(lambda: region.read(0, P))
                await anyio.sleep(TIMEOUT)
        assert await finished(victim) == bytes(P)


async def test_a_hung_resolver_cancelled_by_a_deadline_around_the_server(lab: Lab) -> None:
    """The caller's deadline cancels serving: the blocked thread stays blocked (nothing
    is served in a hurry) and the next server gets its fault."""
    uffd = lab.uffd()
    region = lab.anonymous(2)
    uffd.register(region.address, region.length)
    never = anyio.Event()
    source = source_bytes(2)

    async def hangs(fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        await never.wait()

    with anyio.fail_after(TIMEOUT):
        with anyio.move_on_after(0.2) as scope:
            async with ua.FaultServer(uffd, hangs):
                victims = [lab.run(functools.partial(region.read, n * P, P)) for n in range(2)]
                await anyio.sleep(TIMEOUT)
        assert scope.cancelled_caught
        assert all(victim.stays_blocked() for victim in victims)
        async with ua.FaultServer(uffd, ua.copy_from(source, base=region.address)) as server:
            got = [await finished(victim) for victim in victims]
    assert got == [source[:P], source[P:]]
    assert server.stats.faults == 2


# -- cancelled at every await point ----------------------------------------------------

#: The await points of MultiStep, in order; the copy happens between "fetched" and "after".
STEPS = ["start", "fetch", "fetched", "after", "end"]


class MultiStep:
    """A resolver with several awaits; it stops at ``stop_at`` until cancelled."""

    def __init__(self, source: bytes, base: int, stop_at: str | None) -> None:
        self.source, self.base, self.stop_at = source, base, stop_at
        self.reached = anyio.Event()
        self.copied = False

    async def step(self, name: str) -> None:
        if name == self.stop_at:
            self.reached.set()
            await anyio.sleep_forever()
        await anyio.lowlevel.checkpoint()

    async def __call__(self, fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        await self.step("start")
        offset = fault.page - self.base
        await self.step("fetch")
        data = self.source[offset : offset + P]
        await self.step("fetched")
        uffd.copy(fault.page, data)
        self.copied = True
        await self.step("after")
        await self.step("end")


@pytest.mark.parametrize("stop_at", STEPS)
async def test_cancelled_at_each_await_point(lab: Lab, stop_at: str) -> None:
    """Cancelling the server at any await of a resolver loses no fault and serves no
    wrong bytes: before the copy the thread stays blocked and the next server serves
    it; after the copy it was served, and the handed-back fault is only woken again."""
    uffd = lab.uffd()
    region = lab.anonymous(1)
    uffd.register(region.address, region.length)
    source = pattern(5)
    resolver = MultiStep(source, region.address, stop_at)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            server = await tg.start(ua.serve, uffd, resolver)
            victim = lab.run(lambda: region.read(0, P))
            await resolver.reached.wait()
            assert server.stats.in_flight == 1
            tg.cancel_scope.cancel()
        if resolver.copied:
            assert await finished(victim) == source
        else:
            assert victim.stays_blocked()
        async with ua.FaultServer(uffd, MultiStep(pattern(6), region.address, None)) as again:
            assert await finished(victim) == (source if resolver.copied else pattern(6))
            while again.stats.faults < 1 or again.stats.in_flight:
                await anyio.sleep(0.001)
    # The kernel never resends a fault: the handed-back one reaches the next server.
    assert again.stats.faults == 1
    assert again.stats.eexist == (1 if resolver.copied else 0)


# -- the uffd closed under the server ---------------------------------------------------


async def test_uffd_closed_while_resolutions_wait(lab: Lab) -> None:
    """Closing the uffd ends serving (serve() returns), wakes every blocked thread,
    and anonymous memory then reads as zeros."""
    uffd = lab.uffd()
    region = lab.anonymous(8)
    uffd.register(region.address, region.length)
    never = anyio.Event()

    async def stuck(fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        await never.wait()

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            server = await tg.start(ua.serve, uffd, stuck)
            victims = [lab.run(functools.partial(region.read, n * P, P)) for n in range(8)]
            while server.stats.in_flight < 8:
                await anyio.sleep(0.001)
            uffd.close()
        for victim in victims:
            assert await finished(victim) == bytes(P)


async def test_uffd_closed_just_before_a_resolvers_ioctl(lab: Lab) -> None:
    """Closed between a resolver's await and its ioctl (here by the resolver's own
    task, which makes the order certain): serve() still just returns."""
    uffd = lab.uffd()
    region = lab.anonymous(1)
    uffd.register(region.address, region.length)

    async def closes_first(fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        await anyio.sleep(0)
        uffd.close()  # e.g. a shutdown path elsewhere in the program
        uffd.copy(fault.page, pattern(0))

    with anyio.fail_after(TIMEOUT):
        victim = lab.run(lambda: region.read(0, P))
        await ua.serve(uffd, closes_first)
        assert await finished(victim) == bytes(P)


# -- the handler process killed -----------------------------------------------------------

HANDLER = textwrap.dedent(
    """
    import anyio, socket, sys, uffd_async as ua
    from uffd_async._handoff._transfer import receive_uffd
    P = ua.PAGE_SIZE

    async def main():
        sock = socket.socket(fileno=int(sys.argv[1]))
        with sock, await receive_uffd(sock) as handoff:
            [mapping] = handoff.mappings
            served = int(sys.argv[2])

            async def resolver(fault, uffd):
                index = (fault.page - mapping.base_host_virt_addr) // P
                if index >= served:
                    print("hanging", index, flush=True)
                    await anyio.sleep_forever()
                stamp = f"page {index:08d} ".encode()
                uffd.copy(fault.page, (stamp * (P // len(stamp) + 1))[:P])

            print("serving", flush=True)
            await ua.serve(handoff.uffd, resolver)

    anyio.run(main)
    """
)


async def test_the_handler_process_killed_mid_run(lab: Lab) -> None:
    """The handler (another process, holding the only reference to the uffd) is killed
    with SIGKILL while threads here wait on faults: closing its last reference wakes
    them, and they fault the ordinary way. Pages it served keep their bytes, the
    others read as zeros; nothing else, and no thread stays blocked."""
    from uffd_async._handoff._transfer import send_uffd
    from uffd_async._restore._guest_mapping import GuestMapping

    pages, served = 16, 8
    uffd = lab.uffd()
    region = lab.anonymous(pages)
    uffd.register(region.address, region.length)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        with theirs:
            handler = subprocess.Popen(
                [sys.executable, "-c", HANDLER, str(theirs.fileno()), str(served)],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        try:
            mapping = GuestMapping(
                base_host_virt_addr=region.address, size=region.length, offset=0, page_size=P
            )
            send_uffd(ours, uffd, [mapping])
            uffd.close()  # the handler's reference is now the only one
            victims = [lab.run(functools.partial(region.read, n * P, P)) for n in range(pages)]
            for victim in victims[:served]:
                await finished(victim, TIMEOUT * 3)
            assert all(victim.stays_blocked() for victim in victims[served:])
            handler.kill()
            got = [await finished(victim) for victim in victims]
        finally:
            handler.kill()
            output, _ = handler.communicate(timeout=TIMEOUT)
    assert handler.returncode == -signal.SIGKILL, output
    assert got[:served] == [pattern(n) for n in range(served)], output
    assert got[served:] == [bytes(P)] * (pages - served)


FAULTER = textwrap.dedent(
    """
    import socket, sys, threading, time, uffd_async as ua
    from uffd_async._restore._guest_mapping import GuestMapping
    from uffd_async._handoff._transfer import send_uffd
    P = ua.PAGE_SIZE
    sock = socket.socket(fileno=int(sys.argv[1]))
    uffd = ua.Userfaultfd.open()
    region = ua.Region.anonymous(4 * P)
    uffd.register(region.address, region.length)
    mapping = GuestMapping(
        base_host_virt_addr=region.address, size=region.length, offset=0, page_size=P
    )
    send_uffd(sock, uffd, [mapping])
    for n in range(4):
        threading.Thread(target=ua.touch, args=(region.address + n * P, 1), daemon=True).start()
    time.sleep(60)
    """
)


async def test_the_served_process_killed_mid_run(lab: Lab) -> None:
    """The process whose memory is served dies while its faults are being resolved:
    the resolutions meet ESRCH, and serve() returns without an error."""
    from uffd_async._handoff._transfer import receive_uffd

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        with theirs:
            faulter = subprocess.Popen(
                [sys.executable, "-c", FAULTER, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        try:
            with anyio.fail_after(TIMEOUT):
                handoff = await receive_uffd(ours)
            with handoff:
                dead = anyio.Event()
                returned = anyio.Event()
                seen = exited = 0

                async def after_death(fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
                    nonlocal seen, exited
                    seen += 1
                    await dead.wait()
                    try:
                        uffd.copy(fault.page, pattern(0))
                    except ua.ProcessExited:  # ESRCH: the server takes it for the end
                        exited += 1
                        raise

                async def kill_when_all_wait() -> None:
                    while seen < 4:
                        await anyio.sleep(0.001)
                    faulter.kill()
                    while faulter.poll() is None:
                        await anyio.sleep(0.005)
                    dead.set()

                async def serve_until_it_returns(
                    *, task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED
                ) -> None:
                    await ua.serve(handoff.uffd, after_death, task_status=task_status)
                    returned.set()

                # Bounded, but not with fail_after: a serve() that does not return is
                # the failure below, with the process's output, not a TimeoutError.
                with anyio.move_on_after(TIMEOUT):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(kill_when_all_wait)
                        server = await tg.start(serve_until_it_returns)
                        await returned.wait()
        finally:
            faulter.kill()
            output, _ = faulter.communicate(timeout=TIMEOUT)
    assert seen == 4 and dead.is_set(), f"the process did not fault 4 times, then die: {output}"
    assert returned.is_set(), f"serve() still running {TIMEOUT}s after the process died"
    assert exited >= 1, "no resolution met ESRCH"
    assert server.stats.errors == 0 and server.stats.faults == 4, server.stats


# -- a failure while an event is unread ---------------------------------------------------


class FailsWhileARemoveIsUnread(ua.Resolver):
    """Raises once a REMOVE is queued and unread: disposing of the page then meets EAGAIN."""

    def __init__(self, lab: Lab, region: ua.Region) -> None:
        self.lab, self.region = lab, region

    def resolve_now(self, fault: ua.PageFault, uffd: ua.Userfaultfd) -> bool:
        self.lab.run(lambda: self.region.discard(P, P))  # blocks until the REMOVE is read
        assert select.select([uffd], [], [], TIMEOUT)[0]  # the REMOVE is queued
        raise Broken("injected while a REMOVE is unread")


async def test_a_failure_while_an_event_is_unread_still_disposes_and_reports(lab: Lab) -> None:
    uffd = lab.uffd(ua.Feature.EVENT_REMOVE)
    region = lab.anonymous(2)
    uffd.register(region.address, region.length)
    resolver = FailsWhileARemoveIsUnread(lab, region)
    with anyio.fail_after(TIMEOUT):
        with pytest.raises(Broken):
            async with ua.FaultServer(uffd, resolver, on_error=ua.OnError(page="zero")):
                victim = lab.run(lambda: region.read(0, P))
                await anyio.sleep(TIMEOUT)
        assert await finished(victim) == bytes(P)
