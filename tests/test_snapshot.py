"""Snapshot and SnapshotResolver in this process: routing, events, fork, and misuse."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import uffd_async as ua

from ._support import TIMEOUT, Lab, finished, source_bytes

P = ua.PAGE_SIZE
PAGES = 16
SOURCE = source_bytes(PAGES)


@pytest.fixture
def snapshot(tmp_path: Path) -> Iterator[ua.Snapshot]:
    path = tmp_path / "snapshot.bin"
    path.write_bytes(SOURCE)
    with ua.Snapshot(path) as snapshot:
        yield snapshot


def mapping(base: int, pages: int, offset_pages: int) -> ua.GuestMapping:
    return ua.GuestMapping(
        base_host_virt_addr=base, size=pages * P, offset=offset_pages * P, page_size=P
    )


def fault_at(address: int) -> ua.PageFault:
    return ua.PageFault(address=address, flags=ua.FaultFlags(0))


@pytest.mark.anyio
async def test_faults_go_to_the_mapping_that_holds_them(lab: Lab, snapshot: ua.Snapshot) -> None:
    region = lab.anonymous(10)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    a = mapping(region.address, 4, 8)  # pages 0-3 <- snapshot pages 8-11
    b = mapping(region.address + 6 * P, 4, 0)  # pages 6-9 <- snapshot pages 0-3
    resolver = snapshot.resolver([a, b])
    assert resolver.mappings == (a, b)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver) as server:
            await finished(lab.touch(region.address, 4 * P, write=False))
            await finished(lab.touch(region.address + 6 * P, 4 * P, write=False))
    assert region.read(0, 4 * P) == SOURCE[8 * P : 12 * P]
    assert region.read(6 * P, 4 * P) == SOURCE[: 4 * P]
    assert server.stats.resolved == 8
    with pytest.raises(ua.NoSourcePage, match="did not list in its mappings"):
        resolver.resolve_now(fault_at(region.address + 4 * P), uffd)  # the gap


@pytest.mark.anyio
async def test_readahead_stays_inside_its_mapping(lab: Lab, snapshot: ua.Snapshot) -> None:
    region = lab.anonymous(8)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    resolver = snapshot.resolver(
        [mapping(region.address, 4, 12), mapping(region.address + 4 * P, 4, 0)], readahead=7
    )
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver) as server:
            await finished(lab.touch(region.address, region.length, write=False))
    assert server.stats.faults == 2  # one per mapping: readahead fills the rest of each
    assert region.read(0, region.length) == SOURCE[12 * P :] + SOURCE[: 4 * P]


@pytest.mark.anyio
async def test_a_fork_keeps_its_own_bookkeeping(lab: Lab, snapshot: ua.Snapshot) -> None:
    """A Remove applied to the parent after the fork: the child still serves the bytes."""
    region = lab.anonymous(4)
    uffd = lab.uffd()  # no EVENT_REMOVE: discarding below does not wait for a handler
    uffd.register(region.address, region.length)
    parent = snapshot.resolver([mapping(region.address, 4, 4)])
    child = parent.fork()
    parent.apply(ua.Remove(start=region.address, end=region.address + region.length))
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, child):
            await finished(lab.touch(region.address, region.length, write=False))
        assert region.read(0, region.length) == SOURCE[4 * P : 8 * P]
        region.discard(0, region.length)
        async with ua.FaultServer(uffd, parent):
            await finished(lab.touch(region.address, region.length, write=False))
        assert region.read(0, region.length) == bytes(region.length)


def test_unmap_and_remap_move_the_routes(lab: Lab, snapshot: ua.Snapshot) -> None:
    uffd = lab.uffd()
    base = 0x7F00_0000_0000
    resolver = snapshot.resolver([mapping(base, 4, 0), mapping(base + 8 * P, 4, 4)])
    resolver.apply(ua.Unmap(start=base + 2 * P, end=base + 10 * P))
    for page in (2, 3, 8, 9):
        with pytest.raises(ua.NoSourcePage):
            resolver.resolve_now(fault_at(base + page * P), uffd)
    resolver.apply(ua.Remap(from_address=base + 10 * P, to_address=base + 2 * P, length=2 * P))
    with pytest.raises(ua.NoSourcePage):
        resolver.resolve_now(fault_at(base + 10 * P), uffd)
    with pytest.raises(ua.UffdError, match=r"not \(or no longer\) mapped"):
        resolver.resolve_now(fault_at(base + 2 * P), uffd)  # routed, then refused by the kernel


def test_a_closed_snapshot_serves_nothing(lab: Lab, tmp_path: Path) -> None:
    path = tmp_path / "snapshot.bin"
    path.write_bytes(SOURCE)
    snapshot = ua.Snapshot(path)
    resolver = snapshot.resolver([mapping(0x7F00_0000_0000, 4, 0)])
    snapshot.close()
    snapshot.close()
    assert snapshot.closed and "closed" in repr(snapshot)
    with pytest.raises(ua.SnapshotClosed, match="stop the servers that use it"):
        resolver.resolve_now(fault_at(0x7F00_0000_0000), lab.uffd())
    with pytest.raises(ua.SnapshotClosed):
        snapshot.resolver([mapping(0x7F00_0000_0000, 4, 0)])


def test_mappings_must_fit_the_snapshot(snapshot: ua.Snapshot) -> None:
    with pytest.raises(ua.HandoffError, match="ends past the 0x10000-byte backing memory"):
        snapshot.resolver([mapping(0x7F00_0000_0000, 4, 14)])
    with pytest.raises(ua.HandoffError, match="overlaps"):
        snapshot.resolver([mapping(0x7F00_0000_0000, 4, 0), mapping(0x7F00_0000_1000, 1, 8)])
    with pytest.raises(ua.HandoffError, match="no mappings"):
        snapshot.resolver([])


def test_what_cannot_be_a_snapshot(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ua.Snapshot(tmp_path / "missing")
    (tmp_path / "empty").touch()
    with pytest.raises(ua.InvalidArgument, match="is empty: there is nothing to serve"):
        ua.Snapshot(tmp_path / "empty")
    with pytest.raises(ua.InvalidArgument, match="is not a regular file"):
        ua.Snapshot(tmp_path)
