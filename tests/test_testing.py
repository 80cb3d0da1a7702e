"""FaultGate and the pytest fixtures, under anyio (asyncio, trio) and pytest-trio."""

from __future__ import annotations

import anyio
import pytest
import trio

import uffd_async as ua
from uffd_async.testing import FaultGate

from ._support import TIMEOUT, Lab, finished, pattern

P = ua.PAGE_SIZE


@pytest.mark.anyio
async def test_gate_pauses_a_thread_at_a_memory_access(lab: Lab) -> None:
    region = lab.anonymous(8)
    with anyio.fail_after(TIMEOUT):
        async with FaultGate(region.address, region.length) as gate:
            worker = lab.touch(region.address + 5 * P + 17, 1)
            fault = await gate.next_fault()
            assert fault.page == region.address + 5 * P and fault.is_write
            assert worker.stays_blocked()  # paused exactly there
            await gate.resolve(fault, pattern(5))
            await finished(worker)
    assert region.read(5 * P, P) == pattern(5)


@pytest.mark.anyio
async def test_interleaving_two_threads(lab: Lab) -> None:
    """Drive two threads through a chosen order: B's access completes before A's."""
    region = lab.anonymous(2)
    order: list[str] = []
    with anyio.fail_after(TIMEOUT):
        async with FaultGate(region.address, region.length) as gate:

            def access(page: int, name: str) -> None:
                ua.touch(region.address + page * P, 1)
                order.append(name)

            a = lab.run(lambda: access(0, "a"))
            first = await gate.next_fault()
            b = lab.run(lambda: access(1, "b"))
            second = await gate.next_fault()
            await gate.resolve(second)
            await finished(b)
            await gate.resolve(first)
            await finished(a)
    assert order == ["b", "a"]


@pytest.mark.anyio
async def test_leaving_the_gate_releases_held_threads(lab: Lab) -> None:
    region = lab.anonymous(4)
    with anyio.fail_after(TIMEOUT):
        async with FaultGate(region.address, region.length) as gate:
            worker = lab.touch(region.address, region.length, write=False)
            await gate.next_fault()
        await finished(worker)
    assert region.read(0, region.length) == bytes(region.length)


@pytest.mark.anyio
async def test_release_with_a_resolver(lab: Lab) -> None:
    region = lab.anonymous(4)
    source = b"".join(pattern(i) for i in range(4))
    with anyio.fail_after(TIMEOUT):
        async with FaultGate(region.address, region.length) as gate:
            worker = lab.touch(region.address, region.length)
            await gate.next_fault()
            gate.release(ua.copy_from(source, base=region.address))
            await finished(worker)
    assert region.read(0, region.length) == source


@pytest.mark.anyio
async def test_resolving_an_unknown_fault(lab: Lab) -> None:
    region = lab.anonymous(1)
    async with FaultGate(region.address, region.length) as gate:
        stray = ua.PageFault(address=region.address, flags=ua.FaultFlags(0))
        with pytest.raises(LookupError):
            await gate.resolve(stray)


@pytest.mark.anyio
async def test_fixture_under_anyio(fault_gate: FaultGate, region: ua.Region, lab: Lab) -> None:
    with anyio.fail_after(TIMEOUT):
        worker = lab.touch(region.address + P)
        fault = await fault_gate.next_fault()
        await fault_gate.resolve(fault, pattern(1))
        await finished(worker)
    assert region.read(P, P) == pattern(1)


@pytest.mark.trio
async def test_fixture_under_pytest_trio(
    fault_gate: FaultGate, region: ua.Region, lab: Lab
) -> None:
    with trio.fail_after(TIMEOUT):
        worker = lab.touch(region.address + 2 * P)
        fault = await fault_gate.next_fault()
        await fault_gate.resolve(fault, pattern(2))
        await finished(worker)
    assert region.read(2 * P, P) == pattern(2)


def test_uffd_and_region_fixtures(uffd: ua.Userfaultfd, region: ua.Region) -> None:
    assert uffd.register(region.address, region.length) & ua.Ioctl.COPY
