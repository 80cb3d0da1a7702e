"""Touching served memory from the thread of the event loop that serves it.

That thread would wait on a fault only its own loop can resolve: it would hang
silently. Region's accessors refuse instead (EDEADLK, naming the way out), and
only where a fault would happen: populated pages, and memory no uffd serves,
read as ever. Were the refusal missing, a rescuer thread resolves the fault
after a bound, so the test fails by assertion rather than hang the run.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Iterator

import anyio
import pytest

import uffd_async as ua

from ._support import Lab, source_bytes

pytestmark = pytest.mark.anyio

P = ua.PAGE_SIZE
SOURCE = source_bytes(4)
RESCUE_AFTER = 2.0


@contextlib.contextmanager
def rescued(uffd: ua.Userfaultfd, region: ua.Region) -> Iterator[None]:
    """Zero-fill the region's missing pages from another thread after a bound (waking a
    loop thread that blocked on them); stopped and joined on the way out."""
    stop = threading.Event()

    def rescue() -> None:
        if not stop.wait(RESCUE_AFTER):
            for page in range(region.address, region.address + region.length, P):
                with contextlib.suppress(ua.UffdError):
                    uffd.zeropage(page, P)

    rescuer = threading.Thread(target=rescue, name="rescuer")
    rescuer.start()
    try:
        yield
    finally:
        stop.set()
        rescuer.join()


@pytest.mark.parametrize(
    "access",
    [
        lambda region: region.read(P + 8, 16),
        lambda region: region.write(P, b"x"),
        lambda region: region.fill(P, P, 1),
    ],
    ids=["read", "write", "fill"],
)
async def test_faulting_on_the_serving_loops_thread_is_refused(lab: Lab, access: object) -> None:
    region = lab.anonymous(4)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    assert callable(access)
    async with ua.FaultServer(uffd, ua.copy_from(SOURCE, base=region.address)) as server:
        with rescued(uffd, region), pytest.raises(ua.UffdError) as info:
            access(region)
        assert info.value.errno == errno.EDEADLK
        assert "from a worker thread" in str(info.value)
        assert server.stats.faults == 0  # refused before any fault
        # The way out the message names: a worker thread, whose fault the loop serves.
        assert await anyio.to_thread.run_sync(region.read, P, P) == SOURCE[P : 2 * P]
        assert region.read(P, P) == SOURCE[P : 2 * P]  # populated: read on the loop, as ever
        assert server.stats.faults == 1


async def test_memory_no_server_here_serves_is_read_as_ever(lab: Lab) -> None:
    served, plain = lab.anonymous(2), lab.anonymous(2)
    uffd = lab.uffd()
    uffd.register(served.address, served.length)
    async with ua.FaultServer(uffd, ua.copy_from(SOURCE, base=served.address)):
        plain.write(P, b"y")  # never touched, not registered: no fault to wait on
        assert plain.read(0, 2 * P) == bytes(P) + b"y" + bytes(P - 1)
