"""Stress harnesses: many threads faulting while the address space churns.

Shared by the fast tests (the default suite) and the ``slow`` ones (``make
stress``); they differ only in how many faults or writes they ask for.

``serve_under_churn``: 16 threads touch random runs of pages, for reading or
writing, in a main region (private anonymous or shmem) and in a second,
"mobile" one, while a churn thread, meanwhile:

* discards parts of the main region (MADV_DONTNEED: a Remove event);
* moves the mobile region (mremap: a Remap event; touchers hold a read lock
  on it, so none touches the old address afterwards, which would SIGSEGV);
* forks (``ua_fork_touch``: the raw clone syscall, never ``os.fork`` in the
  handler's process) a child that touches and hashes another part, served
  through the Fork event's uffd (needs CAP_SYS_PTRACE for EVENT_FORK).

Every fault goes to a :class:`Racer`, which picks a ``copy_from`` with a random
readahead per fault (each with its own idea of what is populated, so readahead
runs into pages another one filled: partial copies and EEXIST), and which
sometimes plays a second resolver: it copies the page first with DONTWAKE, so
the real copy gets EEXIST and only the server's UFFDIO_WAKE lets the thread go.
A Racer's source is a callable, so all of that runs in Python. With
``path="C"`` a :class:`FastRacer` serves instead: ``copy_from`` from memory, so
the server's C loop resolves every batch (a random readahead per batch), and
the second resolver races it from the server's own thread, just before each
batch, with a DONTWAKE copy of a page some toucher is at: usually the page that
toucher is blocked on, its fault read (or about to be) and not resolved yet, so
the C loop's COPY finds it there and only the C loop's UFFDIO_WAKE frees it.
The main region is then not discarded (the first Remove would turn the C path
off for good, and a racing copy could land after the discard's zap).

Then every page is read back and must hold exactly its source bytes, or zeros
where an anonymous page was discarded (MADV_DONTNEED on shmem keeps the page
cache, so there the churn populates a part before discarding it, and the bytes
stay the source's).

``track_under_churn``: 16 writers write random bytes at random places while
the event loop collects a :class:`WriteTracker` and a churn thread discards
and forks. Ground truth: a base snapshot plus the pages of every collect,
copied when collected, equals the memory at the end, and every page a writer
wrote was collected.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import random
import struct
import threading
import time
from collections.abc import Iterator
from typing import Literal

import anyio
import attrs

import uffd_async as ua
from uffd_async._core._native import FastPath, lib
from uffd_async.resolvers import CopyFrom, SyncSource

from ._support import TIMEOUT, Lab, Worker, finished

P = ua.PAGE_SIZE
Kind = Literal["anonymous", "shmem"]

#: Readaheads a Racer picks from, per fault.
READAHEADS = (0, 0, 0, 0, 1, 3, 15)
#: Pages a toucher takes as one unit of work (the mobile region: a quarter of it).
CHUNK = 32
#: Bound on one round (the slow tests run many rounds; each is bounded), well
#: below conftest's per-test deadline, so a hung round fails its own test.
ROUND_TIMEOUT = 90.0
#: Which resolver the stress serves with: :class:`Racer` (Python) or :class:`FastRacer` (C).
RacePath = Literal["python", "C"]


class RWLock:
    """Many readers or one writer; a waiting writer keeps new readers out."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait(TIMEOUT)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait(TIMEOUT)
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class _RaceContext:
    """What the racing fetch needs to know: the fault being resolved, and by whom.

    Shared by a Racer and its fork children: resolutions run inline on the
    event loop's thread, one at a time, so setting it just before each is safe.
    """

    def __init__(self, rng: random.Random, race_rate: float) -> None:
        self.rng = rng
        self.race_rate = race_rate
        self.fault: ua.PageFault | None = None
        self.uffd: ua.Userfaultfd | None = None
        self.races = 0


def racing_fetch(source: bytes, context: _RaceContext) -> SyncSource:
    """A ``copy_from`` source that sometimes fills the pages itself first, with DONTWAKE."""

    def fetch(offset: int, length: int) -> bytes:
        data = source[offset : offset + length]
        if context.rng.random() < context.race_rate:
            assert context.fault is not None and context.uffd is not None
            context.races += 1
            with contextlib.suppress(ua.PageExists):
                context.uffd.copy(context.fault.page, data, wake=False)
        return data

    return fetch


class Racer(ua.Resolver):
    """A copy_from with a random readahead per fault, and a second resolver racing it."""

    def __init__(self, inners: list[CopyFrom], context: _RaceContext) -> None:
        self._inners = inners
        self._context = context

    @classmethod
    def over(
        cls,
        source: bytes,
        base: int,
        rng: random.Random,
        race_rate: float,
        readaheads: tuple[int, ...] = READAHEADS,
    ) -> Racer:
        context = _RaceContext(rng, race_rate)
        fetch = racing_fetch(source, context)
        inners = [ua.copy_from(fetch, base=base, size=len(source), readahead=n) for n in readaheads]
        return cls(inners, context)

    @property
    def races(self) -> int:
        return self._context.races

    def resolve_now(self, fault: ua.PageFault, uffd: ua.Userfaultfd) -> bool:
        self._context.fault, self._context.uffd = fault, uffd
        return self._context.rng.choice(self._inners).resolve_now(fault, uffd)

    def apply(self, event: ua.Remap | ua.Remove | ua.Unmap) -> None:
        for inner in self._inners:
            inner.apply(event)

    def fork(self) -> Racer:
        return Racer([inner.fork() for inner in self._inners], self._context)


class FastRacer(ua.Resolver):
    """copy_from from memory with a random readahead per batch, on the C fast path; and,
    where ``at`` says which page each toucher is at, a second resolver racing it."""

    def __init__(
        self,
        inners: list[CopyFrom],
        context: _RaceContext,
        source: bytes,
        base: int,
        at: list[int] | None,
    ) -> None:
        self._inners = inners
        self._context = context
        self._source = source
        self._base = base
        self._at = at

    @classmethod
    def over(
        cls,
        source: bytes,
        base: int,
        rng: random.Random,
        race_rate: float,
        *,
        uffd: ua.Userfaultfd,
        at: list[int] | None = None,
        readaheads: tuple[int, ...] = READAHEADS,
    ) -> FastRacer:
        context = _RaceContext(rng, race_rate)
        context.uffd = uffd
        inners = [ua.copy_from(source, base=base, readahead=n) for n in readaheads]
        return cls(inners, context, source, base, at)

    @property
    def races(self) -> int:
        return self._context.races

    def _fast_path(self) -> FastPath | None:
        # The server calls this once per batch of faults it read, just before the C
        # loop resolves them: the moment for another resolver to get there first.
        context = self._context
        fast = context.rng.choice(self._inners)._fast_path()
        if fast is not None and self._at and context.rng.random() < context.race_rate:
            page = context.rng.choice(self._at)
            if page:
                assert context.uffd is not None
                offset = page - self._base
                try:
                    context.uffd.copy(page, self._source[offset : offset + P], wake=False)
                except (ua.PageExists, ua.MappingChanged):
                    pass  # resolved already, or a Fork event is unread: no race this time
                else:
                    context.races += 1
        return fast

    def resolve_now(self, fault: ua.PageFault, uffd: ua.Userfaultfd) -> bool:
        return self._context.rng.choice(self._inners).resolve_now(fault, uffd)

    def apply(self, event: ua.Remap | ua.Remove | ua.Unmap) -> None:
        for inner in self._inners:
            inner.apply(event)

    def fork(self) -> FastRacer:
        # The child's pages are another process's: its server does not race.
        inners = [inner.fork() for inner in self._inners]
        return FastRacer(inners, self._context, self._source, self._base, None)


@attrs.define
class Tally:
    """What a stress run did, for its assertions and the README's table."""

    faults: int = 0
    resolved: int = 0
    coalesced: int = 0
    eexist: int = 0
    retries: int = 0
    races: int = 0
    removes: int = 0
    remaps: int = 0
    forks: int = 0
    rounds: int = 0
    touches: int = 0
    writes: int = 0
    collects: int = 0
    collected: int = 0
    pages_checked: int = 0

    def add_server(self, stats: ua.ServerStats) -> None:
        self.faults += stats.faults
        self.resolved += stats.resolved
        self.coalesced += stats.coalesced
        self.eexist += stats.eexist
        self.retries += stats.retries


def fork_features() -> ua.Feature:
    """EVENT_FORK where this process may have it (CAP_SYS_PTRACE), else nothing."""
    try:
        ua.Userfaultfd.open(ua.Feature.EVENT_FORK).close()
    except ua.UffdPermissionError:
        return ua.Feature(0)
    return ua.Feature.EVENT_FORK


def fork_and_hash(address: int, length: int, *, write: bool) -> int:
    """Fork (raw clone) a child that touches ``[address, +length)``; its FNV-1a hash.

    Call from a thread: with EVENT_FORK the fork waits for the handler.
    """
    read_end, write_end = os.pipe()
    try:
        pid = lib.ua_fork_touch(address, length, P, 1 if write else 0, write_end)
        if pid < 0:
            raise OSError(errno.EAGAIN, "ua_fork_touch failed")
        deadline = time.monotonic() + TIMEOUT
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise AssertionError(f"the forked child {pid} never finished touching")
            time.sleep(0.001)
        assert os.waitstatus_to_exitcode(status) == 0, f"child exit status {status:#x}"
        (value,) = struct.unpack("=Q", os.read(read_end, 8))
        return int(value)
    finally:
        os.close(read_end)
        os.close(write_end)


def fnv1a(data: bytes) -> int:
    """The hash ``ua_fork_touch`` children report, computed in C over a private copy."""
    with ua.Region.anonymous(max(P, -(-len(data) // P) * P)) as scratch:
        scratch.write(0, data)
        return int(lib.ua_fnv1a(scratch.address, len(data)))


def first_difference(actual: bytes, expected: bytes, what: str) -> str:
    for page in range(len(expected) // P):
        span = slice(page * P, (page + 1) * P)
        if actual[span] != expected[span]:
            zero = actual[span] == bytes(P)
            return f"{what}: page {page} differs (it reads {'zeros' if zero else 'other bytes'})"
    return f"{what}: lengths differ"


# -- serving under churn ---------------------------------------------------------


async def serve_under_churn(
    kind: Kind,
    *,
    faults: int,
    seed: int,
    threads: int = 16,
    pages: int = 4096,
    race_rate: float = 0.05,
    path: RacePath = "python",
) -> Tally:
    """Rounds of touching-while-churning until the servers have read ``faults`` faults;
    ``path="C"`` serves with :class:`FastRacer` (see the module's docstring)."""
    rng = random.Random(seed)
    source = rng.randbytes(pages * P)
    mobile_source = rng.randbytes(pages // 8 * P)
    tally = Tally()
    forking = fork_features()
    while tally.faults < faults:
        await _churn_round(
            kind, tally, rng, source, mobile_source, threads, race_rate, forking, path
        )
        tally.rounds += 1
    return tally


async def _churn_round(
    kind: Kind,
    tally: Tally,
    rng: random.Random,
    source: bytes,
    mobile_source: bytes,
    threads: int,
    race_rate: float,
    forking: ua.Feature,
    path: RacePath,
) -> None:
    lab = Lab()
    try:
        pages = len(source) // P
        make = lab.anonymous if kind == "anonymous" else lab.shared
        mobile_pages = len(mobile_source) // P
        main, mobile = make(pages), make(mobile_pages)
        events = ua.Feature.EVENT_REMOVE | ua.Feature.EVENT_REMAP | forking
        main_uffd, mobile_uffd = lab.uffd(events), lab.uffd(ua.Feature.EVENT_REMAP | forking)
        main_uffd.register(main.address, main.length)
        mobile_uffd.register(mobile.address, mobile.length)
        at = [0] * threads  # the page each toucher of the main region is at (path "C")
        main_racer: Racer | FastRacer
        mobile_racer: Racer | FastRacer
        if path == "C":
            main_racer = FastRacer.over(
                source, main.address, random.Random(rng.random()), race_rate, uffd=main_uffd, at=at
            )
            # Served by the C loop until the first move, then by copy_from in Python.
            mobile_racer = FastRacer.over(
                mobile_source, mobile.address, random.Random(rng.random()), race_rate,
                uffd=mobile_uffd,
            )  # fmt: skip
        else:
            main_racer = Racer.over(source, main.address, random.Random(rng.random()), race_rate)
            mobile_racer = Racer.over(
                mobile_source, mobile.address, random.Random(rng.random()), race_rate
            )
        mobile_lock = RWLock()
        stop = threading.Event()
        discarded: list[tuple[int, int]] = []  # (offset, length) zeroed on anonymous memory
        touches = [0]

        def toucher(index: int, seed: float) -> None:
            # A random quarter of the chunks, each from a random page to its end,
            # for reading or writing: threads meet on pages, in different orders.
            local = random.Random(seed)
            work = [("main", start, CHUNK) for start in range(0, pages, CHUNK)]
            work += [("mobile", start, CHUNK // 4) for start in range(0, mobile_pages, CHUNK // 4)]
            for where, start, count in local.sample(work, len(work) // 4):
                first = start + local.randrange(count)
                length = (start + count - first) * P
                write = local.random() < 0.5
                if where == "main" and path == "C":
                    for page in range(first, start + count):  # saying where, for FastRacer
                        at[index] = main.address + page * P
                        ua.touch(at[index], 1, write=write)
                    at[index] = 0
                elif where == "main":
                    ua.touch(main.address + first * P, length, write=write)
                else:
                    with mobile_lock.read():
                        ua.touch(mobile.address + first * P, length, write=write)
                touches[0] += 1

        def churn(seed: float) -> None:
            local = random.Random(seed)
            discard_zone = pages // 4
            fork_start, fork_pages = pages // 4, pages // 4
            operations = (["discard"] if path == "python" else []) + ["move"]
            operations += ["fork"] if forking else []
            first_of_each = list(operations)
            while not stop.is_set() or first_of_each:
                operation = first_of_each.pop() if first_of_each else local.choice(operations)
                if operation == "discard":
                    first = local.randrange(discard_zone)
                    count = local.randrange(1, min(64, discard_zone - first) + 1)
                    if kind == "shmem":
                        main.read(first * P, count * P)  # in the page cache: kept by DONTNEED
                    else:
                        discarded.append((first * P, count * P))
                    main.discard(first * P, count * P)
                    tally.removes += 1
                elif operation == "move":
                    with mobile_lock.write():
                        mobile.move()
                    tally.remaps += 1
                else:
                    first = fork_start + local.randrange(fork_pages - 64)
                    count = local.randrange(1, 65)
                    child = fork_and_hash(
                        main.address + first * P, count * P, write=local.random() < 0.5
                    )
                    expected = fnv1a(source[first * P : (first + count) * P])
                    assert child == expected, "a forked child read wrong bytes"
                    tally.forks += 1
                time.sleep(local.random() * 0.002)

        try:
            with anyio.fail_after(ROUND_TIMEOUT):
                async with (
                    ua.FaultServer(main_uffd, main_racer) as main_server,
                    ua.FaultServer(mobile_uffd, mobile_racer) as mobile_server,
                ):
                    workers = [
                        lab.run(functools.partial(toucher, index, rng.random()))
                        for index in range(threads)
                    ]
                    churner = lab.run(functools.partial(churn, rng.random()))
                    for worker in workers:
                        await finished(worker, ROUND_TIMEOUT)
                    stop.set()
                    await finished(churner, ROUND_TIMEOUT)
                    # Read everything back while the servers still run: pages never
                    # touched, or discarded and not touched since, fault here.
                    main_bytes = await finished(lab.run(lambda: main.read(0, main.length)))
                    mobile_bytes = await finished(lab.run(lambda: mobile.read(0, mobile.length)))
        finally:
            stop.set()  # a failed round: the churn must end too, or lab.close() waits on it
        expected = bytearray(source)
        for offset, length in discarded:
            expected[offset : offset + length] = bytes(length)
        assert main_bytes == expected, first_difference(main_bytes, bytes(expected), "main")
        assert mobile_bytes == mobile_source, first_difference(
            mobile_bytes, mobile_source, "mobile"
        )
        for server in (main_server, mobile_server):
            assert server.stats.errors == 0 and server.stats.in_flight == 0
            tally.add_server(server.stats)
        tally.races += main_racer.races + mobile_racer.races
        tally.touches += touches[0]
        tally.pages_checked += pages + len(mobile_source) // P
    finally:
        lab.close()


# -- write tracking under churn ----------------------------------------------------


async def track_under_churn(
    mode: Literal["fault", "async"],
    *,
    writes: int,
    seed: int,
    threads: int = 16,
    pages: int = 512,
    discard: bool = True,
) -> Tally:
    """Writers, a collector and a churn thread; then the snapshot must equal the memory."""
    rng = random.Random(seed)
    features = ua.Feature.WP_UNPOPULATED if mode == "fault" else ua.Feature.WP_ASYNC
    tally = Tally()
    lab = Lab()
    try:
        region = lab.anonymous(pages)
        base = rng.randbytes(pages * P // 2)
        region.write(0, base)  # half populated, half never touched
        snapshot = bytearray(region.read(0, region.length))
        written: set[int] = set()
        collected: set[int] = set()
        lock = threading.Lock()  # a collect and its copies, or a discard and its zeroing
        each = writes // threads
        uffd = lab.uffd(features)

        def writer(seed: float) -> None:
            local = random.Random(seed)
            for count in range(each):
                if count % 256 == 255:
                    # Let collects and churn in between: in async mode, writers never
                    # wait for anything else.
                    time.sleep(0.0002)
                offset = local.randrange(region.length - 1)
                length = min(local.randrange(1, 2 * P), region.length - offset)
                written.update(range(offset // P, (offset + length - 1) // P + 1))
                region.fill(offset, length, local.randrange(256))

        def churn(seed: float) -> None:
            local = random.Random(seed)
            first_of_each = ["discard", "fork"] if discard else ["fork"]
            while any(worker.alive for worker in workers) or first_of_each:
                operation = first_of_each.pop() if first_of_each else local.choice("df")[0]
                if discard and operation[0] == "d":
                    first = local.randrange(pages)
                    count = local.randrange(1, min(32, pages - first) + 1)
                    with lock:
                        region.discard(first * P, count * P)
                        snapshot[first * P : (first + count) * P] = bytes(count * P)
                    tally.removes += 1
                else:
                    first = local.randrange(pages)
                    count = local.randrange(1, pages - first + 1)
                    fork_and_hash(region.address + first * P, count * P, write=True)
                    tally.forks += 1
                time.sleep(local.random() * 0.002)

        def take(tracker: ua.WriteTracker) -> None:
            with lock:
                for page in tracker.collect():
                    offset = page - region.address
                    collected.add(offset // P)
                    snapshot[offset : offset + P] = region.read(offset, P)
                    tally.collected += 1

        with anyio.fail_after(ROUND_TIMEOUT):
            async with ua.WriteTracker(uffd, region.address, region.length, mode=mode) as tracker:
                workers: list[Worker] = [
                    lab.run(functools.partial(writer, rng.random())) for _ in range(threads)
                ]
                churner = lab.run(functools.partial(churn, rng.random()))
                while any(worker.alive for worker in workers):
                    take(tracker)
                    tally.collects += 1
                    await anyio.sleep(0.001)
                for worker in workers:
                    await finished(worker, ROUND_TIMEOUT)
                await finished(churner, ROUND_TIMEOUT)
                take(tracker)
        missing = sorted(written - collected)
        assert not missing, f"{len(missing)} written pages never collected, first {missing[:8]}"
        memory = region.read(0, region.length)
        assert memory == snapshot, first_difference(memory, bytes(snapshot), "snapshot")
        tally.writes = each * threads
        tally.pages_checked = pages
        return tally
    finally:
        lab.close()
