"""The benchmark harness: ``python -m benchmarks`` (see ``__main__.py``).

A runner is ``Callable[[Job], Served]``; the contract is in ``_job.py`` and the
uffd_async runners plug in through ``UFFD_ASYNC_RUNNERS`` in ``_async.py``.
"""

from ._async import UFFD_ASYNC_RUNNERS as UFFD_ASYNC_RUNNERS
from ._job import Job as Job
from ._job import Runner as Runner
from ._job import Served as Served
from ._job import Workload as Workload

__all__ = ["UFFD_ASYNC_RUNNERS", "Job", "Runner", "Served", "Workload"]
