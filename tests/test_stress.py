"""Stress: faults from 16 threads while the address space churns, and write tracking
under the same churn; every byte checked afterwards (see ``_stress`` for how).

The fast versions run in the default suite. The ``slow`` ones (a million faults
over both memory kinds and backends) run with ``make stress`` (``pytest -m slow``); the
default options deselect them, so name one explicitly with ``-m slow`` too.
"""

from __future__ import annotations

import os
from typing import Literal

import anyio
import pytest

import uffd_async as ua

from . import _stress
from ._stress import Kind, RacePath, serve_under_churn, track_under_churn
from ._support import TIMEOUT, Lab, finished

pytestmark = pytest.mark.anyio

KINDS: list[Kind] = ["anonymous", "shmem"]
#: Resolved by copy_from in Python (a callable source), or by the server's C loop.
PATHS: list[RacePath] = ["python", "C"]
#: Set UFFD_ASYNC_STRESS_REPORT=path to append each run's tally (for the README table).
REPORT = os.environ.get("UFFD_ASYNC_STRESS_REPORT")


def report(name: str, tally: _stress.Tally) -> None:
    if REPORT:
        with open(REPORT, "a") as out:
            out.write(f"{name}: {tally}\n")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
async def test_faults_under_churn(kind: Kind, path: RacePath, anyio_backend: str) -> None:
    tally = await serve_under_churn(kind, faults=20_000, seed=1, path=path)
    assert tally.faults >= 20_000 and tally.remaps
    assert tally.removes or path == "C"  # the C path's churn does not discard
    assert tally.races and tally.eexist
    report(f"fast serve {kind} {path} {anyio_backend}", tally)


@pytest.mark.parametrize("mode", ["fault", "async"])
async def test_write_tracking_under_churn(mode: Literal["fault", "async"]) -> None:
    # Fault mode sees discards only with EVENT_REMOVE (the test below): churn it
    # with forks only; async mode gets discards too.
    tally = await track_under_churn(mode, writes=20_000, seed=2, discard=mode == "async")
    assert tally.collected and tally.forks
    report(f"fast track {mode}", tally)


async def test_fault_mode_reports_writes_to_a_discarded_page(lab: Lab) -> None:
    """MADV_DONTNEED drops write protection with the pages; with EVENT_REMOVE the
    tracker counts them as written (they did change) and protects them again."""
    uffd = lab.uffd(ua.Feature.WP_UNPOPULATED | ua.Feature.EVENT_REMOVE)
    region = lab.anonymous(4)
    P = ua.PAGE_SIZE
    with anyio.fail_after(TIMEOUT):
        async with ua.WriteTracker(uffd, region.address, region.length) as tracker:
            await finished(lab.run(lambda: region.fill(0, region.length, 1)))
            assert len(tracker.collect()) == 4
            await finished(lab.run(lambda: region.discard(P, P)))
            await finished(lab.run(lambda: region.fill(P, 1, 9)))
            assert region.address + P in tracker.collect()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
async def test_a_million_faults_under_churn(kind: Kind, anyio_backend: str) -> None:
    """A quarter of a million faults per memory kind and backend: a million in all."""
    tally = await serve_under_churn(kind, faults=250_000, seed=3, pages=16384)
    assert tally.faults >= 250_000
    report(f"slow serve {kind} {anyio_backend}", tally)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fault", "async"])
async def test_write_tracking_under_long_churn(mode: Literal["fault", "async"]) -> None:
    tally = await track_under_churn(
        mode, writes=300_000, seed=4, pages=4096, discard=mode == "async"
    )
    report(f"slow track {mode}", tally)
