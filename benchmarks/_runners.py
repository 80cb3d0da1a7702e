"""Every runner the harness knows: the two baselines, then the uffd_async hook."""

from __future__ import annotations

import ctypes
import os

from ._async import UFFD_ASYNC_RUNNERS
from ._c import MISSING, WP, HandlerConfig, native
from ._job import Job, Runner, Served
from ._plain import run_plain


def run_c(job: Job) -> Served:
    """Runner: the reference C handler (its own pthread), the workload in this thread."""
    seen = (ctypes.c_uint8 * job.pages).from_buffer(job.seen)
    config = HandlerConfig(
        uffd=job.uffd.fileno(),
        mode=WP if job.mode == "wp" else MISSING,
        base=job.address,
        length=job.length,
        source=job.source,
        page_size=job.page_size,
        pages=ctypes.addressof(seen),
        readahead=job.readahead,
        slow_us=job.slow_us,
        wake_separately=int(job.wake_separately),
    )
    lib = native()
    handle = lib.handler_start(config)
    try:
        job.workload.run()
    finally:
        stats = lib.handler_stop(handle, job.timeout)
    del seen
    if stats.error:
        what = stats.failed.decode(errors="replace")
        raise RuntimeError(f"the C handler failed: {what}: {os.strerror(stats.error)}")
    return Served(faults=int(stats.faults), resolved=int(stats.resolved))


#: The runner every other one is compared with.
BASELINE = "c"

BASELINE_RUNNERS: dict[str, Runner] = {BASELINE: run_c, "plain-python": run_plain}


def all_runners() -> dict[str, Runner]:
    """Baselines first, then whatever the uffd_async hook holds, in order."""
    return {**BASELINE_RUNNERS, **UFFD_ASYNC_RUNNERS}
