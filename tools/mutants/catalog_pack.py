"""Mutants of packs: the format (_pack_format.py), the writer (_pack_writer.py), PackSource
(_pack_source.py), where a pack is kept (_pack_store.py: a directory or an object-store
prefix), its host cache by digest, the command line's pack paths, and the zero-chunk path
of ChunkedCopy (each catalog: one list named MUTANTS)."""

from mutant import Mutant

FORMAT = "uffd_async/_remote/_pack_format.py"
WRITER = "uffd_async/_remote/_pack_writer.py"
SOURCE = "uffd_async/_remote/_pack_source.py"
COPY = "uffd_async/_remote/_chunked_copy.py"
STORE = "uffd_async/_remote/_pack_store.py"
OPEN = "uffd_async/_remote/_open_source.py"
MAIN = "uffd_async/__main__.py"
TESTS = ["tests/test_pack.py"]
STORE_TESTS = ["tests/test_pack_store.py"]

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
        old="                known: int | Future[int] | None = have.get(key, started.get(key))",
        new="                known: int | Future[int] | None = started.get(key)",
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
    Mutant(
        id="pack-store-create-overwrites",
        file=STORE,
        old=(
            "                obstore.put(store, self.prefix + name,"
            ' data, mode="create", use_multipart=False)'
        ),
        new="                obstore.put(store, self.prefix + name, data, use_multipart=False)",
        tests=STORE_TESTS,
        why="a chunk another writer put there meanwhile is uploaded again, over it",
    ),
    Mutant(
        id="pack-store-listing-ignored",
        file=WRITER,
        old='        have = self.store.sizes(CHUNK_DIR + "/")',
        new="        have: dict[str, int] = {}",
        tests=STORE_TESTS,
        why="a second snapshot into the same prefix uploads every chunk again",
    ),
    Mutant(
        id="pack-store-missing-not-typed",
        file=STORE,
        old='        if failure.kind == "missing":',
        new="        if False:",
        tests=STORE_TESTS,
        why="a missing object is an I/O error like any other, not FileNotFoundError",
    ),
    Mutant(
        id="pack-store-transient-not-retried",
        file=STORE,
        old='            if failure.kind != "transient" or tries >= self.retries:',
        new="            if True:",
        tests=STORE_TESTS,
        why="one dropped connection to the store fails the chunk (or the pack) at once",
    ),
    Mutant(
        id="pack-host-cache-keeps-unchecked",
        file=SOURCE,
        old='            fresh.append(await self._in_thread(self._unpack, index, frame, ""))',
        new="            pass",
        tests=STORE_TESTS,
        why="a damaged chunk is kept in the host cache before its check: every process gets it",
    ),
    Mutant(
        id="pack-host-cache-keyed-by-pack",
        file=SOURCE,
        old=(
            '        key = ChunkKey(object=f"sha256:{digest.hex()}",'
            ' version="zstd", chunk_size=stored, index=0)'
        ),
        new=(
            "        key = ChunkKey(object=self.path,"
            ' version="zstd", chunk_size=stored, index=index)'
        ),
        tests=STORE_TESTS,
        why="two packs that share chunks fetch each of them once per pack, not once per host",
    ),
    Mutant(
        id="pack-host-bad-entry-kept",
        file=SOURCE,
        old="        await self._in_thread(self.host_cache.put, key, frame)",
        new="        pass",
        tests=STORE_TESTS,
        why="a cache entry that fails the digest stays: every process reads the pack again",
    ),
    Mutant(
        id="pack-host-hit-not-checked",
        file=SOURCE,
        old=(
            "            return await self._in_thread(self._unpack,"
            ' index, kept, "the host cache\'s copy ")'
        ),
        new="            return bytes(kept)",
        tests=STORE_TESTS,
        why="a cache hit goes into the guest as the compressed frame, unchecked",
    ),
    Mutant(
        id="pack-url-served-as-raw-object",
        file=OPEN,
        old="        if is_pack_url(path):",
        new="        if False:",
        tests=STORE_TESTS,
        why="serve s3://.../NAME.index copies the index's bytes into the guest",
    ),
    Mutant(
        id="pack-cli-store-options-dropped",
        file=MAIN,
        old="            level=args.level, name=args.name, options=dict(args.store_option or ()),",
        new="            level=args.level, name=args.name,",
        tests=STORE_TESTS,
        why="pack --store-option is ignored: the credentials or endpoint given are not used",
    ),
    Mutant(
        id="pack-cli-cache-dir-refused-for-packs",
        file=MAIN,
        old="        pack = is_pack_index(args.snapshot)",
        new="        pack = False",
        tests=STORE_TESTS,
        why="serve INDEX --cache-dir is a usage error for a local pack",
    ),
    Mutant(
        id="pack-show-counts-itself",
        file=WRITER,
        old=(
            "        neighbours = [other for other in"
            ' store.sizes("", INDEX_SUFFIX) if other != name]'
        ),
        new='        neighbours = list(store.sizes("", INDEX_SUFFIX))',
        tests=TESTS,
        why="pack show says every chunk is shared with another index (its own)",
    ),
    Mutant(
        id="pack-read-waits-out-an-outage",
        file=SOURCE,
        old="        parts = [await self.chunk(n, outage=False) for n in range(first, last + 1)]",
        new="        parts = [await self.chunk(n) for n in range(first, last + 1)]",
        tests=TESTS,
        timeout=400.0,
        why="read() of a missing chunk waits the fault deadline (5 min), not failing",
    ),
    Mutant(
        id="pack-mappings-not-together",
        file=COPY,
        old="        copier._together = chunked",
        new="        copier._together = [copier]",
        tests=["tests/test_pack.py::test_mappings_that_split_a_chunk_are_filled_together"],
        why="a chunk fetched for one mapping leaves the other mapping's part of it to fault",
    ),
]
