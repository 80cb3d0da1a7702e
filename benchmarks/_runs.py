"""Working sets as runs of pages at random places: what a booting process touches.

One generator for every scenario that needs a set (6, 7, 10) and for the guest-like
image's data (its 10% of non-zero pages are laid out the same way).
"""

from __future__ import annotations

import random

#: A run's longest length, in pages.
LONGEST_RUN = 64


def boot_set(pages: int, rng: random.Random, *, fraction: float) -> list[tuple[int, int]]:
    """Runs (first page, pages) covering about ``fraction`` of ``pages``, in touch order:
    1 to LONGEST_RUN pages each, at random places that no earlier run took."""
    taken = bytearray(pages)
    runs: list[tuple[int, int]] = []
    have, want = 0, int(pages * fraction)
    while have < want:
        length = rng.randint(1, LONGEST_RUN)
        first = rng.randrange(pages - length + 1)
        if any(taken[first : first + length]):
            continue
        taken[first : first + length] = b"\1" * length
        runs.append((first, length))
        have += length
    return runs
