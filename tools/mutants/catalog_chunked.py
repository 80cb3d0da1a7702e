"""Mutants of uffd_async/_remote/_chunked_copy.py: HttpSource's chunk-at-a-time copy."""

from mutant import Mutant

F = "uffd_async/_remote/_chunked_copy.py"
CHUNKED = ["tests/test_chunked_copy.py"]

MUTANTS = [
    Mutant(
        id="chunked-no-replan",
        file=F,
        old=(
            "            page, index, _, removed ="
            " self._plan(fault)  # what changed while we waited"
        ),
        new="            pass",
        tests=CHUNKED,
        why="a fault is not planned again after its fetch: filled where the page was",
    ),
    Mutant(
        id="chunked-removed-ignored",
        file=F,
        old=(
            "            if not removed and lo <= start and start"
            " + self._page_size <= lo + len(data):"
        ),
        new="            if lo <= start and start + self._page_size <= lo + len(data):",
        tests=CHUNKED,
        why="a page discarded while its chunk was fetched is filled with source bytes",
    ),
    Mutant(
        id="chunked-was-ignored",
        file=F,
        old="        if was or not self._populated[index]:  # see the module's docstring",
        new="        if not self._populated[index]:  # see the module's docstring",
        tests=CHUNKED,
        why="a page zapped without an event is never copied again: its thread hangs",
    ),
    Mutant(
        id="chunked-fill-first-floor",
        file=F,
        old="        first = max(0, -(-(lo - self._offset) // size))",
        new="        first = max(0, (lo - self._offset) // size)",
        tests=CHUNKED,
        why="a chunk fill copies a page only partly inside the chunk",
    ),
    Mutant(
        id="chunked-fill-last-ceil",
        file=F,
        old="        last = min(self._pages, (lo + len(data) - self._offset) // size)",
        new="        last = min(self._pages, -(-(lo + len(data) - self._offset) // size))",
        tests=CHUNKED,
        why="a chunk fill copies the huge page the chunk only starts, past its bytes",
    ),
    Mutant(
        id="chunked-chunks-of-short",
        file=F,
        old="        return range(start // size, -(-(start + self._page_size) // size))",
        new="        return range(start // size, start // size + 1)",
        tests=CHUNKED,
        why="a huge page larger than a chunk takes only its first chunk",
    ),
    Mutant(
        id="chunked-cached-first-part",
        file=F,
        old=(
            "        return chunks[0] * self._chunk_size, parts[0]"
            ' if len(parts) == 1 else b"".join(parts)'
        ),
        new="        return chunks[0] * self._chunk_size, parts[0]",
        tests=CHUNKED,
        why="a huge page served from cached chunks gets only the first chunk's bytes",
    ),
    Mutant(
        id="chunked-span-lo-last",
        file=F,
        old="        lo = chunks[0] * self._chunk_size\n",
        new="        lo = chunks[-1] * self._chunk_size\n",
        tests=CHUNKED,
        why="a span of several chunks is taken to start at its last chunk",
    ),
    Mutant(
        id="chunked-record-fills",
        file=F,
        old=(
            "        if self._recorder is None:  # recording:"
            " every page must fault once (see below)"
        ),
        new="        if True:",
        tests=CHUNKED,
        why="while recording, a chunk fill hides the pages it brings in from the set",
    ),
    Mutant(
        id="chunked-missing-off-by-one",
        file=F,
        old="        last = min(self._pages, -(-(lo + self._chunk_size) // self._page_size))",
        new="        last = min(self._pages, (lo + self._chunk_size) // self._page_size - 1)",
        tests=CHUNKED,
        why="a chunk whose only missing page is its last is taken for resident: never prefetched",
    ),
    Mutant(
        id="chunked-fork-shares",
        file=F,
        old="        child._together = [child]",
        new="        child._together = self._together",
        tests=CHUNKED,
        why="a fork child's chunk fills copy into the parent's memory (and never its own)",
    ),
    Mutant(
        id="chunked-mappings-not-together",
        file=F,
        old="        copier._together = chunked",
        new="        pass",
        tests=["tests/test_http_handoff.py"],
        why="a chunk that lands for one mapping no longer fills the process's other mappings",
    ),
]
