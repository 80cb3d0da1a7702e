"""One tenant cannot starve another, nor make the server deaf to cancellation.

A heavy peer (``tests/_storm_peer.py``: another process) faults as fast as it
can, without pause, and discards its pages to fault on them again: a steady
stream of faults and Remove events that never lets a read find the uffd empty
for long. Beside it, on the same server, a light peer touches a page every
millisecond. The light one must be served throughout, every fault of it, while
the heavy one still storms; and a server under the storm must return from a
cancellation while the storm still goes on. The resolvers: the snapshot's own
(beside a storm of faults and Remove events, as a ballooning guest's), one that
computes 200 us inline before each answer, and an awaited one that computes as
long and never awaits (the server's workers run it).

Beside those: a lone thread's stream caught by the reader's spin; a reader whose
reads always find events, and one whose every batch comes from its spin (both
deterministic: the same fault handed back); the worker pool's turn-taking
(deterministic, with a zero slice); the ``limit`` under a storm; and a reader
that stops mid-stream handing back what it read.

No latency is asserted. The heavy peer storms until told to stop or for
``STORM_BOUND`` seconds: a server that never gives the loop back is seen by
the storm having ended on its own bound before the test could act, which
fails the test by assertion (not by the watchdog). A cancel's return is held
to ``CANCEL_BOUND``, the loop's clock: a bound on a hang, not a measure.
"""

from __future__ import annotations

import dataclasses
import functools
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import uffd_async as ua
from uffd_async._serve import _pool
from uffd_async._serve._pool import WorkerPool
from uffd_async.resolvers import AnyResolver

from ._storm_peer import Tenant, tenant
from ._support import TIMEOUT, Lab, Worker, finished, source_bytes

pytestmark = pytest.mark.anyio

P = ua.PAGE_SIZE
#: The heavy peer's pages: 64 per thread, so each thread's C loop faults 64 times
#: between its trips through Python (where 32 threads would queue for the GIL).
PAGES = 2048
#: How long the heavy peer storms unless told to stop (s): far beyond what a fair
#: server needs for the test, below the test's own bounds (``Tenant.line``'s).
STORM_BOUND = 15.0
#: The lone thread's region: a pass over it lasts many times ``CANCEL_BOUND`` (8 GiB
#: of address space, read as zero pages: page tables only).
LONE_STREAM_PAGES = 1 << 21
#: How long a server serves the storm before its deadline cancels it (s).
STORMING = 0.5
#: The bound on a cancel's return under the storm (loop clock, s): a hang's bound, far
#: above the milliseconds a fair server takes, far below what the storm lasts.
CANCEL_BOUND = 5.0
#: The heavy peer's threads: faults are pending at every read (with a resolver that
#: takes its time, a read never finds the uffd empty: the reader never waits on its own).
STORM_THREADS = 32
#: The light peer's faults, one a millisecond.
LIGHT_FAULTS = 100
#: Faults per read in the plain serve() tests: one, far fewer than the storm keeps waiting.
SMALL_BATCH = 1
#: How long a resolution of the "awaited" kind computes without awaiting (s): more
#: than the server's poll interval, so a worker always finds the next fault waiting.
BUSY = 200e-6


@pytest.fixture
def where() -> Iterator[Path]:
    """A short directory (a Unix socket path holds at most 107 bytes) with the snapshot."""
    with tempfile.TemporaryDirectory(prefix="ua-fair-") as name:
        (Path(name) / "snapshot.bin").write_bytes(source_bytes(PAGES))
        yield Path(name)


def peer(where: Path, role: str, **config: Any) -> AbstractAsyncContextManager[Tenant]:
    """A peer handing its memory over on ``where/s.sock`` (see ``_storm_peer``).

    The heavy one discards without Remove events unless ``remove=True``: a Remove
    makes the faults behind it wait (EAGAIN, retried after a sleep), and the storm
    then pauses by itself, which would hide a server that never yields."""
    settings = {
        "pages": PAGES,
        "bound": STORM_BOUND,
        "threads": STORM_THREADS,
        "remove": False,
        **config,
    }
    return tenant(
        where / "s.sock", where / "snapshot.bin", role, timeout=STORM_BOUND + TIMEOUT, **settings
    )


def busy(seconds: float = BUSY) -> None:
    """Compute for ``seconds`` without awaiting, as a synchronous decompression would."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


class BusyInline(ua.Resolver):
    """A snapshot resolver that computes for ``BUSY`` s before each answer, inline: the
    storm refills the uffd while a batch is answered, so the reader's reads never find
    it empty."""

    def __init__(self, inner: ua.Resolver) -> None:
        self._inner = inner

    def resolve_now(self, fault: ua.PageFault, uffd: ua.Userfaultfd) -> bool:
        busy()
        return self._inner.resolve_now(fault, uffd)

    def woke(self, fault: ua.PageFault) -> bool:
        return self._inner.woke(fault)

    def apply(self, event: ua.Remap | ua.Remove | ua.Unmap) -> None:
        self._inner.apply(event)


def resolver_for(kind: str, snapshot: ua.Snapshot, handoff: ua.Handoff) -> AnyResolver:
    """``inline``: the snapshot's own resolver; ``busy``: :class:`BusyInline`;
    ``awaited``: an async function that computes, then answers, never awaiting: the
    server's workers run it, and never find themselves out of work."""
    inner = snapshot.resolver(handoff.mappings)
    if kind == "inline":
        return inner
    if kind == "busy":
        return BusyInline(inner)

    async def resolve(fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        busy()
        assert inner.resolve_now(fault, uffd)

    return resolve


# -- two tenants on one server ----------------------------------------------------


@pytest.mark.parametrize("kind", ["inline", "busy", "awaited"])
async def test_a_light_peer_is_served_throughout_a_heavy_ones_storm(where: Path, kind: str) -> None:
    with ua.Snapshot(where / "snapshot.bin") as snapshot:
        source = functools.partial(resolver_for, kind, snapshot)
        async with anyio.create_task_group() as tg:
            server: ua.HandoffServer = await tg.start(
                functools.partial(ua.serve_handoffs, where / "s.sock", source)
            )
            async with peer(where, "heavy", remove=kind == "inline") as storm:
                assert await storm.line() == "ready"
                assert await storm.line() == "storming"
                async with peer(where, "light", interval=0.001, count=LIGHT_FAULTS) as ticks:
                    assert await ticks.line() == "ready"
                    while (line := await ticks.line()) != "done":
                        assert line.startswith("served "), ticks.lines
                    with anyio.fail_after(TIMEOUT):
                        assert await ticks.process.wait() == 0
                ended, _ = await storm.stop()
            tg.cancel_scope.cancel()
    served = [line for line in ticks.lines if line.startswith("served")]
    assert len(served) == LIGHT_FAULTS
    assert ended == "stopped", (
        f"the heavy peer's storm ran its {STORM_BOUND} s before the light peer's "
        f"{LIGHT_FAULTS} faults were served: one tenant starved the other"
    )
    assert server.stats.served == 2 and server.stats.errors == 0


# -- cancellation under a storm ---------------------------------------------------
#
# The cancel comes from a deadline, not from the test's task: a server that holds
# the loop holds that task too, and would only let it ask once the storm is over.


@pytest.mark.parametrize("kind", ["busy", "awaited"])
async def test_serve_returns_from_a_cancel_under_a_storm(where: Path, kind: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener, ua.Snapshot(where / "snapshot.bin") as snapshot:
        listener.bind(str(where / "s.sock"))
        listener.listen()
        listener.setblocking(False)
        async with peer(where, "heavy") as storm:
            assert await storm.line() == "ready"
            with anyio.fail_after(TIMEOUT):
                await anyio.wait_readable(listener)
            conn, _ = listener.accept()
            with conn, await ua.receive_uffd(conn, backing_size=snapshot.size) as handoff:
                resolver = resolver_for(kind, snapshot, handoff)
                # The peer is blocked on its first fault: the storm starts with serve().
                # Small batches: a read's faults take less than a slice to answer, and
                # the storm keeps more than a batch waiting, so no read comes back empty.
                serving = functools.partial(ua.serve, handoff.uffd, resolver, batch=SMALL_BATCH)
                with anyio.CancelScope(deadline=anyio.current_time() + STORMING) as scope:
                    async with anyio.create_task_group() as tg:
                        server = await tg.start(serving)
                        await anyio.sleep_forever()
                took = anyio.current_time() - scope.deadline
                faults = server.stats.faults
                # The faults it was blocked on at the cancel went back to the uffd: serving
                # again answers them, and the storm goes on until told to stop.
                async with anyio.create_task_group() as tg:
                    tg.start_soon(serving)
                    assert await storm.line() == "storming"
                    ended, _ = await storm.stop()
                    tg.cancel_scope.cancel()
    assert faults >= STORM_THREADS, "no storm to speak of"
    assert took < CANCEL_BOUND, f"serve() returned {took:.1f} s after its deadline"
    assert ended == "stopped"


class PythonZeroFill(ua.Resolver):
    """Zero pages, answered in Python (no C loop): the reader returns every fault."""

    def resolve_now(self, fault: ua.PageFault, uffd: ua.Userfaultfd) -> bool:
        uffd.zeropage(fault.page, P)
        return True


async def test_serve_returns_from_a_cancel_under_a_lone_threads_stream(lab: Lab) -> None:
    """One thread reading page after page of a vast region (zero pages: nothing stays
    resident), one fault at a time: each fault comes within microseconds of the last
    one's answer, so the uffd is often seen empty for an instant and the spin catches
    the next. That stream must not keep the server from its checkpoints."""
    pages = LONE_STREAM_PAGES
    region = lab.anonymous(pages)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    resolver = PythonZeroFill()
    reader = lab.run(lambda: ua.touch(region.address, region.length, write=False))
    with anyio.CancelScope(deadline=anyio.current_time() + STORMING) as scope:
        async with anyio.create_task_group() as tg:
            # The longest spin a server may have: it catches every fault of the thread.
            serving = functools.partial(ua.serve, uffd, resolver, spin=0.01)
            server = await tg.start(serving)
            await anyio.sleep_forever()
    took = anyio.current_time() - scope.deadline
    faults = server.stats.faults
    assert reader.alive, "the thread read the whole region before the cancel"
    uffd.close()  # the rest fault the ordinary way (zero pages): the thread ends
    await finished(reader)
    assert faults > 0
    assert took < CANCEL_BOUND, f"serve() returned {took:.1f} s after its deadline"


async def test_serve_handoffs_returns_from_a_cancel_under_a_storm(where: Path) -> None:
    with ua.Snapshot(where / "snapshot.bin") as snapshot:
        async with peer(where, "heavy") as storm:
            assert await storm.line() == "ready"  # it connects as the socket appears
            source = functools.partial(resolver_for, "busy", snapshot)
            with anyio.CancelScope(deadline=anyio.current_time() + STORMING) as scope:
                async with anyio.create_task_group() as tg:
                    serving = functools.partial(ua.serve_handoffs, where / "s.sock", source)
                    server = await tg.start(serving)
                    await anyio.sleep_forever()
            took = anyio.current_time() - scope.deadline
            # Its uffd is closed on our side, not on its: it stays blocked; killed on exit.
    assert server.stats.served == 1 and server.stats.faults >= STORM_THREADS, "no storm"
    assert took < CANCEL_BOUND, f"serve_handoffs() returned {took:.1f} s after its deadline"


# -- the worker pool takes turns as one -------------------------------------------


async def test_a_pool_of_busy_workers_takes_one_slice_per_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a slice of 0, each worker would checkpoint after every job; while one is
    away the others must park, so between two turns of another task at most one job
    or two run, not one per worker."""
    monkeypatch.setattr(_pool, "SLICE_NS", 0)
    done = [0]
    workers = 8

    async def job(item: int) -> None:
        done[0] += 1  # never awaits: as a resolver that answers at once

    def after() -> None:  # the next job is always there, up to a bound (so a pool that
        if done[0] < 1000:  # never yields still ends, and the assertion fails)
            pool.submit(tg, 0)

    async with anyio.create_task_group() as tg:
        pool: WorkerPool[int] = WorkerPool(job, workers, after=after)
        for _ in range(workers):
            pool.submit(tg, 0)
        most = 0
        with anyio.fail_after(TIMEOUT):
            while done[0] < 200:
                before = done[0]
                await anyio.lowlevel.checkpoint()
                most = max(most, done[0] - before)
        assert pool.workers == workers  # every worker was started, and had work waiting
        tg.cancel_scope.cancel()
    assert most <= 2, f"{most} jobs ran between two turns of another task"


# -- a storm waits its turn behind ``limit``; a reader that stops loses nothing -----


async def test_a_storm_queues_behind_limit_and_every_fault_is_served(lab: Lab) -> None:
    threads, pages, limit = 16, 8, 2
    region = lab.anonymous(threads * pages)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    running, most, counted = [0], [0], [0]
    stats: list[ua.ServerStats] = []

    async def resolve(fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        running[0] += 1
        most[0] = max(most[0], running[0])
        counted[0] = max(counted[0], stats[0].in_flight)  # what the server says it runs
        try:
            await anyio.sleep(0.001)
            uffd.zeropage(fault.page, P)
        finally:
            running[0] -= 1

    span = pages * P
    async with anyio.create_task_group() as tg:
        server = await tg.start(functools.partial(ua.serve, uffd, resolve, limit=limit))
        stats.append(server.stats)
        workers = [
            lab.run(functools.partial(ua.touch, region.address + i * span, span, write=False))
            for i in range(threads)
        ]
        for worker in workers:
            await finished(worker)
        tg.cancel_scope.cancel()
    assert most[0] == counted[0] == limit
    assert server.stats.resolved == threads * pages


@dataclasses.dataclass
class OneFault:
    """One thread blocked on one page, and a reader that has read its fault."""

    region: ua.Region
    uffd: ua.Userfaultfd
    worker: Worker
    reader: ua.EventReader
    events: list[ua.Event]

    @classmethod
    async def read(cls, lab: Lab, spin: float = 0.0) -> OneFault:
        region = lab.anonymous(1)
        uffd = lab.uffd()
        uffd.register(region.address, region.length)
        worker = lab.touch(region.address, write=False)
        reader = ua.EventReader(uffd, spin=spin)
        with anyio.fail_after(TIMEOUT):
            events = await reader.receive_batch()
        return cls(region, uffd, worker, reader, events)

    async def answer(self) -> None:
        """Zero the page (its thread goes on) and wait for the thread."""
        self.uffd._unhandled.clear()
        self.uffd.zeropage(self.region.address, P)
        await finished(self.worker)


async def test_events_a_reader_did_not_hand_out_go_back_when_it_closes(lab: Lab) -> None:
    one = await OneFault.read(lab)
    one.reader.push_back(one.events)  # received, never handled: as a server cancelled mid-batch
    one.reader.close()
    async with anyio.create_task_group() as tg:
        await tg.start(functools.partial(ua.serve, one.uffd, ua.zero_fill()))
        await finished(one.worker)
        tg.cancel_scope.cancel()


async def test_a_reader_that_never_runs_dry_lets_the_others_run(lab: Lab) -> None:
    """Events that are there at every read (one real fault, handed back to the uffd
    after each read, as a stopping server does): the reader never waits, so only
    its slice lets another task run, and it must."""
    one = await OneFault.read(lab)
    uffd, reader, events = one.uffd, one.reader, one.events
    ran = [False]

    async def other() -> None:
        ran[0] = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        for _ in range(200_000):  # far more than a slice's worth of reads
            uffd._push_back(events)
            events = await reader.receive_batch()
            if ran[0]:
                break
        meanwhile = ran[0]  # (leaving the task group would let it run anyway)
    assert meanwhile, "the reader read 200,000 times without letting another task run"
    await one.answer()


#: Longer than any spin: a batch still not returned went to wait on the uffd (s).
WAITED_IN_EPOLL = 0.5


async def test_events_the_spin_catches_do_not_restart_the_slice(lab: Lab) -> None:
    """The same fault handed back from another thread, which gets the GIL only while the
    reader spins (every 5 ms, Python's switch interval): each batch is caught by the
    spin after the uffd read empty, as a lone thread's next fault is. Those catches are
    no wait: the reader must still let another task run."""
    one = await OneFault.read(lab, spin=0.01)
    uffd, reader, events = one.uffd, one.reader, one.events
    done = threading.Event()

    def hand_back() -> None:
        while not done.is_set():
            if not uffd._unhandled:
                uffd._push_back(events)
            time.sleep(0)  # (lets the GIL go)

    ran = [False]

    async def other() -> None:
        ran[0] = True

    helper = threading.Thread(target=hand_back)
    helper.start()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(other)
            caught = 0
            while caught < 1000:  # each takes up to a spin: far more than a slice's worth
                # A push-back the spin missed (a loaded machine did not run the thread in
                # time) leaves the reader waiting on a uffd the kernel has nothing more in:
                # that wait is a real one, which lets others run; start over after it.
                with anyio.move_on_after(WAITED_IN_EPOLL) as waited:
                    await reader.receive_batch()
                if waited.cancelled_caught:
                    ran[0] = False
                    tg.start_soon(other)
                    continue
                caught += 1
                if ran[0]:
                    break
            meanwhile = ran[0]
    finally:
        done.set()
        helper.join(TIMEOUT)
    assert meanwhile, "the reader took 1,000 batches from its spin without letting others run"
    await one.answer()
