"""Shared helpers for tests that take real faults.

Every wait here is bounded: a fault nobody resolves must fail the test, not
hang the run. Faulting threads only ever touch memory through ctypes (ua.touch,
Region.read/write), so they never hold the GIL while blocked on a fault.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from typing import Any

import uffd_async as ua

#: Upper bound for any single wait on the kernel in these tests.
TIMEOUT = 10.0


class Worker:
    """Runs ``target`` in a daemon thread and remembers how it ended."""

    def __init__(self, target: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(target,), daemon=True)
        self._thread.start()

    def _run(self, target: Callable[[], Any]) -> None:
        try:
            self.result = target()
        except BaseException as exc:
            self.error = exc

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float = TIMEOUT) -> Any:
        """Wait for the thread; fail if it is still blocked after ``timeout``."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"worker still blocked after {timeout}s"
        if self.error is not None:
            raise self.error
        return self.result

    def stays_blocked(self, seconds: float = 0.2) -> bool:
        """True if the thread is still running after ``seconds`` (it is waiting on a fault)."""
        self._thread.join(seconds)
        return self._thread.is_alive()


def wait_events(uffd: ua.Userfaultfd, timeout: float = TIMEOUT) -> list[ua.Event]:
    """Block (bounded) until the uffd has events, then read them."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no userfaultfd event within {timeout}s"
        readable, _, _ = select.select([uffd], [], [], remaining)
        if readable:
            events = uffd.read_events()
            if events:
                return events


def wait_fault(uffd: ua.Userfaultfd, timeout: float = TIMEOUT) -> ua.PageFault:
    events = wait_events(uffd, timeout)
    assert len(events) == 1, events
    fault = events[0]
    assert isinstance(fault, ua.PageFault), fault
    return fault


class Lab:
    """Owns the regions, uffds and faulting threads of one test, and tears them
    down in the only safe order: close the uffds (which wakes every blocked
    thread), join the threads, and only then unmap the memory they touch."""

    def __init__(self) -> None:
        self.regions: list[ua.Region] = []
        self.uffds: list[ua.Userfaultfd] = []
        self.workers: list[Worker] = []

    def anonymous(self, pages: int) -> ua.Region:
        region = ua.Region.anonymous(pages * ua.PAGE_SIZE)
        self.regions.append(region)
        return region

    def shared(self, pages: int) -> ua.Region:
        region = ua.Region.shared(pages * ua.PAGE_SIZE)
        self.regions.append(region)
        return region

    def adopt_region(self, region: ua.Region) -> ua.Region:
        self.regions.append(region)
        return region

    def uffd(self, features: ua.Feature | int = ua.Feature(0), **kwargs: Any) -> ua.Userfaultfd:
        uffd = ua.Userfaultfd.open(features, **kwargs)
        self.uffds.append(uffd)
        return uffd

    def run(self, target: Callable[[], Any]) -> Worker:
        worker = Worker(target)
        self.workers.append(worker)
        return worker

    def touch(self, address: int, length: int = ua.PAGE_SIZE, *, write: bool = True) -> Worker:
        return self.run(lambda: ua.touch(address, length, write=write))

    def close(self) -> None:
        for uffd in self.uffds:
            uffd.close()
        stuck = []
        for worker in self.workers:
            worker._thread.join(TIMEOUT)
            if worker.alive:
                stuck.append(worker)
        if stuck:
            # Unmapping under a blocked thread would crash the process: leak instead.
            raise AssertionError(f"{len(stuck)} faulting threads never finished")
        for region in self.regions:
            region.close()


def pattern(page_index: int, size: int = ua.PAGE_SIZE) -> bytes:
    """Distinct, recognisable contents for page ``page_index``."""
    stamp = f"page {page_index:08d} ".encode()
    return (stamp * (size // len(stamp) + 1))[:size]


async def finished(worker: Worker, timeout: float = TIMEOUT) -> Any:
    """Wait (async, bounded) for a worker thread without blocking the event loop."""
    import anyio

    with anyio.fail_after(timeout):
        while worker.alive:
            await anyio.sleep(0.002)
    return worker.join(0)


def source_bytes(pages: int) -> bytes:
    return b"".join(pattern(i) for i in range(pages))
