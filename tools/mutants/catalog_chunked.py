"""Mutants of uffd_async/_remote/_chunked_copy.py: HttpSource's chunk-at-a-time copy."""

from mutant import Mutant

F = "uffd_async/_remote/_chunked_copy.py"
CHUNKED = ["tests/test_chunked_copy.py"]
AHEAD = ["tests/test_chunk_readahead.py"]
CHUNKS = "uffd_async/_remote/_chunks.py"

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
        old="        first = max(0, -(-(lo + skip - self._offset) // size))",
        new="        first = max(0, (lo + skip - self._offset) // size)",
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
    Mutant(
        id="ahead-not-only-at-a-chunks-start",
        file=CHUNKS,
        old=(
            "        if first and self._last >= 0 and self._last < chunk"
            " <= max(self._last, self._end) + 1:"
        ),
        new="        if self._last >= 0 and self._last < chunk <= max(self._last, self._end) + 1:",
        tests=AHEAD,
        why="threads faulting mid-chunk in chunks that happen to follow start a sequence",
    ),
    Mutant(
        id="ahead-past-the-end",
        file=CHUNKS,
        old="        stop = min(chunk + self._ahead + 1, self._count)",
        new="        stop = chunk + self._ahead + 1",
        tests=AHEAD,
        why="chunks past the object's end are asked for",
    ),
    Mutant(
        id="ahead-starts-after-two",
        file=CHUNKS,
        old="        if self._streak < self.START:",
        new="        if self._streak < self.START - 1:",
        tests=AHEAD,
        why="two faults in chunks that follow (chance, with many threads) start a sequence",
    ),
    Mutant(
        id="ahead-as-demand",
        file=F,
        old="            data = await self._source.chunk(chunk, demand=False)",
        new="            data = await self._source.chunk(chunk, demand=True)",
        tests=AHEAD,
        why="chunks asked for ahead go before a stopped thread's fault",
    ),
    Mutant(
        id="ahead-fetches-what-is-there",
        file=F,
        old="            and any(copier.chunk_missing(n) for copier in self._together)",
        new="            and True",
        tests=AHEAD,
        why="chunks a prefetch already filled are fetched again ahead",
    ),
    Mutant(
        id="ahead-marker-not-kept",
        file=F,
        old="        self._markers[chunk] = data[:PAGE_SIZE]",
        new="        pass",
        tests=AHEAD,
        why="a marker's fault is served from memory and asks for nothing more: the sequence "
        "stalls every few chunks",
    ),
    Mutant(
        id="ahead-no-marker",
        file=F,
        old="                copier.fill_span(uffd, lo, data, skip=PAGE_SIZE)",
        new="                copier.fill_span(uffd, lo, data, skip=0)",
        tests=AHEAD,
        why="a chunk fetched ahead is filled whole: no fault tells the sequence goes on",
    ),
    Mutant(
        id="ahead-marker-inline",
        file=F,
        old="        if self._markers and self._chunks_of(index)[0] in self._markers:",
        new="        if False:",
        tests=AHEAD,
        why="a marker's fault is served inline, never awaited: nothing more is asked for",
    ),
    Mutant(
        id="ahead-marker-refetched",
        file=F,
        old="        served = marker is not None and self._serve_marker(fault, uffd, marker)",
        new="        served = False",
        tests=AHEAD,
        why="a marker's page is fetched again (its chunk no longer in memory)",
    ),
    Mutant(
        id="ahead-marker-counts-missing",
        file=F,
        old=(
            "        skip = PAGE_SIZE if chunk in self._markers else 0  # a marker is left to fault"
        ),
        new="        skip = 0",
        tests=AHEAD,
        why="a prefetch fetches again a chunk whose only missing page is its marker",
    ),
]
