"""``prefetch()`` inside ``native_replay()``: the working set copied by a worker thread in
native code (:mod:`uffd_async._restore._native_replay`), on real faults, on both loops.

The replay runs without the GIL, so the tests cannot stop it at a chosen run; they make
the event happen while it runs (a thread waits, from the loop, until the replay has
reached a page, then discards or moves) and assert what must hold whenever it lands:
every byte right, zeros where a discard left them, never source bytes at a stale
place, no hang. Faulting threads touch memory through ctypes (``Lab.touch``,
``Region.read``), never holding the GIL.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import uffd_async as ua
from uffd_async._core import _native
from uffd_async._core._abi import EVENT_REMOVE
from uffd_async._restore._native_replay import (
    _gated_reader,
    can_replay_natively,
    native_replay,
    replay_natively,
)

from ._support import TIMEOUT, Lab, finished, source_bytes
from .test_prefetch import KINDS, PAGES, P, Runs, Setup, everything, queued, snapshot


@pytest.fixture(autouse=True)
def replaying_natively() -> Iterator[None]:
    with native_replay():
        yield


pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not _native.HAS_REPLAY, reason="the native helper has no ua_replay"),
]
__all__ = ["snapshot"]  # the fixture, from test_prefetch

BIG = 4096  # pages: a replay long enough for an event to land while it runs


@pytest.fixture(params=KINDS)
def setup(lab: Lab, snapshot: ua.Snapshot, request: pytest.FixtureRequest) -> Setup:
    return Setup(lab, request.param, snapshot, ua.Feature.EVENT_REMOVE | ua.Feature.EVENT_REMAP)


class Big:
    """A registered region of BIG pages, copy_from or a snapshot's resolver."""

    def __init__(self, lab: Lab, kind: str, tmp_path: Path, pages: int = BIG) -> None:
        self.pages = pages
        self.source = source_bytes(pages)
        self.region = lab.anonymous(pages)
        self.uffd = lab.uffd(ua.Feature.EVENT_REMOVE | ua.Feature.EVENT_REMAP)
        self.uffd.register(self.region.address, self.region.length)
        self.resolver: Any
        self.snapshot: ua.Snapshot | None = None
        if kind == "copy_from":
            self.resolver = ua.copy_from(self.source, base=self.region.address)
        else:
            path = tmp_path / "big.bin"
            path.write_bytes(self.source)
            self.snapshot = ua.Snapshot(path)
            mapping = ua.GuestMapping(
                base_host_virt_addr=self.region.address, size=pages * P, offset=0, page_size=P
            )
            self.resolver = self.snapshot.resolver([mapping])
        self.expected = bytearray(self.source)
        self.populated = self._copier()._populated

    def _copier(self) -> Any:
        if isinstance(self.resolver, ua.SnapshotResolver):
            return self.resolver._parts[0].copier
        return self.resolver

    async def reached(self, page: int) -> None:
        """Wait (from the loop, bounded by the caller) until the replay copied ``page``."""
        while not self.populated[page]:
            await anyio.sleep(0)

    def close(self) -> None:
        if self.snapshot is not None:
            self.snapshot.close()


@pytest.fixture(params=KINDS)
def big(lab: Lab, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    big = Big(lab, request.param, tmp_path)
    yield big
    big.close()


@pytest.fixture(params=KINDS)
def bigger(lab: Lab, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    big = Big(lab, request.param, tmp_path, 4 * BIG)
    yield big
    big.close()


async def test_the_working_set_is_copied_natively(
    lab: Lab, setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every page of the set copied by the thread (the loop's path copies none), bytes
    right, demand faults only outside the set."""
    pages = random.Random(5).sample(range(PAGES), 40)
    runs = Runs(setup.resolver, monkeypatch)
    assert can_replay_natively(setup.resolver)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(setup.uffd, setup.resolver) as server:
            stats = await ua.prefetch(setup.uffd, setup.resolver, setup.working_set(pages))
            assert await setup.read_all(lab) == setup.expected
    assert runs.log == [], "the loop's path copied runs the native replay should have"
    assert stats.prefetched == 40 and stats.working_set_done
    assert setup.uffd._filled == PAGES * P
    assert stats.runs == len(list(setup.working_set(pages).runs(512)))
    assert server.stats.faults == PAGES - 40


async def test_pages_already_there_are_skipped(
    lab: Lab, setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EEXIST (a demand fault got there first) is skipped, not an error: the thread goes
    on, and marks the page populated."""
    runs = Runs(setup.resolver, monkeypatch)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(setup.uffd, setup.resolver) as server:
            await finished(lab.touch(setup.region.address + 5 * P, 3 * P))
            # The resolver knows those are there; forget it, so the replay meets EEXIST.
            copier: Any = (
                setup.resolver._parts[0].copier
                if isinstance(setup.resolver, ua.SnapshotResolver)
                else setup.resolver
            )
            copier._populated[5:8] = bytes(3)
            stats = await ua.prefetch(
                setup.uffd, setup.resolver, setup.working_set([*range(PAGES)])
            )
            assert bytes(copier._populated) == b"\1" * PAGES
            assert await setup.read_all(lab) == setup.expected
    assert stats.prefetched == PAGES - 3
    assert server.stats.faults == 3
    assert runs.log == [], "an EEXIST stopped the native replay"


async def test_a_fault_far_ahead_of_the_replay(lab: Lab, big: Big) -> None:
    """A thread faults on the last page before the replay (one page a run) starts: the
    server answers it while the thread copies; every byte right, each page copied once."""
    last = big.region.address + (BIG - 1) * P
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(big.uffd, big.resolver) as server:
            toucher = lab.touch(last, 1, write=False)
            stats = await ua.prefetch(big.uffd, big.resolver, everything(BIG), run_bytes=P)
            await finished(toucher)
            assert await finished(lab.run(lambda: big.region.read(0, big.region.length))) == (
                big.source
            )
    assert stats.prefetched + server.stats.resolved == BIG
    assert stats.working_set_done


@pytest.mark.parametrize("at", [0, 1024, 3000])
async def test_a_discard_during_the_replay(lab: Lab, big: Big, at: int) -> None:
    """Once the replay copied page ``at``, pages 2048-2303 and 0-63 are discarded
    (MADV_DONTNEED): whenever the REMOVE lands, they read zeros, never source bytes, and
    everything else is right."""
    discarding: list[Any] = []

    async def discard_when_reached() -> None:
        await big.reached(at)
        discarding.append(lab.run(lambda: big.region.discard(2048 * P, 256 * P)))
        discarding.append(lab.run(lambda: big.region.discard(0, 64 * P)))

    big.expected[2048 * P : 2304 * P] = bytes(256 * P)
    big.expected[: 64 * P] = bytes(64 * P)
    with anyio.fail_after(TIMEOUT):
        async with (
            ua.FaultServer(big.uffd, big.resolver) as server,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(discard_when_reached)
            stats = await ua.prefetch(big.uffd, big.resolver, everything(BIG), run_bytes=P)
            for worker in discarding:
                await finished(worker)
            kept = [page for page in range(BIG) if not (page < 64 or 2048 <= page < 2304)]
            assert all(big.populated[page] for page in kept), "the replay did not go on"
            assert await finished(lab.run(lambda: big.region.read(0, big.region.length))) == (
                big.expected
            )
    assert server.stats.events == 2
    assert stats.working_set_done


async def test_an_event_unread_when_the_replay_starts(lab: Lab, setup: Setup) -> None:
    """A REMOVE is queued before the prefetch: the replay meets it (EAGAIN) or the server
    reads it first; either way the discarded pages stay zero."""
    discarding = lab.run(lambda: setup.region.discard(16 * P, 16 * P))
    queued(setup.uffd)
    setup.expected[16 * P : 32 * P] = bytes(16 * P)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(setup.uffd, setup.resolver) as server:
            stats = await ua.prefetch(
                setup.uffd, setup.resolver, setup.working_set([*range(PAGES)])
            )
            await finished(discarding)
            assert await setup.read_all(lab) == setup.expected
    assert stats.working_set_done
    assert server.stats.events == 1


async def test_an_mremap_during_the_replay(lab: Lab, big: Big) -> None:
    """The second half moves (mremap) once the replay copied page 1024: whenever the REMAP
    lands, both halves read the source's bytes at their new places."""
    tail = lab.adopt_region(ua.Region(big.region.address + BIG // 2 * P, BIG // 2 * P))
    moving: list[Any] = []

    async def move_when_reached() -> None:
        await big.reached(1024)
        moving.append(lab.run(tail.move))

    with anyio.fail_after(TIMEOUT):
        async with (
            ua.FaultServer(big.uffd, big.resolver) as server,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(move_when_reached)
            stats = await ua.prefetch(big.uffd, big.resolver, everything(BIG), run_bytes=P)
            await finished(moving[0])
            head = await finished(lab.run(lambda: big.region.read(0, BIG // 2 * P)))
            moved = await finished(lab.run(lambda: tail.read(0, BIG // 2 * P)))
    assert head == big.source[: BIG // 2 * P] and moved == big.source[BIG // 2 * P :]
    assert server.stats.events == 1
    assert stats.working_set_done


async def test_cancelled_mid_replay(lab: Lab, bigger: Big) -> None:
    """Cancelled once the replay copied page 1024: it returns (bounded), the thread has
    stopped (nothing is copied after), and the uffd reads as before (no gate left)."""
    big = bigger
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            await tg.start(ua.serve, big.uffd, big.resolver)

            async def cancel_when_reached() -> None:
                await big.reached(1024)
                tg.cancel_scope.cancel()

            tg.start_soon(cancel_when_reached)
            await replay_natively(big.uffd, big.resolver, [(page, 1) for page in range(big.pages)])
    copied = bytes(big.populated).count(1)
    assert "_read_raw" not in vars(big.uffd), "the gated read outlived the replay"
    await anyio.sleep(0.05)
    assert bytes(big.populated).count(1) == copied, "the thread copied after it was cancelled"
    assert 1024 < copied < big.pages, "the replay was not stopped"


async def test_a_resolver_that_does_not_qualify_goes_the_loops_way(
    lab: Lab, setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an event was applied (a layout changed), the whole set goes the loop's way."""
    runs = Runs(setup.resolver, monkeypatch)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(setup.uffd, setup.resolver):
            await finished(lab.run(lambda: setup.region.discard(0, 4 * P)))
            assert not can_replay_natively(setup.resolver)
            stats = await ua.prefetch(
                setup.uffd, setup.resolver, setup.working_set([*range(PAGES)])
            )
            setup.expected[: 4 * P] = bytes(4 * P)
            assert await setup.read_all(lab) == setup.expected
    assert runs.log and stats.prefetched == PAGES - 4


async def test_the_gated_read_stops_the_replay_on_an_event(lab: Lab) -> None:
    """The read the server makes while the thread copies (``ua_gated_read``): a batch of
    faults leaves the replay going; a REMOVE stops it (before its next copy), so no copy
    is issued after the discard it announces was let go on."""
    region = lab.anonymous(8)
    uffd = lab.uffd(ua.Feature.EVENT_REMOVE)
    uffd.register(region.address, region.length)
    control = _native.ReplayControl()
    read = _gated_reader(uffd, control)
    toucher = lab.touch(region.address, 1, write=False)
    queued(uffd)
    faults = read(8)
    assert faults and not control.stop, "a page fault stopped the replay"
    uffd.zeropage(region.address, P)  # answer it: the toucher goes on
    await finished(toucher)
    discarding = lab.run(lambda: region.discard(0, 8 * P))
    queued(uffd)
    assert read(8) and control.stop and control.event == EVENT_REMOVE
    await finished(discarding)
    assert read(8) == b""


async def test_a_closed_uffd_ends_the_replay(lab: Lab, bigger: Big) -> None:
    """The uffd is closed (serving ended) once the replay copied page 1024: the close
    stops the thread before its next copy, and the prefetch ends quietly."""
    big = bigger
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            await tg.start(ua.serve, big.uffd, big.resolver)

            async def close_when_reached() -> None:
                await big.reached(1024)
                big.uffd.close()

            tg.start_soon(close_when_reached)
            stats = await ua.prefetch(big.uffd, big.resolver, everything(big.pages), run_bytes=P)
    copied = bytes(big.populated).count(1)
    await anyio.sleep(0.05)
    assert bytes(big.populated).count(1) == copied, "the thread copied after the close"
    assert 1024 < copied < big.pages and not stats.working_set_done
