"""Scenario 10: restore over a link with a real network's shape (issue #19, item 4).

The snapshot is a real memory image (``_memory_image``: a Python process with
modules loaded and a heap in use, 256 MiB), an object in nginx on the far side
of a shaped link (``_network``: a namespace behind a veth pair at 1 Gbit/s each
way, and a proxy adding 20 ms before every response's first byte and pacing
each connection at 100 MB/s). The restored process is scenario 6's
(``benchmarks/c/restore_peer.c``, its words checked against the image's).

Workloads:

* (a) a scattered 10% of the pages, in runs of 1 to 64 pages (scenario 7's
  boot-like set), read by 16 threads;
* (b) one thread reads every page in order;
* (c) 16 processes, each reading (a), restored at once from the same snapshot
  on this host by ONE ``serve_handoffs`` (one source for all, as a host's
  daemon would run); the time is from the first handshake to the last page of
  the last process, and the proxy counts how often each chunk was fetched;
* (e) 10% of the pages clustered in 12% of the 1 MiB chunks (a real process's set is
  clustered: its code, its heap), read by 16 threads: the issue's set that "touches at
  most 15% of the chunks", where lazy must be 5x faster than the download;
* (d) (a) again on the same host: a second restore. Without a host cache every
  chunk crosses the link again (lazy); the host-cache runner passes
  ``host_cache=`` to ``ua.HttpSource`` (a cold run fills it, the warm run is
  timed), and is skipped while ``ua.HttpSource`` takes no such option.

Runners: download-then-serve (the object fetched with 16 ranged GETs of 8 MiB
in parallel, as ``s5cmd``/``aws s3 cp`` do, into /dev/shm, then served with
``ua.Snapshot``), ``HttpSource`` lazy (with its default chunk readahead, and on
(b) without it too), ``HttpSource`` + the working set of (a) prefetched
(recorded once, ``record=``), ``HttpSource`` lazy with 256 KiB chunks on (a)
(what a smaller default would give), ``ObjectSource`` on ``s3://`` (moto in
the store's namespace, behind a proxy of the same shape), a pack of the image
(``ua.pack_snapshot``: zstd chunks named by digest, zero chunks not stored)
whose chunk files nginx serves over the same link (``_LinkedPack``: each
chunk file fetched on its first read, then checked and decompressed as
``PackSource`` does), the host chunk cache cold then warm (d), 16 ``serve``
processes (the CLI, one per restored process) sharing one ``--cache-dir`` on
(c), and the reference: the image served from a local file (no link at all).
moto answers a ranged GET by reading the whole object and slicing it (its
``_handle_range_header``), so the ObjectSource runner's time is moto's; its
requests, bytes and this process's CPU are the client's.

Per run: time to done (the restored processes' clocks, plus the download),
requests and body bytes the proxy counted, bytes the host's end of the link
received, the serving process's CPU time (``getrusage``: this process, every
thread) per request, and demand faults. The ideal for (a) is the bytes of the
chunks (a) touches crossing at the link's rate plus one first-byte delay per
wave of ``concurrency`` requests. One invocation on asyncio, uvloop (when
installed) and trio; each runner runs ``rounds`` times, alternating with the others,
and the run with the median time is shown (its counts with it).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from subprocess import PIPE
from typing import Any, Literal

import anyio
import attrs

import uffd_async as ua

from ._http_restore import _run, backends
from ._memory_image import describe_image, memory_image
from ._network import (
    S3_BUCKET,
    Link,
    LinkUnavailable,
    Shape,
    measure_shape,
    open_link,
    put_s3,
    refusal,
    shape_lines,
)
from ._restore import RestoreFailed, _write_runs, handoff_over, page_order, peer_program
from ._runs import boot_set

if sys.version_info < (3, 11):
    pass

PAGES = 65536  # 256 MiB
QUICK_PAGES = 2048  # 8 MiB
QUICK_SCALE = 0.02  # the quick image's heap
FRACTION = 0.1
#: (e)'s chunks: the share of the 1 MiB chunks its pages are clustered in.
CLUSTER_CHUNKS = 0.12
CLUSTER_CHUNK_PAGES = 256
SEED = 10
THREADS = 16
PROCESSES = 16
QUICK_PROCESSES = 3
SHARE_CHUNK_SIZES = (256 << 10, 1 << 20, 2 << 20, 4 << 20)
DOWNLOAD_PART = 8 << 20
DOWNLOAD_CONNECTIONS = 16
OBJECT = "image.mem"

Workload = Literal["a", "b", "c", "d", "e"]
WORKLOADS: dict[Workload, str] = {
    "a": "(a) 10% scattered, 16 threads",
    "b": "(b) everything in order, 1 thread",
    "c": "(c) N processes at once, each (a)",
    "d": "(d) (a) again on this host",
    "e": "(e) 10% in 12% of chunks, 16 thr.",
}
RunnerKind = Literal[
    "download", "lazy", "lazy_noahead", "lazy_small", "prefetch", "object", "pack", "cache",
    "servers", "local",
]  # fmt: skip
SMALL_CHUNK = 256 << 10  # lazy_small's chunk size: what a smaller default would give
LABELS: dict[RunnerKind, str] = {
    "download": "download, then serve",
    "lazy": "HttpSource lazy",
    "lazy_noahead": "HttpSource lazy, no chunk readahead",
    "lazy_small": "HttpSource lazy, 256 KiB chunks",
    "prefetch": "HttpSource + prefetch=",
    "object": "ObjectSource s3:// (moto) lazy",
    "pack": "pack (zstd) over the link",
    "cache": "HttpSource + host cache (warm)",
    "servers": "N serve processes, one --cache-dir",
    "local": "local file (no link)",
}
PLAN: dict[Workload, tuple[RunnerKind, ...]] = {
    "a": ("download", "lazy", "lazy_small", "prefetch", "object", "pack", "local"),
    "b": ("download", "lazy", "lazy_noahead", "prefetch", "object", "pack", "local"),
    "c": ("download", "lazy", "prefetch", "servers", "local"),
    "d": ("lazy", "cache", "local"),
    "e": ("download", "lazy", "pack", "local"),
}
PACK_CONCURRENCY = 16  # chunks fetched at once: as many as HttpSource's requests
S3_KEY = "image.mem"
PACK_PREFIX = "pack/"  # the pack's index and chunks, in the S3 store's bucket


def _default(name: str) -> Any:
    return inspect.signature(ua.HttpSource).parameters[name].default


def cache_refusal() -> str | None:
    """Why the host-cache runner cannot run yet, or None."""
    if "host_cache" in inspect.signature(ua.HttpSource).parameters:
        return None
    return "needs the host chunk cache (ua.HttpSource takes no host_cache= yet)"


def _kib(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@attrs.frozen(kw_only=True)
class Sample:
    """One run of one runner on one workload."""

    ms: float  # to done: the processes' clocks, plus the download
    download_ms: float
    faults: int
    prefetched: int
    requests: int  # the proxy's count (opening the source included)
    body_bytes: int  # what the proxy sent (heads and bodies)
    link_bytes: int  # what the host's end of the link received (IP packets)
    cpu_ms: float  # this process (the serving side), every thread
    ranges: int  # distinct byte ranges asked for
    most_fetches: int  # the most times one range was asked for
    cold: dict[str, Any] | None = None  # the host-cache runner: its cold run


@attrs.frozen(kw_only=True)
class Setup:
    directory: Path
    link: Link
    url: str
    image: Path
    pages: int
    processes: int
    sets: dict[str, tuple[Path, int, int]]  # "a", "b": (set file, threads, pages)
    timeout: float
    backend: list[str] = attrs.field(factory=lambda: ["asyncio"])  # the one running
    serial: list[int] = attrs.field(factory=lambda: [0])

    def socket_path(self) -> Path:
        self.serial[0] += 1
        return self.directory / f"s{self.serial[0]}.sock"


# -- one run ----------------------------------------------------------------------


async def _peer(setup: Setup, path: Path, which: str, out: list[tuple[int, int]]) -> None:
    """One restored process; appends its (start_ns, ready_ns) (CLOCK_MONOTONIC)."""
    set_path, threads, _ = setup.sets[which]
    command = [
        str(peer_program()), str(path), str(setup.image), str(set_path), str(setup.pages),
        "0", str(threads), "file",
    ]  # fmt: skip
    process = await anyio.run_process(command, stdin=PIPE, check=False)
    if process.returncode != 0:
        raise RestoreFailed(
            f"the restored process exited with {process.returncode}: "
            f"{process.stderr.decode().strip()}"
        )
    ready, _first, _pages, start = (int(word) for word in process.stdout.split())
    out.append((start, ready))


@attrs.frozen(kw_only=True)
class Window:
    """What the link counted and this process's CPU spent between two instants."""

    cpu_s: float
    counts: dict[str, Any]

    @classmethod
    def now(cls, link: Link) -> Window:
        return cls(cpu_s=_cpu_s(), counts=link.counters())

    def to(self, later: Window) -> Window:
        """The difference: ``later`` minus this one."""
        old = self.counts["ranges"]
        ranges = {
            key: count - old.get(key, 0)
            for key, count in later.counts["ranges"].items()
            if count > old.get(key, 0)
        }
        counts = {
            key: later.counts[key] - self.counts[key] for key in ("requests", "bytes", "link_bytes")
        }
        return Window(cpu_s=later.cpu_s - self.cpu_s, counts={**counts, "ranges": ranges})

    def plus(self, other: Window) -> Window:
        ranges = dict(self.counts["ranges"])
        for key, count in other.counts["ranges"].items():
            ranges[key] = ranges.get(key, 0) + count
        counts = {
            key: self.counts[key] + other.counts[key] for key in ("requests", "bytes", "link_bytes")
        }
        return Window(cpu_s=self.cpu_s + other.cpu_s, counts={**counts, "ranges": ranges})


async def _serve(
    setup: Setup,
    source: Any,
    workload: Workload,
    working_set: ua.WorkingSet | None = None,
    record: Path | None = None,
) -> tuple[float, ua.HandoffStats, Window]:
    """One ``serve_handoffs`` serves the workload's processes: (ms to done, its stats, the
    window from the source open and the server listening to the last process gone)."""
    path = setup.socket_path()
    count = setup.processes if workload == "c" else 1
    which = workload if workload in ("b", "e") else "a"
    serving = functools.partial(
        ua.serve_handoffs, path, source, prefetch=working_set, record=record
    )
    done: list[tuple[int, int]] = []
    async with anyio.create_task_group() as tg:
        server: ua.HandoffServer = await tg.start(serving)
        began = Window.now(setup.link)
        async with anyio.create_task_group() as peers:
            for _ in range(count):
                peers.start_soon(_peer, setup, path, which, done)
        stats = await handoff_over(server)
        window = began.to(Window.now(setup.link))
        tg.cancel_scope.cancel()
    first = min(start for start, _ in done)
    return (max(start + ready for start, ready in done) - first) / 1e6, stats, window


async def _download(url: str, destination: Path, size: int) -> None:
    """The whole object, in DOWNLOAD_PART ranges, DOWNLOAD_CONNECTIONS at a time."""
    import httpx

    limits = httpx.Limits(max_connections=DOWNLOAD_CONNECTIONS)
    fd = os.open(destination, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        parts = list(range(0, size, DOWNLOAD_PART))
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:

            async def worker() -> None:
                while parts:
                    first = parts.pop()
                    last = min(first + DOWNLOAD_PART, size) - 1
                    headers = {"Range": f"bytes={first}-{last}", "Accept-Encoding": "identity"}
                    async with client.stream("GET", url, headers=headers) as response:
                        if response.status_code != 206:
                            raise RestoreFailed(f"downloading: HTTP {response.status_code}")
                        at = first
                        async for piece in response.aiter_raw(1 << 20):
                            os.pwrite(fd, piece, at)
                            at += len(piece)
                    if at != last + 1:
                        raise RestoreFailed(f"downloading: a part ended at {at}, not {last + 1}")

            async with anyio.create_task_group() as tg:
                for _ in range(DOWNLOAD_CONNECTIONS):
                    tg.start_soon(worker)
    finally:
        os.close(fd)


def _proc_cpu_s(pid: int) -> float:
    """A live process's CPU time (user + system, its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _servers(setup: Setup) -> tuple[float, ua.HandoffStats, Window]:
    """(c) as separate daemons: one ``python -m uffd_async serve`` per restored process,
    every one with the same fresh ``--cache-dir``; the window's CPU is theirs."""
    cache = setup.directory / f"servers-cache-{setup.serial[0]}"
    backend = "asyncio+uvloop" if setup.backend[0] == "uvloop" else setup.backend[0]
    paths = [setup.socket_path() for _ in range(setup.processes)]
    processes = []
    for path in paths:
        command = [
            sys.executable, "-m", "uffd_async", "serve", setup.url, "--socket", str(path),
            "--cache-dir", str(cache), "--backend", backend, "--quiet",
        ]  # fmt: skip
        processes.append(
            await anyio.open_process(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=PIPE
            )
        )
    try:
        while not all(path.exists() for path in paths):
            for process in processes:
                if process.returncode is not None:
                    raise RestoreFailed(f"a serve process exited with {process.returncode}")
            await anyio.sleep(0.02)
        began = Window.now(setup.link)
        cpu = sum(_proc_cpu_s(process.pid) for process in processes)
        done: list[tuple[int, int]] = []
        async with anyio.create_task_group() as peers:
            for path in paths:
                peers.start_soon(_peer, setup, path, "a", done)
        spent = sum(_proc_cpu_s(process.pid) for process in processes) - cpu
        window = began.to(Window.now(setup.link))
        window = Window(cpu_s=spent, counts=window.counts)
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGINT)
        for process in processes:
            with anyio.fail_after(30):
                code = await process.wait()
            if code != 0:
                said = b"" if process.stderr is None else await process.stderr.receive()
                raise RestoreFailed(f"a serve process exited with {code}: {said.decode()[-500:]}")
    first = min(start for start, _ in done)
    ms = (max(start + ready for start, ready in done) - first) / 1e6
    return ms, ua.HandoffStats(), window


async def _runner(
    setup: Setup, kind: RunnerKind, workload: Workload, working_set: ua.WorkingSet
) -> tuple[float, float, ua.HandoffStats, Window, dict[str, Any] | None]:
    """(ms, download ms, stats, window, the cold run's figures for the cache runner)."""
    if kind == "local":
        with ua.Snapshot(setup.image) as snapshot:
            ms, stats, window = await _serve(setup, snapshot, workload)
        return ms, 0.0, stats, window, None
    if kind == "download":
        destination = setup.directory / "download.mem"
        try:
            began, at = time.monotonic(), Window.now(setup.link)
            await _download(setup.url, destination, setup.pages * ua.PAGE_SIZE)
            with ua.Snapshot(destination) as snapshot:
                download_ms = (time.monotonic() - began) * 1e3
                fetched = at.to(Window.now(setup.link))
                ms, stats, window = await _serve(setup, snapshot, workload)
        finally:
            destination.unlink(missing_ok=True)
        return ms + download_ms, download_ms, stats, fetched.plus(window), None
    if kind == "cache":
        directory = setup.directory / f"host-cache-{setup.serial[0]}"  # cold: a fresh one
        setup.serial[0] += 1
        with ua.HostChunkCache(directory, 1 << 30) as host_cache:
            async with ua.HttpSource(setup.url, host_cache=host_cache) as source:
                cold_ms, _, cold = await _serve(setup, source, workload)
        with ua.HostChunkCache(directory, 1 << 30) as host_cache:  # as a restarted server
            async with ua.HttpSource(setup.url, host_cache=host_cache) as source:
                ms, stats, window = await _serve(setup, source, workload)
        cold_counts = {key: cold.counts[key] for key in ("requests", "bytes", "link_bytes")}
        return ms, 0.0, stats, window, {"ms": cold_ms, **cold_counts}
    if kind == "servers":
        ms, stats, window = await _servers(setup)
        return ms, 0.0, stats, window, None
    if kind == "object":
        url = f"s3://{S3_BUCKET}/{S3_KEY}"
        async with ua.ObjectSource(url, options=setup.link.s3_options()) as object_source:
            ms, stats, window = await _serve(setup, object_source, workload)
        return ms, 0.0, stats, window, None
    if kind == "pack":
        index = f"s3://{S3_BUCKET}/{PACK_PREFIX}{OBJECT}.index"
        options = setup.link.s3_options()
        async with ua.PackSource(index, options=options, concurrency=PACK_CONCURRENCY) as pack:
            ms, stats, window = await _serve(setup, pack, workload)
        return ms, 0.0, stats, window, None
    chunk_size = SMALL_CHUNK if kind == "lazy_small" else int(_default("chunk_size"))
    ahead = 0 if kind == "lazy_noahead" else int(_default("chunk_readahead"))
    async with ua.HttpSource(setup.url, chunk_size=chunk_size, chunk_readahead=ahead) as source:
        chosen = working_set if kind == "prefetch" else None
        ms, stats, window = await _serve(setup, source, workload, chosen)
    return ms, 0.0, stats, window, None


async def run_once(
    setup: Setup, kind: RunnerKind, workload: Workload, working_set: ua.WorkingSet
) -> Sample:
    with anyio.fail_after(setup.timeout):
        ms, download_ms, stats, window, cold = await _runner(setup, kind, workload, working_set)
    asked = window.counts["ranges"]
    return Sample(
        ms=ms,
        download_ms=download_ms,
        faults=stats.faults,
        prefetched=stats.prefetched,
        requests=window.counts["requests"],
        body_bytes=window.counts["bytes"],
        link_bytes=window.counts["link_bytes"],
        cpu_ms=window.cpu_s * 1e3,
        ranges=len(asked),
        most_fetches=max(asked.values(), default=0),
        cold=cold,
    )


async def _record(setup: Setup, path: Path) -> None:
    with anyio.fail_after(setup.timeout):
        async with ua.HttpSource(setup.url) as source:
            await _serve(setup, source, "a", record=path)


async def _all_runs(
    setup: Setup,
    working_set: ua.WorkingSet,
    skip: dict[RunnerKind, str],
    rounds: int,
    backend: str,
) -> dict[tuple[Workload, RunnerKind], list[Sample]]:
    """Every runner on every workload, ``rounds`` times, the runners alternating."""
    out: dict[tuple[Workload, RunnerKind], list[Sample]] = {}
    setup.backend[0] = backend
    for _ in range(rounds):
        for workload, kinds in PLAN.items():
            for kind in kinds:
                if kind not in skip:
                    sample = await run_once(setup, kind, workload, working_set)
                    out.setdefault((workload, kind), []).append(sample)
    return out


# -- the scenario ------------------------------------------------------------------


def clustered_set(pages: int, rng: random.Random) -> list[tuple[int, int]]:
    """Runs (first page, pages) covering FRACTION of ``pages``, all within CLUSTER_CHUNKS of
    the 1 MiB chunks (chosen at random), in random order: a scattered set's runs confined to
    a few regions, as a process's code and heap are."""
    chunks = pages // CLUSTER_CHUNK_PAGES
    chosen = sorted(rng.sample(range(chunks), max(1, round(chunks * CLUSTER_CHUNKS))))
    region = [c * CLUSTER_CHUNK_PAGES + p for c in chosen for p in range(CLUSTER_CHUNK_PAGES)]
    inside = boot_set(len(region), rng, fraction=FRACTION * pages / len(region))
    runs: list[tuple[int, int]] = []
    for first, length in inside:  # split where a run crosses from one chosen chunk to the next
        at = first
        while at < first + length:
            end = min(first + length, (at // CLUSTER_CHUNK_PAGES + 1) * CLUSTER_CHUNK_PAGES)
            runs.append((region[at], end - at))
            at = end
    return runs


def chunk_shares(pages: list[int], total_pages: int) -> dict[int, float]:
    """The share of the object's chunks that ``pages`` touch, per chunk size."""
    out = {}
    for size in SHARE_CHUNK_SIZES:
        per = size // ua.PAGE_SIZE
        out[size] = len({page // per for page in pages}) / math.ceil(total_pages / per)
    return out


def ideal_ms(pages: list[int], chunk_size: int, concurrency: int, shape: Shape) -> float:
    """The chunks ``pages`` touch crossing the link at its rate, plus one first byte per
    wave of ``concurrency`` requests."""
    touched = len({page * ua.PAGE_SIZE // chunk_size for page in pages})
    waves = math.ceil(touched / concurrency)
    return (touched * chunk_size / shape.link_bytes + waves * shape.first_byte_ms / 1e3) * 1e3


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def skipped(reason: str) -> dict[str, Any]:
    return {"key": "10", "title": "Restore over a shaped network", "skipped": reason}


def measure(*, quick: bool, rounds: int, timeout: float) -> dict[str, Any]:
    """Build the image and the link, record (a)'s working set, then every runner on every
    workload, ``rounds`` times, on every backend: the run with the median time is shown."""
    refused = refusal()
    if refused:  # not root, or no ip/tc: skipped, saying why (any other failure fails)
        return skipped(refused)
    if not importlib.util.find_spec("httpx"):
        raise RestoreFailed("scenario 10 needs httpx: pip install -e '.[test]'")
    pages = QUICK_PAGES if quick else PAGES
    processes = QUICK_PROCESSES if quick else PROCESSES
    chunk_size, concurrency = int(_default("chunk_size")), int(_default("concurrency"))
    image, made = memory_image(pages * ua.PAGE_SIZE, QUICK_SCALE if quick else 1.0)
    about = describe_image(image, chunk_size)
    runs_a = boot_set(pages, random.Random(SEED), fraction=FRACTION)
    order_a = page_order(runs_a)
    runs_e = clustered_set(pages, random.Random(SEED))
    order_e = page_order(runs_e)
    shares = {
        "a": chunk_shares(order_a, pages),
        "b": chunk_shares(list(range(pages)), pages),
        "e": chunk_shares(order_e, pages),
    }
    shape = Shape()
    ideals = {size: ideal_ms(order_a, size, concurrency, shape) for size in SHARE_CHUNK_SIZES}
    ideal_e = ideal_ms(order_e, chunk_size, concurrency, shape)
    touched = len({page * ua.PAGE_SIZE // chunk_size for page in order_a})
    skip: dict[RunnerKind, str] = {}
    no_cache = cache_refusal()
    if no_cache:
        skip["cache"] = no_cache
    if "options" not in inspect.signature(ua.PackSource).parameters:
        skip["pack"] = "needs packs in an object store (ua.PackSource takes no options= yet)"
    found = backends(quick=quick)
    peer_program()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="uffd-bench-net-", dir=shm) as where:
        directory = Path(where)
        served = directory / "store"
        served.mkdir()
        shutil.copyfile(image, served / OBJECT)  # into /dev/shm: the store reads RAM, as S3 is

        _write_runs(directory / "a.set", runs_a)
        _write_runs(directory / "b.set", [(0, pages)])
        _write_runs(directory / "e.set", runs_e)
        try:
            with open_link(served, shape, say=_say, s3=True) as link:
                measured = measure_shape(link, OBJECT, pages * ua.PAGE_SIZE)
                put_s3(link, S3_KEY, served / OBJECT)
                pack: dict[str, Any] = {}
                if "pack" not in skip:
                    packed = ua.pack_snapshot(
                        served / OBJECT, f"s3://{S3_BUCKET}/{PACK_PREFIX}",
                        chunk_size=chunk_size, options=link.s3_options(direct=True),
                    )  # fmt: skip
                    pack = {
                        "chunks": packed.chunks,
                        "zero_chunks": packed.zero,
                        "stored_bytes": packed.written_bytes,
                        "ratio": pages * ua.PAGE_SIZE / max(1, packed.written_bytes),
                    }
                setup = Setup(
                    directory=directory,
                    link=link,
                    url=link.url(OBJECT),
                    image=served / OBJECT,
                    pages=pages,
                    processes=processes,
                    sets={
                        "a": (directory / "a.set", THREADS, len(order_a)),
                        "b": (directory / "b.set", 1, pages),
                        "e": (directory / "e.set", THREADS, len(order_e)),
                    },
                    timeout=timeout,
                )
                recorded = directory / "a.ws"
                _run(_record, setup, recorded, backend="asyncio", scenario="10")
                working_set = ua.WorkingSet.load(recorded)
                results: list[dict[str, Any]] = []
                for backend in found:
                    samples = _run(
                        _all_runs, setup, working_set, skip, rounds, backend,
                        backend=backend, scenario="10",
                    )  # fmt: skip
                    results.extend(_summary(backend, samples, ideals, chunk_size, ideal_e))
        except LinkUnavailable as exc:  # here (root, ip and tc present): a failure
            raise RestoreFailed(f"scenario 10: the shaped link: {exc}") from exc
    return {
        "key": "10",
        "title": "Restore over a shaped network",
        "pages": pages,
        "image": {**made, **about},
        "pack": pack,
        "shape": attrs.asdict(shape),
        "measured_shape": measured,
        "threads": THREADS,
        "processes": processes,
        "set_pages": len(order_a),
        "set_runs": len(runs_a),
        "chunk_size": chunk_size,
        "concurrency": concurrency,
        "chunks_touched": touched,
        "chunk_shares": {w: {str(k): v for k, v in s.items()} for w, s in shares.items()},
        "ideal_a_ms": ideals.get(chunk_size) or ideal_ms(order_a, chunk_size, concurrency, shape),
        "ideal_a_ms_by_chunk_size": {str(size): ms for size, ms in ideals.items()},
        "set_e_pages": len(order_e),
        "ideal_e_ms": ideal_e,
        "recorded_pages": len(working_set.pages),
        "backends": list(found),
        "rounds": rounds,
        "skipped_runners": dict(skip),
        "results": results,
        "targets": targets(results, found),
    }


def _median_run(runs: list[Sample]) -> Sample:
    """The run whose time is the median (the lower middle one of an even count)."""
    return sorted(runs, key=lambda sample: sample.ms)[(len(runs) - 1) // 2]


def _summary(
    backend: str,
    rounds: dict[tuple[Workload, RunnerKind], list[Sample]],
    ideals: dict[int, float],
    chunk_size: int,
    ideal_e: float,
) -> list[dict[str, Any]]:
    out = []
    samples = {key: _median_run(runs) for key, runs in rounds.items()}
    for (workload, kind), sample in samples.items():
        download = samples.get((workload, "download"))
        out.append(
            {
                "backend": backend,
                "workload": workload,
                "runner": kind,
                "label": LABELS[kind],
                **attrs.asdict(sample),
                "link_mib": sample.link_bytes / 2**20,
                "all_ms": [run.ms for run in rounds[(workload, kind)]],
                "cpu_per_request_ms": sample.cpu_ms / sample.requests if sample.requests else None,
                "vs_download": download.ms / sample.ms if download else None,
                "vs_ideal": (
                    sample.ms / ideals[SMALL_CHUNK if kind == "lazy_small" else chunk_size]
                    if workload == "a" and kind.startswith("lazy")
                    else sample.ms / ideal_e
                    if workload == "e" and kind == "lazy"
                    else None
                ),
            }
        )
    return out


def targets(results: list[dict[str, Any]], found: tuple[str, ...]) -> list[dict[str, Any]]:
    """The issue's targets, per backend: (what, value, target, met)."""
    out = []
    for backend in found:
        got = {(r["workload"], r["runner"]): r for r in results if r["backend"] == backend}
        out.extend(_targets_of(backend, got))
    return out


def _targets_of(backend: str, got: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    def ms(workload: str, runner: str) -> float:
        return float(got[(workload, runner)]["ms"])

    checks: list[tuple[str, float, str, bool]] = []
    for kind in ("lazy", "lazy_small"):
        name = "lazy" if kind == "lazy" else "lazy 256 KiB"
        lazy_ideal = float(got[("a", kind)]["vs_ideal"])
        checks.append((f"(a) {name} / ideal", lazy_ideal, "<= 2", lazy_ideal <= 2))
        faster = ms("a", "download") / ms("a", kind)
        checks.append((f"(a) download-then-serve / {name}", faster, ">= 5", faster >= 5))
    if ("e", "lazy") in got:
        lazy_ideal = float(got[("e", "lazy")]["vs_ideal"])
        checks.append(("(e) lazy / ideal", lazy_ideal, "<= 2", lazy_ideal <= 2))
        for kind in ("lazy", "pack"):
            if ("e", kind) in got:
                faster = ms("e", "download") / ms("e", kind)
                what = f"(e) download-then-serve / {kind}"
                checks.append((what, faster, ">= 5", faster >= 5))
    ahead: tuple[RunnerKind, ...] = ("lazy", "lazy_noahead", "object", "pack")
    for kind in ahead:
        if ("b", kind) in got:
            slower = ms("b", kind) / ms("b", "download")
            name = LABELS[kind]
            checks.append((f"(b) {name} / download", slower, "<= 1.2", slower <= 1.2))
    for kind in ("lazy", "prefetch", "servers"):
        if ("c", kind) in got:
            most = float(got[("c", kind)]["most_fetches"])
            checks.append((f"(c) {kind}: most fetches of one chunk", most, "1", most <= 1))
    if ("d", "cache") in got:
        warm = ms("d", "cache") / ms("d", "local")
        checks.append(("(d) warm host cache / local file", warm, "<= 1.2", warm <= 1.2))
    if ("b", "pack") in got:
        share = got[("b", "pack")]["body_bytes"] / max(1, got[("b", "lazy")]["body_bytes"])
        checks.append(("(b) pack's bytes / the raw object's", share, "<= 0.5", share <= 0.5))
    for workload, kind in (("a", "lazy"), ("b", "lazy"), ("a", "object"), ("a", "pack")):
        if (workload, kind) in got:
            cpu = got[(workload, kind)]["cpu_per_request_ms"] or math.nan
            what = f"({workload}) {kind}: CPU per request, ms"
            checks.append((what, cpu, "<= 0.3", cpu <= 0.3))
    return [
        {"backend": backend, "what": w, "value": v, "target": t, "met": m} for w, v, t, m in checks
    ]


def net_restore_table(report: dict[str, Any]) -> str:
    if "skipped" in report:
        return f"10. Restore over a shaped network: skipped: {report['skipped']}"
    mib = report["pages"] * ua.PAGE_SIZE >> 20
    image = report["image"]
    zstd = image["zstd"]
    ratio = f"{zstd['ratio']:.2f}x ({zstd['how']})" if "ratio" in zstd else zstd["how"]
    shape = Shape(**report["shape"])
    chunk = _kib(report["chunk_size"])
    shares = report["chunk_shares"]
    pack = report.get("pack") or {}
    packed = (
        f"   pack (s3://, zstd, {chunk} chunks by digest): {pack['stored_bytes'] / 2**20:.1f} "
        f"MiB stored ({pack['ratio']:.2f}x), {pack['zero_chunks']} of {pack['chunks']} chunks "
        "all zeros (not stored)"
        if pack
        else "   pack: not measured"
    )
    lines = [
        "10. Restore over a shaped network",
        *shape_lines(shape, report["measured_shape"]),
        packed,
        f"   image: {mib} MiB of a Python process's memory ({image['modules']} modules, a heap "
        f"in use; {image['mapped_bytes'] >> 20} MiB mapped, cut to {mib}): zero pages "
        f"{image['zero_pages']:.1%}, all-zero {_kib(image['chunk_size'])} chunks "
        f"{image['zero_chunks']:.1%}, zstd {ratio}",
        f"   (a) {report['threads']} threads read {report['set_pages']:,} pages "
        f"({report['set_pages'] / report['pages']:.0%}) in {report['set_runs']} runs of 1-64; "
        f"(b) 1 thread reads all; (c) {report['processes']} processes each read (a) at once, one "
        f"serve_handoffs for all; (d) (a) again on this host; (e) {THREADS} threads read "
        f"{report['set_e_pages']:,} pages clustered in {CLUSTER_CHUNKS:.0%} of the 1 MiB chunks",
        "   chunks (a) touches: "
        + ", ".join(f"{_kib(int(size))} {share:.0%}" for size, share in shares["a"].items())
        + "; (b) 100% at every size; (e) "
        + ", ".join(f"{_kib(int(size))} {share:.0%}" for size, share in shares["e"].items()),
        f"   ideal (a): the chunks it touches over {shape.link_bits / 1e9:g} Gbit/s + a first "
        f"byte per {report['concurrency']} requests: "
        + ", ".join(
            f"{_kib(int(size))} {ms:.0f} ms"
            for size, ms in report["ideal_a_ms_by_chunk_size"].items()
        ),
        f"   HttpSource: {chunk} chunks, {report['concurrency']} requests in flight (defaults); "
        "ms: to the last page read (processes' clocks) + the download; requests, link MiB: "
        "counted by the proxy / the host's end of the link; CPU/req: this process's CPU / "
        "requests (CPU ms: from the source open to the last process gone, spawning the processes "
        "included); most: the most fetches of one range; each row: the run with the median ms "
        f"of {report['rounds']}",
        f"  {'backend':<8} {'workload':<34} {'runner':<31} {'ms':>8} {'x dl':>6} {'requests':>8} "
        f"{'link MiB':>8} {'CPU ms':>7} {'CPU/req':>8} {'faults':>7} {'most':>4}",
    ]
    for r in report["results"]:
        cpu = r["cpu_per_request_ms"]
        cpu_text = f"{cpu:>6.2f}ms" if cpu is not None and not math.isnan(cpu) else f"{'-':>8}"
        vs = f"{r['vs_download']:>5.2f}x" if r["vs_download"] else f"{'-':>6}"
        ideal = f"  ({r['vs_ideal']:.2f}x ideal)" if r["vs_ideal"] else ""
        lines.append(
            f"  {r['backend']:<8} {WORKLOADS[r['workload']]:<34} {r['label']:<31} {r['ms']:>8.0f} "
            f"{vs} {r['requests']:>8,} {r['link_mib']:>8.0f} {r['cpu_ms']:>7.0f} {cpu_text} "
            f"{r['faults']:>7,} "
            f"{r['most_fetches']:>4}{ideal}"
        )
    for r in report["results"]:
        if r["cold"]:
            cold = r["cold"]
            lines.append(
                f"  {r['backend']:<8} (d) host cache cold (the run that filled it): "
                f"{cold['ms']:.0f} ms, {cold['requests']:,} requests, "
                f"{cold['link_bytes'] / 2**20:.0f} MiB over the link"
            )
    for name, reason in report["skipped_runners"].items():
        lines.append(f"  skipped: {LABELS[name]}: {reason}")
    for backend in report["backends"]:
        checks = [t for t in report["targets"] if t["backend"] == backend]
        lines.append(f"  targets ({backend}):")
        for t in checks:
            verdict = "met" if t["met"] else "MISSED"
            lines.append(f"    {t['what']:<58} {t['value']:>7.2f}  {t['target']:<7} {verdict}")
    return "\n".join(lines)
