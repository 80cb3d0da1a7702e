"""Mutants of the COPY paths: Userfaultfd.copy and its helpers (uffd_async/_core/_uffd.py) and
the UFFDIO_COPY of the C resolve loop (uffd_async/_core/_native_lib.c), chiefly the retry of a
COPY into hugetlbfs that fails with ENOMEM because its source was not mapped yet.

Left out as equivalent on Linux 6.18: dropping ``retried = True`` in ``_fill`` (a retry
without a bound). It spins only where a second attempt fails with ENOMEM too, and 6.18
answers a COPY into hugetlbfs with an empty pool with EEXIST (older kernels: ENOMEM).
Two more, truly equivalent: ``rc = ioctl(...)`` of the C retry without the ``rc =`` (the
partial-progress branch below it takes a ``copy`` field of the whole length for success),
and ``_continue_fill``'s ``if result > 0: self._filled += result`` dropped (dead: the
kernel writes a positive count only with EAGAIN, handled above it)."""

from mutant import Mutant

PY = "uffd_async/_core/_uffd.py"
C = "uffd_async/_core/_native_lib.c"
HUGE = ["tests/test_hugetlb_copy.py"]
FAST = ["tests/test_fast_path.py"]
IOCTLS = ["tests/test_ioctls.py"]

MUTANTS = [
    # -- Python: _continue_fill (the resolvers' one-page path, _copy_nocheck) --------
    Mutant(
        id="hugecopy-py-nocheck-no-retry",
        file=PY,
        old="        if exc.errno == _ENOMEM and request == _UFFDIO_COPY:  #",
        new="        if False:  #",
        tests=HUGE,
        why="the last huge page of a MAP_NORESERVE guest fails to copy: ENOMEM, poisoned",
    ),
    Mutant(
        id="hugecopy-py-nocheck-retry-from-result",
        file=PY,
        old="            self._fill(request, layout, args, length, what, retried=True)",
        new="            self._fill(request, layout, args, length, what, result, retried=True)",
        tests=HUGE,
        why="the retry starts at the negative errno taken for bytes done (copied from EAGAIN)",
    ),
    Mutant(
        id="hugecopy-py-wrong-errno",
        file=PY,
        old="_ENOMEM = errno.ENOMEM",
        new="_ENOMEM = errno.ENOSPC",
        tests=HUGE,
        why="the retry waits for the errno hugetlb allocation uses inside the kernel",
    ),
    # -- Python: _fill (copy() with an address, readahead, prefetch) ------------------
    Mutant(
        id="hugecopy-py-fill-no-retry",
        file=PY,
        old="request == _UFFDIO_COPY and not retried:",
        new="request == _UFFDIO_COPY and False:",
        tests=HUGE,
        why="copy() from an address fails on the last free huge page",
    ),
    Mutant(
        id="hugecopy-py-fill-retried-default",
        file=PY,
        old="        retried: bool = False,",
        new="        retried: bool = True,",
        tests=HUGE,
        why="every caller of _fill but _continue_fill lost the retry",
    ),
    # -- Python: the COPY paths that were there before --------------------------------
    Mutant(
        id="hugecopy-py-nocheck-not-counted",
        file=PY,
        old="        else:\n            self._filled += length\n\n    def _zeropage_nocheck",
        new="        else:\n            pass\n\n    def _zeropage_nocheck",
        tests=HUGE,
        why="pages the resolvers' one-page path copies are missing from the page count",
    ),
    Mutant(
        id="hugecopy-py-dontwake-inverted",
        file=PY,
        old="        self._copy_nocheck(dst, src, length, 0 if wake else _abi.COPY_MODE_DONTWAKE)",
        new="        self._copy_nocheck(dst, src, length, _abi.COPY_MODE_DONTWAKE if wake else 0)",
        tests=[*IOCTLS, *FAST],
        why="copy(bytes) wakes nobody by default: the faulting thread sleeps forever",
    ),
    # -- C: ua_resolve_batch's COPY ----------------------------------------------------
    Mutant(
        id="hugecopy-c-no-retry",
        file=C,
        old="            if (rc != 0 && errno == ENOMEM) {",
        new="            if (0) {",
        tests=HUGE,
        why="the C loop leaves the last huge page to Python (or, before its fix, poison)",
    ),
    Mutant(
        id="hugecopy-c-retry-errno",
        file=C,
        old="            if (rc != 0 && errno == ENOMEM) {",
        new="            if (rc != 0 && errno == EAGAIN) {",
        tests=HUGE,
        why="the retry waits for the wrong errno",
    ),
    Mutant(
        id="hugecopy-c-partial-off-by-one",
        file=C,
        old="            if (rc != 0 && copy.copy >= (int64_t)f->page_size) {",
        new="            if (rc != 0 && copy.copy > (int64_t)f->page_size) {",
        tests=FAST,
        why="a readahead copy cut short after the faulting page counts as failed",
    ),
    Mutant(
        id="hugecopy-c-readahead-unmarked",
        file=C,
        old="if (f->populated)\n                    memset(f->populated + index, 1, count);",
        new="if (f->populated)\n                    memset(f->populated + index, 1, 1);",
        tests=[*HUGE, *FAST],
        why="pages copied by readahead are not marked: copied again, or counted missing",
    ),
    Mutant(
        id="hugecopy-c-readahead-uncounted",
        file=C,
        old="                counts->filled += count * f->page_size;",
        new="                counts->filled += f->page_size;",
        tests=HUGE,
        why="pages the C loop's readahead copied are missing from the page count",
    ),
]
