"""WriteTracker, in fault and async (WP_ASYNC + PAGEMAP_SCAN) modes, against ground truth."""

from __future__ import annotations

import errno
import functools
import random
from typing import Any, Literal

import anyio
import pytest

import uffd_async as ua
from uffd_async._core._native import FastPath

from ._support import TIMEOUT, Lab, finished

pytestmark = pytest.mark.anyio
P = ua.PAGE_SIZE
MODES = {"fault": ua.Feature.WP_UNPOPULATED, "async": ua.Feature.WP_ASYNC}


@pytest.mark.parametrize("mode", ["fault", "async"])
async def test_collect_reports_exactly_the_written_pages(
    lab: Lab, mode: Literal["fault", "async"]
) -> None:
    uffd = lab.uffd(MODES[mode])
    region = lab.anonymous(32)
    region.fill(0, 8 * P, 1)  # some populated pages, the rest never touched
    with anyio.fail_after(TIMEOUT):
        async with ua.WriteTracker(uffd, region.address, region.length, mode=mode) as tracker:
            assert tracker.collect() == []
            written = [0, 3, 9, 31]
            for index in written:
                await finished(lab.run(functools.partial(region.fill, index * P, 8, 7)))
            assert tracker.collect() == [region.address + i * P for i in written]
            assert tracker.collect() == []
            await finished(lab.run(lambda: region.fill(3 * P, 1, 9)))
            assert tracker.collect() == [region.address + 3 * P]
    # leaving unprotects everything: a write now needs no handler
    region.fill(5 * P, 1, 1)


async def test_next_write_reports_first_writes(lab: Lab) -> None:
    uffd = lab.uffd(ua.Feature.WP_UNPOPULATED)
    region = lab.anonymous(8)
    with anyio.fail_after(TIMEOUT):
        async with ua.WriteTracker(uffd, region.address, region.length) as tracker:
            worker = lab.run(lambda: region.fill(2 * P, 2 * P, 5))
            assert await tracker.next_write() == region.address + 2 * P
            assert await tracker.next_write() == region.address + 3 * P
            await finished(worker)
            seen = []
            lab.run(lambda: region.fill(7 * P, 1, 5))
            async for page in tracker:
                seen.append(page)
                break
            assert seen == [region.address + 7 * P]


@pytest.mark.parametrize("mode", ["fault", "async"])
async def test_incremental_snapshots_under_many_writers(
    lab: Lab, mode: Literal["fault", "async"]
) -> None:
    """Ground truth: a base copy plus the pages of every collect, copied when
    collected, equals the memory at the end, whatever the writers did."""
    pages, writers, writes_each = 256, 8, 400
    uffd = lab.uffd(MODES[mode])
    region = lab.anonymous(pages)
    snapshot = bytearray(region.length)  # base snapshot: all zeros
    written: set[int] = set()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(writes_each):
            index = rng.randrange(pages)
            written.add(index)
            region.fill(index * P + rng.randrange(P - 64), 64, rng.randrange(1, 256))

    collected: set[int] = set()

    def take(tracker: ua.WriteTracker) -> None:
        for page in tracker.collect():
            offset = page - region.address
            collected.add(offset // P)
            snapshot[offset : offset + P] = region.read(offset, P)

    with anyio.fail_after(60):
        async with ua.WriteTracker(uffd, region.address, region.length, mode=mode) as tracker:
            workers = [lab.run(functools.partial(writer, n)) for n in range(writers)]
            while any(w.alive for w in workers):
                take(tracker)
                await anyio.sleep(0.001)
            for worker in workers:
                await finished(worker)
            take(tracker)
    assert collected == written
    assert bytes(snapshot) == region.read(0, region.length)


async def test_missing_and_wp_together(lab: Lab) -> None:
    """Lazy population and write tracking on one MISSING|WP range."""
    uffd = lab.uffd(ua.Feature.WP_UNPOPULATED)
    region = lab.anonymous(8)
    uffd.register(region.address, region.length, ua.Mode.MISSING | ua.Mode.WP)
    source = bytes(range(256)) * (8 * P // 256)
    missing = ua.copy_from(source, base=region.address, wp=True)
    with anyio.fail_after(TIMEOUT):
        async with ua.WriteTracker(
            uffd, region.address, region.length, register=False, missing=missing
        ) as tracker:
            assert await finished(lab.run(lambda: region.read(0, 8 * P))) == source
            assert tracker.collect() == []
            await finished(lab.run(lambda: region.fill(P, 1, 0)))
            assert tracker.collect() == [region.address + P]


async def test_features_are_checked_with_a_remedy(lab: Lab) -> None:
    region = lab.anonymous(1)
    with pytest.raises(ua.UnsupportedFeature, match="WP_UNPOPULATED"):
        ua.WriteTracker(lab.uffd(), region.address, region.length)
    with pytest.raises(ua.UnsupportedFeature, match="WP_ASYNC"):
        ua.WriteTracker(lab.uffd(), region.address, region.length, mode="async")
    uffd = lab.uffd(ua.Feature.WP_ASYNC)
    async with ua.WriteTracker(uffd, region.address, region.length, mode="async") as tracker:
        with pytest.raises(ua.InvalidArgument, match="fault mode"):
            await tracker.next_write()


class RecordingHook:
    """A write hook with nothing behind it: what the tracker calls, and what the page held
    then. ``fast_path`` declines, so every write fault comes through Python."""

    def __init__(self, region: ua.Region) -> None:
        self.region = region
        self.calls: list[tuple[str, Any]] = []

    def before_unprotect(self, page: int) -> None:
        offset = page - self.region.address
        self.calls.append(("before_unprotect", (page, self.region.read(offset, 1))))

    def fast_path(self, marks: int | None = None) -> FastPath | None:
        self.calls.append(("fast_path", marks is not None))
        return None

    def apply(self, event: ua.Remap | ua.Remove | ua.Unmap) -> None:
        self.calls.append(("apply", event))


async def test_a_write_hook_sees_each_write_fault_before_the_write(lab: Lab) -> None:
    """The seam a live snapshot uses, driven by a fake: the tracker calls the hook at each
    write fault while the page still holds its old bytes, and at each event, and records
    the page as written either way; after detach it calls nothing."""
    uffd = lab.uffd(ua.Feature.WP_UNPOPULATED | ua.Feature.EVENT_REMOVE)
    region = lab.anonymous(8)
    region.fill(0, region.length, 3)
    hook = RecordingHook(region)
    with anyio.fail_after(TIMEOUT):
        async with ua.WriteTracker(uffd, region.address, region.length) as tracker:
            assert (tracker.start, tracker.length) == (region.address, region.length)
            assert tracker.write_hook is None and tracker.dirty_indexes() == []
            tracker.attach(hook)
            assert tracker.write_hook is hook
            with pytest.raises(ua.InvalidArgument, match="under way") as refused:
                tracker.attach(RecordingHook(region))
            assert refused.value.errno == errno.EBUSY
            tracker.detach(RecordingHook(region))  # not the one attached: nothing happens
            assert tracker.write_hook is hook
            await finished(lab.run(lambda: region.fill(2 * P, 1, 9)))
            await finished(lab.run(lambda: region.discard(5 * P, P)))
            assert tracker.dirty_indexes() == [2, 5]
            saved = [args for name, args in hook.calls if name == "before_unprotect"]
            assert saved == [(region.address + 2 * P, b"\x03")]  # before the write
            applied = [args for name, args in hook.calls if name == "apply"]
            assert applied == [ua.Remove(start=region.address + 5 * P, end=region.address + 6 * P)]
            assert ("fast_path", True) in hook.calls  # offered the C loop, declined
            assert tracker.collect() == [region.address + 2 * P, region.address + 5 * P]
            tracker.detach(hook)
            assert tracker.write_hook is None
            calls = len(hook.calls)
            await finished(lab.run(lambda: region.fill(6 * P, 1, 9)))
            assert tracker.collect() == [region.address + 6 * P]
            assert len(hook.calls) == calls
