from __future__ import annotations

import errno
import faulthandler
import os
import sys
import threading
from collections.abc import Generator, Iterator

import pytest

import uffd_async as ua

from ._support import Lab, Resources

#: No single test may take longer. The watchdog is a C thread, so it fires even
#: when a thread holding the GIL is stuck on an unresolved fault in the kernel.
TEST_DEADLINE = 120.0
#: The same for tests marked ``slow`` (stress; ``make stress``).
SLOW_TEST_DEADLINE = 420.0


@pytest.fixture(autouse=True)
def deadline(request: pytest.FixtureRequest) -> Iterator[None]:
    """A hung test dumps every thread's stack and ends the run with status 1."""
    slow = request.node.get_closest_marker("slow") is not None
    limit = SLOW_TEST_DEADLINE if slow else TEST_DEADLINE
    faulthandler.dump_traceback_later(limit, exit=True, file=sys.__stderr__ or 2)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


_POOLED_THREADS = ("Trio thread", "AnyIO worker thread")


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves behind an fd, a thread blocked on a fault, a thread
    still running, a userfaultfd registration or a mapping that looks like a Region.

    How each is told apart from the interpreter's own doings is written down in
    ``_support`` (above ``Resources``). The checks run after every other fixture's
    teardown, so after ``lab`` closed its uffds (which wakes blocked threads).
    """
    before = Resources()
    threads_before = set(threading.enumerate())
    yield
    problems = list(before.leaks())
    assert not problems, "the test left behind:\n  " + "\n  ".join(problems)
    for thread in set(threading.enumerate()) - threads_before:
        if thread.name.startswith(_POOLED_THREADS):
            continue  # idle workers that trio and anyio keep cached on purpose
        thread.join(10)
        assert not thread.is_alive(), f"leaked thread {thread!r}"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def is_root() -> bool:
    return os.geteuid() == 0


needs_root = pytest.mark.skipif(not is_root(), reason="needs root (or CAP_SYS_PTRACE)")

_CAP_SYS_PTRACE = 19


def _has_cap_sys_ptrace() -> bool:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_PTRACE & 1)
    return False


def _refused_a_privilege(excinfo: pytest.ExceptionInfo[BaseException]) -> bool:
    """The kernel refused what only privilege gets: EVENT_FORK or a full uffd (the
    library's UffdPermissionError names CAP_SYS_PTRACE), or userfaultfd(2) without
    UFFD_USER_MODE_ONLY called directly (a PermissionError out of ``_open.open_raw``)."""
    exc = excinfo.value
    if isinstance(exc, ua.UffdPermissionError):
        return "CAP_SYS_PTRACE" in str(exc)
    if isinstance(exc, PermissionError) and exc.errno == errno.EPERM:
        return any(
            entry.name == "open_raw" and entry.path.name == "_open.py"
            for entry in excinfo.traceback
            if hasattr(entry.path, "name")
        )
    return False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Without privileges, a test that fails only because the kernel refused a privilege
    is reported as skipped, naming it: root-only tests skip, never fail, as a user.

    Only for that exact refusal, and never for tests marked ``unprivileged`` (those
    check the unprivileged path itself, so a refusal there is a failure); and
    ``.ci/unprivileged`` checks first that a user-mode-only uffd is available.
    """
    report = yield
    if (
        report.failed
        and call.excinfo is not None
        and not is_root()
        and not _has_cap_sys_ptrace()
        and item.get_closest_marker("unprivileged") is None
        and _refused_a_privilege(call.excinfo)
    ):
        report.outcome = "skipped"
        reason = f"needs CAP_SYS_PTRACE (or root): {call.excinfo.value}"
        report.longrepr = (str(item.path), item.location[1] or 0, reason)
    return report
