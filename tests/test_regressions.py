"""Regression tests for bugs found in the server and resolvers (now fixed).

Each docstring says what was broken; the test checks what must happen instead: a
"leave" that does not spin, zeros served for removed huge pages, and fork children
served after their parent died.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import anyio
import pytest

import uffd_async as ua
from uffd_async._core._memory import huge_page_size

from ._support import TIMEOUT, Lab, finished, source_bytes, with_huge_pages
from .conftest import needs_root

P = ua.PAGE_SIZE


#: Made free for the test as root (the ``huge_pages`` fixture); skips elsewhere.
needs_huge_pages = with_huge_pages(2)


def test_leave_without_propagating_does_not_spin() -> None:
    """Was broken: with OnError(page="leave", propagate=False) the failed fault was pushed
    back onto the uffd and the same server read it again at once, so the resolver ran (and
    an error was logged) in a busy loop, tens of thousands of times a second, until serving
    stopped. Now it is handed back only when the server stops.
    Run in a subprocess: the loop may starve the event loop that would time it out."""
    code = textwrap.dedent(
        """
        import logging, threading, anyio, uffd_async as ua
        logging.disable(logging.CRITICAL)
        calls = 0
        class Broken(ua.Resolver):
            def resolve_now(self, fault, uffd):
                global calls
                calls += 1
                raise KeyError("the page store is down")
        async def main():
            region = ua.Region.anonymous(ua.PAGE_SIZE)
            uffd = ua.Userfaultfd.open()
            uffd.register(region.address, region.length)
            toucher = threading.Thread(target=ua.touch, args=(region.address, 1))
            on_error = ua.OnError(page="leave", propagate=False)
            async with ua.FaultServer(uffd, Broken(), on_error=on_error):
                toucher.start()
                await anyio.sleep(0.3)
            uffd.close()  # wakes the toucher, which then reads a zero page
            toucher.join()
            region.close()
            print(calls)
        anyio.run(main)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == 1


@needs_huge_pages
@pytest.mark.anyio
async def test_copy_from_serves_zeros_for_a_removed_huge_page(lab: Lab) -> None:
    """Was broken: copy_from(page_size=huge) answered a removed huge page with
    UFFDIO_ZEROPAGE, which hugetlbfs refuses (EINVAL). Now a COPY of a zeroed huge page."""
    huge = huge_page_size()
    region = lab.adopt_region(ua.Region.hugetlb(huge))
    uffd = lab.uffd(ua.Feature.EVENT_REMOVE)
    uffd.register(region.address, region.length)
    resolver = ua.copy_from(os.urandom(huge), base=region.address, page_size=huge)
    on_error = ua.OnError(page="leave")
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver, page_size=huge, on_error=on_error):
            await finished(lab.touch(region.address, 1))
            await finished(lab.run(lambda: region.discard(0, huge)))
            await finished(lab.touch(region.address, 1, write=False))
    assert region.read(0, huge) == bytes(huge)


@needs_huge_pages
@pytest.mark.anyio
async def test_zero_fill_on_huge_pages(lab: Lab) -> None:
    """Was broken: zero_fill(page_size=huge) (documented: "hugetlb: a zeroed huge page")
    used UFFDIO_ZEROPAGE, which hugetlbfs refuses with EINVAL."""
    huge = huge_page_size()
    region = lab.adopt_region(ua.Region.hugetlb(huge))
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    on_error = ua.OnError(page="leave")
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, ua.zero_fill(page_size=huge), on_error=on_error):
            await finished(lab.touch(region.address, 1, write=False))
    assert region.read(0, huge) == bytes(huge)


FORKING_PEER = textwrap.dedent(
    """
    import ctypes, os, signal, socket, sys
    import uffd_async as ua
    P = ua.PAGE_SIZE
    signal.alarm(30)
    expected = bytes.fromhex(sys.argv[2])
    uffd = ua.Userfaultfd.open(ua.Feature.EVENT_FORK)
    region = ua.Region.anonymous(4 * P)
    uffd.register(region.address, region.length)
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sys.argv[1])
    mapping = ua.GuestMapping(base_host_virt_addr=region.address, size=region.length,
                              offset=0, page_size=P)
    ua.send_uffd(sock, uffd, [mapping])
    if os.fork() == 0:  # the child waits for the go, then reads a page it never touched
        sys.stdin.readline()
        ok = ctypes.string_at(region.address + P, P) == expected
        print("ok" if ok else "wrong bytes", flush=True)
        os._exit(0)
    print("forked", flush=True)
    ctypes.string_at(region.address, 1)  # held by the handler until this process is killed
    """
)


class Held(ua.Resolver):
    """Holds the parent's faults until ``release``; the fork child's get copy_from at once."""

    def __init__(self, source: bytes, base: int) -> None:
        self.source, self.base = source, base
        self.release = anyio.Event()
        self.held = 0

    async def resolve(self, fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        self.held += 1
        await self.release.wait()
        uffd.copy(fault.page, self.source[fault.page - self.base :][:P])  # ESRCH by now

    def fork(self) -> ua.Resolver:
        return ua.copy_from(self.source, base=self.base)


@needs_root
@pytest.mark.anyio
async def test_a_dead_parent_stops_serving_its_live_fork_child(tmp_path: Path) -> None:
    """Was broken: a fault of the parent was in flight when it died; resolving it failed
    with ESRCH and ``process_exited`` cancelled the whole server, fork children included;
    ``_serve_child`` then closed the child's uffd, so the child, alive and well, read zeros
    for every page not served yet instead of its contents. Now the children are served on."""
    source = source_bytes(4)
    path = str(tmp_path / "h.sock")
    command = [sys.executable, "-c", FORKING_PEER, path, source[P : 2 * P].hex()]
    with (
        socket.socket(socket.AF_UNIX) as listener,
        subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        ) as process,
    ):
        assert process.stdin is not None and process.stdout is not None
        stdin, stdout = process.stdin, process.stdout
        output: list[bytes] = []
        reader = threading.Thread(target=lambda: output.append(stdout.read()))
        reader.start()
        try:
            listener.bind(path)
            listener.listen()
            listener.setblocking(False)
            with anyio.fail_after(TIMEOUT):
                await anyio.wait_readable(listener)
                conn, _ = listener.accept()
                with conn, await ua.receive_uffd(conn) as handoff:
                    [mapping] = handoff.mappings
                    resolver = Held(source, mapping.base_host_virt_addr)
                    async with anyio.create_task_group() as tg:
                        server = await tg.start(ua.serve, handoff.uffd, resolver)
                        while resolver.held < 1 or server.stats.forks < 1:
                            await anyio.sleep(0.005)
                        process.kill()  # the parent dies with its fault in flight
                        while process.poll() is None:
                            await anyio.sleep(0.005)
                        resolver.release.set()
                        await anyio.sleep(0.2)  # ESRCH, and whatever the server does then
                        stdin.write(b"go\n")  # the child reads its page now
                        stdin.close()
                        while reader.is_alive():
                            await anyio.sleep(0.005)
                        tg.cancel_scope.cancel()
        finally:
            process.kill()
            reader.join(TIMEOUT)
    assert output == [b"forked\nok\n"]
