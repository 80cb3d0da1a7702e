"""What a fault server counts: faults, resolutions, pages, and how long resolving took.

Read by users while serving, summed by the handoff server over connections and
fork children, and exported as Prometheus metrics (see ``_metrics``). Counting
is on the hot path, so it is a few integer operations per resolution: latency
samples go to a bounded ring (for percentiles) and to a histogram of
power-of-two buckets (the bucket is the sample's bit length: no search).
"""

from __future__ import annotations

from array import array

import attrs

from .._core._checks import check_percentile

__all__ = ["LatencyHistogram", "ServerStats"]

_LATENCY_SAMPLES = 4096
#: The histogram's first bucket ends at 2**13 ns (8.2 us), each next one at twice that,
#: the last finite one at 2**30 ns (1.07 s); one more bucket holds the rest.
_FIRST_BIT, _LAST_BIT = 13, 30


class LatencyHistogram:
    """Resolution latencies in power-of-two buckets, counted since the server started."""

    __slots__ = ("counts", "total_ns")

    def __init__(self) -> None:
        self.counts = array("q", bytes(8 * (_LAST_BIT - _FIRST_BIT + 2)))
        self.total_ns = 0

    def add(self, nanoseconds: int) -> None:
        bucket = nanoseconds.bit_length() - _FIRST_BIT
        self.counts[0 if bucket < 0 else min(bucket, _LAST_BIT - _FIRST_BIT + 1)] += 1
        self.total_ns += nanoseconds

    def merge(self, other: LatencyHistogram) -> None:
        for i, count in enumerate(other.counts):
            self.counts[i] += count
        self.total_ns += other.total_ns

    @staticmethod
    def bounds() -> tuple[float, ...]:
        """Each finite bucket's upper bound, in seconds (the last bucket is +Inf)."""
        return tuple(2**bit / 1e9 for bit in range(_FIRST_BIT, _LAST_BIT + 1))


_COUNTERS = (
    "faults", "resolved", "pages", "coalesced", "eexist", "retries", "errors", "events",
    "forks", "in_flight",
)  # fmt: skip


@attrs.define(kw_only=True)
class ServerStats:
    """Counters of one server; read them while it runs or after."""

    #: Page fault events read.
    faults: int = 0
    #: Faults resolved by a resolver.
    resolved: int = 0
    #: Base pages (``PAGE_SIZE`` bytes) mapped in to resolve them: copied, zeroed or
    #: continued, readahead included (a 2 MiB huge page counts 512).
    pages: int = 0
    #: Faults folded into a resolution already under way for the same page.
    coalesced: int = 0
    #: Resolutions that found the page already there (EEXIST) and woke it.
    eexist: int = 0
    #: Resolutions retried after EAGAIN (a non-cooperative event was unread).
    retries: int = 0
    #: Resolver errors.
    errors: int = 0
    #: Remove/Remap/Unmap events applied, and Fork children served.
    events: int = 0
    forks: int = 0
    #: Resolutions running right now (async ones; inline ones never overlap).
    in_flight: int = 0
    #: The stats of each fork child served (``EVENT_FORK``), in fork order.
    children: list[ServerStats] = attrs.field(factory=list, repr=False)
    _latencies: array[int] = attrs.field(factory=lambda: array("q"), repr=False)
    _next: int = attrs.field(default=0, repr=False)
    _histogram: LatencyHistogram = attrs.field(factory=LatencyHistogram, repr=False, eq=False)

    def _record(self, nanoseconds: int) -> None:
        self._histogram.add(nanoseconds)
        samples = self._latencies
        if len(samples) < _LATENCY_SAMPLES:
            samples.append(nanoseconds)
        else:
            samples[self._next] = nanoseconds
            self._next = (self._next + 1) % _LATENCY_SAMPLES

    def latency_us(self, percentile: float) -> float:
        """Resolution latency (fault read to resolved) at ``percentile``, over recent faults."""
        check_percentile("percentile", percentile)
        samples = sorted(self._latencies)
        if not samples:
            return 0.0
        index = min(len(samples) - 1, round(percentile / 100 * (len(samples) - 1)))
        return samples[index] / 1000

    def latency_histogram(self) -> LatencyHistogram:
        """Every resolution's latency so far, fork descendants' included, in buckets."""
        total = LatencyHistogram()
        total.merge(self._histogram)
        for child in self.children:
            total.merge(child.latency_histogram())
        return total

    def with_children(self) -> ServerStats:
        """A copy whose counters also count every fork descendant's (latencies are this one's)."""
        total = attrs.evolve(self, children=[])
        for child in self.children:
            summed = child.with_children()
            for name in _COUNTERS:
                setattr(total, name, getattr(total, name) + getattr(summed, name))
        return total

    def as_dict(self) -> dict[str, float]:
        counters = {name: getattr(self, name) for name in _COUNTERS}
        for p in (50, 90, 99, 100):
            counters[f"latency_p{p}_us"] = self.latency_us(p)
        return counters
