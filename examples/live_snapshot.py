# What this shows: snapshots of memory that keeps changing. A "program" (a thread writing
# pages with ctypes.memset, which never holds the GIL while it writes) runs the whole time.
# A live snapshot saves the memory exactly as it was at one instant while the program
# writes on (its writes to pages not saved yet wait for those pages to be saved first);
# a WriteTracker then knows which pages changed, so the next snapshot is a small layer of
# just those. Finally base + layer are restored lazily into fresh memory and compared with
# the memory as it was at the layer's instant.
#
# Run it: python examples/live_snapshot.py [--backend trio] [--size-mib 64] [--dir DIR]
from __future__ import annotations

import argparse
import ctypes
import random
import tempfile
import threading
from pathlib import Path

import anyio

import uffd_async as ua

P = ua.PAGE_SIZE


class Program:
    """Writes random pages of ``region`` until stopped; never holds the GIL while writing."""

    def __init__(self, region: ua.Region) -> None:
        self.region = region
        self.writes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        rng = random.Random(1)
        pages = self.region.length // P
        while not self._stop.is_set():
            ctypes.memset(self.region.address + rng.randrange(pages) * P, rng.randrange(256), P)
            self.writes += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


async def snapshot(uffd: ua.Userfaultfd, region: ua.Region, path: Path,
                   **options: object) -> tuple[ua.LiveSnapshotStats, bytes]:  # fmt: skip
    """A live snapshot while the program runs; also what memory held at its instant (the
    program is started again only once the instant has passed, so the two can be compared)."""
    instant = region.read(0, region.length)
    program = Program(region)
    async with anyio.create_task_group() as tg:
        start = ua.snapshot_live
        stats = await tg.start(
            lambda task_status: start(uffd, region.address, region.length, path,
                                      task_status=task_status, **options)  # type: ignore[arg-type]
        )  # fmt: skip
        program.start()  # the instant has passed: writes from now on are after it
    # Its writes may wait on this event loop (the tracker's faults): never block it.
    await anyio.to_thread.run_sync(program.stop)
    print(f"{path.name}: {stats.pages:,} pages in {stats.seconds * 1000:.0f} ms while the "
          f"program wrote {program.writes:,} pages; {stats.early:,} saved first because "
          f"the program was about to write them")  # fmt: skip
    return stats, instant


async def main(size: int, directory: Path) -> None:
    features = (ua.Feature.WP_UNPOPULATED | ua.Feature.EVENT_REMOVE | ua.Feature.EVENT_REMAP
                | ua.Feature.EVENT_UNMAP)  # fmt: skip
    with ua.Region.anonymous(size) as region, ua.Userfaultfd.open(features) as uffd:
        ctypes.memset(region.address, 0x5A, size)
        async with ua.WriteTracker(uffd, region.address, region.length) as tracker:
            base, at_base = await snapshot(uffd, region, directory / "base.img", tracker=tracker)
            print(f"base image equals memory at its instant: "
                  f"{(directory / 'base.img').read_bytes() == at_base}")  # fmt: skip
            program = Program(region)  # some more work between the two snapshots
            program.start()
            await anyio.sleep(0.05)
            await anyio.to_thread.run_sync(program.stop)
            layer, at_layer = await snapshot(uffd, region, directory / "1.layer",
                                             tracker=tracker, incremental=True,
                                             parent=base.identity)  # fmt: skip
    print(
        f"the layer holds {layer.total:,} of {size // P:,} pages "
        f"({(directory / '1.layer').stat().st_size / 2**20:.1f} MiB)"
    )
    with ua.LayeredSnapshot(directory / "base.img", directory / "1.layer") as layered:
        with ua.Region.anonymous(size) as memory, ua.Userfaultfd.open() as uffd:
            uffd.register(memory.address, memory.length)
            mapping = ua.GuestMapping(base_host_virt_addr=memory.address, size=size, offset=0,
                                      page_size=P)  # fmt: skip
            async with ua.FaultServer(uffd, layered.resolver([mapping])):
                restored = await anyio.to_thread.run_sync(memory.read, 0, size)
    print(f"base + layer restored lazily equal memory at the layer's instant: "
          f"{restored == at_layer}")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Live snapshots and an incremental layer.")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--dir", type=Path, help="where the files go (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        where = args.dir or Path(scratch)
        anyio.run(main, args.size_mib << 20, where, backend=args.backend)
