"""Mutants of packs: the format (_pack_format.py), the writer (_pack_writer.py), PackSource
(_pack_source.py) and the zero-chunk path of ChunkedCopy (each catalog: one list named
MUTANTS)."""

from mutant import Mutant

FORMAT = "uffd_async/_remote/_pack_format.py"
WRITER = "uffd_async/_remote/_pack_writer.py"
SOURCE = "uffd_async/_remote/_pack_source.py"
COPY = "uffd_async/_remote/_chunked_copy.py"
TESTS = ["tests/test_pack.py"]

MUTANTS = [
    Mutant(
        id="pack-digest-not-checked",
        file=SOURCE,
        old="        if chunk_digest(data) != self.index.digests[index]:",
        new="        if False:",
        tests=TESTS,
        why="a damaged chunk that still decompresses is copied into the guest",
    ),
    Mutant(
        id="pack-stored-length-not-checked",
        file=SOURCE,
        old="        if len(frame) != self.index.stored[index]:",
        new="        if False:",
        tests=TESTS,
        why="a truncated or replaced chunk file is decompressed as if whole",
    ),
    Mutant(
        id="pack-decompressed-length-not-checked",
        file=SOURCE,
        old="        if len(data) != end - start:",
        new="        if False:",
        tests=TESTS,
        why="a chunk of the wrong length is served (its digest check then decides alone)",
    ),
    Mutant(
        id="pack-index-checksum-not-checked",
        file=FORMAT,
        old="    if hashlib.sha256(body).digest() != checksum:",
        new="    if False:",
        tests=TESTS,
        why="a damaged index is served: wrong digests, wrong zero chunks",
    ),
    Mutant(
        id="pack-index-length-not-checked",
        file=FORMAT,
        old="    if len(body) != _HEADER.size + count * _ENTRY.size:",
        new="    if False:",
        tests=TESTS,
        why="a truncated index is read as far as it goes",
    ),
    Mutant(
        id="pack-zero-chunk-read-anyway",
        file=FORMAT,
        old="        return self.stored[index] == 0",
        new="        return False",
        tests=TESTS,
        why="zero chunks are looked for as files (there are none): zero pages fail",
    ),
    Mutant(
        id="pack-writer-zero-chunk-stored",
        file=WRITER,
        old="            if data == zero_chunk[: len(data)]:",
        new="            if False:",
        tests=TESTS,
        why="all-zero chunks are compressed, written and read like any other",
    ),
    Mutant(
        id="pack-writer-rewrites-existing-chunks",
        file=WRITER,
        old="                stored = os.stat(path).st_size",
        new="                raise FileNotFoundError",
        tests=TESTS,
        why="a second pack into the same DEST writes every chunk again",
    ),
    Mutant(
        id="pack-writer-ignores-layers",
        file=WRITER,
        old="    source = LayeredSnapshot(snapshot, *layers) if layers else Snapshot(snapshot)",
        new="    source = Snapshot(snapshot)",
        tests=TESTS,
        why="pack --layer packs the base alone: the guest gets the old image",
    ),
    Mutant(
        id="pack-writer-wrong-identity",
        file=WRITER,
        old="        identity = source.identity",
        new="        identity = bytes(32)",
        tests=TESTS,
        why="working sets recorded against the raw image never replay on its pack",
    ),
    Mutant(
        id="pack-zero-chunk-fetched-on-demand",
        file=COPY,
        old=(
            "        return zero is not None"
            " and all(zero(chunk) for chunk in self._chunks_of(index))"
        ),
        new="        return False",
        tests=TESTS,
        why="a fault in a zero chunk awaits a fetch and copies zeros instead of ZEROPAGE",
    ),
    Mutant(
        id="pack-zero-span-only-the-faulting-page",
        file=COPY,
        old="                resolver.zero_span(uffd, chunks[0] * self._chunk_size, hi)",
        new="                pass",
        tests=TESTS,
        why="every page of a zero chunk faults on its own",
    ),
    Mutant(
        id="pack-prefetched-zero-chunk-copied",
        file=COPY,
        old="            and self._zero_chunk(lo // self._chunk_size)",
        new="            and False",
        tests=TESTS,
        why="a prefetched zero chunk is copied as bytes, not mapped as zero pages",
    ),
    Mutant(
        id="pack-zero-span-off-by-one",
        file=COPY,
        old="        last = min(self._pages, (hi - self._offset) // size)",
        new="        last = min(self._pages, (hi - self._offset) // size - 1)",
        tests=TESTS,
        why="the last page of each zero chunk is left to fault",
    ),
    Mutant(
        id="pack-version-not-the-identity",
        file=SOURCE,
        old="        return self.index.identity",
        new="        return self.index.digests[0]",
        tests=TESTS,
        why="a pack's version is not the raw image's: working sets do not replay",
    ),
    Mutant(
        id="pack-recording-skips-zero-pages",
        file=COPY,
        old="            self._record(index)\n        if not was and self._populated[index]:",
        new="            pass\n        if not was and self._populated[index]:",
        tests=TESTS,
        why="a working set recorded on a pack misses the pages of its zero chunks",
    ),
]
