from __future__ import annotations

import contextlib
import errno
import faulthandler
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Generator, Iterator

import pytest

import uffd_async as ua

from ._support import HttpObjectServer, Lab, Resources, huge_pages_free, start_http_server

#: No single test may take longer. The watchdog is a C thread, so it fires even
#: when a thread holding the GIL is stuck on an unresolved fault in the kernel.
#: Every bounded wait inside a test stays well below, teardown included
#: (``_support.TIMEOUT``, the stress rounds' ``_stress.ROUND_TIMEOUT``), so a hang
#: there fails its own test and the run goes on.
TEST_DEADLINE = 180.0
#: The same for tests marked ``slow`` (stress; ``make stress``).
SLOW_TEST_DEADLINE = 420.0

# Run by the reporter process: waits for the pytest process (argv[1]) to end; if
# the watchdog's dump is in the file (argv[2]), prints it and where it is kept.
_REPORTER = """
import os, select, sys
pid, path = int(sys.argv[1]), sys.argv[2]
try:
    select.select([os.pidfd_open(pid)], [], [])
except ProcessLookupError:
    pass
try:
    with open(path, errors="replace") as dump:
        text = dump.read()
except OSError:
    sys.exit()
if "Timeout (" not in text:
    os.unlink(path)
    sys.exit()
sys.stderr.write(f"\\n{text}\\nThe stacks above are kept in {path}\\n")
"""


class Watchdog:
    """Ends the run when a test hangs, and leaves every thread's stack in a file.

    faulthandler's timer writes the dump to a file, not to fd 2: pytest captures
    fd 2 into a temporary file that is lost when the timer ends the process. When a
    test starts, the file is emptied and gets a line naming it. A reporter process,
    given the real stderr before capturing starts, waits for this one to end; if it
    ended with a dump in the file, it prints the dump and the file's path.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.fd, self.path = tempfile.mkstemp(prefix="uffd_async-watchdog-", suffix=".txt")
        capture = config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            stderr = os.dup(2)
        self.reporter: subprocess.Popen[bytes] | None = None
        try:
            self.reporter = subprocess.Popen(
                [sys.executable, "-I", "-c", _REPORTER, str(os.getpid()), self.path],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,  # survives a ^C or a kill of the process group
            )
        except OSError as exc:  # the dump is still written; the header names the file
            os.write(stderr, f"uffd_async watchdog: no reporter ({exc})\n".encode())
        finally:
            os.close(stderr)

    def start(self, test: str, limit: float) -> None:
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(
            self.fd,
            f"uffd_async watchdog: {test} was still running {limit:g} s after it started "
            f"(tests/conftest.py), so the watchdog ended the run (exit status 1). "
            f"Every thread's stack, most recent call first:\n".encode(),
        )
        faulthandler.dump_traceback_later(limit, exit=True, file=self.fd)

    def stop(self) -> None:
        faulthandler.cancel_dump_traceback_later()

    def close(self) -> None:
        if self.reporter is not None:
            self.reporter.kill()
            self.reporter.wait()
        os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


_watchdog: Watchdog | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _watchdog
    config.addinivalue_line(
        "markers", "huge_pages(count): how many huge pages the huge_pages fixture frees"
    )
    _watchdog = Watchdog(config)


def pytest_report_header(config: pytest.Config) -> str | None:
    if _watchdog is None:
        return None
    return f"watchdog: a hung test's dump goes to {_watchdog.path}"


def pytest_unconfigure(config: pytest.Config) -> None:
    global _watchdog
    if _watchdog is not None:
        _watchdog.close()
        _watchdog = None


@pytest.fixture(autouse=True)
def deadline(request: pytest.FixtureRequest) -> Iterator[None]:
    """A hung test dumps every thread's stack and ends the run with status 1."""
    assert _watchdog is not None
    slow = request.node.get_closest_marker("slow") is not None
    _watchdog.start(request.node.nodeid, SLOW_TEST_DEADLINE if slow else TEST_DEADLINE)
    try:
        yield
    finally:
        _watchdog.stop()


@pytest.fixture
def huge_pages(request: pytest.FixtureRequest) -> Iterator[int]:
    """The huge page size, with as many huge pages free as the test's
    ``huge_pages(count)`` mark asks (one without): reserved for it as root and
    given back after; the test skips where they cannot be had
    (``_support.huge_pages_free``)."""
    mark = request.node.get_closest_marker("huge_pages")
    with huge_pages_free(int(mark.args[0]) if mark else 1) as size:
        yield size


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def _http_server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpObjectServer]:
    """One server process per test module: starting one takes about half a second."""
    with start_http_server(tmp_path_factory.mktemp("objects")) as server:
        yield server


@pytest.fixture
def http_server(_http_server_process: HttpObjectServer) -> HttpObjectServer:
    """A real HTTP object server on loopback (``tests/_http_server.py``), as if new:
    no objects, no delay, no queued actions, ETags on, counters at zero."""
    server = _http_server_process
    for entry in server.root.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    server.reset()
    return server


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
