"""Mutants of zero pages: the zero map (_zero_map.py, the C scan), the snapshot's and the
layers' maps, CopyFrom's ZEROPAGE paths (demand faults, readahead, populating) and the C
loop's (each catalog: one list named MUTANTS)."""

from mutant import Mutant

MAP = "uffd_async/_restore/_zero_map.py"
SNAPSHOT = "uffd_async/_restore/_snapshot.py"
LAYERED = "uffd_async/_restore/_layered.py"
RESOLVERS = "uffd_async/_serve/_resolvers.py"
NATIVE = "uffd_async/_core/_native_lib.c"
TESTS = ["tests/test_zero_pages.py"]

MUTANTS = [
    Mutant(
        id="zero-c-loop-ignores-zeros",
        file=NATIVE,
        old="        int zero = f->kind == UA_COPY && f->zeros && f->zeros[index];",
        new="        int zero = 0;",
        tests=TESTS,
        why="the C loop copies zero pages: nothing is mapped as the zero page",
    ),
    Mutant(
        id="zero-c-data-readahead-into-zeros",
        file=NATIVE,
        old=(
            "                       !f->populated[index + count] && "
            "!(f->zeros && f->zeros[index + count]))"
        ),
        new="                       !f->populated[index + count])",
        tests=TESTS,
        why="a data page's readahead copies the zero pages behind it",
    ),
    Mutant(
        id="zero-c-zero-readahead-into-data",
        file=NATIVE,
        old="                       !f->populated[index + count] && f->zeros[index + count])",
        new="                       !f->populated[index + count])",
        tests=TESTS,
        why="a zero page's readahead maps the data pages behind it as zeros",
    ),
    Mutant(
        id="zero-c-run-uncounted",
        file=NATIVE,
        old="                counts->filled += f->page_size * count;",
        new="                counts->filled += f->page_size;",
        tests=TESTS,
        why="the pages a zero run's readahead mapped are missing from the server's count",
    ),
    Mutant(
        id="zero-c-scan-says-all-zero",
        file=NATIVE,
        old="        out[i] = acc == 0;",
        new="        out[i] = 1;",
        tests=TESTS,
        why="every page is taken for a zero page: the guest sees zeros for its data",
    ),
    Mutant(
        id="zero-reads-cold-pages",
        file=MAP,
        old="        for match in _RESIDENT.finditer(bytes(vector)):",
        new="        for match in _RESIDENT.finditer(bytes([1]) * (end - first)):",
        tests=TESTS,
        why="the scan reads pages not in memory: a cold snapshot is read whole at its restore",
    ),
    Mutant(
        id="zero-short-read-trusted",
        file=MAP,
        old="    if cut < pages:  # cut short since it was opened: nothing is zero from its end on",
        new="    if False:",
        tests=TESTS,
        why="a file cut short since it was opened: its holes past the end are served as zeros",
    ),
    Mutant(
        id="zero-holes-not-zero",
        file=MAP,
        old='    zeros = bytearray(b"\\1") * pages',
        new="    zeros = bytearray(pages)",
        tests=TESTS,
        why="holes are copied: the map names only zero data pages",
    ),
    Mutant(
        id="zero-holes-not-found",
        file=MAP,
        old="            first, last = start // PAGE_SIZE, min(-(-end // PAGE_SIZE), pages)",
        new="            first, last = start // PAGE_SIZE, pages",
        tests=TESTS,
        why="the first data range runs to the end: later holes are read (filling the page cache)",
    ),
    Mutant(
        id="zero-direct-path-copies-zeros",
        file=RESOLVERS,
        old="                    if zeros is not None and zeros[index]:",
        new="                    if False:",
        tests=TESTS,
        why="the one-page shortcut copies zero pages",
    ),
    Mutant(
        id="zero-split-mixes",
        file=RESOLVERS,
        old="        while n < count and zeros[index + n] == zero:",
        new="        while n < count:",
        tests=TESTS,
        why="a fault's readahead run mixes zero and data pages: data mapped as zeros",
    ),
    Mutant(
        id="zero-wp-zeropage",
        file=RESOLVERS,
        old="        if zeros is not None and not wp and page_size == PAGE_SIZE and any(zeros):",
        new="        if zeros is not None and page_size == PAGE_SIZE and any(zeros):",
        tests=TESTS,
        why="a write-protecting copier maps zero pages unprotected: the first write is lost",
    ),
    Mutant(
        id="zero-hugetlb-zeropage",
        file=RESOLVERS,
        old="        if zeros is not None and not wp and page_size == PAGE_SIZE and any(zeros):",
        new="        if zeros is not None and not wp and any(zeros):",
        tests=TESTS,
        why="huge pages get ZEROPAGE, which hugetlbfs refuses (and a base-page map)",
    ),
    Mutant(
        id="zero-populate-runs-mixed",
        file=RESOLVERS,
        old="                and (zeros is None or zeros[j] == zeros[i])",
        new="                and (zeros is None or True)",
        tests=TESTS,
        why="a populate run spans zero and data pages: mapped all as one kind",
    ),
    Mutant(
        id="zero-populate-copies",
        file=RESOLVERS,
        old=(
            "            if zeros is not None and zeros[i]:  "
            "# a run of zero pages (see _each_missing_run)"
        ),
        new="            if False:",
        tests=TESTS,
        why="populating copies zero runs: the ZEROPAGE saving is gone",
    ),
    Mutant(
        id="zero-layer-not-scanned",
        file=LAYERED,
        old="                lib.ua_zero_pages(at, end - start, PAGE_SIZE, out)",
        new="                pass",
        tests=TESTS,
        why="a layer's zero pages are copied",
    ),
    Mutant(
        id="zero-layer-base-map-ignored",
        file=LAYERED,
        old="                zeros[start:end] = base_zeros[from_page : from_page + end - start]",
        new="                pass",
        tests=TESTS,
        why="base holes under layers are copied",
    ),
    Mutant(
        id="zero-layered-copy-copies",
        file=LAYERED,
        old="        zero, count = self._zero_split(index, count)",
        new="        zero = False",
        tests=TESTS,
        why="a mapping served piece by piece copies its zero pages",
    ),
    Mutant(
        id="zero-snapshot-map-dropped",
        file=SNAPSHOT,
        old="            zeros=self._zeros_of(mapping),",
        new="            zeros=None,",
        tests=TESTS,
        why="a snapshot's zero pages are copied",
    ),
]
