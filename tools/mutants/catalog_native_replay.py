"""Mutants of the native replay: ``ua_replay`` and its fault answers in
uffd_async/_core/_native_lib.c, their Python side (uffd_async/_restore/_native_replay.py,
the read loan in uffd_async/_core/_read_loan.py and _uffd.py), and the native branch of
``prefetch()`` with its readahead outside the set (_restore/_prefetch.py,
_serve/_resolvers.py)."""

from mutant import Mutant

C = "uffd_async/_core/_native_lib.c"
PY = "uffd_async/_restore/_native_replay.py"
PREFETCH = "uffd_async/_restore/_prefetch.py"
RESOLVERS = "uffd_async/_serve/_resolvers.py"
LAYERED = "uffd_async/_restore/_layered.py"
T = ["tests/test_native_replay.py"]
T_LAYERS = ["tests/test_layers.py"]
LOOP = ["tests/test_prefetch.py"]

MUTANTS = [
    Mutant(
        id="native-replay-event-not-seen",
        file=C,
        old="                if (msgs[k].event != UFFD_EVENT_PAGEFAULT)",
        new="                if (0)",
        tests=T,
        why="a Remove handed back looks like a fault: the thread starts again on a stale plan",
    ),
    Mutant(
        id="native-replay-answers-wp-faults",
        file=C,
        old=(
            "                !(m->arg.pagefault.flags & (UFFD_PAGEFAULT_FLAG_WP | "
            "UFFD_PAGEFAULT_FLAG_MINOR)))"
        ),
        new="                1)",
        tests=T,
        why="a write-protect fault is answered by a COPY (EEXIST, woken): it never unprotects",
    ),
    Mutant(
        id="native-replay-part-off-by-one",
        file=C,
        old="    if ((address - f->base) / f->page_size < f->pages)",
        new="    if ((address - f->base) / f->page_size <= f->pages)",
        tests=T,
        why="the page past a part is answered from past its source",
    ),
    Mutant(
        id="native-replay-records-dropped",
        file=C,
        old="            memcpy(ctl->pending + ctl->pending_len, m, bytes);",
        new="            (void)0;",
        tests=T,
        why="records handed back are lost: their threads sleep forever",
    ),
    Mutant(
        id="native-replay-no-jump",
        file=C,
        old="            *jump = (uint64_t)run + 1;",
        new="            (void)0;",
        tests=T,
        why="a fault ahead does not move the replay: it copies behind the process",
    ),
    Mutant(
        id="native-replay-follows-in-the-second-pass",
        file=C,
        old="            int status = replay_run(uffd, runs, k, ctl, &jump, pass == 0);",
        new="            int status = replay_run(uffd, runs, k, ctl, &jump, 1);",
        tests=T,
        why="the runs skipped by a jump are skipped again: the set is never whole",
    ),
    Mutant(
        id="native-replay-runs-not-marked-done",
        file=C,
        old="                ctl->done[k] = 1;",
        new="                (void)0;",
        tests=T,
        why="every run looks left over: the loop's path goes through the set again",
    ),
    Mutant(
        id="native-replay-no-readahead-outside",
        file=C,
        old="    uint64_t end = index + 1 + f->readahead;",
        new="    uint64_t end = index + 1;",
        tests=T,
        why="a fault outside the set brings its page only",
    ),
    Mutant(
        id="native-replay-answer-not-marked",
        file=C,
        old="    memset(f->populated + index, 1, (size_t)done);\n    ctl->faults++;",
        new="    ctl->faults++;",
        tests=T,
        why="the resolver does not know what the thread's answers mapped",
    ),
    Mutant(
        id="native-replay-no-zero-pages",
        file=C,
        old="        int zero = r->zeros && r->zeros[i];",
        new="        int zero = 0;",
        tests=T,
        why="zero pages are copied, never mapped as the zero page",
    ),
    Mutant(
        id="native-replay-ignores-stop",
        file=C,
        old=(
            "        if (__atomic_load_n(&ctl->stop, __ATOMIC_ACQUIRE))\n"
            "            status = UA_REPLAY_STOPPED;"
        ),
        new="        if (0)\n            status = UA_REPLAY_STOPPED;",
        tests=T,
        why="neither a cancel nor a close stops the thread: it copies to the end",
    ),
    Mutant(
        id="native-replay-copied-not-marked",
        file=C,
        old="            memset(r->populated + i, 1, (size_t)done);\n        else if",
        new="            (void)0;\n        else if",
        tests=T,
        why="the resolver does not know what the thread copied",
    ),
    Mutant(
        id="native-replay-no-restart-after-a-fault",
        file=PY,
        old="            if status != _native.REPLAY_HANDBACK or control.event or uffd.closed:",
        new="            if True:",
        tests=T,
        why="a fault handed back ends the native replay: the loop copies the rest",
    ),
    Mutant(
        id="native-replay-not-guided",
        file=PY,
        old=(
            "                        run_of[p][index:end] = "
            'array.array("i", [len(self.owners)]) * (end - index)'
        ),
        new="                        pass",
        tests=T,
        why="the thread does not know a fault's run: no run's rest, no jump",
    ),
    Mutant(
        id="native-replay-cancel-leaves-it-running",
        file=PY,
        old="        control.stop = 1  # the thread stops at its next copy",
        new="        pass",
        tests=T,
        why="a cancelled replay waits for the thread to copy everything",
    ),
    Mutant(
        id="native-replay-rest-dropped",
        file=PREFETCH,
        old="                runs = progress.left",
        new="                runs = []",
        tests=T,
        why="after an event stopped the thread, the rest of the set is never prefetched",
    ),
    Mutant(
        id="native-replay-progress-not-counted",
        file=PREFETCH,
        old="                    stats.prefetched = before[0] + progress.pages",
        new="                    pass",
        tests=T,
        why="the stats miss what the thread copied",
    ),
    Mutant(
        id="native-replay-removed-not-blocked",
        file=RESOLVERS,
        old='                        blocked[first:last] = b"\\1" * (last - first)',
        new="                        pass",
        tests=T,
        why="the thread copies snapshot bytes over pages removed since: zeros lost",
    ),
    Mutant(
        id="native-replay-maps-blocked-pages",
        file=C,
        old="        if (r->populated[i] || (r->blocked && r->blocked[i])) {",
        new="        if (r->populated[i]) {",
        tests=T,
        why="a removed page is filled with the snapshot's bytes by the replay",
    ),
    Mutant(
        id="native-replay-answers-blocked-faults",
        file=C,
        old="    if (p->blocked && p->blocked[index])\n        return -1;",
        new="    if (0)\n        return -1;",
        tests=T,
        why="a fault on a removed page gets the snapshot's bytes, not zeros",
    ),
    Mutant(
        id="native-replay-not-planned-again",
        file=PREFETCH,
        old="                parts = resolver.memory_parts() if progress.event else None",
        new="                parts = None",
        tests=T,
        why="after an event the rest of the set goes the loop's way",
    ),
    Mutant(
        id="set-readahead-not-in-the-c-loop",
        file=RESOLVERS,
        old="                kind=FAST_COPY,\n                readahead=self._outside_readahead,",
        new="                kind=FAST_COPY,\n                readahead=self._readahead,",
        tests=T,
        why="once the set is replayed, a fault outside it brings its page only",
    ),
    Mutant(
        id="set-readahead-not-native",
        file=RESOLVERS,
        old=(
            "                    zeros=self._zeros,\n"
            "                    readahead=self._outside_readahead,"
        ),
        new="                    zeros=self._zeros,\n"
        "                    readahead=self._readahead,",
        tests=T,
        why="while the thread runs, a fault outside the set brings its page only",
    ),
    Mutant(
        id="set-readahead-not-on-the-loop",
        file=RESOLVERS,
        old="        readahead = self._readahead if guided_end else self._outside_readahead",
        new="        readahead = self._readahead",
        tests=LOOP,
        why="on the loop's path, a fault outside the set brings its page only",
    ),
    Mutant(
        id="native-replay-layer-origin",
        file=LAYERED,
        old="                            source=self._origins[span] + low * size,",
        new="                            source=piece.source + (low - piece.index) * size,",
        tests=T_LAYERS,
        why="every span copied from the first span's file: layers' pages lost",
    ),
    Mutant(
        id="native-replay-layer-bitmap",
        file=LAYERED,
        old="                            index=low,",
        new="                            index=piece.index,",
        tests=T_LAYERS,
        why="a span's pages marked at the start of the bitmap, not at their own",
    ),
    Mutant(
        id="native-replay-cancelled-faults-not-woken",
        file="uffd_async/_core/_read_loan.py",
        old="                        uffd.wake(fault.address & ~(PAGE_SIZE - 1), PAGE_SIZE)",
        new="                        pass",
        tests=T,
        why="a cancelled replay's faults are dropped: their threads sleep on",
    ),
    Mutant(
        id="native-replay-prefix-counts-entries",
        file=PY,
        old="        return self.owners[k] if k < self.set_entries else set_runs",
        new="        return k if k < self.set_entries else set_runs",
        tests=T,
        why="a successor skips runs not gone through (a run split over two parts counted twice)",
    ),
    Mutant(
        id="native-replay-runs-not-counted",
        file=PREFETCH,
        old="                    stats.runs = before[2] + progress.runs",
        new="                    pass",
        tests=T,
        why="a successor taking over replays the whole set again",
    ),
    Mutant(
        id="native-replay-while-recording",
        file=RESOLVERS,
        old="        if not self.can_prefetch or not self._address or self._recorder is not None:",
        new="        if not self.can_prefetch or not self._address:",
        tests=T,
        why="recording while replaying: the faults the thread answers are never recorded",
    ),
]
