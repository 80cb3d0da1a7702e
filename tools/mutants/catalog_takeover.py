"""Mutants of the takeover and the fd store (one list: MUTANTS): the messages
(``_handoff/_succession.py``), the exchange (``_handoff/_takeover.py``), the rounds of
each handoff (``_handoff/_handover.py``), the server's end of it (``_handoff/_successor.py``
and the counters in ``_handoff/_server.py``), the fault server's hand-over and its
events-applied hook (``_serve/_server.py``), the prefetch that goes on
(``_restore/_replay.py``), and systemd's fd store (``_handoff/_fdstore.py``)."""

from mutant import Mutant

SUCCESSION = "uffd_async/_handoff/_succession.py"
TAKEOVER = "uffd_async/_handoff/_takeover.py"
HANDOVER = "uffd_async/_handoff/_handover.py"
SERVER = "uffd_async/_handoff/_server.py"
SUCCESSOR = "uffd_async/_handoff/_successor.py"
FAULTS = "uffd_async/_serve/_server.py"
REPLAY = "uffd_async/_restore/_replay.py"
FDSTORE = "uffd_async/_handoff/_fdstore.py"
T_FDSTORE = "tests/test_fdstore.py"
T = "tests/test_takeover.py"
FAST = [T]  # with NOT_CLI: the command-line tests run in processes of their own, slowly
NOT_CLI = ("-k", "not serve_takeover")

MUTANTS = [
    Mutant(
        id="takeover-read-faults-not-woken",
        file=FAULTS,
        old="        if self._handing_over and self.uffd._unhandled:",
        new="        if False:",
        tests=FAST,
        extra_args=NOT_CLI,
        why="faults read and not answered stay in the old process: their threads sleep forever",
    ),
    Mutant(
        id="takeover-child-uffd-closed",
        file=FAULTS,
        old="            if child._handing_over:\n                self.handed_children.append(",
        new="            if False:\n                self.handed_children.append(",
        tests=FAST,
        extra_args=NOT_CLI,
        why="a fork child's uffd, held by nobody else, is closed: its pages read zeros",
    ),
    Mutant(
        id="takeover-events-not-kept",
        file=FAULTS,
        old="        self.applied.append(event)",
        new="        pass",
        tests=FAST,
        extra_args=NOT_CLI,
        why="the successor never learns of a balloon's Remove: snapshot bytes where zeros belong",
    ),
    Mutant(
        id="takeover-events-not-applied",
        file=HANDOVER,
        old="            _apply(resolver, carried.events)",
        new="            pass",
        tests=FAST,
        extra_args=NOT_CLI,
        why="the successor's resolver starts afresh: removed pages get the snapshot's bytes",
    ),
    Mutant(
        id="takeover-children-not-adopted",
        file=HANDOVER,
        old="            server.adopt_children(children)",
        new="            pass",
        tests=FAST,
        extra_args=NOT_CLI,
        why="the fork children handed over are never served: the child freezes",
    ),
    Mutant(
        id="takeover-no-ack-needed",
        file=TAKEOVER,
        old="        if answer != Reply.ACK.value:",
        new="        if False:",
        tests=FAST,
        extra_args=NOT_CLI,
        why="a successor that died mid-handover is taken for done: every guest freezes",
    ),
    Mutant(
        id="takeover-no-resume",
        file=TAKEOVER,
        old="        offered_state.resume()",
        new="        pass",
        tests=FAST,
        extra_args=NOT_CLI,
        why="after a failed handover the server stays stopped: every guest freezes",
    ),
    Mutant(
        id="takeover-any-version",
        file=SUCCESSION,
        old="    common = set(offered) & set(spoken)",
        new="    common = set(offered)",
        tests=FAST,
        extra_args=NOT_CLI,
        why="a successor of another protocol version is answered in a version it cannot read",
    ),
    Mutant(
        id="takeover-crc-unchecked",
        file=SUCCESSION,
        old="    if zlib.crc32(body) != crc:",
        new="    if False:",
        tests=FAST,
        extra_args=NOT_CLI,
        why="a damaged state is believed",
    ),
    Mutant(
        id="takeover-fd-reused",
        file=SUCCESSION,
        old="        if index in self.used:",
        new="        if False:",
        tests=FAST,
        extra_args=NOT_CLI,
        why="one fd taken for two things: a uffd served as a socket, or closed twice",
    ),
    Mutant(
        id="takeover-socket-file-removed",
        file=SUCCESSOR,
        old="    listener.keep_file()",
        new="    pass",
        tests=FAST,
        extra_args=NOT_CLI,
        why="the old server removes the socket file the successor listens on: no new guest",
    ),
    Mutant(
        id="takeover-counters-restart",
        file=SERVER,
        old="                setattr(totals, name, value)",
        new="                pass",
        tests=[T],
        why="the successor's counters start from zero: the metrics jump back",
    ),
    Mutant(
        id="takeover-served-twice",
        file=SERVER,
        old="        totals.served -= len(adopted)  # each is counted again as it is served here",
        new="        pass",
        tests=FAST,
        extra_args=NOT_CLI,
        why="each process taken over is counted as served twice",
    ),
    Mutant(
        id="takeover-recording-lost",
        file=SERVER,
        old="            self._replay.recorder.record_pages(state.recording)",
        new="            pass",
        tests=FAST,
        extra_args=NOT_CLI,
        why="the working set recorded before the takeover is lost",
    ),
    Mutant(
        id="takeover-accepts-again-stale",
        file=SERVER,
        old="                            conn = None  # stays None if a handover cancels the wait",
        new="                            pass",
        tests=FAST,
        extra_args=NOT_CLI,
        why="the last connection is served a second time when a handover stops accepting",
    ),
    Mutant(
        id="takeover-prefetch-restarts",
        file=REPLAY,
        old="            working_set = None if done else self._rest(working_set, resume.runs)",
        new="            pass",
        tests=FAST,
        extra_args=NOT_CLI,
        why="the successor's prefetch starts over: the set is copied again",
    ),
    Mutant(
        id="fdstore-child-not-stored",
        file=FDSTORE,
        old="                    names[uffd.fileno()] = store.child_name(serial, uffd)",
        new="                    pass",
        tests=[T_FDSTORE],
        why="a fork child's uffd is not stored: when the server dies its pages read zeros",
    ),
    Mutant(
        id="fdstore-state-never-pushed",
        file=FDSTORE,
        old="        if state != self._state:",
        new="        if False:",
        tests=[T_FDSTORE],
        why="no state in the store: a restart cannot tell what the stored uffds were",
    ),
    Mutant(
        id="fdstore-never-removed",
        file=FDSTORE,
        old='            if notify("FDSTOREREMOVE=1", f"FDNAME={name}"):',
        new="            if False:",
        tests=[T_FDSTORE],
        why="the uffds of processes gone stay in the store, and are served again after a restart",
    ),
    Mutant(
        id="fdstore-counters-restart",
        file=FDSTORE,
        old="        served.carry_on(taken.state, adopted)\n    finally:\n        taken.close()",
        new="        pass\n    finally:\n        taken.close()",
        tests=[T_FDSTORE],
        why="a restarted service's counters start from zero",
    ),
    Mutant(
        id="fdstore-no-wake",
        file=FDSTORE,
        old="            wake_everything(live)  # what the dead server read and never answered",
        new="            pass",
        tests=[T_FDSTORE],
        why="faults the killed server read and never answered sleep forever",
    ),
    Mutant(
        id="fdstore-events-pushed-late",
        file=FDSTORE,
        old="            pushed = self._push(fresh=False)",
        new="            pushed = False",
        tests=[T_FDSTORE],
        extra_args=("-k", "remove"),
        why="a Remove reaches the store after the faults read with it are answered: a crash "
        "then serves snapshot bytes where zeros belong",
    ),
    Mutant(
        id="fdstore-events-not-announced",
        file=FAULTS,
        old="            if self.on_applied is not None:\n                self.on_applied()",
        new="            pass",
        tests=[T_FDSTORE],
        extra_args=("-k", "remove"),
        why="the fd store learns of a Remove only at its next look: a crash before it loses it",
    ),
    Mutant(
        id="fdstore-hook-not-passed-on",
        file=HANDOVER,
        old="        server.on_applied = self.on_applied",
        new="        pass",
        tests=[T_FDSTORE],
        extra_args=("-k", "remove"),
        why="a round's server never tells the fd store of the events it applies",
    ),
    Mutant(
        id="fdstore-new-peer-not-pushed",
        file=SERVER,
        old="            store.events_applied()  # its fds: stored before its serving starts",
        new="            pass",
        tests=[T_FDSTORE],
        extra_args=("-k", "remove"),
        why="a new peer's uffd reaches the store only at its next look: a crash before that "
        "freezes the peer for good",
    ),
    Mutant(
        id="fdstore-recording-never-refreshed",
        file=FDSTORE,
        old="        self._stale = self._recorded != now[2]",
        new="        self._stale = False",
        tests=[T_FDSTORE],
        extra_args=("-k", "recorded"),
        why="pages recorded before an event's push never reach the store: a restart after a "
        "crash records a thinner working set",
    ),
]
