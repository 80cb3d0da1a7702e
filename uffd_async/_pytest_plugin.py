"""pytest fixtures: ``region``, ``uffd`` and ``fault_gate``.

Registered through the ``pytest11`` entry point. ``fault_gate`` is an async
fixture: it works in tests run by anyio's plugin (asyncio and trio) and by
pytest-trio. Teardown order matters: the uffd closes (waking any blocked
thread) before the region is unmapped, because unmapping memory under a
thread blocked on it would crash the process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from ._core._abi import PAGE_SIZE
from ._core._memory import Region
from ._core._uffd import Userfaultfd
from .testing import FaultGate

#: Size of the ``region`` fixture.
REGION_PAGES = 16


@pytest.fixture
def region() -> Iterator[Region]:
    """16 pages of anonymous memory, not registered."""
    with Region.anonymous(REGION_PAGES * PAGE_SIZE) as mapped:
        yield mapped


@pytest.fixture
def uffd(region: Region) -> Iterator[Userfaultfd]:
    """An open userfaultfd (closed before ``region`` is unmapped)."""
    with Userfaultfd.open() as handle:
        yield handle


@pytest.fixture
async def fault_gate(region: Region) -> AsyncIterator[FaultGate]:
    """A :class:`~uffd_async.testing.FaultGate` holding every fault in ``region``."""
    async with FaultGate(region.address, region.length) as gate:
        yield gate
