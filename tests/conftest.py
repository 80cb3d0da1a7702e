from __future__ import annotations

import faulthandler
import os
import sys
import threading
from collections.abc import Iterator

import pytest

from ._support import Lab

#: No single test may take longer. The watchdog is a C thread, so it fires even
#: when a thread holding the GIL is stuck on an unresolved fault in the kernel.
TEST_DEADLINE = 120.0


@pytest.fixture(autouse=True)
def deadline() -> Iterator[None]:
    """A hung test dumps every thread's stack and ends the run with status 1."""
    faulthandler.dump_traceback_later(TEST_DEADLINE, exit=True, file=sys.__stderr__ or 2)
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


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves an fd open or a thread running."""
    fds_before = _open_fds()
    threads_before = set(threading.enumerate())
    yield
    leaked_fds = {fd for fd in _open_fds() - fds_before if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked_fds, "leaked fds: " + ", ".join(
        f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}" for fd in sorted(leaked_fds)
    )
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
