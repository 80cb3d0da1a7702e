"""Prometheus metrics of a handoff server (``python -m uffd_async serve --metrics HOST:PORT``).

Built on prometheus-client (the ``metrics`` extra). Facts this relies on:

* The server's counters live in the event loop's thread, which alone may walk
  them (its dicts change size as handoffs come and go). So the loop copies
  them into a frozen sample every ``interval`` seconds, and the exporter's HTTP
  thread (prometheus-client's ``start_http_server``) only ever reads the latest
  sample: a scrape never touches live state, and costs the loop nothing.
* Counters only grow: a handoff that ends has its counts folded into the
  server's totals (see ``HandoffServer.stats``), and so does its latency
  histogram, so Prometheus sees no resets while the process lives. What is
  true of the moment (active handoffs, their populated and mapped pages) is
  a gauge; every figure of one sample is read at one instant of the loop, so
  they add up: ``prefetched_pages`` <= ``pages_mapped``, and
  ``populated_ratio`` is ``populated_pages / mapped_pages`` (0 with none).
* The latency histogram is the fault-read-to-resolved time of every
  resolution (or C batch), in fixed buckets counted as they happen.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import anyio
import attrs
from anyio.abc import TaskStatus

if TYPE_CHECKING:
    from .._remote._chunked_source import FetchStats as HttpStats
    from ._server import HandoffServer, HandoffStats

__all__ = ["MetricsExporter", "parse_address"]


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for IPv6; ``:9100`` for every address)."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:9100")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


@attrs.frozen
class _Sample:
    handoff: HandoffStats
    http: HttpStats | None
    #: (upper bound in seconds, cumulative count) per bucket, +Inf last; sum of seconds.
    buckets: tuple[tuple[float, int], ...]
    latency_sum: float


class MetricsExporter:
    """Serves ``server``'s metrics on ``host:port`` while :meth:`run` runs."""

    def __init__(
        self, server: HandoffServer, host: str, port: int, *, interval: float = 1.0
    ) -> None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise ImportError(
                "--metrics needs prometheus-client: pip install 'uffd_async[metrics]'"
            ) from None
        self._server = server
        self.host = host
        self.port = port
        self._interval = interval
        self._sample: _Sample | None = None
        self._lock = threading.Lock()

    async def run(self, *, task_status: TaskStatus[MetricsExporter] = anyio.TASK_STATUS_IGNORED
                  ) -> None:  # fmt: skip
        """Listen (an OSError if the address cannot be bound), then refresh the sample every
        ``interval`` seconds until cancelled; the listener is closed on the way out."""
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        self._refresh()
        httpd, thread = start_http_server(self.port, addr=self.host, registry=registry)
        try:
            self.port = httpd.server_address[1]
            task_status.started(self)
            while True:
                await anyio.sleep(self._interval)
                self._refresh()
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join(5)

    def _refresh(self) -> None:
        server = self._server
        bounds, counts, total = server.latency_histogram()
        cumulative, running = [], 0
        for bound, count in zip((*bounds, float("inf")), counts, strict=True):
            running += count
            cumulative.append((bound, running))
        http = server.http_stats
        sample = _Sample(
            handoff=server.stats,
            http=None if http is None else attrs.evolve(http),
            buckets=tuple(cumulative),
            latency_sum=total,
        )
        with self._lock:
            self._sample = sample

    def collect(self) -> Iterator[Any]:
        """prometheus-client's collector protocol: the latest sample as metric families."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        with self._lock:
            sample = self._sample
        if sample is None:
            return
        stats = sample.handoff

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"uffd_async_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"uffd_async_{name}", doc, value=value)

        yield counter("faults", "Page faults read, over every handoff.", stats.faults)
        yield counter("resolutions", "Faults resolved.", stats.resolved)
        yield counter("errors", "Resolutions that failed (on_error applied).", stats.errors)
        yield counter("pages_mapped", "Base pages mapped in (copied, zeroed).", stats.pages)
        yield counter("prefetched_pages", "Base pages copied in ahead of faults.",
                      stats.prefetched)  # fmt: skip
        yield counter("replay_answered_faults", "Demand faults a native working-set replay "
                      "answered itself (not in faults_total).",
                      stats.faults_answered)  # fmt: skip
        yield counter("events", "Remap, remove and unmap events applied.", stats.events)
        yield counter("forks", "Fork children served.", stats.forks)
        yield counter("connections", "Connections accepted.", stats.connections)
        handoffs = CounterMetricFamily(
            "uffd_async_handoffs", "Handoffs, by outcome.", labels=["outcome"]
        )
        handoffs.add_metric(["served"], stats.served)
        handoffs.add_metric(["refused"], stats.refused)
        handoffs.add_metric(["failed"], stats.failed)
        yield handoffs
        yield counter("refused_over_limit", "Peers refused because max_peers were being served "
                      "(also in handoffs{outcome=refused}).", stats.over_limit)  # fmt: skip
        yield gauge("active_handoffs", "Handoffs being served now.", stats.active)
        yield gauge("draining", "1 while draining: no new peer accepted, the connected "
                    "ones served until they exit.", int(stats.draining))  # fmt: skip
        yield gauge("populated_ratio", "populated_pages / mapped_pages (0 with none active).",
                    stats.populated)  # fmt: skip
        yield gauge("populated_pages", "Base pages populated now in the active handoffs' "
                    "mappings (prefetched or faulted in, not removed since).",
                    stats.populated_pages)  # fmt: skip
        yield gauge("mapped_pages", "Base pages the active handoffs' mappings hold.",
                    stats.mapped_pages)  # fmt: skip
        yield counter("resident_handoffs", "Handoffs made fully resident (populate).",
                      stats.resident)  # fmt: skip
        yield HistogramMetricFamily(
            "uffd_async_resolution_seconds",
            "Fault read to resolved (per resolution, or per batch of the C loop).",
            buckets=[(_bound(b), c) for b, c in sample.buckets],
            sum_value=sample.latency_sum,
        )
        http = sample.http
        if http is None:
            return
        yield counter("http_requests", "HTTP requests sent (retries included).", http.requests)
        yield counter("http_received_bytes", "Body bytes received.", http.bytes)
        yield counter("http_retries", "Requests retried.", http.retries)
        yield counter("http_chunks_fetched", "Chunks fetched.", http.chunks)
        yield counter("http_cache_hits", "Chunks found in the cache.", http.cache_hits)
        yield counter("http_joined_fetches", "Fetches joined by another fault.", http.joined)
        yield counter("http_failed_fetches", "Fetches that failed for good.", http.failed)
        yield gauge("http_in_flight", "Requests under way.", http.in_flight)
        yield gauge("http_queued", "Fetches waiting for a connection.", http.queued)
        yield gauge("source_faults_waiting", "Faults waiting now on a source that is failing.",
                    http.faults_waiting)  # fmt: skip
        yield counter("source_faults_waited", "Faults that waited on a failing source.",
                      http.faults_waited)  # fmt: skip
        yield counter("source_outages", "Times the source began failing (after the retries).",
                      http.outages)  # fmt: skip
        yield counter("source_outage_seconds", "Seconds the source has been failing, in all.",
                      http.outage_seconds)  # fmt: skip
        yield counter("source_deadline_failures", "Faults poisoned because the source was "
                      "still failing at --source-deadline.", http.deadline_failures)  # fmt: skip


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
