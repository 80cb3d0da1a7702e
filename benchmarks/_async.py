"""The hook for the uffd_async runners: the async server, measured against the C handler.

Add a runner to ``UFFD_ASYNC_RUNNERS`` under a name such as ``"uffd_async/asyncio"``.
A runner is ``Callable[[Job], Served]``; the contract (serve faults on
``job.uffd``, call ``job.workload.run()`` once, mark ``job.seen``, return
counters, ``job.abort()`` on failure) is in ``benchmarks/_job.py``. The usual
shape with anyio::

    def run_asyncio(job: Job) -> Served:
        async def main() -> Served:
            async with anyio.create_task_group() as tg:
                stats = await tg.start(serve, job)        # the server, under tg
                await anyio.to_thread.run_sync(job.workload.run)
                tg.cancel_scope.cancel()
            return Served(faults=stats.faults, resolved=stats.resolved)
        return anyio.run(main, backend="asyncio")

If the server fails while the workload thread is blocked on a fault, that thread
cannot be cancelled: call ``job.abort(reason)`` first, which wakes it.

The stubs below raise NotImplementedError before touching the job, which the
harness reports as "skipped" with their message.
"""

from __future__ import annotations

from ._job import Job, Runner, Served


def _not_yet(backend: str) -> Runner:
    def runner(job: Job) -> Served:
        raise NotImplementedError(f"the uffd_async server on {backend} is not plugged in yet")

    return runner


UFFD_ASYNC_RUNNERS: dict[str, Runner] = {
    "uffd_async/asyncio": _not_yet("asyncio"),
    "uffd_async/trio": _not_yet("trio"),
}
