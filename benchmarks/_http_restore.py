"""Scenario 7: restore from object storage. How soon is a process restored from HTTP ready?

The snapshot (256 MiB, each page a distinct pattern) is an object on a real
HTTP server on loopback (``tests/_http_server.py``: uvicorn and Starlette in
a process of its own), with 2 ms added to every response. The restored
process is scenario 6's (``benchmarks/c/restore_peer.c``): it maps the memory,
registers it MISSING, hands its uffd over as Firecracker 1.12 does, touches a
workload and checks every page it read against the snapshot. Workloads:

* (a) 16 threads touch a boot-like working set: 10% of the pages in runs of 1
  to 64 pages at random (seeded) places, the runs dealt round-robin to the
  threads, each thread reading its runs in order;
* (b) one thread reads every page in order.

Runners (each a ``serve_handoffs`` the process hands its uffd to):

* ``HttpSource`` lazy: ``serve_handoffs(path, ua.HttpSource(url, chunk_size=C))``:
  a fault awaits its chunk (single flight), which fills every missing page of
  it;
* ``HttpSource`` + ``prefetch=``: the same, with a working set recorded once
  per chunk size (``record=``, a lazy run of (a)) replayed: its chunks are
  fetched ahead, demand faults first;
* per-page fetch (scenario 3's way): ``copy_from`` with an async callable that
  sends one ranged GET per page (``HttpSource.read``, no chunking, the same
  pool of 16 connections). At ~4 ms a request it would need minutes for
  every page, so it runs on a prefix of each workload (the first runs of (a),
  the first pages of (b)), once per backend, and its time, faults and
  requests are scaled to the whole workload (labelled as such);
* download-then-serve: the whole object streamed with httpx into a file in
  /dev/shm, then served lazily from it (``ua.Snapshot``); its time is the
  download plus the process's run.

Times are the process's own clock from the handshake sent to its last page
read (plus the download, for download-then-serve); the HTTP source is opened
(one request, and 64 more for the identity a working set is checked against)
before the process starts, as a handler is started before a restore. Faults
are the demand faults the server read; requests (and bytes) are what the HTTP
server itself counted in the run, opening included. Chunk sizes of 256 KiB,
1, 2 and 4 MiB are measured for both HttpSource runners on asyncio and trio
(asyncio on uvloop, where the library offers it, runs the default only); the
summary table shows the default's. Each round runs every runner on (a) and
(b), on every backend; the tables show medians.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from subprocess import PIPE
from typing import TYPE_CHECKING, Any, Literal

import anyio
import attrs
from anyio.abc import Process

import uffd_async as ua
from uffd_async._core._loops import choose_backend, uvloop_available
from uffd_async._remote._http_source import DEFAULT_CHUNK_SIZE

from ._restore import (
    RestoreFailed,
    _result,
    _write_runs,
    _write_snapshot,
    handoff_over,
    page_order,
    peer_program,
)
from ._runs import boot_set

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:  # imported when measuring: the server's controller lives with the tests
    from tests._support import HttpObjectServer

PAGES = 65536  # 256 MiB of 4 KiB pages
QUICK_PAGES = 2048  # 8 MiB
FRACTION = 0.1  # of the pages in (a)'s working set
SEED = 7
THREADS = 16  # (a)'s threads
DELAY_MS = 2.0  # added by the server to every response
CHUNK_SIZES = (256 << 10, 1 << 20, 2 << 20, 4 << 20)
#: Where the other chunk sizes are measured too (uvloop, if at all, runs the default only).
SWEEP_BACKENDS = ("asyncio", "trio")
#: "uvloop": asyncio on uvloop (where installed), named as the other scenarios name it.
BACKENDS = ("asyncio", "trio", "uvloop")
CONCURRENCY = 16  # HttpSource's default
#: The per-page runner's share of each workload: (a)'s first runs (full size: a multiple
#: of THREADS, so every thread has as many), (b)'s first pages.
PER_PAGE_RUNS = 32
PER_PAGE_PAGES = 512
QUICK_PER_PAGE_RUNS = 2
QUICK_PER_PAGE_PAGES = 16
OBJECT = "snapshot.mem"

Workload = Literal["a", "b"]
WORKLOADS: dict[Workload, str] = {
    "a": "(a) 16 threads, boot set",
    "b": "(b) 1 thread, all in order",
}
RunnerKind = Literal["lazy", "prefetch", "per_page", "download"]
LABELS: dict[RunnerKind, str] = {
    "lazy": "HttpSource lazy",
    "prefetch": "HttpSource + prefetch=",
    "per_page": "per-page fetch",
    "download": "download, then serve",
}


def _kib(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def backends(*, quick: bool = False) -> tuple[str, ...]:
    """asyncio and trio, and (but ``quick``) asyncio on uvloop when uvloop is installed."""
    return ("asyncio", "trio") if quick or not uvloop_available() else BACKENDS


def _anyio_run(function: Callable[..., Any], *args: Any, backend: str) -> Any:
    name, options = choose_backend("asyncio+uvloop" if backend == "uvloop" else backend)
    return anyio.run(function, *args, backend=name, backend_options=options)


@attrs.frozen(kw_only=True)
class Runner:
    """One way of serving the restored process from the object."""

    kind: RunnerKind
    chunk_size: int = 0  # HttpSource runners

    @property
    def key(self) -> str:
        return f"{self.kind}@{_kib(self.chunk_size)}" if self.chunk_size else self.kind

    @property
    def label(self) -> str:
        label = LABELS[self.kind]
        return f"{label}, {_kib(self.chunk_size)} chunks" if self.chunk_size else label


def runners(chunk_sizes: tuple[int, ...]) -> tuple[Runner, ...]:
    return (
        *(Runner(kind="lazy", chunk_size=size) for size in chunk_sizes),
        *(Runner(kind="prefetch", chunk_size=size) for size in chunk_sizes),
        Runner(kind="per_page"),
        Runner(kind="download"),
    )


# -- one run ------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Sample:
    """What one restored process measured, and what its servers counted."""

    ready_ns: int  # handshake sent -> last page read (the peer's clock)
    first_ns: int  # handshake sent -> first page read
    download_ns: int  # download-then-serve: the download (and opening the file); else 0
    pages: int  # pages the process read
    faults: int  # demand faults the handoff server read
    requests: int  # object requests the HTTP server saw in the run, opening included
    open_requests: int  # ... of which before the process started (opening the source)
    bytes_sent: int  # body bytes the HTTP server sent
    prefetched: int  # pages copied ahead of the faults
    scale: float = 1.0  # per-page: the whole workload's pages / the pages measured

    @property
    def done_ns(self) -> float:
        """Time to done for the whole workload (scaled, for the per-page runner)."""
        return (self.ready_ns + self.download_ns) * self.scale


@attrs.frozen(kw_only=True)
class Setup:
    """What every run of one invocation shares."""

    directory: Path
    http: HttpObjectServer
    url: str
    snapshot_path: Path
    pages: int
    #: "a", "b" and the per-page runner's prefixes of them, "a-part" and "b-part":
    #: (the set file, the threads reading it, its pages).
    sets: dict[str, tuple[Path, int, int]]
    timeout: float
    serial: list[int] = attrs.field(factory=lambda: [0])

    def socket_path(self) -> Path:
        self.serial[0] += 1
        return self.directory / f"s{self.serial[0]}.sock"

    def server_stats(self) -> dict[str, Any]:
        return self.http.stats(log=False)

    def fresh_server(self) -> None:
        """Counters to zero (``reset`` also clears the delay, so it is set again)."""
        self.http.reset()
        self.http.delay(DELAY_MS)


@contextlib.asynccontextmanager
async def _peer(setup: Setup, path: Path, which: str) -> AsyncIterator[Process]:
    set_path, threads, _ = setup.sets[which]
    command = [
        str(peer_program()),
        str(path),
        str(setup.snapshot_path),
        str(set_path),
        str(setup.pages),
        "0",
        str(threads),
    ]
    async with await anyio.open_process(command, stdin=PIPE, stdout=PIPE, stderr=PIPE) as process:
        yield process


async def _serve_one(
    setup: Setup,
    source: ua.HttpSource | ua.Snapshot | Callable[[ua.Handoff], ua.resolvers.CopyFrom],
    which: str,
    *,
    record: Path | None = None,
    prefetch: ua.WorkingSet | None = None,
) -> tuple[int, int, ua.HandoffStats, dict[str, Any]]:
    """``serve_handoffs`` serves one process; (ready_ns, first_ns, its stats, the HTTP
    server's stats from before the process started)."""
    path = setup.socket_path()
    serving = functools.partial(ua.serve_handoffs, path, source, record=record, prefetch=prefetch)
    async with anyio.create_task_group() as tg:
        server: ua.HandoffServer = await tg.start(serving)
        before = setup.server_stats()  # the source is open: what opening it took
        async with _peer(setup, path, which) as process:
            ready, first = await _result(process)
        stats = await handoff_over(server)
        tg.cancel_scope.cancel()
    return ready, first, stats, before


def _sample(
    ready: int,
    first: int,
    stats: ua.HandoffStats,
    before: dict[str, Any],
    after: dict[str, Any],
    *,
    pages: int,
    download_ns: int = 0,
    scale: float = 1.0,
) -> Sample:
    return Sample(
        ready_ns=ready,
        first_ns=first,
        download_ns=download_ns,
        pages=pages,
        faults=stats.faults,
        requests=after["requests"],
        open_requests=before["requests"],
        bytes_sent=after["bytes_sent"],
        prefetched=stats.prefetched,
        scale=scale,
    )


def _pages_of(setup: Setup, which: str) -> int:
    return setup.sets[which][2]


async def _http_source(
    setup: Setup, runner: Runner, workload: Workload, working_set: ua.WorkingSet | None
) -> Sample:
    setup.fresh_server()
    async with ua.HttpSource(setup.url, chunk_size=runner.chunk_size) as source:
        ready, first, stats, before = await _serve_one(
            setup, source, workload, prefetch=working_set if runner.kind == "prefetch" else None
        )
    return _sample(
        ready, first, stats, before, setup.server_stats(), pages=_pages_of(setup, workload)
    )


async def _per_page(setup: Setup, workload: Workload) -> Sample:
    """One ranged GET per faulting page, on a prefix of the workload, scaled to all of it."""
    setup.fresh_server()
    part = f"{workload}-part"
    async with ua.HttpSource(setup.url, concurrency=CONCURRENCY) as source:

        def factory(handoff: ua.Handoff) -> ua.resolvers.CopyFrom:
            if len(handoff.mappings) != 1:
                raise ua.HandoffError("the benchmark's process maps one region")
            mapping = handoff.mappings[0]

            async def fetch(offset: int, length: int) -> bytes:
                return await source.read(mapping.offset + offset, length)

            return ua.copy_from(fetch, base=mapping.base_host_virt_addr, size=mapping.size)

        ready, first, stats, before = await _serve_one(setup, factory, part)
    measured = _pages_of(setup, part)
    return _sample(
        ready,
        first,
        stats,
        before,
        setup.server_stats(),
        pages=measured,
        scale=_pages_of(setup, workload) / measured,
    )


async def _download(url: str, destination: Path) -> None:
    """The whole object, streamed into ``destination``."""
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as client:
        headers = {"Accept-Encoding": "identity"}
        async with client.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                raise RestoreFailed(f"downloading {url}: HTTP {response.status_code}")
            with open(destination, "wb") as file:
                async for piece in response.aiter_raw():
                    file.write(piece)


async def _download_then_serve(setup: Setup, workload: Workload) -> Sample:
    setup.fresh_server()
    destination = setup.directory / "downloads" / "snapshot.mem"
    destination.parent.mkdir(exist_ok=True)
    try:
        began = time.monotonic_ns()
        await _download(setup.url, destination)
        with ua.Snapshot(destination) as snapshot:
            download_ns = time.monotonic_ns() - began
            if snapshot.size != setup.pages * ua.PAGE_SIZE:
                raise RestoreFailed(f"downloaded {snapshot.size} bytes, not {setup.pages} pages")
            ready, first, stats, before = await _serve_one(setup, snapshot, workload)
    finally:
        destination.unlink(missing_ok=True)
    return _sample(
        ready,
        first,
        stats,
        before,
        setup.server_stats(),
        pages=_pages_of(setup, workload),
        download_ns=download_ns,
    )


async def run_once(
    setup: Setup,
    runner: Runner,
    workload: Workload,
    sets: dict[int, ua.WorkingSet],
) -> Sample:
    with anyio.fail_after(setup.timeout):
        if runner.kind == "per_page":
            return await _per_page(setup, workload)
        if runner.kind == "download":
            return await _download_then_serve(setup, workload)
        return await _http_source(setup, runner, workload, sets.get(runner.chunk_size))


async def _record(setup: Setup, chunk_size: int, path: Path) -> Sample:
    """A lazy run of (a) under ``record=``: the working set for ``chunk_size``."""
    with anyio.fail_after(setup.timeout):
        setup.fresh_server()
        async with ua.HttpSource(setup.url, chunk_size=chunk_size) as source:
            ready, first, stats, before = await _serve_one(setup, source, "a", record=path)
        return _sample(ready, first, stats, before, setup.server_stats(), pages=0)


async def _rounds(
    setup: Setup, chosen: tuple[Runner, ...], sets: dict[int, ua.WorkingSet], rounds: int
) -> dict[tuple[str, str], list[Sample]]:
    samples: dict[tuple[str, str], list[Sample]] = {}
    for round_ in range(rounds):
        for workload in WORKLOADS:
            for runner in chosen:
                if runner.kind == "per_page" and round_:
                    continue  # once per backend: see the module's docstring
                sample = await run_once(setup, runner, workload, sets)
                samples.setdefault((workload, runner.key), []).append(sample)
    return samples


# -- the scenario ---------------------------------------------------------------


def _run(function: Callable[..., Any], *args: Any, backend: str, scenario: str = "7") -> Any:
    """``anyio.run`` on ``backend``, a failure inside task groups raised as one RestoreFailed."""
    try:
        return _anyio_run(function, *args, backend=backend)
    except Exception as exc:
        leaf: BaseException = exc
        while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
            leaf = leaf.exceptions[0]
        if isinstance(leaf, RestoreFailed):
            raise leaf from None
        raise RestoreFailed(f"scenario {scenario} on {backend}: {leaf!r}") from exc


def _chunks(pages: list[int], chunk_size: int) -> set[int]:
    return {page * ua.PAGE_SIZE // chunk_size for page in pages}


def measure(*, quick: bool, rounds: int, timeout: float) -> dict[str, Any]:
    """Record a working set per chunk size, then every runner on (a) and (b), on every
    backend, ``rounds`` times (the per-page runner once per backend)."""
    missing = [
        name for name in ("httpx", "starlette", "uvicorn") if not importlib.util.find_spec(name)
    ]
    if missing:
        raise RestoreFailed(
            f"scenario 7 needs {', '.join(missing)} (the HTTP client and the loopback server): "
            "pip install -e '.[test]'"
        )
    from tests._support import start_http_server

    pages = QUICK_PAGES if quick else PAGES
    chunk_sizes = (DEFAULT_CHUNK_SIZE,) if quick else CHUNK_SIZES
    if DEFAULT_CHUNK_SIZE not in chunk_sizes:
        chunk_sizes = (*chunk_sizes, DEFAULT_CHUNK_SIZE)
    runs_a = boot_set(pages, random.Random(SEED), fraction=FRACTION)
    order_a = page_order(runs_a)
    part_runs = runs_a[: QUICK_PER_PAGE_RUNS if quick else PER_PAGE_RUNS]
    part_a = sum(length for _, length in part_runs)
    part_b = min(pages, QUICK_PER_PAGE_PAGES if quick else PER_PAGE_PAGES)
    chosen = runners(chunk_sizes)
    found = backends(quick=quick)
    peer_program()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="uffd-bench-http-", dir=shm) as where:
        directory = Path(where)
        objects = directory / "objects"
        objects.mkdir()
        snapshot_path = objects / OBJECT
        _write_snapshot(snapshot_path, pages)
        _write_runs(directory / "a.set", runs_a)
        _write_runs(directory / "b.set", [(0, pages)])
        _write_runs(directory / "a-part.set", part_runs)
        _write_runs(directory / "b-part.set", [(0, part_b)])
        with start_http_server(objects) as http:
            setup = Setup(
                directory=directory,
                http=http,
                url=http.url(OBJECT),
                snapshot_path=snapshot_path,
                pages=pages,
                sets={
                    "a": (directory / "a.set", THREADS, len(order_a)),
                    "b": (directory / "b.set", 1, pages),
                    "a-part": (directory / "a-part.set", THREADS, part_a),
                    "b-part": (directory / "b-part.set", 1, part_b),
                },
                timeout=timeout,
            )
            sets: dict[int, ua.WorkingSet] = {}
            recordings: list[dict[str, Any]] = []
            for size in chunk_sizes:
                recorded = directory / f"a-{size}.ws"
                recording = _run(_record, setup, size, recorded, backend="asyncio")
                working_set = ua.WorkingSet.load(recorded)
                # With chunks, a fault fills its chunk: the set holds the pages that
                # faulted, which must name exactly the chunks the process touched.
                want, got = _chunks(order_a, size), _chunks(list(working_set.pages), size)
                if got != want:
                    raise RestoreFailed(
                        f"the working set recorded with {_kib(size)} chunks names "
                        f"{len(got)} chunks, not the {len(want)} the process touched"
                    )
                sets[size] = working_set
                recordings.append(
                    {
                        "chunk_size": size,
                        "pages": len(working_set.pages),
                        "chunks": len(got),
                        "ms": recording.ready_ns / 1e6,
                    }
                )
            results: list[dict[str, Any]] = []
            for backend in found:
                mine = tuple(
                    runner
                    for runner in chosen
                    if runner.chunk_size in (0, DEFAULT_CHUNK_SIZE) or backend in SWEEP_BACKENDS
                )
                samples = _run(_rounds, setup, mine, sets, rounds, backend=backend)
                results.extend(_summary(backend, mine, samples))
    return {
        "key": "7",
        "title": "Restore from object storage",
        "pages": pages,
        "delay_ms": DELAY_MS,
        "threads": THREADS,
        "set_pages": len(order_a),
        "set_runs": len(runs_a),
        "per_page_part": {"a": part_a, "a_runs": len(part_runs), "b": part_b},
        "default_chunk_size": DEFAULT_CHUNK_SIZE,
        "chunk_sizes": list(chunk_sizes),
        "concurrency": CONCURRENCY,
        "backends": list(found),
        "recordings": recordings,
        "rounds": rounds,
        "results": results,
        "targets": targets(results, found),
    }


def _summary(
    backend: str, chosen: tuple[Runner, ...], samples: dict[tuple[str, str], list[Sample]]
) -> list[dict[str, Any]]:
    out = []
    for workload in WORKLOADS:
        download = statistics.median(s.done_ns for s in samples[(workload, "download")]) / 1e6
        for runner in chosen:
            runs = samples[(workload, runner.key)]
            ms = statistics.median(s.done_ns for s in runs) / 1e6
            out.append(
                {
                    "backend": backend,
                    "workload": workload,
                    "runner": runner.key,
                    "kind": runner.kind,
                    "chunk_size": runner.chunk_size or None,
                    "label": runner.label,
                    "median_ms": ms,
                    "first_ms": statistics.median(s.first_ns for s in runs) / 1e6,
                    "download_ms": statistics.median(s.download_ns for s in runs) / 1e6,
                    "faults": statistics.median(s.faults * s.scale for s in runs),
                    "requests": statistics.median(s.requests * s.scale for s in runs),
                    "open_requests": statistics.median(s.open_requests for s in runs),
                    "mib_sent": statistics.median(s.bytes_sent * s.scale for s in runs) / 2**20,
                    "prefetched": statistics.median(s.prefetched for s in runs),
                    "scaled": runs[0].scale != 1.0,
                    "vs_download": download / ms,
                    "samples": [attrs.asdict(s) for s in runs],
                }
            )
    return out


def targets(results: list[dict[str, Any]], found: tuple[str, ...]) -> list[dict[str, Any]]:
    """The issue's targets for HttpSource (lazy, default chunk size), per backend."""
    out = []
    for backend in found:
        got = {(r["workload"], r["runner"]): r for r in results if r["backend"] == backend}
        if got:
            out.extend(_targets_of(backend, got))
    return out


def _targets_of(backend: str, got: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    lazy = f"lazy@{_kib(DEFAULT_CHUNK_SIZE)}"

    def ms(workload: str, runner: str) -> float:
        return float(got[(workload, runner)]["median_ms"])

    checks = [
        ("(a) download-then-serve / HttpSource", ms("a", "download") / ms("a", lazy), 5.0),
        ("(a) per-page fetch / HttpSource", ms("a", "per_page") / ms("a", lazy), 50.0),
        # "within 1.3x": HttpSource may take up to 1.3 times download-then-serve.
        ("(b) download-then-serve / HttpSource", ms("b", "download") / ms("b", lazy), 1 / 1.3),
    ]
    return [
        {"backend": backend, "what": what, "value": value, "target": want, "met": value >= want}
        for what, value, want in checks
    ]


def http_restore_table(report: dict[str, Any]) -> str:
    mib = report["pages"] * ua.PAGE_SIZE >> 20
    part = report["per_page_part"]
    default = _kib(report["default_chunk_size"])
    lines = [
        "7. Restore from object storage",
        f"   a {mib} MiB snapshot on a loopback HTTP server (uvicorn) adding "
        f"{report['delay_ms']:g} ms to every response; the process hands its uffd over as "
        "Firecracker 1.12 does, then",
        f"   (a) {report['threads']} threads read a boot-like set: {report['set_pages']:,} pages "
        f"({report['set_pages'] / report['pages']:.0%}) in {report['set_runs']} runs of "
        f"1-64; (b) 1 thread reads all {report['pages']:,} pages in order",
        "   ms: handshake sent -> last page read (the process's clock, median), plus the download "
        "for download-then-serve; x: download-then-serve's ms / this one's",
        "   faults: demand faults the server read; requests, MiB: what the HTTP server served "
        "(opening included)",
        f"   per-page fetch (*): one run on (a)'s first {part['a_runs']} runs ({part['a']:,} "
        f"pages) and (b)'s first {part['b']:,} pages, scaled to the whole workload",
        f"  {'backend':<15} {'runner':<34} {'(a) ms':>9} {'x':>6} {'faults':>7} {'requests':>8}"
        f"   {'(b) ms':>9} {'x':>6} {'faults':>7} {'requests':>8}",
    ]
    rows = {(r["backend"], r["runner"], r["workload"]): r for r in report["results"]}
    order = [f"lazy@{default}", f"prefetch@{default}", "per_page", "download"]
    for backend in report["backends"]:
        for key in order:
            cells, label = [], ""
            for workload in WORKLOADS:
                r = rows.get((backend, key, workload))
                if r is None:
                    continue
                label = r["label"] + (" *" if r["scaled"] else "")
                cells.append(
                    f"{r['median_ms']:>9.1f} {r['vs_download']:>5.2f}x {r['faults']:>7,.0f} "
                    f"{r['requests']:>8,.0f}"
                )
            if cells:
                lines.append(f"  {backend:<15} {label:<34} " + "   ".join(cells))
    lines.append("  chunk sizes (HttpSource; ms, requests, MiB served):")
    lines.append(
        f"  {'backend':<15} {'runner':<34} {'(a) ms':>9} {'requests':>8} {'MiB':>6}"
        f"   {'(b) ms':>9} {'requests':>8} {'MiB':>6}"
    )
    for backend in report["backends"]:
        for kind in ("lazy", "prefetch"):
            for size in report["chunk_sizes"]:
                key = f"{kind}@{_kib(size)}"
                cells, label = [], ""
                for workload in WORKLOADS:
                    r = rows.get((backend, key, workload))
                    if r is None:
                        continue
                    label = r["label"]
                    cells.append(
                        f"{r['median_ms']:>9.1f} {r['requests']:>8,.0f} {r['mib_sent']:>6.0f}"
                    )
                if cells:
                    lines.append(f"  {backend:<15} {label:<34} " + "   ".join(cells))
    for backend in report["backends"]:
        checks = [t for t in report["targets"] if t["backend"] == backend]
        if checks:
            lines.append(f"  targets ({backend}, HttpSource = lazy, {default} chunks):")
        for t in checks:
            verdict = "met" if t["met"] else "MISSED"
            lines.append(
                f"    {t['what']:<40} {t['value']:>6.2f}x  >= {t['target']:.2f}x  {verdict}"
            )
    return "\n".join(lines)
