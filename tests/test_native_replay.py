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

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import anyio
import attrs
import pytest

import uffd_async as ua
from uffd_async._core import _native
from uffd_async._restore._native_replay import _Plan, native_replay, replay_natively
from uffd_async._serve._resolvers import MemoryPart

from ._support import TIMEOUT, Lab, finished, pattern, source_bytes
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
    assert cast(Any, setup.resolver).memory_parts() is not None
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(setup.uffd, setup.resolver) as server:
            stats = await ua.prefetch(
                setup.uffd, setup.resolver, setup.working_set(pages), readahead=0
            )
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
async def test_a_discard_during_the_replay(
    lab: Lab, big: Big, at: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the replay copied page ``at``, pages 2048-2303 and 0-63 are discarded
    (MADV_DONTNEED): whenever the REMOVE lands, they read zeros, never source bytes, and
    everything else is right; the rest is planned again natively (the loop copies none)."""
    runs = Runs(big.resolver, monkeypatch)
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
    assert stats.working_set_done and runs.log == []


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


async def test_an_mremap_during_the_replay(
    lab: Lab, big: Big, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second half moves (mremap) once the replay copied page 1024: whenever the REMAP
    lands, both halves read the source's bytes at their new places, the moved half
    replayed natively at its new place (the loop copies none)."""
    runs = Runs(big.resolver, monkeypatch)
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
    assert stats.working_set_done and runs.log == []


async def test_cancelled_mid_replay(lab: Lab, bigger: Big) -> None:
    """Cancelled once the replay copied page 1024: it returns (bounded), the thread has
    stopped (nothing is copied after), and the uffd's reads are given back."""
    big = bigger
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            await tg.start(ua.serve, big.uffd, big.resolver)

            async def cancel_when_reached() -> None:
                await big.reached(1024)
                tg.cancel_scope.cancel()

            tg.start_soon(cancel_when_reached)
            await replay_natively(
                big.uffd, big.resolver.memory_parts(), [(page, 1) for page in range(big.pages)]
            )
    copied = bytes(big.populated).count(1)
    assert big.uffd._loan is None, "the reads stayed lent after the replay"
    await anyio.sleep(0.05)
    assert bytes(big.populated).count(1) == copied, "the thread copied after it was cancelled"
    assert 1024 < copied < big.pages, "the replay was not stopped"


async def test_pages_removed_before_are_left_to_the_server(
    lab: Lab, setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a discard was applied, the set still replays natively (the loop's path copies
    nothing), around the removed pages: those are blocked, never mapped by the thread;
    read, they fault to the server, which maps zeros."""
    runs = Runs(setup.resolver, monkeypatch)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(setup.uffd, setup.resolver) as server:
            await finished(lab.run(lambda: setup.region.discard(0, 4 * P)))
            [part] = cast(Any, setup.resolver).memory_parts()
            assert part.blocked is not None and bytes(part.blocked[:5]) == b"\1\1\1\1\0"
            toucher = lab.touch(setup.region.address + P, 1, write=False)  # the thread reads it
            queued(setup.uffd)
            stats = await ua.prefetch(
                setup.uffd, setup.resolver, setup.working_set([*range(PAGES)])
            )
            await finished(toucher)
            setup.expected[: 4 * P] = bytes(4 * P)
            assert await setup.read_all(lab) == setup.expected
    assert runs.log == [] and stats.prefetched == PAGES - 4
    assert server.stats.faults == 4  # the removed pages: zeros, one by one, from the server


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


# -- the thread answers the faults while it runs -------------------------------------------


def runs_of(pages: int, size: int) -> list[tuple[int, int]]:
    return [(first, min(size, pages - first)) for first in range(0, pages, size)]


async def test_a_fault_ahead_moves_the_replay_past_it(lab: Lab, big: Big) -> None:
    """A fault queued in run 187 (of 16-page runs) before the replay starts: the thread
    reads it first, answers it with the rest of that run, goes on from run 188 (one
    jump), and maps the runs it passed afterwards; the server reads no fault."""
    page = 187 * 16 + 5
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(big.uffd, big.resolver) as server:
            toucher = lab.touch(big.region.address + page * P, 1, write=False)
            queued(big.uffd)
            progress = await replay_natively(
                big.uffd, big.resolver.memory_parts(), runs_of(BIG, 16)
            )
            await finished(toucher)
            got = await finished(lab.run(lambda: big.region.read(0, big.region.length)))
    assert got == big.source
    assert (progress.faults, progress.jumps, progress.left) == (1, 1, [])
    assert progress.pages == BIG and progress.set_done
    assert server.stats.faults == 0 and big.uffd._loan is None


async def test_a_fault_outside_the_set_brings_readahead_natively(lab: Lab, big: Big) -> None:
    """A fault outside the set, answered by the thread: its page and ``readahead`` pages
    behind it (the part's), not one more; the set's runs untouched by it."""
    parts = [attrs.evolve(part, readahead=9) for part in big.resolver.memory_parts()]
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(big.uffd, big.resolver) as server:
            toucher = lab.touch(big.region.address + 3000 * P, 1, write=False)
            queued(big.uffd)
            progress = await replay_natively(big.uffd, parts, runs_of(1024, 64))
            await finished(toucher)
    populated = bytes(big.populated)
    assert populated[3000:3010] == b"\1" * 10 and populated[3010] == 0
    assert populated[:1024] == b"\1" * 1024 and populated.count(1) == 1034
    assert (progress.faults, progress.jumps, progress.pages) == (1, 0, 1034)
    assert server.stats.faults == 0


async def test_a_fault_it_cannot_answer_goes_to_the_server(lab: Lab, big: Big) -> None:
    """The thread is given the first half only; a fault queued in the second half is
    handed back (the server answers it, from the whole resolver), and the thread starts
    again and finishes the set."""
    parts = [attrs.evolve(part, pages=BIG // 2) for part in big.resolver.memory_parts()]
    page = BIG // 2  # the first page past the thread's part
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(big.uffd, big.resolver) as server:
            toucher = lab.touch(big.region.address + page * P, 1, write=False)
            queued(big.uffd)
            progress = await replay_natively(big.uffd, parts, runs_of(BIG // 2, 64))
            await finished(toucher)
            half = await finished(lab.run(lambda: big.region.read(0, BIG // 2 * P)))
            assert server.stats.faults >= 1
    assert half == big.source[: BIG // 2 * P]
    assert bytes(big.populated[page : page + 1]) == b"\1"
    assert (progress.handed_back, progress.left, progress.pages) == (1, [], BIG // 2)


async def test_populate_goes_natively_too(
    lab: Lab, setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``populate=True``: the set, then everything else, all by the thread."""
    runs = Runs(setup.resolver, monkeypatch)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(setup.uffd, setup.resolver) as server:
            stats = await ua.prefetch(
                setup.uffd, setup.resolver, setup.working_set([50, 51, 3]), populate=True
            )
            assert stats.working_set_done and stats.populated
            assert stats.prefetched == PAGES and stats.working_set_seconds <= stats.seconds
            assert await setup.read_all(lab) == setup.expected
    assert runs.log == [] and server.stats.faults == 0


async def test_zero_pages_are_mapped_not_copied(lab: Lab, tmp_path: Path) -> None:
    """A snapshot of mostly zero pages: the thread maps its zero runs as the zero page
    (counted), copies the data, and a write to a zero-filled page gets a page of its own."""
    layout = ("D" + "Z" * 7) * 64  # 512 pages, one in eight data
    path = tmp_path / "zeros.bin"
    image = b"".join(pattern(i) if kind == "D" else bytes(P) for i, kind in enumerate(layout))
    path.write_bytes(image)
    region = lab.anonymous(len(layout))
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    mapping = ua.GuestMapping(
        base_host_virt_addr=region.address, size=region.length, offset=0, page_size=P
    )
    with ua.Snapshot(path) as snapshot:
        resolver = snapshot.resolver([mapping])
        with anyio.fail_after(TIMEOUT):
            async with ua.FaultServer(uffd, resolver) as server:
                progress = await replay_natively(
                    uffd, resolver.memory_parts() or [], runs_of(len(layout), 32)
                )
                await finished(lab.run(lambda: region.write(9 * P + 10, b"written")))
                got = await finished(lab.run(lambda: region.read(0, region.length)))
    expected = bytearray(image)
    expected[9 * P + 10 : 9 * P + 17] = b"written"
    assert got == expected
    assert progress.zero_pages == layout.count("Z") and progress.pages == len(layout)
    assert server.stats.faults == 0


async def test_prefetch_brings_readahead_outside_the_set(lab: Lab, setup: Setup) -> None:
    """Through ``prefetch()``: a fault outside the set queued before it starts (the thread
    answers it) and one after the set is done (the server's C loop answers it) each bring
    15 pages behind them by default, stopping at pages already there."""
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(setup.uffd, setup.resolver) as server:
            toucher = lab.touch(setup.region.address + 2 * P, 1, write=False)
            queued(setup.uffd)
            stats = await ua.prefetch(setup.uffd, setup.resolver, setup.working_set([40, 41]))
            await finished(toucher)
            await finished(lab.touch(setup.region.address + 37 * P, 1, write=False))
            populated = setup.populated()
            assert await setup.read_all(lab) == setup.expected
    assert stats.faults_answered == 1 and stats.prefetched == 2 + 16
    assert populated[2:18] == [1] * 16 and populated[18] == 0
    assert populated[36:42] == [0, 1, 1, 1, 1, 1]
    assert server.stats.faults >= 1


async def test_a_write_protect_fault_goes_to_the_server(lab: Lab, tmp_path: Path) -> None:
    """Pages mapped write-protected (``copy_from(wp=True)``): a write to one is a WP fault,
    which the thread never answers (it hands it back); the server unprotects it, the
    writer goes on, and the replay finishes."""
    pages = 1024
    source = source_bytes(pages)
    region = lab.anonymous(pages)
    uffd = lab.uffd(ua.Feature.PAGEFAULT_FLAG_WP)
    uffd.register(region.address, region.length, ua.Mode.MISSING | ua.Mode.WP)
    copier = ua.copy_from(source, base=region.address, wp=True)
    resolver = ua.by_kind(missing=copier, wp=ua.unprotect())
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver) as server:
            await finished(lab.touch(region.address, 1, write=False))  # mapped protected
            writer = lab.run(lambda: region.write(10, b"written"))
            queued(uffd)
            progress = await replay_natively(uffd, copier.memory_parts() or [], runs_of(pages, 16))
            await finished(writer)
            got = await finished(lab.run(lambda: region.read(0, region.length)))
    expected = bytearray(source)
    expected[10:17] = b"written"
    assert got == expected
    assert progress.handed_back == 1 and progress.left == []
    assert server.stats.faults == 2  # the first read, and the write


@pytest.mark.parametrize("wake_faults", [False, True], ids=["pushed-back", "woken"])
async def test_records_given_back_with_the_reads(lab: Lab, wake_faults: bool) -> None:
    """What a borrower read and gives back: pushed back (read first by the next reader),
    or, once cancelled (the server may be stopping too), its fault's thread woken to fault
    again for whoever reads next. Either way the thread is answered, never lost."""
    region = lab.anonymous(4)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    toucher = lab.touch(region.address + P, 1, write=False)
    queued(uffd)
    loan = uffd.lend_reads(lambda: None)
    assert loan is not None and uffd.lend_reads(lambda: None) is None  # one loan at a time
    assert uffd.read_events() == []  # lent: reads find nothing
    record = os.read(uffd.fileno(), 32)
    loan.give_back(record, wake_faults=wake_faults)
    assert uffd._loan is None
    if wake_faults:
        queued(uffd)  # it faulted again
        assert uffd._unhandled == []
    [fault] = uffd.read_events()
    assert isinstance(fault, ua.PageFault) and fault.page == region.address + P
    uffd.zeropage(fault.page, P)
    await finished(toucher)


def test_the_runs_a_successor_may_skip_are_a_prefix() -> None:
    """``done_before``: the working set's first runs wholly gone through, whatever was done
    past them (a jump); a run split over two parts counts once both halves are done."""
    pages = 64
    populated = bytearray(pages)
    halves = [
        MemoryPart(
            base=0x10000000 + half * 32 * P,
            pages=32,
            page_size=P,
            source=0,
            mode=0,
            populated=populated,
            zeros=None,
            readahead=0,
            first=half * 32,
            index=half * 32,
        )
        for half in (0, 1)
    ]
    set_runs = [(0, 8), (28, 8), (40, 8), (50, 8)]  # the second straddles the two parts
    plan = _Plan(halves, set_runs, [])
    assert list(plan.owners) == [0, 1, 1, 2, 3] and plan.done_before(4) == 0
    for k in (0, 1, 3, 4):  # run 0, half of run 1, and runs 2 and 3 (past a jump)
        plan.done[k] = 1
    assert plan.done_before(4) == 1
    assert plan.left(set_runs) == [(28, 8)]
    plan.done[2] = 1
    assert plan.done_before(4) == 4 and plan.left(set_runs) == []


async def test_a_recording_resolver_replays_on_the_loop(
    lab: Lab, snapshot: ua.Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recording while replaying (``--record`` with ``--prefetch``): every demand fault must
    be seen by the recorder, in Python, so the thread does not answer any: a fault outside
    the set, queued before the prefetch, is recorded; the set goes the loop's way."""
    region = lab.anonymous(PAGES)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    mapping = ua.GuestMapping(
        base_host_virt_addr=region.address, size=PAGES * P, offset=0, page_size=P
    )
    recorder = ua.WorkingSetRecorder(snapshot.size, snapshot.identity)
    resolver = snapshot.resolver([mapping], recorder=recorder)
    assert resolver.memory_parts() is None
    runs = Runs(resolver, monkeypatch)
    working_set = ua.WorkingSet(
        snapshot_size=snapshot.size, identity=snapshot.identity, pages=range(10, 20)
    )
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver):
            toucher = lab.touch(region.address + 40 * P, 1, write=False)
            queued(uffd)
            stats = await ua.prefetch(uffd, resolver, working_set)
            await finished(toucher)
    assert stats.faults_answered == 0 and runs.log
    assert recorder.working_set().pages == (40,)


async def test_an_event_while_populating_keeps_the_sets_time(lab: Lab, big: Big) -> None:
    """The set is done, populating goes on, a discard stops the thread and the rest is
    planned again: the set's time stays when it was done (before the discard), the removed
    pages read zeros, everything else is there."""
    discarded: list[float] = []
    done = anyio.Event()

    async def discard_when_populating() -> None:
        await big.reached(3000)
        discarded.append(time.monotonic())
        await finished(lab.run(lambda: big.region.discard(3500 * P, 100 * P)))
        done.set()

    big.expected[3500 * P : 3600 * P] = bytes(100 * P)
    working_set = ua.WorkingSet(snapshot_size=BIG * P, identity=bytes(32), pages=range(64))
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(big.uffd, big.resolver), anyio.create_task_group() as tg:
            tg.start_soon(discard_when_populating)
            started = time.monotonic()
            stats = await ua.prefetch(big.uffd, big.resolver, working_set, populate=True)
            await done.wait()  # the discard may come after the prefetch: read after it
            got = await finished(lab.run(lambda: big.region.read(0, big.region.length)))
    assert got == big.expected and stats.populated
    if discarded and discarded[0] < started + stats.seconds:  # it landed during the prefetch
        assert stats.working_set_seconds <= discarded[0] - started
