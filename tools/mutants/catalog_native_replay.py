"""Mutants of the native replay: ``ua_replay`` and ``ua_gated_read`` in
uffd_async/_core/_native_lib.c, and their Python side, uffd_async/_restore/_native_replay.py
and the ``native=True`` branch of ``prefetch()`` (uffd_async/_restore/_prefetch.py)."""

from mutant import Mutant

C = "uffd_async/_core/_native_lib.c"
PY = "uffd_async/_restore/_native_replay.py"
PREFETCH = "uffd_async/_restore/_prefetch.py"
T = ["tests/test_native_replay.py"]

MUTANTS = [
    Mutant(
        id="native-replay-read-does-not-stop",
        file=C,
        old="                __atomic_store_n(&ctl->stop, 1, __ATOMIC_RELEASE);",
        new="                (void)0;",
        tests=T,
        why="a Remove read while the thread copies: snapshot bytes land where zeros belong",
    ),
    Mutant(
        id="native-replay-ignores-stop",
        file=C,
        old=(
            "    if (__atomic_load_n(&ctl->stop, __ATOMIC_ACQUIRE)) {\n"
            "        gate_unlock(&ctl->lock);"
        ),
        new="    if (0) {\n        gate_unlock(&ctl->lock);",
        tests=T,
        why="neither an event nor a cancel stops the thread: it copies to the end",
    ),
    Mutant(
        id="native-replay-eexist-is-an-error",
        file=C,
        old="    if (err == EEXIST) { /* a demand fault got there first: skip that page */",
        new="    if (0) { /* a demand fault got there first: skip that page */",
        tests=T,
        why="a page a demand fault brought stops the replay: the loop copies the rest",
    ),
    Mutant(
        id="native-replay-partial-is-the-end",
        file=C,
        old="    if (rc == 0 || done) /* stopped part-way (EAGAIN with a count): go on */",
        new="    if (rc == 0) /* stopped part-way (EAGAIN with a count): go on */",
        tests=T,
        why="a COPY stopped part-way by a page there already ends the native replay",
    ),
    Mutant(
        id="native-replay-populated-not-marked",
        file=C,
        old="        memset(r->populated + i, 1, done);",
        new="        (void)0;",
        tests=T,
        why="the resolver does not know what the thread copied",
    ),
    Mutant(
        id="native-replay-no-gate",
        file=PY,
        old="    uffd._read_raw = _gated_reader(uffd, control)  # type: ignore[method-assign,assig",
        new="    pass",
        tests=T,
        why="the server reads events past the gate: a Remove does not stop the thread",
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
        id="native-replay-after-an-event",
        file=PY,
        old="            or copier._changed",
        new="            or False",
        tests=T,
        why="the thread copies to the places a Remap or Remove changed",
    ),
    Mutant(
        id="native-replay-rest-dropped",
        file=PREFETCH,
        old="                runs = runs[progress.runs :]",
        new="                runs = []",
        tests=T,
        why="after an event stopped the thread, the rest of the set is never prefetched",
    ),
    Mutant(
        id="native-replay-progress-not-counted",
        file=PREFETCH,
        old="                stats.prefetched += progress.pages",
        new="                pass",
        tests=T,
        why="the stats miss what the thread copied",
    ),
]
