"""Long-lived worker tasks for awaited resolutions, parked between jobs at the loop's cost.

Waking a parked task costs a fraction of spawning one, and that wake is paid
for every fault a resolver awaits on. So workers outlive their jobs, and
park with what the running loop does cheapest:

* asyncio (and uvloop): a bare future, completed by :meth:`WorkerPool.submit`;
* trio: ``trio.lowlevel.wait_task_rescheduled``, woken by ``reschedule``;
* anything else: an ``anyio.Event`` per wait.

After each job the worker runs ``after()`` (the server reads the uffd there):
the first item that submits is the same worker's next job, so a fault read
as a resolution ends starts at once, without waking another task.

A job need not await anything (a resolver may answer at once), and under a
steady stream of faults ``after()`` always finds another: a worker would then
never give the loop back, starving every other task (other uffds' servers, the
accept loop) and never seeing a cancellation. So a worker that has run jobs
for :data:`SLICE_NS` without parking checkpoints before the next one; and
while it is away, the others park rather than take the jobs it left (else
every worker would get its own slice in each turn of the loop, and a pool of
64 would hold the loop 64 times as long): it takes them when it is back.

Cancellation is the task group's: a parked worker is cancelled like any
task awaiting (the future is cancelled, or trio's abort callback takes the
task off the idle list), and never woken afterwards.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from .._core._loops import SLICE_NS, in_trio

__all__ = ["SLICE_NS", "WorkerPool"]

T = TypeVar("T")


class WorkerPool(Generic[T]):
    """Runs ``await work(item)`` for each item submitted, on at most ``limit`` tasks.

    Items wait in order in :attr:`pending` while every worker is busy; the
    caller bounds how many are outstanding.
    """

    def __init__(
        self,
        work: Callable[[T], Awaitable[None]],
        limit: int,
        after: Callable[[], None] | None = None,
    ) -> None:
        self._work = work
        self._limit = limit
        self._after = after or _nothing
        self.pending: deque[T] = deque()
        self._idle: list[Any] = []  # parked workers' wake handles, the last parked first
        self._wake: Callable[[Any], bool] = _set_event
        self._claim = False  # the worker running ``after`` takes the next item itself
        self._yielding = 0  # workers in a checkpoint, the pool's turn over: the rest park
        self.workers = 0

    def submit(self, tg: TaskGroup, item: T) -> None:
        """Hand ``item`` to an idle worker, or a new one (in ``tg``) while under ``limit``."""
        self.pending.append(item)
        if self._claim:
            self._claim = False
            return
        idle = self._idle
        while idle:
            if self._wake(idle.pop()):
                return
        if self.workers < self._limit:
            self.workers += 1
            tg.start_soon(self._worker)

    async def _drain(self) -> None:
        """Run pending items, and ``after`` each; the first item ``after`` submits is this
        worker's next (no other worker is woken for it)."""
        pending, work, after = self.pending, self._work, self._after
        began = time.perf_counter_ns()
        while pending and not self._yielding:
            await work(pending.popleft())
            self._claim = True
            try:
                after()
            finally:
                self._claim = False
            if pending and time.perf_counter_ns() - began >= SLICE_NS:
                # Jobs keep coming: let the other tasks run, and a cancellation in.
                # The items left wait in ``pending`` for this worker.
                self._yielding += 1
                try:
                    await anyio.lowlevel.checkpoint()
                finally:
                    self._yielding -= 1
                began = time.perf_counter_ns()

    async def _worker(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if in_trio():
                await self._trio_worker(sys.modules["trio"])
            else:
                await self._anyio_worker()
        else:
            await self._asyncio_worker(loop)

    async def _asyncio_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wake = _complete
        idle = self._idle
        create_future = loop.create_future
        while True:
            await self._drain()
            waiter = create_future()
            idle.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in idle:
                    idle.remove(waiter)
                raise

    async def _trio_worker(self, trio: Any) -> None:
        lowlevel = trio.lowlevel
        reschedule = lowlevel.reschedule

        def wake(task: Any) -> bool:
            reschedule(task)
            return True

        self._wake = wake
        idle = self._idle
        task = lowlevel.current_task()
        wait = lowlevel.wait_task_rescheduled
        succeeded = lowlevel.Abort.SUCCEEDED

        def abort(_: object) -> Any:
            if task in idle:
                idle.remove(task)
            return succeeded

        while True:
            await self._drain()
            idle.append(task)
            await wait(abort)

    async def _anyio_worker(self) -> None:
        idle = self._idle
        while True:
            await self._drain()
            event = anyio.Event()
            idle.append(event)
            try:
                await event.wait()
            except BaseException:
                if event in idle:
                    idle.remove(event)
                raise


def _nothing() -> None:
    pass


def _complete(waiter: asyncio.Future[None]) -> bool:
    if waiter.done():  # cancelled: its worker is on its way out
        return False
    waiter.set_result(None)
    return True


def _set_event(event: anyio.Event) -> bool:
    event.set()
    return True
