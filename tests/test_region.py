"""Regions: mappings to register, and GIL-free access to them."""

from __future__ import annotations

import os

import pytest

import uffd_async as ua
from uffd_async._core._memory import huge_page_size

from ._support import NR_HUGEPAGES, Lab, free_huge_pages, pattern, wait_fault

P = ua.PAGE_SIZE


def test_anonymous_region_read_write_fill() -> None:
    with ua.Region.anonymous(2 * P) as region:
        assert region.address % P == 0 and region.length == 2 * P
        region.write(10, b"hello")
        assert region.read(8, 9) == b"\0\0hello\0\0"
        region.fill(P, 3, 0x41)
        assert region.read(P, 4) == b"AAA\0"
        region.write(0, bytearray(b"xy"))
        region.write(2, memoryview(b"z"))
        assert region.read(0, 3) == b"xyz"
    assert region.closed
    with pytest.raises(ua.InvalidArgument, match="closed"):
        region.read(0, 1)


def test_out_of_bounds_access_is_refused() -> None:
    with ua.Region.anonymous(P) as region:
        with pytest.raises(ua.InvalidArgument, match="outside"):
            region.read(P - 1, 2)
        with pytest.raises(ua.InvalidArgument, match="outside"):
            region.write(-1, b"x")
        with pytest.raises(TypeError):
            region.read(0.5, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("length", [0, -P, P + 1])
def test_bad_lengths(length: int) -> None:
    with pytest.raises(ua.InvalidArgument, match="multiple of the page size"):
        ua.Region.anonymous(length)


def test_shared_region_alias_sees_the_same_pages() -> None:
    with ua.Region.shared(2 * P) as region:
        assert region.alias is not None and region.memfd is not None
        region.alias.write(P, b"through the alias")
        assert region.read(P, 17) == b"through the alias"
    assert region.alias.closed


def test_region_read_waits_for_the_fault_without_the_gil(lab: Lab) -> None:
    """A Python thread reading registered memory through Region.read does not
    block the interpreter: the handler (this thread) still runs."""
    uffd = lab.uffd()
    region = lab.anonymous(1)
    uffd.register(region.address, region.length)
    reader = lab.run(lambda: region.read(0, P))
    fault = wait_fault(uffd)
    uffd.copy(fault.page, pattern(0))
    assert reader.join() == pattern(0)


def test_touch_validates() -> None:
    with pytest.raises(ua.InvalidArgument):
        ua.touch(0x1000, 0)
    with pytest.raises(TypeError):
        ua.touch("0x1000", 1)  # type: ignore[arg-type]


def test_hugetlb_missing_fault(lab: Lab, huge_pages: int) -> None:
    uffd = lab.uffd(ua.Feature.MISSING_HUGETLBFS)
    region = lab.adopt_region(ua.Region.hugetlb(huge_pages))
    assert region.page_size == huge_pages
    uffd.register(region.address, region.length)
    worker = lab.touch(region.address + 5 * P)
    fault = wait_fault(uffd)
    assert fault.page == region.address  # hugetlb faults report the huge page
    huge_page = region.address  # and are resolved a whole huge page at a time
    data = b"".join(pattern(i) for i in range(huge_pages // P))
    assert uffd.copy(huge_page, data) == huge_pages
    worker.join()
    assert region.read(5 * P, P) == pattern(5)


def test_hugetlb_minor_fault(lab: Lab, huge_pages: int) -> None:
    uffd = lab.uffd(ua.Feature.MINOR_HUGETLBFS)
    region = lab.adopt_region(ua.Region.hugetlb(huge_pages, shared=True))
    assert region.alias is not None
    region.alias.write(0, pattern(1))
    uffd.register(region.address, region.length, ua.Mode.MINOR)
    worker = lab.touch(region.address, write=False)
    fault = wait_fault(uffd)
    assert fault.is_minor
    uffd.continue_(region.address, huge_pages)
    worker.join()
    assert region.read(0, P) == pattern(1)


def test_hugetlb_without_reserved_pages_says_how_to_reserve() -> None:
    """As root, the pool is emptied for the test (CI reserves huge pages) and put back."""
    before = int(NR_HUGEPAGES.read_text())
    if before != 0 and os.geteuid() != 0:
        pytest.skip("needs an empty huge page pool")
    try:
        if before != 0:
            NR_HUGEPAGES.write_text("0")
        if free_huge_pages() > 0:
            pytest.skip("the huge page pool could not be emptied")
        with pytest.raises(OSError, match=r"vm\.nr_hugepages"):
            ua.Region.hugetlb(huge_page_size())
    finally:
        if before != 0:
            NR_HUGEPAGES.write_text(str(before))
