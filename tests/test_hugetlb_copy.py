"""UFFDIO_COPY into hugetlbfs with exactly as many free huge pages as the destination has.

Found with the real Firecracker: its guest memory is MAP_NORESERVE (nothing set aside),
and the server maps the snapshot file without reading it. The kernel reads a COPY's
source with page faults disabled; a source page not mapped yet makes it copy through a
temporary huge page from the pool, then allocate the destination's page while holding
it. So with the pool at exactly the guest's size, the last page's copy failed with
ENOMEM (and was poisoned). That failed attempt has mapped the source in the server, so
now a COPY that fails with ENOMEM is tried once more, in Python and in the C loop, and
needs one page.

Each test maps a MAP_NORESERVE hugetlbfs destination of exactly the pool's free pages
(it never changes vm.nr_hugepages: other tests use the pool), and copies from a fresh
mapping of a file. Faulting threads touch memory through ctypes; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from pathlib import Path

import pytest

import uffd_async as ua
from uffd_async._core._memory import (
    MAP_ANONYMOUS,
    MAP_HUGETLB,
    MAP_NORESERVE,
    MAP_PRIVATE,
    MAP_SHARED,
    huge_page_size,
    map_memory,
)
from uffd_async.resolvers import CopyFrom

from ._support import Lab, finished, free_huge_pages, pattern, wait_fault
from .test_fast_path import spy_on_python_path

P = ua.PAGE_SIZE


@pytest.fixture
def pool() -> int:
    """The free huge pages: the destination gets exactly that many."""
    free = free_huge_pages()
    if free < 2:
        pytest.skip(
            f"needs at least 2 free huge pages ({free} free; this test sizes its guest to "
            "the pool and never grows it: sysctl vm.nr_hugepages)"
        )
    return free


def guest_memory(lab: Lab, pages: int) -> ua.Region:
    """Hugetlbfs memory mapped as Firecracker maps a guest's: MAP_NORESERVE."""
    huge = huge_page_size()
    flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_NORESERVE
    return lab.adopt_region(
        ua.Region(map_memory(pages * huge, flags), pages * huge, page_size=huge)
    )


def snapshot_file(directory: Path, pages: int) -> Path:
    """A file of ``pages`` huge pages, each with its own stamp (in the page cache, as a
    file just written is, but mapped by nobody)."""
    huge = huge_page_size()
    path = directory / "memory"
    with open(path, "wb") as out:
        for index in range(pages):
            out.write(pattern(index, huge))
    return path


def fresh_mapping(lab: Lab, path: Path) -> ua.Region:
    """A new read-only mapping of ``path``: none of its pages is mapped in yet."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        address = map_memory(size, MAP_SHARED, fd, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    return lab.adopt_region(ua.Region(address, size))


def check_contents(region: ua.Region, pages: int) -> None:
    huge = huge_page_size()
    wrong = [i for i in range(pages) if region.read(i * huge, huge) != pattern(i, huge)]
    assert wrong == [], f"huge pages {wrong} of {pages} hold the wrong bytes"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "readahead"),
    [("snapshot", 0), ("C", 0), ("C", 1), ("Python", 0), ("Python", 1)],
)
async def test_a_guest_the_size_of_the_pool_is_restored_whole(
    path: str,
    readahead: int,
    pool: int,
    lab: Lab,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A thread touches every huge page; each is copied from the unread file mapping.
    ``snapshot`` is what ``serve`` runs (a Snapshot's resolver); ``C`` is copy_from on
    the C fast path (no fault may reach Python), ``Python`` the same with it off
    (readahead 1: several huge pages per COPY, cut short by the kernel before the last).

    Before the fix the last page's COPY failed with ENOMEM: the server raises it (the
    fault is left, not poisoned, so the toucher is not killed by a SIGBUS)."""
    huge = huge_page_size()
    region = guest_memory(lab, pool)
    path_on_disk = snapshot_file(tmp_path, pool)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    on_error = ua.OnError(page="leave")  # and propagate: an ENOMEM fails the test
    with contextlib.ExitStack() as stack:
        resolver: ua.Resolver
        copier: CopyFrom | None = None
        if path == "snapshot":
            snapshot = stack.enter_context(ua.Snapshot(path_on_disk))
            mapping = ua.GuestMapping(
                base_host_virt_addr=region.address, size=region.length, offset=0, page_size=huge
            )
            resolver = snapshot.resolver([mapping])
        else:
            source = fresh_mapping(lab, path_on_disk)
            resolver = copier = ua.copy_from(
                source, base=region.address, page_size=huge, readahead=readahead
            )
            assert resolver._fast_path() is not None
            if path == "Python":
                monkeypatch.setattr(resolver, "_fast_path", lambda: None)
        python_path = spy_on_python_path(resolver, monkeypatch)
        async with ua.FaultServer(uffd, resolver, on_error=on_error) as server:
            await finished(lab.touch(region.address, region.length))
    if path == "C":
        assert python_path == [], "a fault left the C loop for Python"
    else:
        assert python_path, "the faults did not go through Python"
    stats = server.stats
    assert (stats.errors, stats.pages) == (0, pool * huge // P), stats
    if copier is not None:  # readahead's pages too
        assert bytes(copier.populated) == b"\1" * pool, "pages copied but not marked"
    assert free_huge_pages() == 0, "the guest did not take the whole pool"
    check_contents(region, pool)


def test_copy_takes_the_last_free_page_and_no_more(pool: int, lab: Lab, tmp_path: Path) -> None:
    """``Userfaultfd.copy`` from an address, no server: real faults on the pool's worth
    of pages are all filled, the last one through the retry. A page more, with the pool
    now empty, still fails, at once: the retry happens once and hides no real shortage
    (nobody touches that page: it would SIGBUS). Linux 6.18 answers that copy with
    EEXIST, not ENOMEM (seen here: an empty pool, a page table already there); older
    kernels with ENOMEM, which a retry without a bound would spin on."""
    huge = huge_page_size()
    region = guest_memory(lab, pool + 1)
    source = fresh_mapping(lab, snapshot_file(tmp_path, pool + 1))
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    toucher = lab.touch(region.address, pool * huge)
    for _ in range(pool):
        page = wait_fault(uffd).address & ~(huge - 1)
        offset = page - region.address
        assert uffd.copy(page, source.address + offset, huge) == huge
    toucher.join()
    check_contents(region, pool)
    assert free_huge_pages() == 0
    last = pool * huge
    copier = lab.run(lambda: uffd.copy(region.address + last, source.address + last, huge))
    with pytest.raises(ua.UffdError) as failed:
        copier.join()  # fails (asserts) if the copy is still retrying
    assert failed.value.errno in (errno.ENOMEM, errno.EEXIST), failed.value
    assert free_huge_pages() == 0
