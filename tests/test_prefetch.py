"""``ua.prefetch`` beside a server in this process, on real faults, on both event loops.

Each test pins one promise of :mod:`uffd_async._restore._prefetch`: every byte right, demand
faults only outside the working set (none at all after ``populate``), demand faults
first, pages removed (``MADV_DONTNEED``) or moved (``mremap``) since never filled with
source bytes at a stale place, EEXIST skipped, a closed uffd or cancelled serving ends
it quietly, huge pages, and the recorder seeing demand faults only.

Where the order of things matters, the tests make it happen at a chosen point: the
resolver's ``prefetch_pages`` (one call per planned run) is wrapped, and at run ``k`` the
wrapper starts a thread (a toucher, a discard, a move) and waits, bounded, until its
event is queued in the uffd. Assertions are on counters and bytes, never on time.
Faulting threads touch memory through ctypes (``Lab.touch``, ``Region.read``), never
holding the GIL.
"""

from __future__ import annotations

import random
import select
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import uffd_async as ua
from uffd_async._core._native import libc
from uffd_async._restore._native_replay import native_replay

from ._support import TIMEOUT, Lab, finished, pattern, source_bytes, with_huge_pages

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def replaying_on_the_loop() -> Iterator[None]:
    """These tests pin the loop's path (``test_native_replay`` the native one)."""
    with native_replay(False):
        yield


P = ua.PAGE_SIZE
PAGES = 64
SOURCE = source_bytes(PAGES)
#: The snapshot has this many pages before the ones the tests map, so that snapshot
#: offsets (what a working set names) differ from region offsets.
LEAD = 8
SOURCE_AT = source_bytes(LEAD + PAGES)[LEAD * P :]  # what the snapshot holds at LEAD


def everything(count: int = PAGES, *, offset: int = 0) -> ua.WorkingSet:
    return ua.WorkingSet(
        snapshot_size=(offset + count) * P, identity=bytes(32), pages=range(offset, offset + count)
    )


def queued(uffd: ua.Userfaultfd, timeout: float = TIMEOUT) -> None:
    """Block (bounded) until an event is queued in ``uffd``, without reading it."""
    assert select.select([uffd], [], [], timeout)[0], f"no event queued within {timeout}s"


class Runs:
    """Wraps a resolver's ``prefetch_pages``: logs each run, runs ``at[first]`` before it once,
    and counts the runs that met an unread event (``MappingChanged``)."""

    def __init__(self, resolver: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[int] = []
        self.at: dict[int, Callable[[], None]] = {}
        self.mapping_changed = 0
        real = resolver.prefetch_pages

        def _prefetch(uffd: ua.Userfaultfd, first: int, count: int) -> None:
            self.log.append(first)
            action = self.at.pop(first, None)
            if action is not None:
                action()
            try:
                real(uffd, first, count)
            except ua.MappingChanged:
                self.mapping_changed += 1
                raise

        monkeypatch.setattr(resolver, "prefetch_pages", _prefetch)


# -- the resolvers that can prefetch: copy_from from memory, and a snapshot's ------------


@pytest.fixture
def snapshot(tmp_path: Path) -> Iterator[ua.Snapshot]:
    path = tmp_path / "snapshot.bin"
    path.write_bytes(source_bytes(LEAD + PAGES))
    with ua.Snapshot(path) as snapshot:
        yield snapshot


class Setup:
    """A registered region of PAGES pages, its resolver, and what it must end up holding."""

    def __init__(self, lab: Lab, kind: str, snapshot: ua.Snapshot, features: ua.Feature) -> None:
        self.region = lab.anonymous(PAGES)
        self.uffd = lab.uffd(features)
        self.uffd.register(self.region.address, self.region.length)
        self.offset = 0
        self.resolver: ua.Resolver
        if kind == "copy_from":
            self.resolver = ua.copy_from(SOURCE, base=self.region.address)
        else:
            self.offset = LEAD
            mapping = ua.GuestMapping(
                base_host_virt_addr=self.region.address, size=PAGES * P, offset=LEAD * P,
                page_size=P,
            )  # fmt: skip
            self.resolver = snapshot.resolver([mapping])
        self.source = SOURCE if kind == "copy_from" else SOURCE_AT
        self.expected = bytearray(self.source)

    def working_set(self, region_pages: list[int]) -> ua.WorkingSet:
        """A working set naming these region pages (as snapshot pages, for a snapshot)."""
        return ua.WorkingSet(
            snapshot_size=(self.offset + PAGES) * P,
            identity=bytes(32),
            pages=[self.offset + page for page in region_pages],
        )

    def populated(self) -> list[int]:
        """The resolver's populated bytes, one a region page."""
        resolver: Any = self.resolver
        snapshot = isinstance(resolver, ua.SnapshotResolver)
        copier = resolver._parts[0].copier if snapshot else resolver
        return list(copier.populated)

    def read_all(self, lab: Lab) -> Any:
        return finished(lab.run(lambda: self.region.read(0, self.region.length)))


KINDS = ["copy_from", "snapshot"]


@pytest.fixture(params=KINDS)
def setup(lab: Lab, snapshot: ua.Snapshot, request: pytest.FixtureRequest) -> Setup:
    return Setup(lab, request.param, snapshot, ua.Feature.EVENT_REMOVE | ua.Feature.EVENT_REMAP)


# -- the working set, then the rest -----------------------------------------------------


async def test_demand_faults_only_outside_the_working_set(lab: Lab, setup: Setup) -> None:
    pages = random.Random(7).sample(range(PAGES), 40)
    working_set = setup.working_set(pages)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(setup.uffd, setup.resolver) as server:
            stats = await ua.prefetch(setup.uffd, setup.resolver, working_set, readahead=0)
            assert (stats.prefetched, stats.runs) == (40, len(list(working_set.runs())))
            assert stats.working_set_done and not stats.populated
            assert server.stats.faults == 0
            assert await setup.read_all(lab) == setup.source
    assert server.stats.faults == server.stats.resolved == PAGES - 40
    assert server.stats.pages == PAGES  # the prefetched pages count too
    assert server.stats.errors == server.stats.eexist == 0


@pytest.mark.parametrize("readahead", [15, 3])
async def test_a_fault_outside_the_set_brings_readahead(
    lab: Lab, setup: Setup, readahead: int
) -> None:
    """A set that drifted: a fault outside the set brings ``readahead`` pages behind it
    (15 by default), never past a page already there; one in a run of the set, the run."""
    working_set = setup.working_set([*range(40, 44)])
    kwargs: dict[str, Any] = {} if readahead == 15 else {"readahead": readahead}
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(setup.uffd, setup.resolver) as server:
            stats = await ua.prefetch(setup.uffd, setup.resolver, working_set, **kwargs)
            await finished(lab.touch(setup.region.address + 2 * P, P, write=False))
            await finished(lab.touch(setup.region.address + 37 * P, P, write=False))
            populated = setup.populated()
    assert stats.prefetched == 4 and server.stats.faults == 2
    assert populated[2 : 3 + readahead] == [1] * (1 + readahead)
    assert populated[3 + readahead] == 0
    assert populated[36:40] == [0, 1, 1, 1], "readahead stops at the set's pages (there already)"
    assert populated[44:] == [0] * (PAGES - 44)


async def test_populate_makes_it_resident(lab: Lab, setup: Setup) -> None:
    working_set = setup.working_set([50, 51, 52, 3])
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(setup.uffd, setup.resolver) as server:
            stats = await ua.prefetch(
                setup.uffd, setup.resolver, working_set, populate=True, run_bytes=16 * P
            )
            assert stats.working_set_done and stats.populated
            assert stats.prefetched == PAGES
            assert stats.seconds >= stats.working_set_seconds >= 0
            assert await setup.read_all(lab) == setup.source
    assert server.stats.faults == 0, "a page was left for a demand fault"


async def test_populate_without_a_working_set(lab: Lab, setup: Setup) -> None:
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(setup.uffd, setup.resolver) as server:
            stats = await ua.prefetch(setup.uffd, setup.resolver, None, populate=True)
            assert stats.prefetched == PAGES and stats.populated
            assert await setup.read_all(lab) == setup.source
    assert server.stats.faults == 0


async def test_pages_already_there_are_skipped(lab: Lab, setup: Setup) -> None:
    """A page filled behind the resolver's back (EEXIST) is skipped; the rest of its run
    is copied, and the page keeps what was there first."""
    setup.uffd.copy(setup.region.address + 5 * P, pattern(99))
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(setup.uffd, setup.resolver) as server:
            stats = await ua.prefetch(setup.uffd, setup.resolver, setup.working_set([*range(16)]))
            assert stats.prefetched == 15 and stats.runs == 1
            setup.expected[5 * P : 6 * P] = pattern(99)
            got = await finished(lab.run(lambda: setup.region.read(0, 16 * P)))
            assert got == setup.expected[: 16 * P]
    assert server.stats.faults == 0


# -- demand first ------------------------------------------------------------------------


async def test_a_fault_far_ahead_is_served_before_the_prefetcher_goes_on(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At run 10 of 256 (one page each), a thread faults on the last page. The prefetcher
    gives the server its turn between runs: the fault waits behind one run at most (trio
    serves it before run 11, asyncio, whose reader wakes a loop iteration later, before
    run 12), 244 runs before the prefetcher would have got there, which then skips it."""
    pages = 256
    source = source_bytes(pages)
    region = lab.anonymous(pages)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    resolver = ua.copy_from(source, base=region.address)
    runs = Runs(resolver, monkeypatch)
    last = region.address + (pages - 1) * P
    toucher: list[Any] = []
    populated_at: dict[int, int] = {}

    def fault_far_ahead() -> None:
        toucher.append(lab.touch(last, 1, write=False))
        queued(uffd)

    runs.at[10] = fault_far_ahead
    runs.at[12] = lambda: populated_at.update({12: resolver.populated[pages - 1]})
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver) as server:
            stats = await ua.prefetch(uffd, resolver, everything(pages), run_bytes=P)
            await finished(toucher[0])
            assert await finished(lab.run(lambda: region.read(0, region.length))) == source
    assert populated_at == {12: 1}, "the fault waited behind more than one run"
    assert (server.stats.faults, server.stats.resolved, server.stats.eexist) == (1, 1, 0)
    assert stats.prefetched == pages - 1, "the prefetcher copied the page the fault asked for"
    assert runs.log == list(range(pages))


# -- pages removed or moved while it runs --------------------------------------------------


async def test_a_balloon_discard_during_the_prefetch(
    lab: Lab, setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages 8-23 are discarded (MADV_DONTNEED, EVENT_REMOVE) when the prefetcher is at
    page 16, one page a run. Its next copy meets the unread REMOVE (EAGAIN); once the
    server applied it, pages 16-23 are skipped; pages 8-15, copied before, are dropped by
    the discard. All of 8-23 then read zeros, never source bytes."""
    runs = Runs(setup.resolver, monkeypatch)
    discarding: list[Any] = []

    def discard() -> None:
        discarding.append(lab.run(lambda: setup.region.discard(8 * P, 16 * P)))
        queued(setup.uffd)

    runs.at[setup.offset + 16] = discard
    setup.expected[8 * P : 24 * P] = bytes(16 * P)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(setup.uffd, setup.resolver) as server:
            stats = await ua.prefetch(
                setup.uffd, setup.resolver, setup.working_set([*range(PAGES)]), run_bytes=P
            )
            await finished(discarding[0])
            assert await setup.read_all(lab) == setup.expected
    assert runs.mapping_changed >= 1, "the copy after the discard did not meet the REMOVE"
    assert stats.prefetched == PAGES - 8  # all but 16-23
    assert server.stats.events == 1
    assert server.stats.faults == 16  # 8-23, served zeros


async def test_pages_discarded_before_the_prefetch_stay_zero(lab: Lab, setup: Setup) -> None:
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(setup.uffd, setup.resolver) as server:
            await finished(lab.run(lambda: setup.region.discard(16 * P, 16 * P)))
            assert server.stats.events == 1
            stats = await ua.prefetch(
                setup.uffd,
                setup.resolver,
                setup.working_set(random.Random(3).sample(range(PAGES), PAGES)),
            )
            assert stats.prefetched == PAGES - 16
            setup.expected[16 * P : 32 * P] = bytes(16 * P)
            assert await setup.read_all(lab) == setup.expected
    assert server.stats.faults == 16


async def test_an_mremap_during_the_prefetch(
    lab: Lab, setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second half moves (mremap, EVENT_REMAP) when the prefetcher is at page 16: its
    next copy meets the unread REMAP; after it, the moved pages are not prefetched (their
    old place is gone), and read right at their new address."""
    runs = Runs(setup.resolver, monkeypatch)
    tail = lab.adopt_region(ua.Region(setup.region.address + 32 * P, 32 * P))
    moving: list[Any] = []

    def move() -> None:
        moving.append(lab.run(tail.move))
        queued(setup.uffd)

    runs.at[setup.offset + 16] = move
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(setup.uffd, setup.resolver) as server:
            stats = await ua.prefetch(
                setup.uffd, setup.resolver, setup.working_set([*range(PAGES)]), run_bytes=P
            )
            await finished(moving[0])
            assert tail.address != setup.region.address + 32 * P
            head = await finished(lab.run(lambda: setup.region.read(0, 32 * P)))
            moved = await finished(lab.run(lambda: tail.read(0, 32 * P)))
    assert head == setup.source[: 32 * P] and moved == setup.source[32 * P :]
    assert runs.mapping_changed >= 1
    assert stats.prefetched == 32
    assert (server.stats.events, server.stats.faults) == (1, 32)


async def test_pages_moved_onto_others_get_their_own_bytes(lab: Lab, setup: Setup) -> None:
    """Pages 0-1 are moved (mremap MREMAP_FIXED) over pages 2-3 before the prefetch: what
    is at pages 2-3 now is source pages 0-1, and the prefetcher must not fill it with
    source pages 2-3 (their place is not theirs any more)."""
    base = setup.region.address

    def move_over() -> None:
        moved = libc.mremap(base, 2 * P, 2 * P, 1 | 2, base + 2 * P)  # MAYMOVE | FIXED
        assert moved == base + 2 * P

    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(setup.uffd, setup.resolver) as server:
            await finished(lab.run(move_over))
            # From page 2 on: where a stale plan would put source page 2.
            stats = await ua.prefetch(
                setup.uffd, setup.resolver, setup.working_set([*range(2, PAGES)]), readahead=0
            )
            got = await finished(lab.run(lambda: setup.region.read(2 * P, (PAGES - 2) * P)))
    assert got[: 2 * P] == setup.source[: 2 * P], "stale source pages at a moved page's place"
    assert got[2 * P :] == setup.source[4 * P :]
    assert stats.prefetched == PAGES - 4
    assert (server.stats.events, server.stats.faults) == (1, 2)  # source pages 0-1


# -- ends: a closed uffd, cancelled serving ------------------------------------------------


async def test_a_closed_uffd_ends_the_prefetch(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    region = lab.anonymous(PAGES)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    resolver = ua.copy_from(SOURCE, base=region.address)
    runs = Runs(resolver, monkeypatch)
    runs.at[16] = uffd.close
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            await tg.start(ua.serve, uffd, resolver)
            stats = await ua.prefetch(uffd, resolver, everything(), populate=True, run_bytes=P)
    assert stats.prefetched == 16
    assert not stats.working_set_done and not stats.populated
    assert runs.log == [*range(17)]


async def test_cancelled_serving_ends_the_prefetch(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    region = lab.anonymous(PAGES)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    resolver = ua.copy_from(SOURCE, base=region.address)
    runs = Runs(resolver, monkeypatch)
    stats = ua.PrefetchStats()
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            runs.at[16] = tg.cancel_scope.cancel
            await tg.start(ua.serve, uffd, resolver)
            tg.start_soon(
                lambda: ua.prefetch(uffd, resolver, everything(), run_bytes=P, stats=stats)
            )
    assert stats.prefetched == 17 and not stats.working_set_done
    assert runs.log == [*range(17)]


# -- huge pages ----------------------------------------------------------------------------

HUGE = 4


@with_huge_pages(HUGE)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("populate", [False, True])
async def test_huge_pages(lab: Lab, tmp_path: Path, kind: str, populate: bool) -> None:
    """A working set names base pages; on hugetlbfs, each huge page holding one is copied
    whole, once."""
    region = lab.adopt_region(ua.Region.hugetlb(HUGE * (2 << 20)))
    huge = region.page_size
    ratio = huge // P
    source = source_bytes(HUGE * ratio)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    resolver: ua.Resolver
    if kind == "copy_from":
        resolver = ua.copy_from(source, base=region.address, page_size=huge)
    else:
        path = tmp_path / "huge.bin"
        path.write_bytes(source)
        snapshot = ua.Snapshot(path)
        mapping = ua.GuestMapping(
            base_host_virt_addr=region.address, size=region.length, offset=0, page_size=huge
        )
        resolver = snapshot.resolver([mapping])
    # Base pages in huge pages 2 and 0, in that order, one of them twice over.
    working_set = ua.WorkingSet(
        snapshot_size=len(source), identity=bytes(32), pages=[2 * ratio + 7, 3, 2 * ratio + 8]
    )
    try:
        with anyio.fail_after(TIMEOUT):
            async with ua.FaultServer(uffd, resolver, page_size=huge) as server:
                stats = await ua.prefetch(uffd, resolver, working_set, populate=populate)
                assert stats.prefetched == (HUGE if populate else 2) * ratio
                got = await finished(lab.run(lambda: region.read(0, region.length)))
        assert got == source
        assert server.stats.faults == (0 if populate else HUGE - 2)
    finally:
        if kind == "snapshot":
            snapshot.close()


# -- what cannot prefetch ---------------------------------------------------------------


async def test_a_resolver_that_cannot_prefetch(lab: Lab) -> None:
    uffd = lab.uffd()
    with pytest.raises(TypeError, match="ZeroFill cannot prefetch: use copy_from"):
        await ua.prefetch(uffd, ua.zero_fill(), everything())

    async def fetch(offset: int, length: int) -> bytes:
        return SOURCE[offset : offset + length]

    with pytest.raises(TypeError, match="cannot prefetch"):
        await ua.prefetch(uffd, ua.copy_from(fetch, base=1 << 30, size=len(SOURCE)), None)
    with pytest.raises(ua.InvalidArgument, match="run_bytes must be an int >= 4096"):
        await ua.prefetch(uffd, ua.copy_from(SOURCE, base=1 << 30), None, run_bytes=100)


# -- recording: demand faults only ----------------------------------------------------------


def recording(
    lab: Lab, snapshot: ua.Snapshot, features: ua.Feature = ua.Feature(0)
) -> tuple[ua.Region, ua.Userfaultfd, ua.WorkingSetRecorder, ua.SnapshotResolver]:
    """A registered region mapped at snapshot page LEAD, and a resolver recording it."""
    region = lab.anonymous(PAGES)
    uffd = lab.uffd(features)
    uffd.register(region.address, region.length)
    recorder = ua.WorkingSetRecorder(snapshot.size, snapshot.identity)
    mapping = ua.GuestMapping(
        base_host_virt_addr=region.address, size=PAGES * P, offset=LEAD * P, page_size=P
    )
    return region, uffd, recorder, snapshot.resolver([mapping], recorder=recorder)


async def test_the_recorder_sees_demand_faults_only(lab: Lab, snapshot: ua.Snapshot) -> None:
    """Faults on region pages 5, 2, 9 record snapshot pages LEAD+5, LEAD+2, LEAD+9; what
    the prefetcher copies afterwards (everything) records nothing."""
    region, uffd, recorder, resolver = recording(lab, snapshot)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver) as server:
            for page in (5, 2, 9, 5):
                await finished(lab.touch(region.address + page * P, 1, write=False))
            assert recorder.working_set().pages == (LEAD + 5, LEAD + 2, LEAD + 9)
            stats = await ua.prefetch(uffd, resolver, None, populate=True)
            assert stats.prefetched == PAGES - 3
            assert await finished(lab.run(lambda: region.read(0, region.length))) == SOURCE_AT
    assert server.stats.faults == 3
    assert recorder.working_set().pages == (LEAD + 5, LEAD + 2, LEAD + 9)
    with pytest.raises(ua.InvalidArgument, match="needs readahead=0"):
        snapshot.resolver(resolver.mappings, readahead=4, recorder=recorder)
    with pytest.raises(ua.InvalidArgument, match="needs readahead=0"):
        ua.copy_from(SOURCE_AT, base=region.address, readahead=4, recorder=recorder)


async def test_the_recorder_leaves_out_discarded_pages(lab: Lab, snapshot: ua.Snapshot) -> None:
    """A page discarded (MADV_DONTNEED) and then faulted gets zeros: nothing of the
    snapshot was asked for, so a replay must not prefetch its snapshot bytes."""
    region, uffd, recorder, resolver = recording(lab, snapshot, ua.Feature.EVENT_REMOVE)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver) as server:
            await finished(lab.touch(region.address + 1 * P, 1, write=False))
            # Never touched: only a REMOVE event, which blocks the discarding thread until
            # the server reads it (so not this one, the server's).
            await finished(lab.run(lambda: region.discard(4 * P, 2 * P)))
            got = await finished(lab.run(lambda: region.read(4 * P, 2 * P)))
    assert got == bytes(2 * P) and server.stats.events == 1
    assert recorder.working_set().pages == (LEAD + 1,)


class PagesAskedFor:
    """A recorder with nothing but the method ``copy_from`` declares it needs
    (:class:`~uffd_async._serve._resolvers.PageRecorder`): no WorkingSetRecorder."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, int]] = []

    def record(self, first: int, count: int = 1) -> None:
        self.asked.append((first, count))


@pytest.mark.parametrize("kind", ["bytes", "snapshot"])
async def test_any_recorder_with_a_record_method_will_do(
    lab: Lab, snapshot: ua.Snapshot, kind: str
) -> None:
    """``copy_from(recorder=...)`` takes any object with ``record(first, count)``, from
    memory and from a snapshot file: demand faults name their source pages, in order."""
    region = lab.anonymous(PAGES)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    recorder = PagesAskedFor()
    source: Any = SOURCE if kind == "bytes" else snapshot
    resolver = ua.copy_from(source, base=region.address, recorder=recorder)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver):
            for page in (5, 2, 9):
                await finished(lab.touch(region.address + page * P, 1, write=False))
            got = await finished(lab.run(lambda: region.read(2 * P, P)))
    assert recorder.asked == [(5, 1), (2, 1), (9, 1)]
    assert got == SOURCE[2 * P : 3 * P]
