"""Mutants of the argument checks (uffd_async/_core/_checks.py), the error tree's new members
(uffd_async/_core/_errors.py) and a few of the call sites that now use the checks."""

from mutant import Mutant

C = "uffd_async/_core/_checks.py"
E = "uffd_async/_core/_errors.py"
CHECKS = ["tests/test_checks.py"]

MUTANTS = [
    # -- check_int -------------------------------------------------------------------------
    Mutant(
        id="checks-int-takes-bool",
        file=C,
        old="    if isinstance(value, bool) or not isinstance(value, int):\n",
        new="    if not isinstance(value, int):\n",
        tests=CHECKS,
        why="True is taken as a count of 1, False as 0",
    ),
    Mutant(
        id="checks-int-minimum-off-by-one",
        file=C,
        old="(minimum is not None and value < minimum)",
        new="(minimum is not None and value <= minimum)",
        tests=CHECKS,
        why="the smallest allowed value (limit=1, readahead=0) is refused",
    ),
    Mutant(
        id="checks-int-maximum-ignored",
        file=C,
        old=" or (maximum is not None and value > maximum):",
        new=":",
        tests=CHECKS,
        why="a byte of 256 or a socket mode of 0o1777 is let through",
    ),
    Mutant(
        id="checks-int-type-not-typeerror",
        file=C,
        old="""        raise InvalidArgumentType(
            f"{name} must be {expected or 'an int'}, not {type(value).__name__}"
        )""",
        new="""        raise InvalidArgument(
            errno.EINVAL, f"{name} must be {expected or 'an int'}, not {type(value).__name__}"
        )""",
        tests=CHECKS,
        why="a float where an int belongs escapes a caller's except TypeError",
    ),
    Mutant(
        id="checks-int-message-drops-name",
        file=C,
        old='raise InvalidArgument(errno.EINVAL, f"{name} must be {wanted}, not {value!r}")',
        new='raise InvalidArgument(errno.EINVAL, f"must be {wanted}, not {value!r}")',
        tests=CHECKS,
        why="the message no longer says which argument was wrong",
    ),
    Mutant(
        id="checks-int-wrong-errno",
        file=C,
        old='raise InvalidArgument(errno.EINVAL, f"{name} must be {wanted}, not {value!r}")',
        new='raise InvalidArgument(errno.ERANGE, f"{name} must be {wanted}, not {value!r}")',
        tests=CHECKS,
        why="an out-of-range argument carries ERANGE where the documented errno is EINVAL",
    ),
    Mutant(
        id="checks-int-expected-ignored",
        file=C,
        old='        wanted = expected or f"an int {_bounds(minimum, maximum)}"',
        new='        wanted = f"an int {_bounds(minimum, maximum)}"',
        tests=CHECKS,
        why="'socket_group must be a name or a gid' becomes 'an int >= 0': the name is not offered",
    ),
    Mutant(
        id="checks-bounds-drops-maximum",
        file=C,
        old='        return f"from {minimum} to {maximum}"',
        new='        return f">= {minimum}"',
        tests=CHECKS,
        why="the message for a value above the maximum says only '>= minimum'",
    ),
    # -- page sizes -------------------------------------------------------------------------
    Mutant(
        id="checks-page-not-power-of-two",
        file=C,
        old="value >= MIN_PAGE_SIZE and not value & (value - 1)",
        new="value >= MIN_PAGE_SIZE and not value % MIN_PAGE_SIZE",
        tests=CHECKS,
        why="12288 (three pages) passes as a page size: page masks go wrong",
    ),
    Mutant(
        id="checks-page-4096-refused",
        file=C,
        old="value >= MIN_PAGE_SIZE and not",
        new="value > MIN_PAGE_SIZE and not",
        tests=CHECKS,
        why="the base page size itself is refused",
    ),
    Mutant(
        id="checks-page-maximum-off-by-one",
        file=C,
        old="(maximum is None or value <= maximum)",
        new="(maximum is None or value < maximum)",
        tests=CHECKS,
        why="a layer of 1 GiB pages is refused",
    ),
    Mutant(
        id="checks-page-min-constant",
        file=C,
        old="MIN_PAGE_SIZE = 4096",
        new="MIN_PAGE_SIZE = 1024",
        tests=CHECKS,
        why="1 KiB 'pages' are accepted",
    ),
    Mutant(
        id="checks-page-unit-wrong",
        file=C,
        old='            return f"{size >> shift} {unit}"',
        new='            return f"{size >> (shift - 10)} {unit}"',
        tests=CHECKS,
        why="the message says 'from 4096 to 1024 GiB'",
    ),
    # -- seconds ----------------------------------------------------------------------------
    Mutant(
        id="checks-seconds-infinite",
        file=C,
        old="    if not ok or not math.isfinite(value):",
        new="    if not ok:",
        tests=CHECKS,
        why="timeout=inf is taken: a silent peer holds its connection forever",
    ),
    Mutant(
        id="checks-seconds-zero-taken",
        file=C,
        old='(">= 0", value >= 0) if zero else ("> 0", value > 0)',
        new='(">= 0", value >= 0) if zero else ("> 0", value >= 0)',
        tests=CHECKS,
        why="timeout=0 is taken: every handoff times out at once",
    ),
    Mutant(
        id="checks-seconds-takes-bool",
        file=C,
        old="    if isinstance(value, bool) or not isinstance(value, (int, float)):",
        new="    if not isinstance(value, (int, float)):",
        tests=CHECKS,
        why="timeout=True is taken as one second",
    ),
    Mutant(
        id="checks-seconds-maximum-off-by-one",
        file=C,
        old="ok and value <= maximum",
        new="ok and value < maximum",
        tests=CHECKS,
        why="spin=0.01, the documented most, is refused",
    ),
    # -- check_instance -----------------------------------------------------------------------
    Mutant(
        id="checks-instance-inverted",
        file=C,
        old="    if not isinstance(value, cls):",
        new="    if isinstance(value, cls):",
        tests=CHECKS,
        why="every right object is refused, every wrong one taken",
    ),
    # -- the error tree -------------------------------------------------------------------------
    Mutant(
        id="errors-type-not-a-typeerror",
        file=E,
        old="class InvalidArgumentType(InvalidArgument, TypeError):",
        new="class InvalidArgumentType(InvalidArgument):",
        tests=CHECKS,
        why="except TypeError no longer sees a wrong type",
    ),
    Mutant(
        id="errors-working-set-not-a-valueerror",
        file=E,
        old="class WorkingSetError(UffdError, ValueError):",
        new="class WorkingSetError(UffdError):",
        tests=CHECKS,
        why="except ValueError around WorkingSet.load stops catching a damaged file",
    ),
    Mutant(
        id="errors-working-set-outside-the-tree",
        file=E,
        old="class WorkingSetError(UffdError, ValueError):",
        new="class WorkingSetError(ValueError):",
        tests=CHECKS,
        why="except UffdError misses a damaged working set",
    ),
    Mutant(
        id="errors-no-source-not-a-lookup",
        file=E,
        old="class NoSourcePage(UffdError, LookupError):",
        new="class NoSourcePage(UffdError):",
        tests=CHECKS,
        why="except LookupError stops catching a fault outside the source",
    ),
    # -- call sites -------------------------------------------------------------------------------
    Mutant(
        id="checks-site-server-limit",
        file="uffd_async/_serve/_options.py",
        old='    check_int("limit", value, minimum=1)',
        new='    check_int("limit", value, minimum=0)',
        tests=CHECKS,  # test_server.py::test_bad_arguments would hang in serve(limit=0)
        why="serve(limit=0) starts a server that can never resolve a fault",
    ),
    Mutant(
        id="checks-site-server-page-size",
        file="uffd_async/_serve/_options.py",
        old='        check_page_size("page_size", value)',
        new='        check_int("page_size", value, minimum=1)',
        tests=["tests/test_hostile.py", *CHECKS],
        why="a FaultServer with a 3-page 'page size' masks fault addresses wrongly",
    ),
    Mutant(
        id="checks-site-reader-batch",
        file="uffd_async/_core/_reader.py",
        old='        check_int("batch", batch, minimum=1)',
        new='        check_int("batch", batch)',
        tests=CHECKS,
        why="EventReader(batch=0) reads nothing forever",
    ),
    Mutant(
        id="checks-site-listener-mode",
        file="uffd_async/_handoff/_options.py",
        old="minimum=0, maximum=0o777,",
        new="minimum=0, maximum=0o7777,",
        tests=CHECKS,
        why="socket_mode=0o4777 (setuid bit) is passed to chmod",
    ),
    Mutant(
        id="checks-site-copy-from-page-size",
        file="uffd_async/_serve/_resolvers.py",
        old='        check_page_size("page_size", page_size)',
        new='        check_int("page_size", page_size, minimum=1)',
        tests=["tests/test_hostile.py", *CHECKS],
        why="copy_from(page_size=3000) serves misaligned pages",
    ),
    Mutant(
        id="checks-site-http-timeout",
        file="uffd_async/_remote/_http_source.py",
        old='        check_seconds("timeout", timeout)',
        new="",
        tests=["tests/test_http_source.py::test_bad_arguments_are_refused_before_any_request"],
        why="HttpSource(timeout=0) fails every request instead of failing at once",
    ),
    Mutant(
        id="checks-site-handoff-uid",
        file="uffd_async/_handoff/_transfer.py",
        old='check_int("each of allowed_uids", uid, minimum=0, expected="a uid (an int >= 0)")',
        new='check_int("each of allowed_uids", uid, expected="a uid (an int >= 0)")',
        tests=CHECKS,
        why="allowed_uids={-1} is taken: uid -1 is (uid_t)-1, 'no change' to the kernel",
    ),
    Mutant(
        id="checks-site-fd-off-by-one",
        file="uffd_async/_handoff/_transfer.py",
        old='    if check_int(name, fd, expected="an open fd") < 0:',
        new='    if check_int(name, fd, expected="an open fd") < -1:',
        tests=CHECKS,
        why="send_uffd(sock, -1, ...) reaches sendmsg and fails as EBADF, not as a TypeError",
    ),
    Mutant(
        id="checks-site-fd-zero-refused",
        file="uffd_async/_handoff/_transfer.py",
        old='    if check_int(name, fd, expected="an open fd") < 0:',
        new='    if check_int(name, fd, expected="an open fd") <= 0:',
        tests=CHECKS,
        why="fd 0 (a uffd opened after stdin was closed) cannot be handed over",
    ),
]
