# What this shows: restoring at the speed of memory with a working set. A "program" (a
# thread in C code: hashlib, which never holds the GIL on large buffers) reads the same
# scattered parts of a snapshot every time it starts. The first restore serves it lazily
# and records which snapshot pages it asked for; the second replays that working set
# ahead of its faults with ua.prefetch, beside the server, demand faults first. Both
# restores check every byte the program read, and print how many faults each took.
#
# Run it: python examples/working_set.py [--backend trio] [--size-mib 64]
from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import random
import time

import anyio

import uffd_async as ua

P = ua.PAGE_SIZE
PIECE = 64 * P  # the program reads 256 KiB pieces: large enough for hashlib to drop the GIL


def pieces(size: int) -> list[int]:
    """Where the program reads: the same 20% of the snapshot, in the same order, every run."""
    rng = random.Random(2026)
    return rng.sample(range(0, size, PIECE), size // PIECE // 5)


def program(address: int, offsets: list[int]) -> str:
    """The restored program: hashes its pieces in place (the faults happen inside hashlib)."""
    digest = hashlib.sha256()
    for offset in offsets:
        digest.update(memoryview((ctypes.c_char * PIECE).from_address(address + offset)))
    return digest.hexdigest()


async def restore(
    snapshot: bytes, working_set: ua.WorkingSet | None
) -> tuple[str, int, float, ua.WorkingSet]:
    """One restore: lazily (recording), or replaying ``working_set``; the program's digest,
    its demand faults, its time, and what a recorder saw."""
    offsets = pieces(len(snapshot))
    recorder = ua.WorkingSetRecorder(len(snapshot), hashlib.sha256(snapshot).digest())
    with ua.Region.anonymous(len(snapshot)) as memory, ua.Userfaultfd.open() as uffd:
        uffd.register(memory.address, memory.length)
        resolver = ua.copy_from(
            snapshot, base=memory.address, recorder=recorder if working_set is None else None
        )
        async with anyio.create_task_group() as tg:
            server = await tg.start(ua.serve, uffd, resolver)
            if working_set is not None:
                await tg.start(ua.prefetch, uffd, resolver, working_set)
            started = time.perf_counter()
            digest = await anyio.to_thread.run_sync(program, memory.address, offsets)
            elapsed = time.perf_counter() - started
            tg.cancel_scope.cancel()
    return digest, server.stats.faults, elapsed, recorder.working_set()


async def main(size: int) -> None:
    snapshot = os.urandom(size)
    buffer = ctypes.create_string_buffer(snapshot, size)
    expected = program(ctypes.addressof(buffer), pieces(size))
    first, faults, lazy_time, recorded = await restore(snapshot, None)
    print(f"lazy restore: {faults} faults, {lazy_time * 1000:.1f} ms; recorded "
          f"{len(recorded.pages)} pages ({len(recorded.to_bytes())} bytes as a file)")  # fmt: skip
    second, faults, replay_time, _ = await restore(snapshot, recorded)
    print(f"replayed restore: {faults} faults, {replay_time * 1000:.1f} ms")
    print(f"every byte the program read matches the snapshot: {first == second == expected}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Record a working set, then replay it.")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--size-mib", type=int, default=64)
    args = parser.parse_args()
    anyio.run(main, args.size_mib << 20, backend=args.backend)
