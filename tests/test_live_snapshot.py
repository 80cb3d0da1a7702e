"""``ua.snapshot_live``: memory at one instant while writers keep writing, on real faults.

Each test fills a region with pattern A, starts a live snapshot and, the moment it
is protected (``task_status.started()``), starts writers overwriting pages with B
(``ctypes.memset`` from threads: the fault happens inside C, without the GIL). The
image must be exactly A where the instant held A; every writer must finish (no
thread left blocked), and the memory must end up as the writers left it. Also:
pages never populated, writers on the same page, a discard and an mremap during
the snapshot, cancellation part-way, shmem, and a uffd handed over by another
process. Bytes and counters are asserted, never time.
"""

from __future__ import annotations

import ctypes
import functools
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

import anyio
import pytest

import uffd_async as ua
from uffd_async._core._native import libc
from uffd_async._core._process_memory import ProcessMemory

from ._support import (
    TIMEOUT,
    Lab,
    finished,
    source_bytes,
    with_huge_pages,
)

pytestmark = pytest.mark.anyio
P = ua.PAGE_SIZE
PAGES = 2048  # 8 MiB
A, B = 0xA1, 0xB2
EVENTS = ua.Feature.EVENT_REMOVE | ua.Feature.EVENT_REMAP | ua.Feature.EVENT_UNMAP
FEATURES = ua.Feature.WP_UNPOPULATED | EVENTS


def write_pages(address: int, pages: list[int], value: int) -> int:
    for page in pages:
        ctypes.memset(address + page * P, value, P)
    return len(pages)


def writers(lab: Lab, region: ua.Region, threads: int = 4, value: int = B) -> list[Any]:
    """``threads`` writers overwriting every page of ``region`` once, in random orders."""
    pages = list(range(region.length // P))
    random.Random(1).shuffle(pages)
    share = -(-len(pages) // threads)
    return [
        lab.run(functools.partial(write_pages, region.address, part, value))
        for part in (pages[n * share : (n + 1) * share] for n in range(threads))
    ]


def filled(lab: Lab, features: ua.Feature = FEATURES, pages: int = PAGES,
           shared: bool = False) -> tuple[ua.Region, ua.Userfaultfd]:  # fmt: skip
    region = lab.shared(pages) if shared else lab.anonymous(pages)
    ctypes.memset(region.address, A, region.length)
    uffd = lab.uffd(features)
    uffd.register(region.address, region.length, ua.Mode.WP)
    return region, uffd


async def start(
    tg: Any, uffd: ua.Userfaultfd, region: ua.Region, dest: Any, **options: Any
) -> ua.LiveSnapshotStats:
    """``snapshot_live`` of the whole region under ``tg``, once protected."""
    run = functools.partial(ua.snapshot_live, uffd, region.address, region.length, dest, **options)
    stats: ua.LiveSnapshotStats = await tg.start(run)
    return stats


async def snapshot_while_writing(
    lab: Lab, region: ua.Region, uffd: ua.Userfaultfd, dest: Path, **options: Any
) -> ua.LiveSnapshotStats:
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            stats = await start(tg, uffd, region, dest, **options)
            running = writers(lab, region)
        for worker in running:
            await finished(worker)
    return stats


async def test_the_image_is_the_instant_while_every_page_is_overwritten(
    lab: Lab, tmp_path: Path
) -> None:
    region, uffd = filled(lab)
    stats = await snapshot_while_writing(lab, region, uffd, tmp_path / "image")
    assert (tmp_path / "image").read_bytes() == bytes([A]) * region.length
    assert region.read(0, region.length) == bytes([B]) * region.length
    assert stats.pages == stats.total == PAGES and stats.lost == stats.discarded == 0
    assert 0 <= stats.early <= PAGES
    with ua.Snapshot(tmp_path / "image") as image:
        assert stats.identity == image.identity
    assert [p.name for p in tmp_path.iterdir()] == ["image"]  # no temporary left


async def test_writers_racing_on_the_same_pages(lab: Lab, tmp_path: Path) -> None:
    region, uffd = filled(lab, pages=64)
    hot = [0, 1, 2, 3, 40] * 50
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            await start(tg, uffd, region, tmp_path / "image")
            running = [lab.run(functools.partial(write_pages, region.address, hot, B + n))
                       for n in range(8)]  # fmt: skip
        for worker in running:
            await finished(worker)
    assert (tmp_path / "image").read_bytes() == bytes([A]) * region.length


@pytest.mark.parametrize("unpopulated", [True, False], ids=["wp-unpopulated", "prefaulted"])
async def test_pages_never_populated_are_zeros_and_cannot_escape(
    lab: Lab, tmp_path: Path, unpopulated: bool
) -> None:
    features = FEATURES if unpopulated else EVENTS
    region = lab.anonymous(PAGES)
    ctypes.memset(region.address, A, region.length // 2)  # the second half never touched
    uffd = lab.uffd(features)
    uffd.register(region.address, region.length, ua.Mode.WP)
    await snapshot_while_writing(lab, region, uffd, tmp_path / "image")
    half = region.length // 2
    assert (tmp_path / "image").read_bytes() == bytes([A]) * half + bytes(half)


async def test_a_discard_during_the_snapshot(lab: Lab, tmp_path: Path) -> None:
    """Discarded pages may hold zeros (their contents at the instant are gone, as the
    module says): every other page is the instant's, and nothing blocks."""
    region, uffd = filled(lab)
    tail = region.address + (PAGES - 256) * P
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            stats = await start(tg, uffd, region, tmp_path / "image", run_bytes=64 * P)
            discard = lab.run(lambda: region.discard(tail - region.address, 256 * P))
            await finished(discard)
        image = (tmp_path / "image").read_bytes()
    cut = (PAGES - 256) * P
    assert image[:cut] == bytes([A]) * cut
    for page in range(PAGES - 256, PAGES):
        assert image[page * P : (page + 1) * P] in (bytes([A]) * P, bytes(P)), page
    assert stats.pages == PAGES and stats.discarded <= 256


async def test_pages_moved_during_the_snapshot_are_saved_where_they_went(
    lab: Lab, tmp_path: Path
) -> None:
    region, uffd = filled(lab)
    moved = 128
    target = lab.anonymous(moved)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            await start(tg, uffd, region, tmp_path / "image", run_bytes=16 * P)
            source = region.address + (PAGES - moved) * P

            def move_and_write() -> None:
                libc.mremap(source, moved * P, moved * P, 3, target.address)  # MAYMOVE|FIXED
                write_pages(target.address, list(range(moved)), B)

            await finished(lab.run(move_and_write))
    assert (tmp_path / "image").read_bytes() == bytes([A]) * region.length
    assert target.read(0, moved * P) == bytes([B]) * moved * P


async def test_cancelled_part_way_leaves_nothing_protected_or_written(
    lab: Lab, tmp_path: Path
) -> None:
    region, uffd = filled(lab)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            stats = await start(tg, uffd, region, tmp_path / "image", run_bytes=4 * P)
            while stats.pages < 64:
                await anyio.sleep(0.001)
            tg.cancel_scope.cancel()
        assert stats.pages < PAGES
        # Nothing is protected any more: writes run with no server at all.
        for worker in writers(lab, region):
            await finished(worker)
    assert list(tmp_path.iterdir()) == []
    assert region.read(0, region.length) == bytes([B]) * region.length


async def test_shared_memory(lab: Lab, tmp_path: Path) -> None:
    if not ua.probe().features & ua.Feature.WP_HUGETLBFS_SHMEM:
        pytest.skip("the kernel cannot write-protect shmem")
    region, uffd = filled(lab, FEATURES | ua.Feature.WP_HUGETLBFS_SHMEM, shared=True)
    await snapshot_while_writing(lab, region, uffd, tmp_path / "image")
    assert (tmp_path / "image").read_bytes() == bytes([A]) * region.length


@with_huge_pages(4)
async def test_huge_pages(lab: Lab, tmp_path: Path) -> None:
    if not ua.probe().features & ua.Feature.WP_HUGETLBFS_SHMEM:
        pytest.skip("the kernel cannot write-protect hugetlbfs")
    huge = 2 << 20
    region = lab.adopt_region(ua.Region.hugetlb(4 * huge))
    ctypes.memset(region.address, A, region.length)
    uffd = lab.uffd(FEATURES | ua.Feature.WP_HUGETLBFS_SHMEM)
    uffd.register(region.address, region.length, ua.Mode.WP)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            stats = await start(tg, uffd, region, tmp_path / "image", page_size=huge,
                                run_bytes=huge)  # fmt: skip
            running = writers(lab, region)
        for worker in running:
            await finished(worker)
    assert (tmp_path / "image").read_bytes() == bytes([A]) * region.length
    assert region.read(0, region.length) == bytes([B]) * region.length
    assert stats.pages == stats.total == 4


async def test_into_an_open_file(lab: Lab, tmp_path: Path) -> None:
    region, uffd = filled(lab, pages=256)
    with open(tmp_path / "image", "wb+") as file:
        file.write(b"old contents, longer than nothing")
        await snapshot_while_writing(lab, region, uffd, file)  # type: ignore[arg-type]
    assert (tmp_path / "image").read_bytes() == bytes([A]) * region.length


PEER = textwrap.dedent(
    """
    import array, ctypes, socket, sys
    import uffd_async as ua
    P = ua.PAGE_SIZE
    pages = int(sys.argv[2])
    region = ua.Region.anonymous(pages * P)
    ctypes.memset(region.address, 0xA1, region.length)
    uffd = ua.Userfaultfd.open(ua.Feature.WP_UNPOPULATED | ua.Feature.EVENT_REMOVE)
    uffd.register(region.address, region.length, ua.Mode.WP)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sys.argv[1])
    mapping = ua.GuestMapping(base_host_virt_addr=region.address, size=region.length,
                              offset=0, page_size=P)
    ua.send_uffd(sock, uffd, [mapping])
    sock.recv(1)  # the snapshot is protected: write everything
    for page in range(pages):
        ctypes.memset(region.address + page * P, 0xB2, P)
    print("wrote", region.read(0, region.length) == bytes([0xB2]) * region.length, flush=True)
    """
)


async def test_memory_of_another_process_through_its_handed_over_uffd(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    pages = 512
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        async with await anyio.open_process(
            [sys.executable, "-c", PEER, path, str(pages)], stderr=subprocess.STDOUT
        ) as peer:
            with anyio.fail_after(TIMEOUT):
                conn, _ = await anyio.to_thread.run_sync(listener.accept)
                with conn, await ua.receive_uffd(conn) as handoff:
                    [mapping] = handoff.mappings
                    async with anyio.create_task_group() as tg:
                        stats = await tg.start(
                            functools.partial(
                                ua.snapshot_live, handoff.uffd, mapping.base_host_virt_addr,
                                mapping.size, tmp_path / "image", pid=handoff.pid,
                            )
                        )  # fmt: skip
                        conn.send(b"g")
                    assert peer.stdout is not None
                    output = b""
                    async for piece in peer.stdout:
                        output += piece
                assert await peer.wait() == 0, output
    assert output.startswith(b"wrote True"), output
    assert (tmp_path / "image").read_bytes() == bytes([A]) * pages * P
    assert stats.pages == pages


async def test_what_is_refused(lab: Lab, tmp_path: Path) -> None:
    region, uffd = filled(lab, pages=16)
    with pytest.raises(ua.InvalidArgument, match="is not aligned to 4096-byte pages"):
        await ua.snapshot_live(uffd, region.address + 1, P, tmp_path / "x")
    with pytest.raises(ua.InvalidArgument, match="incremental"):
        await ua.snapshot_live(uffd, region.address, region.length, tmp_path / "x",
                               incremental=True)  # fmt: skip
    if ua.probe().features & ua.Feature.WP_ASYNC:
        with ua.Userfaultfd.open(ua.Feature.WP_ASYNC) as async_uffd:
            with pytest.raises(ua.InvalidArgument, match="WP_ASYNC"):
                await ua.snapshot_live(async_uffd, region.address, region.length, tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        await ua.snapshot_live(uffd, region.address, region.length, tmp_path / "no" / "x")
    assert list(tmp_path.iterdir()) == []
    # Nothing was left protected: a write needs no server.
    await finished(lab.run(functools.partial(write_pages, region.address, [0, 15], B)))


# -- incremental layers, with a WriteTracker ----------------------------------------------


def stamp(region: ua.Region, pages: list[int], value: int) -> None:
    for page in pages:
        ctypes.memset(region.address + page * P, value, P)


async def restored(lab: Lab, layered: ua.LayeredSnapshot) -> bytes:
    """The layered source restored lazily into fresh memory, by real faults."""
    memory = lab.anonymous(PAGES)
    uffd = lab.uffd()
    uffd.register(memory.address, memory.length, ua.Mode.MISSING)
    mapping = ua.GuestMapping(
        base_host_virt_addr=memory.address, size=memory.length, offset=0, page_size=P
    )
    async with ua.FaultServer(uffd, layered.resolver([mapping])):
        data: bytes = await finished(lab.run(lambda: memory.read(0, memory.length)))
    return data


async def test_a_base_and_two_layers_restore_the_last_instant(lab: Lab, tmp_path: Path) -> None:
    region = lab.anonymous(PAGES)
    for page in range(PAGES):
        ctypes.memset(region.address + page * P, page % 251, P)
    uffd = lab.uffd(FEATURES)
    rng = random.Random(5)
    paths = [tmp_path / "base.img", tmp_path / "1.layer", tmp_path / "2.layer"]
    sizes = []
    async with ua.WriteTracker(uffd, region.address, region.length) as tracker:
        parent = b""
        for n, path in enumerate(paths):
            if n:  # the program changes 5% of its pages between two snapshots
                stamp(region, rng.sample(range(PAGES), PAGES // 20), 0x10 + n)
            instant = region.read(0, region.length)
            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as tg:
                    stats = await start(tg, uffd, region, path, tracker=tracker,
                                        incremental=bool(n), parent=parent or None)  # fmt: skip
                    running = writers(lab, region, value=0x80 + n)  # after the instant
                for worker in running:
                    await finished(worker)
            parent = stats.identity
            sizes.append(stats.total)
            with ua.LayeredSnapshot(*paths[: n + 1]) as layered:
                assert await restored(lab, layered) == instant, f"snapshot {n}"
    assert sizes[0] == PAGES and sizes[1] == sizes[2] == PAGES  # every page rewritten
    squashed = tmp_path / "all.img"
    ua.squash(paths[0], paths[1:], squashed)
    with ua.LayeredSnapshot(*paths) as layered, ua.Snapshot(squashed) as whole:
        assert layered.identity == whole.identity


async def test_a_layer_holds_only_the_pages_written_since(lab: Lab, tmp_path: Path) -> None:
    region, uffd = filled(lab)
    async with ua.WriteTracker(uffd, region.address, region.length, register=False) as tracker:
        base = await ua.snapshot_live(uffd, region.address, region.length,
                                      tmp_path / "base.img", tracker=tracker)  # fmt: skip
        changed = sorted(random.Random(2).sample(range(PAGES), 100))
        await finished(lab.run(functools.partial(stamp, region, changed, B)))
        layer = await ua.snapshot_live(uffd, region.address, region.length, tmp_path / "1.layer",
                                       tracker=tracker, incremental=True,
                                       parent=base.identity)  # fmt: skip
        assert tracker.collect() == []  # the layer's instant was a collect()
    assert layer.total == layer.pages == 100
    with ua.Layer(tmp_path / "1.layer") as opened:
        assert opened.page_count == 100 and opened.parent == base.identity
        pages = [first + n for first, count in opened.runs for n in range(count)]
    assert pages == changed
    with ua.LayeredSnapshot(tmp_path / "base.img", tmp_path / "1.layer") as layered:
        assert await restored(lab, layered) == region.read(0, region.length)


@pytest.mark.parametrize("readahead", [0, 7])
async def test_copy_from_a_snapshot_or_its_layers_in_process(
    lab: Lab, tmp_path: Path, readahead: int
) -> None:
    region, uffd = filled(lab, pages=256)
    async with ua.WriteTracker(uffd, region.address, region.length, register=False) as tracker:
        base = await ua.snapshot_live(uffd, region.address, region.length,
                                      tmp_path / "base.img", tracker=tracker)  # fmt: skip
        await finished(lab.run(functools.partial(stamp, region, [3, 4, 100], B)))
        await ua.snapshot_live(uffd, region.address, region.length, tmp_path / "1.layer",
                               tracker=tracker, incremental=True, parent=base.identity)  # fmt: skip
    expected = region.read(0, region.length)
    for source in (ua.LayeredSnapshot(tmp_path / "base.img", tmp_path / "1.layer"),
                   ua.Snapshot(tmp_path / "base.img")):  # fmt: skip
        with source:
            memory = lab.anonymous(256)
            target = lab.uffd()
            target.register(memory.address, memory.length)
            resolver = ua.copy_from(source, base=memory.address, readahead=readahead)
            async with ua.FaultServer(target, resolver):
                got = await finished(lab.run(functools.partial(memory.read, 0, memory.length)))
        layered = isinstance(source, ua.LayeredSnapshot)
        assert got == (expected if layered else bytes([A]) * region.length)
    with pytest.raises(ua.SnapshotClosed):
        ua.copy_from(source, base=memory.address)


# -- the address space changing under the background, deterministically ------------------


class HeldRead:
    """Holds the background's ``n``-th read (the first read by a worker thread is 1)
    until :meth:`release`, so a test changes the address space while a run is surely
    being read. The read itself is the real ``process_vm_readv``, made after the hold."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, n: int) -> None:
        self.reached = threading.Event()
        self._go = threading.Event()
        self._calls = 0
        #: Set: every read from then on is of this process (one that is gone, say).
        self.pid: int | None = None
        loop_thread = threading.current_thread()
        real = ProcessMemory.read_into

        def read_into(memory: ProcessMemory, address: int, buffer: Any, page_size: int) -> int:
            if self.pid is not None:
                memory.pid = self.pid
            if threading.current_thread() is not loop_thread:
                self._calls += 1
                if self._calls == n:
                    self.reached.set()
                    self._go.wait(TIMEOUT)
            return real(memory, address, buffer, page_size)

        monkeypatch.setattr(ProcessMemory, "read_into", read_into)

    async def wait(self) -> None:
        assert await anyio.to_thread.run_sync(self.reached.wait, TIMEOUT), "no such read"

    def release(self) -> None:
        self._go.set()


def stamped(lab: Lab, pages: int, features: ua.Feature = FEATURES, shared: bool = False,
            **open_options: Any) -> tuple[ua.Region, ua.Userfaultfd, bytes]:  # fmt: skip
    """A region of ``pages`` distinct pages, registered WP; and its bytes (the instant)."""
    region = lab.shared(pages) if shared else lab.anonymous(pages)
    instant = source_bytes(pages)
    region.write(0, instant)
    uffd = lab.uffd(features, **open_options)
    if not shared or features & ua.Feature.WP_HUGETLBFS_SHMEM:
        uffd.register(region.address, region.length, ua.Mode.WP)
    return region, uffd, instant


def mremap(source: int, pages: int, target: int) -> None:
    moved = libc.mremap(source, pages * P, pages * P, 3, target)  # MAYMOVE|FIXED
    assert moved == target, f"mremap: errno {ctypes.get_errno()}"


async def test_an_mremap_racing_a_background_read_makes_the_run_be_read_again(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first run is moved away while the background reads it (from where it was):
    those bytes are thrown away and the run is read again where it went."""
    region, uffd, instant = stamped(lab, 64)
    target = lab.anonymous(16)
    hold = HeldRead(monkeypatch, 1)
    try:
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                stats = await start(tg, uffd, region, tmp_path / "image", run_bytes=16 * P)
                await hold.wait()
                await finished(lab.run(functools.partial(mremap, region.address, 16,
                                                         target.address)))  # fmt: skip
                hold.release()
    finally:
        hold.release()
    assert (tmp_path / "image").read_bytes() == instant
    assert stats.pages == 64 and stats.lost == 0


async def test_an_mremap_within_the_range_turns_the_c_save_path_off(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages 32-47 and 64-79 swap places (three mremaps, through a spot outside), then
    writers hit them all before the background got there: each page is saved into its
    own slot (where it was at the instant), not into the slot of the address it is at,
    as the C loop (which knows addresses only) would."""
    region, uffd, instant = stamped(lab, 128)
    spot = lab.anonymous(16)
    a, b = region.address + 32 * P, region.address + 64 * P
    hold = HeldRead(monkeypatch, 1)

    def swap() -> None:
        mremap(a, 16, spot.address)
        mremap(b, 16, a)
        mremap(spot.address, 16, b)

    try:
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                stats = await start(tg, uffd, region, tmp_path / "image", run_bytes=16 * P)
                await hold.wait()  # the background is at the first run: none of these saved
                await finished(lab.run(swap))
                pages = [*range(32, 48), *range(64, 80)]
                await finished(lab.run(functools.partial(write_pages, region.address, pages, B)))
                hold.release()
    finally:
        hold.release()
    assert (tmp_path / "image").read_bytes() == instant
    assert stats.early == 32 and stats.lost == 0


@pytest.mark.parametrize("loop", ["c", "python"])
async def test_a_write_fault_on_a_page_already_saved_never_overwrites_it(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """Under a WriteTracker the background leaves saved pages protected, so a write to
    one faults: the page holds what the image has (the write waits), except where
    the memory changed through another view of it (the memfd's alias, which no
    protection covers). The fault must not save the page again: the image keeps the
    instant's bytes. ``python``: someone awaits ``next_write()``, which turns the C
    loop off."""
    if not ua.probe().features & ua.Feature.WP_HUGETLBFS_SHMEM:
        pytest.skip("the kernel cannot write-protect shmem")
    features = FEATURES | ua.Feature.WP_HUGETLBFS_SHMEM
    region, uffd, instant = stamped(lab, 64, features, shared=True)
    uffd.unregister(region.address, region.length)
    hold = HeldRead(monkeypatch, 2)  # the first run (pages 0-15) is saved by then
    assert region.alias is not None
    try:
        with anyio.fail_after(TIMEOUT):
            async with ua.WriteTracker(uffd, region.address, region.length) as tracker:
                async with anyio.create_task_group() as tg:
                    if loop == "python":
                        tg.start_soon(drain, tracker)
                    async with anyio.create_task_group() as inner:
                        await start(inner, uffd, region, tmp_path / "image", tracker=tracker,
                                    run_bytes=16 * P)  # fmt: skip
                        await hold.wait()
                        region.alias.fill(5 * P, P, 0xEE)  # no fault: not the registered view
                        await finished(lab.run(functools.partial(write_pages, region.address,
                                                                 [5], B)))  # fmt: skip
                        hold.release()
                    tg.cancel_scope.cancel()  # the drain
    finally:
        hold.release()
    assert (tmp_path / "image").read_bytes() == instant


async def drain(tracker: ua.WriteTracker) -> None:
    async for _ in tracker:
        pass


async def test_a_page_unreadable_at_its_fault_is_saved_as_zeros(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Page 40 is unmapped (no EVENT_UNMAP: nothing tells the server) while a write to
    it waits in its fault, and other pages (60, discarded: saved at once; then 50,
    written) were saved just before: the image gets zeros for page 40 (counted lost),
    never the bytes of the page saved before it."""
    # The write comes from the kernel (read() into the page): a user-mode-only uffd
    # refuses such faults, so this needs a full one (skipped without it).
    region, uffd, instant = stamped(
        lab, 64, FEATURES & ~ua.Feature.EVENT_UNMAP, user_mode_only=False
    )
    hold = HeldRead(monkeypatch, 1)
    zero = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
    page40 = region.address + 40 * P
    try:
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                stats = await start(tg, uffd, region, tmp_path / "image", run_bytes=16 * P)
                await hold.wait()
                await finished(lab.run(functools.partial(region.discard, 60 * P, P)))
                # Page 50 written: saved first, through the Python path (an event was
                # seen), so the page buffer holds its bytes, which page 40 must not get.
                await finished(lab.run(functools.partial(region.write, 50 * P, b"\xee" * P)))
                # The loop is held here (no await) until the write to page 40 waits in its
                # fault and the page is gone: the server reads that fault only then. The
                # write comes from the kernel (read() into it), so it ends in EFAULT.
                writer = lab.run(lambda: libc.read(zero, ctypes.c_void_p(page40), P))
                assert select.select([uffd], [], [], TIMEOUT)[0], "the write never faulted"
                assert libc.munmap(page40, P) == 0
                assert await finished(writer) == -1
                hold.release()
    finally:
        hold.release()
        os.close(zero)
    image = (tmp_path / "image").read_bytes()
    assert image[40 * P : 41 * P] == bytes(P)
    assert image[60 * P : 61 * P] in (instant[60 * P : 61 * P], bytes(P))
    assert (
        image[: 40 * P] == instant[: 40 * P] and image[41 * P : 60 * P] == instant[41 * P : 60 * P]
    )
    assert stats.lost >= 1 and stats.discarded == 1  # (the background counts it again)


# -- whose memory it is ------------------------------------------------------------------


async def test_a_pid_that_cannot_be_read_is_an_error_never_an_image_of_zeros(
    lab: Lab, tmp_path: Path
) -> None:
    """A process that is gone, or one that does not map the range (the wrong pid): an
    error before anything is protected or written."""
    region, uffd, _ = stamped(lab, 16)
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    try:
        with pytest.raises(ua.InvalidArgument, match=f"not mapped in process {other.pid}"):
            await ua.snapshot_live(uffd, region.address, region.length, tmp_path / "image",
                                   pid=other.pid)  # fmt: skip
    finally:
        assert other.stdin is not None
        other.stdin.close()
        other.wait(TIMEOUT)
    with pytest.raises(ProcessLookupError, match=f"no process {other.pid}"):
        await ua.snapshot_live(uffd, region.address, region.length, tmp_path / "image",
                               pid=other.pid)  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    await finished(lab.run(functools.partial(write_pages, region.address, [0, 15], B)))


async def test_a_process_gone_mid_snapshot_fails_it(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process whose memory it is exits while the background reads: ESRCH is an
    error (the snapshot fails, the old file stays), never pages of zeros."""
    path = tmp_path / "image"
    path.write_bytes(b"the old image")
    region, uffd, _ = stamped(lab, 64)
    hold = HeldRead(monkeypatch, 2)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(TIMEOUT)
    try:
        with anyio.fail_after(TIMEOUT), pytest.raises(BaseExceptionGroup) as caught:
            async with anyio.create_task_group() as tg:
                stats = await start(tg, uffd, region, path, run_bytes=16 * P)
                await hold.wait()
                hold.pid = child.pid  # from now on every read is of a process that is gone
                hold.release()
        assert caught.group_contains(ProcessLookupError, match="No such process")
    finally:
        hold.release()
    assert stats.pages < 64
    assert path.read_bytes() == b"the old image" and os.listdir(tmp_path) == ["image"]
    await finished(lab.run(functools.partial(write_pages, region.address, [0, 63], B)))


# -- the image file ----------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o000])
async def test_the_image_is_private_to_its_owner(lab: Lab, tmp_path: Path, umask: int) -> None:
    """Live process memory: 0600 whatever the umask (bug 3: it was 0755)."""
    region, uffd, instant = stamped(lab, 16)
    old = os.umask(umask)
    try:
        await ua.snapshot_live(uffd, region.address, region.length, tmp_path / "image")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "image").st_mode & 0o777 == 0o600
    assert (tmp_path / "image").read_bytes() == instant


async def test_cancelled_part_way_leaves_the_old_image(lab: Lab, tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(b"the old image")
    path.chmod(0o640)
    region, uffd, _ = stamped(lab, PAGES)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            stats = await start(tg, uffd, region, path, run_bytes=4 * P)
            while stats.pages < 64:
                await anyio.sleep(0.001)
            tg.cancel_scope.cancel()
    assert path.read_bytes() == b"the old image" and os.listdir(tmp_path) == ["image"]
    assert os.stat(path).st_mode & 0o777 == 0o640


async def test_pages_unmapped_during_a_snapshot_into_an_open_file_are_zeros(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open file is truncated first: a page unmapped before it was saved (never
    written to the image) reads zeros there, not what the file held before."""
    region, uffd, instant = stamped(lab, 64)
    hold = HeldRead(monkeypatch, 1)
    with open(tmp_path / "image", "wb+") as file:
        file.write(b"\xff" * (64 * P))
        try:
            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as tg:
                    stats = await start(tg, uffd, region, file, run_bytes=16 * P)
                    await hold.wait()
                    gone = region.address + 40 * P
                    await finished(lab.run(lambda: libc.munmap(gone, 8 * P)))  # EVENT_UNMAP
                    hold.release()
        finally:
            hold.release()
    image = (tmp_path / "image").read_bytes()
    assert image == instant[: 40 * P] + bytes(8 * P) + instant[48 * P :]
    assert stats.lost == 8


NO_PTRACE = textwrap.dedent(
    """
    import asyncio, os, sys, tempfile
    import uffd_async as ua
    async def main():
        region = ua.Region.anonymous(16 * ua.PAGE_SIZE)
        uffd = ua.Userfaultfd.open(ua.Feature.WP_UNPOPULATED, user_mode_only=True)
        uffd.register(region.address, region.length, ua.Mode.WP)
        directory = tempfile.mkdtemp()
        try:
            await ua.snapshot_live(uffd, region.address, region.length,
                                   os.path.join(directory, "image"), pid=int(sys.argv[1]))
        except PermissionError as exc:
            print("refused:", exc, os.listdir(directory))
        region.write(0, b"written")  # nothing left protected: no server needed
        print("wrote")
    asyncio.run(main())
    """
)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_a_process_this_user_may_not_read_is_refused() -> None:
    """As nobody, a snapshot of a root process's memory (no ptrace access): a
    PermissionError saying so, and no file."""
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
         sys.executable, "-c", NO_PTRACE, str(os.getpid())],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "refused: [Errno 1] cannot read the memory of process" in done.stdout, done.stdout
    assert done.stdout.endswith("(no ptrace access): [Errno 13] Permission denied: "
                                f"'/proc/{os.getpid()}/maps' []\nwrote\n"), done.stdout  # fmt: skip
