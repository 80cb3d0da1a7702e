"""One run: fresh memory and uffd, the runner under a deadline, then a full check.

Each run gets a new region and a new uffd, so no run inherits populated
pages, a write-protection state or unread messages from another. After the
runner returns the uffd is closed first: a page the handler never filled then
reads as zeros instead of faulting, so checking it cannot hang. Every page is
compared with the source (write tracking: with its marker), and every page
must have been reported resolved. Any mismatch raises :class:`RunFailed`.

Every wait is bounded. After ``timeout`` seconds a timer aborts the run
(unregister + wake: the workload's threads stop waiting, the run fails); if
even that does not bring the runner back within another minute, faulthandler
dumps every thread's stack and ends the process with status 1.
"""

from __future__ import annotations

import ctypes
import faulthandler
import sys
import threading

import attrs

import uffd_async as ua

from ._c import native
from ._job import Abort, Job, Runner, Served, Workload
from ._scenarios import Case

#: The grace period between the abort and faulthandler ending the process.
HARD_DEADLINE_GRACE = 60.0


class RunFailed(Exception):
    """A run gave a wrong result, failed, or timed out: the benchmark fails."""


class RunnerSkipped(Exception):
    """The runner declined the job (NotImplementedError before the workload ran)."""


@attrs.frozen(kw_only=True)
class Sample:
    """What one run measured."""

    elapsed_ns: int
    faults: int
    resolved: int


def run_once(
    name: str, runner: Runner, scenario: str, case: Case, source: ua.Region, timeout: float
) -> Sample:
    """Run ``case`` once under ``runner``; raises RunFailed or RunnerSkipped."""
    where = f"scenario {scenario} {case.label}, runner {name}"
    page = ua.PAGE_SIZE
    length = case.pages * page
    with ua.Region.anonymous(length) as region:
        wp = ua.Feature.PAGEFAULT_FLAG_WP | ua.Feature.WP_UNPOPULATED  # for WriteTracker
        features = wp if case.mode == "wp" else ua.Feature(0)
        uffd = ua.Userfaultfd.open(features)
        try:
            if case.mode == "wp":
                ctypes.memmove(region.address, source.address, length)
                uffd.register(region.address, length, ua.Mode.WP)
                uffd.writeprotect(region.address, length)
            else:
                uffd.register(region.address, length)
            abort = Abort(uffd, region.address, length)
            job = Job(
                scenario=scenario,
                case=case.label,
                mode=case.mode,
                uffd=uffd,
                address=region.address,
                length=length,
                page_size=page,
                pages=case.pages,
                source=source.address,
                threads=case.threads,
                readahead=case.readahead,
                slow_us=case.slow_us,
                wake_separately=case.wake_separately,
                seen=bytearray(case.pages),
                workload=Workload(
                    address=region.address,
                    pages=case.pages,
                    page_size=page,
                    threads=case.threads,
                    access=case.access,
                ),
                timeout=timeout,
                abort=abort,
            )
            served = _guarded(runner, job, abort, timeout, where)
        finally:
            uffd.close()
        if abort.reason is not None:
            raise RunFailed(f"{where}: {abort.reason}")
        if job.workload.elapsed_ns is None:
            raise RunFailed(f"{where}: the runner returned without running the workload")
        bad = native().verify(region.address, source.address, case.pages, page, case.mode == "wp")
    if bad >= 0:
        raise RunFailed(f"{where}: page {bad} does not hold what the source says it should")
    unreported = job.seen.find(0)
    if unreported >= 0:
        raise RunFailed(
            f"{where}: page {unreported} was never reported resolved "
            f"({job.seen.count(0)} of {case.pages} pages missing from job.seen)"
        )
    if case.mode == "missing" and served.resolved != case.pages:
        raise RunFailed(f"{where}: {served.resolved} pages populated, expected {case.pages}")
    if case.mode == "wp" and served.faults < case.pages:
        raise RunFailed(f"{where}: {served.faults} WP faults for {case.pages} written pages")
    return Sample(
        elapsed_ns=job.workload.elapsed_ns, faults=served.faults, resolved=served.resolved
    )


def _guarded(runner: Runner, job: Job, abort: Abort, timeout: float, where: str) -> Served:
    timer = threading.Timer(timeout, abort, (f"timed out after {timeout:g} s",))
    timer.daemon = True
    faulthandler.dump_traceback_later(
        timeout + HARD_DEADLINE_GRACE, exit=True, file=sys.__stderr__ or sys.stderr
    )
    timer.start()
    try:
        return runner(job)
    except NotImplementedError as exc:
        if job.workload.started:
            raise RunFailed(f"{where}: {exc!r}") from exc
        raise RunnerSkipped(str(exc) or "not implemented") from exc
    except Exception as exc:
        raise RunFailed(f"{where}: {exc}") from exc
    finally:
        timer.cancel()
        timer.join()
        faulthandler.cancel_dump_traceback_later()
