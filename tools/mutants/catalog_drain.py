"""Mutants of draining, admission and systemd's protocols (one list: MUTANTS):
uffd_async/_handoff/_systemd.py, the drain and ``max_peers`` in ``_handoff/_server.py``,
the passed socket in ``_handoff/_listener.py``, and serve's signals in ``__main__.py``."""

from mutant import Mutant

SYSTEMD = "uffd_async/_handoff/_systemd.py"
SERVER = "uffd_async/_handoff/_server.py"
LISTENER = "uffd_async/_handoff/_listener.py"
MAIN = "uffd_async/__main__.py"
METRICS = "uffd_async/_handoff/_metrics.py"
T_SYSTEMD = "tests/test_systemd.py"
T_DRAIN = "tests/test_drain.py"
T_ADMISSION = "tests/test_admission.py"

MUTANTS = [
    Mutant(
        id="drain-keeps-accepting",
        file=SERVER,
        old="        if self._accepting is not None:\n            self._accepting.cancel()",
        new="        if self._accepting is not None:\n            pass",
        tests=[T_DRAIN],
        why="drain() leaves the socket open: new guests are taken by a server going away",
    ),
    Mutant(
        id="drain-does-not-wait",
        file=SERVER,
        old="                    await self._drained()",
        new="                    pass",
        tests=[T_DRAIN],
        why="the drain stops serving at once: every guest being served freezes",
    ),
    Mutant(
        id="drain-misses-the-last-exit",
        file=SERVER,
        old="            if not self._peers and self._no_peers is not None:",
        new="            if False:",
        tests=[T_DRAIN],
        why="the drain ends only at its next report, not when the last guest exits",
    ),
    Mutant(
        id="admission-off-by-one",
        file=SERVER,
        old="        if limit is not None and len(self._peers) >= limit and not always:",
        new="        if limit is not None and len(self._peers) > limit and not always:",
        tests=[T_ADMISSION],
        why="--max-peers N admits N+1",
    ),
    Mutant(
        id="admission-slot-never-freed",
        file=SERVER,
        old="            del self._peers[key]",
        new="            pass",
        tests=[T_ADMISSION],
        why="a guest that exited still holds its slot: the server fills up for good",
    ),
    Mutant(
        id="admission-not-counted",
        file=SERVER,
        old="            self._totals.over_limit += 1",
        new="            pass",
        tests=[T_ADMISSION],
        why="the metrics never show a refusal for the limit",
    ),
    Mutant(
        id="systemd-abstract-as-path",
        file=SYSTEMD,
        old='        return "\\0" + path[1:]',
        new="        return path[1:]",
        tests=[T_SYSTEMD],
        why="NOTIFY_SOCKET=@name is sent to a file named 'name': READY=1 never arrives",
    ),
    Mutant(
        id="systemd-fds-of-another-pid",
        file=SYSTEMD,
        old="    if pid != os.getpid():",
        new="    if False:",
        tests=[T_SYSTEMD],
        why="a child takes fds meant for its parent",
    ),
    Mutant(
        id="systemd-no-cloexec",
        file=SYSTEMD,
        old="        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)",
        new="        pass",
        tests=[T_SYSTEMD],
        why="every child process inherits the listening socket",
    ),
    Mutant(
        id="systemd-environment-kept",
        file=SYSTEMD,
        old="                os.environ.pop(name, None)",
        new="                pass",
        tests=[T_SYSTEMD],
        why="children see LISTEN_FDS for fds that are not theirs",
    ),
    Mutant(
        id="systemd-no-scm-rights",
        file=SYSTEMD,
        old='    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds'
        " else []",
        new="    ancillary = []",
        tests=[T_SYSTEMD],
        why="FDSTORE=1 stores nothing: a restart loses every guest's uffd",
    ),
    Mutant(
        id="listener-adopted-file-unlinked",
        file=LISTENER,
        old="        listener._identity = None  # not ours to unlink",
        new="        listener._identity = (os.stat(listener.path).st_dev,"
        " os.stat(listener.path).st_ino)",
        tests=[f"{T_SYSTEMD}::test_socket_activation_serves_through_the_passed_socket"],
        why="the server removes systemd's socket file: the next start cannot be activated",
    ),
    Mutant(
        id="listener-datagram-accepted",
        file=LISTENER,
        old="    if sock.type != socket.SOCK_STREAM:",
        new="    if False:",
        tests=[T_SYSTEMD],
        why="a datagram socket is taken for the handoff socket: accept() fails later, unclearly",
    ),
    Mutant(
        id="listener-name-ignored",
        file=LISTENER,
        old="    named = [fd for fd, name in passed if name == LISTEN_FD_NAME]",
        new="    named: list[int] = []",
        tests=[T_SYSTEMD],
        why="FileDescriptorName=handoff is not honoured beside other sockets",
    ),
    Mutant(
        id="cli-sigterm-stops-at-once",
        file=MAIN,
        old="                if signum == signal.SIGTERM and not server.draining:",
        new="                if False:",
        tests=[f"{T_DRAIN}::test_sigterm_drains_then_exits_0"],
        why="systemctl stop freezes every guest being served",
    ),
    Mutant(
        id="cli-drain-timeout-ignored",
        file=MAIN,
        old="                    if args.drain_timeout is not None:",
        new="                    if False:",
        tests=[f"{T_DRAIN}::test_the_drain_timeout_stops_at_once"],
        why="--drain-timeout does nothing: systemd's SIGKILL ends the drain instead",
    ),
    Mutant(
        id="cli-never-ready",
        file=MAIN,
        old='            notify("READY=1", f"STATUS={_status(server)}")',
        new="            pass",
        tests=[f"{T_SYSTEMD}::test_socket_activation_serves_through_the_passed_socket"],
        why="a Type=notify unit never starts: systemd times out and kills it",
    ),
    Mutant(
        id="metrics-draining-hidden",
        file=METRICS,
        old="int(stats.draining))  # fmt: skip",
        new="0)  # fmt: skip",
        tests=[f"{T_ADMISSION}::test_the_metrics_count_refusals_and_show_draining"],
        why="the metrics never say a server is draining",
    ),
    Mutant(
        id="systemd-notify-blocks",
        file=SYSTEMD,
        old="            sock.sendmsg([message], ancillary, socket.MSG_DONTWAIT, address)",
        new="            sock.sendmsg([message], ancillary, 0, address)",
        tests=[f"{T_SYSTEMD}::test_notify_never_waits_for_a_manager_that_stopped_reading"],
        why="a service manager that stops reading freezes the event loop in a blocked send",
    ),
]
