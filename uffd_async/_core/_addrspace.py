"""Where the pages a resolver serves live now: remaps, removals and unmaps, without I/O.

Kernel facts this module relies on (admin-guide/mm/userfaultfd, "non-cooperative"):

* ``Remap(from, to, len)``: mremap() moved ``len`` bytes; the registration
  moved with them, so later faults for those pages arrive at the new address
  and must be served the same contents as before.
* ``Remove(start, end)``: MADV_DONTNEED/MADV_REMOVE dropped the pages; the
  next access faults as missing again, and the right contents are then
  zeros (a balloon, or the program discarding data), not the source's bytes.
* ``Unmap(start, end)``: the pages are gone; nothing will fault there again
  unless something is mapped and registered anew.

Addresses come in two spaces: *current* (where the pages are mapped now, what
faults report) and *original* (where they were when the resolver was made,
what the source's offsets are relative to).
"""

from __future__ import annotations

import bisect

from ._events import Remap, Remove, Unmap


class IntervalSet:
    """Disjoint, merged half-open intervals."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        i = bisect.bisect_left(self._ends, start)
        j = bisect.bisect_right(self._starts, end)
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def __contains__(self, point: int) -> bool:
        i = bisect.bisect_right(self._starts, point) - 1
        return i >= 0 and point < self._ends[i]

    def next_boundary(self, point: int) -> int | None:
        """The first interval start after ``point``, if any (for bounding a run of pages)."""
        i = bisect.bisect_right(self._starts, point)
        return self._starts[i] if i < len(self._starts) else None

    def intervals(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def copy(self) -> IntervalSet:
        other = IntervalSet()
        other._starts = list(self._starts)
        other._ends = list(self._ends)
        return other


class AddressMap:
    """Translates current addresses to original ones and remembers removed ranges."""

    def __init__(self, base: int, length: int) -> None:
        # (current_start, current_end, original_start), sorted by current_start.
        self._segments: list[tuple[int, int, int]] = [(base, base + length, base)]
        self.removed = IntervalSet()  # in original addresses

    def copy(self) -> AddressMap:
        other = AddressMap(0, 0)
        other._segments = list(self._segments)
        other.removed = self.removed.copy()
        return other

    def _find(self, address: int) -> tuple[int, int, int] | None:
        i = bisect.bisect_right(self._segments, (address, float("inf"), 0)) - 1
        if i >= 0:
            segment = self._segments[i]
            if segment[0] <= address < segment[1]:
                return segment
        return None

    def original(self, address: int) -> int | None:
        """The original address of ``address``, or None where nothing is served."""
        segment = self._find(address)
        if segment is None:
            return None
        return segment[2] + (address - segment[0])

    def pieces(self) -> list[tuple[int, int, int]]:
        """(current start, current end, original start) of each range still served, sorted."""
        return list(self._segments)

    def segments(self) -> list[tuple[int, int]]:
        """The current ranges still served, sorted (for routing faults among several maps)."""
        return [(start, end) for start, end, _ in self._segments]

    def run_end(self, address: int) -> int:
        """Where the contiguous segment holding ``address`` ends (current space)."""
        segment = self._find(address)
        return segment[1] if segment else address

    def _cut(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """Remove [start, end) from the map; return the pieces that were there."""
        kept: list[tuple[int, int, int]] = []
        taken: list[tuple[int, int, int]] = []
        for seg_start, seg_end, orig in self._segments:
            if seg_end <= start or seg_start >= end:
                kept.append((seg_start, seg_end, orig))
                continue
            if seg_start < start:
                kept.append((seg_start, start, orig))
            if seg_end > end:
                kept.append((end, seg_end, orig + (end - seg_start)))
            lo, hi = max(seg_start, start), min(seg_end, end)
            taken.append((lo, hi, orig + (lo - seg_start)))
        self._segments = sorted(kept)
        return taken

    def apply(self, event: Remap | Remove | Unmap) -> list[tuple[int, int]]:
        """Apply a non-cooperative event; returns the original ranges it removed."""
        if isinstance(event, Remap):
            moved = self._cut(event.from_address, event.from_address + event.length)
            self._cut(event.to_address, event.to_address + event.length)
            delta = event.to_address - event.from_address
            self._segments = sorted(
                self._segments + [(s + delta, e + delta, o) for s, e, o in moved]
            )
            return []
        if isinstance(event, Unmap):
            self._cut(event.start, event.end)
            return []
        removed = []
        for seg_start, seg_end, orig in self._segments:
            lo, hi = max(seg_start, event.start), min(seg_end, event.end)
            if lo < hi:
                removed.append((orig + (lo - seg_start), orig + (hi - seg_start)))
                self.removed.add(*removed[-1])
        return removed
