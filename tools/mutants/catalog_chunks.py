"""Mutants of uffd_async/_chunks.py (each catalog: one list named MUTANTS)."""

from mutant import Mutant

MUTANTS = [
    Mutant(
        id="chunks-lru-no-touch",
        file="uffd_async/_chunks.py",
        old="            self._cache.move_to_end(index)",
        new="            pass",
        tests=["tests/test_http_source.py"],
        why="a cache hit does not refresh the chunk: eviction is FIFO, not LRU",
    ),
]
