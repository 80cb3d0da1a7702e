"""Mutants of the server's turn-taking: the worker pool, the reader, the dispatch loop."""

from mutant import Mutant

POOL = "uffd_async/_serve/_pool.py"
LOOPS = "uffd_async/_core/_loops.py"
READER = "uffd_async/_core/_reader.py"
SERVER = "uffd_async/_serve/_server.py"
FAIR = ["tests/test_fairness.py"]

MUTANTS = [
    Mutant(
        id="fairness-pool-no-checkpoint",
        file=POOL,
        old="                    await anyio.lowlevel.checkpoint()",
        new="                    pass",
        tests=FAIR,
        why="a resolver that never awaits holds the loop while faults keep coming",
    ),
    Mutant(
        id="fairness-pool-checkpoint-when-idle",
        file=POOL,
        old="            if pending and time.perf_counter_ns() - began >= SLICE_NS:",
        new="            if not pending and time.perf_counter_ns() - began >= SLICE_NS:",
        tests=FAIR,
        why="the worker checkpoints only when there is nothing left: never under a stream",
    ),
    Mutant(
        id="fairness-pool-others-take-over",
        file=POOL,
        old="        while pending and not self._yielding:",
        new="        while pending:",
        tests=FAIR,
        why="every worker gets its own slice per turn of the loop: 64 workers, 64 slices",
    ),
    Mutant(
        id="fairness-pool-yield-never-ends",
        file=POOL,
        old="                    self._yielding -= 1",
        new="                    pass",
        tests=FAIR,
        why="after the first checkpoint no worker takes a job again: faults wait forever",
    ),
    Mutant(
        id="fairness-slice-too-long",
        file=LOOPS,
        old="SLICE_NS = 1_000_000",
        new="SLICE_NS = 1_000_000_000",
        tests=FAIR,
        why="a one-second slice: a light tenant waits seconds per fault beside a storm",
    ),
    Mutant(
        id="fairness-reader-no-checkpoint",
        file=READER,
        old="                    await anyio.lowlevel.checkpoint()",
        new="                    pass",
        tests=FAIR,
        why="a reader fed by a steady stream never lets the loop go",
    ),
    Mutant(
        id="fairness-reader-clock-reset-by-reads",
        file=READER,
        old=(
            "                if events:\n                    return events\n"
            "                if self._spin_ns:"
        ),
        new=(
            "                if events:\n"
            "                    self._waited = time.perf_counter_ns()\n"
            "                    return events\n                if self._spin_ns:"
        ),
        tests=FAIR,
        why="a read that found events counts as a wait: the slice never ends under a stream",
    ),
    Mutant(
        id="fairness-reader-spin-resets-clock",
        file=READER,
        old="                    if events:\n                        return events",
        new=(
            "                    if events:\n                        self._waited = "
            "time.perf_counter_ns()\n                        return events"
        ),
        tests=FAIR,
        why="events the spin caught reset the slice (the original bug): a lone thread's "
        "stream, each fault caught by the spin, holds the loop",
    ),
    Mutant(
        id="fairness-server-limit-off-by-one",
        file=SERVER,
        old="self._queued and len(self._in_flight) < self.options.limit and",
        new="self._queued and len(self._in_flight) <= self.options.limit and",
        tests=FAIR,
        why="one resolution more than ``limit`` runs at once",
    ),
    Mutant(
        id="fairness-server-no-coalesce-in-flight",
        file=SERVER,
        old="        if page in resolved or page in self._in_flight:",
        new="        if page in resolved:",
        tests=["tests/test_server.py"],
        why="a second thread faulting on a page being resolved starts a second resolution",
    ),
    Mutant(
        id="fairness-reader-close-drops-events",
        file=READER,
        old="        if self._buffered and not self._uffd.closed:",
        new="        if False:",
        tests=FAIR,
        why="events received but not handled are dropped when a reader closes: blocked threads",
    ),
]
