"""Mutants of how long a handoff is served (_peer_lifetime, _listener, fork children) and of
the figures a handoff server reports (each catalog: one list named MUTANTS)."""

from mutant import Mutant

FC = "tests/test_firecracker.py"
SERVING = "tests/test_handoff_serving.py"
GONE_BEFORE = f"{FC}::test_no_peer_pidfd_and_a_peer_gone_before_it_is_accepted"
FC_FORK = f"{FC}::test_no_peer_pidfd_and_a_fork_child_that_outlives_the_peer"
ORPHAN = f"{SERVING}::test_a_fork_child_that_outlives_its_parent_is_served_until_it_exits"
LIFETIME = "uffd_async/_serve/_peer_lifetime.py"
LISTENER = "uffd_async/_handoff/_listener.py"

MUTANTS = [
    # -- _peer_lifetime.py ------------------------------------------------------------
    Mutant(
        id="lifetime-peer-gone-einval",
        file=LIFETIME,
        old="_PEER_GONE = frozenset({errno.EINVAL, errno.ESRCH})",
        new="_PEER_GONE = frozenset({errno.ESRCH})",
        tests=[GONE_BEFORE],
        why="6.5 to 6.15 say EINVAL for a peer already gone: its connection fails",
    ),
    Mutant(
        id="lifetime-no-option-raises",
        file=LIFETIME,
        old="_NO_PEERPIDFD = frozenset({errno.ENOPROTOOPT, errno.EOPNOTSUPP})",
        new="_NO_PEERPIDFD = frozenset({errno.EOPNOTSUPP})",
        tests=[GONE_BEFORE],
        why="a kernel without SO_PEERPIDFD: every connection fails",
    ),
    Mutant(
        id="lifetime-pid-zero",
        file=LIFETIME,
        old="        if pid <= 0:",
        new="        if pid < 0:",
        tests=[f"{FC}::test_no_pidfd_and_a_peer_that_keeps_its_socket"],
        why="pid 0 (another pid namespace) is passed to pidfd_open; the log hides why",
    ),
    Mutant(
        id="lifetime-esrch-not-exited",
        file=LIFETIME,
        old="""            if exc.errno == errno.ESRCH:
                return Watch.EXITED""",
        new="""            if exc.errno == errno.ESRCH:
                return Watch.NONE""",
        tests=[GONE_BEFORE],
        why="a peer gone before pidfd_open is taken for one that cannot be watched",
    ),
    Mutant(
        id="lifetime-pidfd-open-label",
        file=LIFETIME,
        old="""            self._pidfd = os.pidfd_open(pid)
            return Watch.PIDFD_OPEN""",
        new="""            self._pidfd = os.pidfd_open(pid)
            return Watch.PEER_PIDFD""",
        tests=[FC_FORK],
        why="the log says SO_PEERPIDFD where pidfd_open (and its pid race) is in use",
    ),
    Mutant(
        id="lifetime-exited-waits",
        file=LIFETIME,
        old="""        if self.watch is Watch.EXITED:
            return""",
        new="""        if self.watch is Watch.EXITED:
            pass""",
        tests=[GONE_BEFORE],
        why="a peer that exited before it was watched is served forever",
    ),
    Mutant(
        id="lifetime-watched-only-peerpidfd",
        file=LIFETIME,
        old="        return self.watch is not Watch.NONE",
        new="        return self.watch is Watch.PEER_PIDFD",
        tests=[FC_FORK],
        why="a pidfd from pidfd_open is ignored: the exit goes unseen",
    ),
    Mutant(
        id="lifetime-pidfd-leaks",
        file=LIFETIME,
        old="            os.close(fd)",
        new="            pass",
        tests=[f"{SERVING}::test_every_byte_of_every_mapping_is_served"],
        why="every connection leaks a pidfd",
    ),
    Mutant(
        id="lifetime-close-no-notify",
        file=LIFETIME,
        old="                anyio.notify_closing(fd)",
        new="                pass",
        tests=["tests/test_handoff.py::test_closing_a_peer_watch_wakes_its_waiter"],
        why="the loop is not told before the pidfd is closed: a waiter waits forever",
    ),
    Mutant(
        id="lifetime-probe-errno",
        file=LIFETIME,
        old="        return exc.errno != errno.ESRCH",
        new="        return exc.errno != errno.ENOENT",
        tests=[ORPHAN],
        why="a live process is taken for gone: its fork child's memory turns to zeros",
    ),
    Mutant(
        id="lifetime-probe-interval",
        file=LIFETIME,
        old="PROBE_INTERVAL = 0.2",
        new="PROBE_INTERVAL = 200",
        tests=[FC_FORK],
        why="seconds for milliseconds: a child's exit is seen minutes late",
    ),
    # -- _listener.py -------------------------------------------------------------------
    Mutant(
        id="listener-issock-inverted",
        file=LISTENER,
        old="    if not stat.S_ISSOCK(os.lstat(path).st_mode):",
        new="    if stat.S_ISSOCK(os.lstat(path).st_mode):",
        tests=[f"{SERVING}::test_a_live_socket_or_another_file_is_left_alone"],
        why="a regular file at the socket path is deleted",
    ),
    Mutant(
        id="listener-unlink-anything",
        file=LISTENER,
        old="                _remove_stale(path)",
        new="                os.unlink(path)",
        tests=[f"{SERVING}::test_a_live_socket_or_another_file_is_left_alone"],
        why="another server's live socket is taken over",
    ),
    Mutant(
        id="listener-chown-swapped",
        file=LISTENER,
        old="                    os.chown(path, -1, gid)",
        new="                    os.chown(path, gid, -1)",
        tests=[f"{FC}::test_a_jailed_peer_of_another_uid_connects_and_is_served"],
        why="--socket-group sets the owner, not the group: the jailed peer cannot connect",
    ),
    Mutant(
        id="listener-identity-inverted",
        file=LISTENER,
        old="            if (status.st_dev, status.st_ino) == identity:",
        new="            if (status.st_dev, status.st_ino) != identity:",
        tests=[f"{SERVING}::test_a_socket_file_replaced_meanwhile_is_not_removed"],
        why="stopping removes someone else's file at the path",
    ),
    Mutant(
        id="listener-emfile-fatal",
        file=LISTENER,
        old="_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE,",
        new="_RESOURCE_ERRORS = frozenset({errno.ENFILE,",
        tests=[f"{SERVING}::test_running_out_of_fds_for_a_moment_is_not_the_end"],
        why="running out of fds for a moment ends the server",
    ),
    Mutant(
        id="listener-chmod-skipped",
        file=LISTENER,
        old="                    os.chmod(path, mode)",
        new="                    pass",
        tests=[f"{FC}::test_socket_mode_and_group_in_the_api"],
        why="--socket-mode is ignored: a peer of another uid cannot connect",
    ),
    Mutant(
        id="listener-abstract-unseen",
        file=LISTENER,
        old='    return path.startswith("\\0")',
        new='    return path.startswith("@")',
        tests=[f"{SERVING}::test_a_peer_of_another_uid_is_refused"],
        why="an abstract socket name is taken for a file path",
    ),
    Mutant(
        id="listener-missing-dir-unnamed",
        file=LISTENER,
        old='                f"{os.path.dirname(os.path.abspath(path))} does not exist",',
        new='                f"{path} does not exist",',
        tests=[f"{FC}::test_a_missing_socket_directory_is_named"],
        why="the error names the socket, not the directory that is missing",
    ),
    Mutant(
        id="listener-mode-bound",
        file="uffd_async/_handoff/_options.py",
        old='"socket_mode", value, minimum=0, maximum=0o777,',
        new='"socket_mode", value, minimum=0, maximum=0o7777,',
        tests=[f"{FC}::test_socket_mode_and_group_in_the_api"],
        why="a setuid/sticky socket mode is accepted",
    ),
    # -- fork children (_server.py, _handoff_server.py) ---------------------------------
    Mutant(
        id="lifetime-child-options",
        file="uffd_async/_serve/_server.py",
        old="        child = _Server(uffd, resolver, self.options)",
        new="        child = _Server(uffd, resolver, ServeOptions(limit=self.options.limit, "
        "batch=self.options.batch, on_error=self.on_error, page_size=self.page_size))",
        tests=[f"{SERVING}::test_a_fork_child_is_served_with_the_servers_options"],
        why="bug 11: a fork child's server busy-polls where the parent chose spin=0",
    ),
    Mutant(
        id="lifetime-child-never-ends",
        file="uffd_async/_serve/_server.py",
        old="                tg.start_soon(until_it_exits)",
        new="                pass",
        tests=[FC_FORK],
        why="a fork child is served (its uffd held) long after it exited",
    ),
    Mutant(
        id="lifetime-children-cut-off",
        file="uffd_async/_handoff/_server.py",
        old="                peer_gone.set()  # serving ends once the fork children",
        new="                tg.cancel_scope.cancel()  # serving ends once the fork children",
        tests=[ORPHAN],
        why="a fork child that outlives the peer reads zeros where its memory was",
    ),
    Mutant(
        id="lifetime-no-pidfd-forever",
        file="uffd_async/_handoff/_server.py",
        old="        await memory_gone(handoff.uffd)",
        new="        await anyio.sleep_forever()",
        tests=[f"{FC}::test_no_pidfd_and_a_peer_that_closes_its_socket_at_once"],
        why="without any pidfd, a peer that exited is served until the server stops",
    ),
    # -- figures (bug 10) -----------------------------------------------------------------
    Mutant(
        id="figures-stale-pages",
        file="uffd_async/_handoff/_server.py",
        old="            live.count_pages()  # the prefetcher copies",
        new="            pass  # the prefetcher copies",
        tests=["tests/test_metrics_progress.py::test_the_figures_add_up_while_a_replay_runs"],
        why="pages copied lags far behind prefetched while a replay runs",
    ),
    Mutant(
        id="figures-populated-when-idle",
        file="uffd_async/_handoff/_server.py",
        old="    populated: float = 0.0",
        new="    populated: float = 1.0",
        tests=["tests/test_metrics_progress.py::test_the_figures_add_up_while_a_replay_runs"],
        why="populated 100% once every process has exited",
    ),
    Mutant(
        id="figures-resident-gauge",
        file="uffd_async/_handoff/_metrics.py",
        old='        yield counter("resident_handoffs",',
        new='        yield gauge("resident_handoffs",',
        tests=["tests/test_metrics_progress.py::test_the_exporter_says_the_same"],
        why="a cumulative count exported as a gauge (no _total)",
    ),
    # -- Region on the serving loop's thread (bug 13) -------------------------------------
    Mutant(
        id="loop-thread-no-check",
        file="uffd_async/_core/_memory.py",
        old="    if n and threading.get_ident() in _serving and _would_fault(address, n):",
        new="    if n and threading.get_ident() not in _serving and _would_fault(address, n):",
        tests=["tests/test_loop_thread.py"],
        why="Region.read on the serving loop's thread hangs silently",
    ),
    Mutant(
        id="loop-thread-wrong-flag",
        file="uffd_async/_core/_memory.py",
        old='_FAULTING_VMFLAGS = frozenset({"um", "ui"})',
        new='_FAULTING_VMFLAGS = frozenset({"uw", "ui"})',
        tests=["tests/test_loop_thread.py"],
        why="MISSING-registered memory is not recognised: the read hangs",
    ),
]
