"""EventReader on asyncio and trio, with real faults."""

from __future__ import annotations

import anyio
import pytest

import uffd_async as ua

from ._support import TIMEOUT, Lab, finished, pattern

pytestmark = pytest.mark.anyio
P = ua.PAGE_SIZE


async def test_iteration_yields_faults_and_ends_when_closed(lab: Lab) -> None:
    uffd = lab.uffd()
    region = lab.anonymous(2)
    uffd.register(region.address, region.length)
    worker = lab.touch(region.address + P)
    reader = ua.EventReader(uffd)
    seen = []
    with anyio.fail_after(10):
        async for event in reader:
            seen.append(event)
            assert isinstance(event, ua.PageFault)
            uffd.copy(event.page, pattern(1))
            await finished(worker)
            uffd.close()
    assert [e.page for e in seen if isinstance(e, ua.PageFault)] == [region.address + P]


async def test_receive_and_receive_batch(lab: Lab) -> None:
    uffd = lab.uffd()
    region = lab.anonymous(4)
    uffd.register(region.address, region.length)
    workers = [lab.touch(region.address + i * P) for i in range(4)]
    reader = ua.EventReader(uffd, batch=2)
    pages: set[int] = set()
    with anyio.fail_after(10):
        while len(pages) < 4:
            batch = await reader.receive_batch()
            assert 1 <= len(batch) <= 2
            for event in batch:
                assert isinstance(event, ua.PageFault)
                pages.add(event.page)
                uffd.zeropage(event.page, P)
        for worker in workers:
            await finished(worker)
    assert pages == {region.address + i * P for i in range(4)}
    uffd.close()
    with pytest.raises(anyio.ClosedResourceError):
        await reader.receive()


async def test_two_readers_at_once_is_busy(lab: Lab) -> None:
    uffd = lab.uffd()
    reader = ua.EventReader(uffd)

    async def first() -> None:
        with pytest.raises(anyio.ClosedResourceError):
            await reader.receive()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(anyio.BusyResourceError):
                await reader.receive()
            uffd.close()  # wakes the first reader


async def close_wakes_reader(lab: Lab) -> list[str]:
    """Close the uffd under a reader waiting on it; what the reader saw."""
    uffd = lab.uffd()
    reader = ua.EventReader(uffd)
    outcome: list[str] = []

    async def read() -> None:
        try:
            await reader.receive()
        except anyio.ClosedResourceError:
            outcome.append("closed")

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await anyio.wait_all_tasks_blocked()
            uffd.close()
    return outcome


async def test_closing_wakes_a_waiting_reader(lab: Lab) -> None:
    assert await close_wakes_reader(lab) == ["closed"]


async def test_bad_batch() -> None:
    with ua.Userfaultfd.open() as uffd, pytest.raises(ValueError):
        ua.EventReader(uffd, batch=0)
