"""The handoff server's figures add up while a replay runs, not only at the end.

A real process hands over its memory and faults on parts of it while the server
copies every page in (``populate``). Sampled at every turn the prefetcher gives
the loop: the pages it copied are counted in the pages mapped in and in the
resident pages, no count exceeds the pages there are, and the populated ratio is
what is resident. Once the process has exited nothing is resident: the ratio is
0, not the 100% (or 12.5%) it last was. The Prometheus exporter says the same,
with ``resident_handoffs`` a counter; and the README names every metric it serves.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.lowlevel
import pytest

import uffd_async as ua
from uffd_async._handoff._metrics import MetricsExporter, _Sample
from uffd_async._remote._http_source import HttpStats

from . import test_handoff_serving as serving
from ._support import TIMEOUT, source_bytes
from .test_handoff_serving import peer, running, until
from .test_http_handoff import scrape

pytestmark = pytest.mark.anyio

P = ua.PAGE_SIZE
PAGES = 8192  # 32 MiB: 16 runs of 2 MiB, the loop's turn between each
#: What the process reads while the replay runs: scattered, some twice.
STEPS = [["read", 5000, 40], ["read", 7, 1], ["read", 8100, 92], ["read", 5000, 40]]
README = Path(__file__).resolve().parent.parent / "README.md"


short_dir, socket_path = serving.short_dir, serving.socket_path  # the fixtures, shared


@pytest.fixture
def big_snapshot(short_dir: Path) -> str:
    path = short_dir / "big.bin"
    path.write_bytes(source_bytes(PAGES))
    return str(path)


def check_adds_up(stats: ua.HandoffStats) -> None:
    """What must hold of every sample: one process, mapping every page, removing none."""
    assert stats.prefetched <= stats.pages <= PAGES, stats
    if stats.active:
        assert stats.mapped_pages == PAGES, stats
        # Every page mapped in is resident, the prefetched ones among them.
        assert stats.prefetched <= stats.populated_pages == stats.pages, stats
        assert stats.populated == stats.populated_pages / PAGES, stats
    else:
        assert (stats.mapped_pages, stats.populated_pages, stats.populated) == (0, 0, 0.0)


async def test_the_figures_add_up_while_a_replay_runs(socket_path: str, big_snapshot: str) -> None:
    samples: list[ua.HandoffStats] = []
    async with running(socket_path, big_snapshot, populate=True) as server:

        async def sampling() -> None:
            while True:
                samples.append(server.stats)
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(sampling)
            result = await peer(
                socket_path, big_snapshot, STEPS, mappings=[[0, PAGES, 0]], memory=PAGES
            )
            assert result.returncode == 0, result.stdout.decode()
            await until(lambda: server.stats.active == 0)
            tg.cancel_scope.cancel()
        final = server.stats
    for stats in samples:
        check_adds_up(stats)
    during = [s for s in samples if s.active and 0 < s.prefetched < PAGES]
    assert during, "no sample was taken while the replay ran"
    assert any(0 < s.populated < 1 for s in during), during
    check_adds_up(final)
    assert (final.prefetched, final.pages, final.resident, final.served) == (
        PAGES - final.faults, PAGES, 1, 1,
    )  # fmt: skip


async def test_the_exporter_says_the_same(socket_path: str, big_snapshot: str) -> None:
    async with running(socket_path, big_snapshot, populate=True) as server:
        async with anyio.create_task_group() as tg:
            run = functools.partial(MetricsExporter(server, "127.0.0.1", 0, interval=0.01).run)
            exporter: MetricsExporter = await tg.start(run)
            url = f"http://127.0.0.1:{exporter.port}/metrics"
            result = await peer(
                socket_path, big_snapshot, STEPS, mappings=[[0, PAGES, 0]], memory=PAGES
            )
            assert result.returncode == 0, result.stdout.decode()
            with anyio.fail_after(TIMEOUT):
                while True:  # until a sample taken after the handoff ended
                    metrics = await anyio.to_thread.run_sync(scrape, url)
                    if metrics["uffd_async_active_handoffs"] == 0:
                        break
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert metrics["uffd_async_resident_handoffs_total"] == 1
    assert metrics["uffd_async_pages_mapped_total"] == PAGES
    assert (
        metrics["uffd_async_prefetched_pages_total"] == PAGES - metrics["uffd_async_faults_total"]
    )
    assert metrics["uffd_async_populated_ratio"] == 0  # nobody is served: nothing is resident
    assert metrics["uffd_async_populated_pages"] == metrics["uffd_async_mapped_pages"] == 0


def exporter_names() -> set[str]:
    """Every sample name the exporter serves (an HTTP source's too): counters end in
    ``_total``; a histogram is named by its family."""
    exporter = MetricsExporter(cast(Any, None), "127.0.0.1", 0)  # collect() reads a sample
    exporter._sample = _Sample(
        handoff=ua.HandoffStats(), http=HttpStats(), buckets=((float("inf"), 0),), latency_sum=0
    )
    names = set()
    for family in exporter.collect():
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def readme_names() -> set[str]:
    """The metric names README.md lists (``uffd_async_x``, or ``_x`` for short)."""
    text = README.read_text()
    start = text.index("serves Prometheus metrics at `/metrics`:")
    end = text.index("The event loop copies", start)
    names = set()
    for token in re.findall(r"`([^`]+)`", text[start:end]):
        match = re.fullmatch(r"(?:uffd_async)?(_[a-z_]+)(\{[^}]*\})?", token)
        if match:
            names.add(f"uffd_async{match[1]}")
    return names


def test_the_readme_names_every_metric() -> None:
    served, listed = exporter_names(), readme_names()
    assert served - listed == set(), "served, but not in the README's list"
    assert listed - served == set(), "in the README's list, but not served"
