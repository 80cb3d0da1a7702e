"""What scenario 3 could reach at best on each loop: its sleeps alone, without faults.

Scenario 3's ideal, 64,000 pages/s, assumes a 1 ms fetch takes 1 ms and costs the
event loop nothing. This runs what its 64 threads wait on and nothing else: 64
tasks, each awaiting ``anyio.sleep(0.001)`` 8 times in a row (a thread's 8 pages),
and reports the rate as a share of that ideal. Timer granularity (epoll timeouts
are whole milliseconds) and each loop's cost per sleep keep it well under 1.

    python -m benchmarks._ceiling [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import anyio

from uffd_async._core._loops import run

from ._async import loops_here
from ._scenarios import ASYNC_LIMIT, SLOW_THREADS, SLOW_US

PER_THREAD = 8  # scenario 3's pages per thread


async def _chained_sleeps() -> float:
    async def one() -> None:
        for _ in range(PER_THREAD):
            await anyio.sleep(SLOW_US / 1e6)

    began = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(SLOW_THREADS):
            tg.start_soon(one)
    return time.perf_counter() - began


def measure(rounds: int) -> dict[str, float]:
    """Each loop's median rate, as a share of scenario 3's ideal."""
    ideal = ASYNC_LIMIT * 1e6 / SLOW_US
    sleeps = SLOW_THREADS * PER_THREAD
    return {
        name: sleeps
        / statistics.median(run(_chained_sleeps, loop=loop) for _ in range(rounds))
        / ideal
        for name, loop in loops_here().items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._ceiling", description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    shares = measure(args.rounds)
    print(
        f"{SLOW_THREADS} tasks x {PER_THREAD} chained {SLOW_US} us sleeps, no faults "
        f"(median of {args.rounds}), as a share of {ASYNC_LIMIT * 1_000_000 // SLOW_US:,} per s: "
        + ", ".join(f"{name} {share:.2f}" for name, share in shares.items())
    )


if __name__ == "__main__":
    main()
