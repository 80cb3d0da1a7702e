"""Scenario 6: restore to ready. How soon can a restored process run its boot path?

A separate process (``benchmarks/c/restore_peer.c``) maps 256 MiB, registers it
MISSING, hands its uffd over on a Unix socket exactly as Firecracker 1.12 does,
and then touches a boot-like working set: about 20% of the pages, in runs of 1
to 64 pages at random places, in a random (seeded) order. It reports the time
from the handshake sent to the last page of the set read, and checks every
page it reads against the snapshot (a wrong page fails the benchmark). The
snapshot is a file in /dev/shm (tmpfs: the page cache, as a snapshot that was
just written or read is), each page a distinct pattern.

The working set is recorded once, by serving a first process lazily under
``serve_handoffs(record=...)`` (the recording must name exactly the pages it
touched). Then every handler below serves new processes touching (a) the same
set and (b) a drifted one: the same runs in the same order, but 10% of them
(another seed) at other places, so 90% of the pages overlap. Handlers:

* ``lazy``: ``serve_handoffs`` as it is, one UFFDIO_COPY per fault;
* ``lazy + readahead 15``: ``serve_handoffs(readahead=15)``;
* ``prefetch``: ``serve_handoffs(prefetch=working_set)``: the set is copied in
  recorded order while the process runs, demand faults first;
* ``REAP-style``: the set copied before the process may touch anything
  (``ua.prefetch`` to the end, then a go byte on the process's stdin, which it
  waits for after the handshake), that time included, as REAP does;
* ``eager``: the whole snapshot copied first, then the go byte;
* ``prefetch + readahead 15``: both: pages outside the set fault with readahead;
* ``prefetch + populate all``: ``serve_handoffs(prefetch=..., populate=True)``.

Faults are the demand faults the server read (``HandoffStats.faults`` or, for
the copy-first handlers built from ``receive_uffd``/``serve``/``prefetch``,
``ServerStats.faults``). Each round runs every handler on (a) and (b), on
asyncio and on trio, alternately; the table shows medians, and ratios to lazy
from the same run.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import functools
import mmap
import os
import random
import socket
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from subprocess import PIPE
from typing import Any, Literal

import anyio
import attrs
from anyio.abc import ByteSendStream, Process

import uffd_async as ua

from . import _build
from ._c import native

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

PAGES = 65536  # 256 MiB of 4 KiB pages
QUICK_PAGES = 8192  # 32 MiB
FRACTION = 0.2  # of the pages in the working set
LONGEST_RUN = 64
DRIFT = 0.1  # of (a)'s runs moved elsewhere in (b)
SEED = 6  # (a)'s runs; (b)'s drift uses SEED + 1
READAHEAD = 15
BACKENDS = ("asyncio", "trio")

Workload = Literal["a", "b"]
WORKLOADS: dict[Workload, str] = {"a": "(a) the recorded set", "b": "(b) 90% overlap"}


@attrs.frozen(kw_only=True)
class Handler:
    """One way of serving the restored process."""

    key: str
    label: str
    readahead: int = 0
    prefetch: bool = False
    populate: bool = False
    #: Copied before the go byte: the working set (REAP-style) or everything (eager).
    first: Literal["set", "all"] | None = None


HANDLERS = (
    Handler(key="lazy", label="lazy"),
    Handler(key="readahead", label=f"lazy + readahead {READAHEAD}", readahead=READAHEAD),
    Handler(key="prefetch", label="prefetch", prefetch=True),
    Handler(
        key="prefetch_readahead",
        label=f"prefetch + readahead {READAHEAD}",
        prefetch=True,
        readahead=READAHEAD,
    ),
    Handler(key="reap", label="REAP-style (set first)", first="set"),
    Handler(key="eager", label="eager (all first)", first="all"),
    Handler(key="populate", label="prefetch + populate all", prefetch=True, populate=True),
)


# -- the working sets ---------------------------------------------------------


def boot_set(
    pages: int, rng: random.Random, *, fraction: float = FRACTION
) -> list[tuple[int, int]]:
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


def drifted(runs: list[tuple[int, int]], pages: int, rng: random.Random) -> list[tuple[int, int]]:
    """``runs`` with DRIFT of them (chosen by ``rng``) moved to places no run took."""
    taken = bytearray(pages)
    for first, length in runs:
        taken[first : first + length] = b"\1" * length
    out = list(runs)
    for index in rng.sample(range(len(runs)), round(len(runs) * DRIFT)):
        length = runs[index][1]
        while True:
            first = rng.randrange(pages - length + 1)
            if not any(taken[first : first + length]):
                break
        taken[first : first + length] = b"\1" * length
        out[index] = (first, length)
    return out


def page_order(runs: list[tuple[int, int]]) -> list[int]:
    return [page for first, length in runs for page in range(first, first + length)]


def _write_runs(path: Path, runs: list[tuple[int, int]]) -> None:
    with open(path, "wb") as f:
        array.array("I", [value for run in runs for value in run]).tofile(f)


def _write_snapshot(path: Path, pages: int) -> None:
    """A snapshot file whose every page holds a distinct pattern (``bench_fill_pattern``)."""
    size = pages * ua.PAGE_SIZE
    with open(path, "w+b") as f:
        f.truncate(size)
        with mmap.mmap(f.fileno(), size) as view:
            buffer = (ctypes.c_char * size).from_buffer(view)
            native().fill_pattern(ctypes.addressof(buffer), pages, ua.PAGE_SIZE)
            del buffer


@functools.cache
def peer_program() -> Path:
    """The restored process (scenarios 6 and 7), compiled once per run of the harness."""
    return _build.build("restore_peer", program=True)


# -- one run ------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Sample:
    """What one restored process measured, and what its server counted."""

    ready_ns: int  # handshake sent -> working set touched (the peer's clock)
    first_ns: int  # handshake sent -> first page read
    faults: int  # demand faults the server read
    prefetched: int  # pages copied ahead of the faults


@attrs.frozen(kw_only=True)
class Setup:
    """What every run of one invocation shares."""

    directory: Path
    snapshot: ua.Snapshot
    pages: int
    sets: dict[Workload, Path]
    timeout: float
    serial: list[int] = attrs.field(factory=lambda: [0])

    def socket_path(self) -> Path:
        self.serial[0] += 1
        return self.directory / f"s{self.serial[0]}.sock"


class RestoreFailed(RuntimeError):
    """A run failed: the restored process read a wrong page, a server failed, a timeout."""


@contextlib.asynccontextmanager
async def _peer(setup: Setup, path: Path, workload: Workload, wait: bool) -> AsyncIterator[Process]:
    command = [
        str(peer_program()),
        str(path),
        setup.snapshot.path,
        str(setup.sets[workload]),
        str(setup.pages),
        "1" if wait else "0",
    ]
    async with await anyio.open_process(command, stdin=PIPE, stdout=PIPE, stderr=PIPE) as process:
        yield process


async def _result(process: Process) -> tuple[int, int]:
    """Wait for the peer to exit; its (ready_ns, first_ns)."""
    assert process.stdout is not None and process.stderr is not None
    out = err = b""
    async for chunk in process.stdout:
        out += chunk
    async for chunk in process.stderr:
        err += chunk
    code = await process.wait()
    if code != 0:
        raise RestoreFailed(f"the restored process exited with {code}: {err.decode().strip()}")
    ready, first, _ = (int(word) for word in out.split())
    return ready, first


async def _served_by_handoff_server(
    setup: Setup,
    handler: Handler,
    workload: Workload,
    working_set: ua.WorkingSet | None,
    record: Path | None = None,
) -> Sample:
    """``serve_handoffs`` serves one process: lazily, with readahead, or with prefetch."""
    path = setup.socket_path()
    serving = functools.partial(
        ua.serve_handoffs,
        path,
        setup.snapshot,
        readahead=handler.readahead,
        prefetch=working_set if handler.prefetch else None,
        populate=handler.populate,
        record=record,
    )
    async with anyio.create_task_group() as tg:
        server: ua.HandoffServer = await tg.start(serving)
        async with _peer(setup, path, workload, wait=False) as process:
            ready, first = await _result(process)
        stats = await handoff_over(server)
        tg.cancel_scope.cancel()
    return Sample(ready_ns=ready, first_ns=first, faults=stats.faults, prefetched=stats.prefetched)


async def handoff_over(server: ua.HandoffServer) -> ua.HandoffStats:
    """The server's stats once it saw the process exit (its counters are final then)."""
    while True:
        stats = server.stats
        if stats.refused or stats.failed:
            raise RestoreFailed(f"the server refused or failed the handoff: {stats}")
        if stats.served and not stats.active:
            return stats
        await anyio.sleep(0.002)


async def _copied_first(
    setup: Setup, handler: Handler, workload: Workload, working_set: ua.WorkingSet
) -> Sample:
    """REAP-style and eager: copy first, then let the process run (a go byte), serving
    whatever it faults on meanwhile. Built from the library's public pieces."""
    path = setup.socket_path()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        listener.bind(str(path))
        listener.listen()
        listener.setblocking(False)
        found: list[tuple[Any, ua.PrefetchStats]] = []
        async with anyio.create_task_group() as tg:
            async with _peer(setup, path, workload, wait=True) as process:
                assert process.stdin is not None
                tg.start_soon(
                    _copy_then_go, setup, handler, working_set, listener, process.stdin, found
                )
                ready, first = await _result(process)
            tg.cancel_scope.cancel()
    path.unlink()
    if not found:
        raise RestoreFailed("the copy-first handler never served the process")
    server, prefetched = found[0]
    return Sample(
        ready_ns=ready, first_ns=first, faults=server.stats.faults, prefetched=prefetched.prefetched
    )


async def _copy_then_go(
    setup: Setup,
    handler: Handler,
    working_set: ua.WorkingSet,
    listener: socket.socket,
    go: ByteSendStream,
    found: list[tuple[Any, ua.PrefetchStats]],
) -> None:
    await anyio.wait_readable(listener)
    conn, _ = listener.accept()
    with conn:
        handoff = await ua.receive_uffd(conn, backing_size=setup.snapshot.size)
        with handoff:
            resolver = setup.snapshot.resolver(handoff.mappings)
            async with anyio.create_task_group() as tg:
                server = await tg.start(functools.partial(ua.serve, handoff.uffd, resolver))
                stats = ua.PrefetchStats()
                found.append((server, stats))
                chosen = working_set if handler.first == "set" else None
                await ua.prefetch(
                    handoff.uffd, resolver, chosen, populate=handler.first == "all", stats=stats
                )
                await go.send(b"g")
                await anyio.sleep_forever()  # serving, until the process has exited


async def run_once(
    setup: Setup, handler: Handler, workload: Workload, working_set: ua.WorkingSet
) -> Sample:
    with anyio.fail_after(setup.timeout):
        if handler.first is not None:
            return await _copied_first(setup, handler, workload, working_set)
        return await _served_by_handoff_server(setup, handler, workload, working_set)


async def _record(setup: Setup, path: Path) -> Sample:
    with anyio.fail_after(setup.timeout):
        return await _served_by_handoff_server(setup, HANDLERS[0], "a", None, record=path)


async def _rounds(
    setup: Setup, working_set: ua.WorkingSet, rounds: int
) -> dict[tuple[str, str], list[Sample]]:
    samples: dict[tuple[str, str], list[Sample]] = {}
    for _ in range(rounds):
        for workload in WORKLOADS:
            for handler in HANDLERS:
                sample = await run_once(setup, handler, workload, working_set)
                samples.setdefault((workload, handler.key), []).append(sample)
    return samples


# -- the scenario ---------------------------------------------------------------


def _run(function: Callable[..., Any], *args: Any, backend: str) -> Any:
    """``anyio.run``, with a failure inside task groups raised as one RestoreFailed."""
    try:
        return anyio.run(function, *args, backend=backend)
    except Exception as exc:
        leaf: BaseException = exc
        while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
            leaf = leaf.exceptions[0]
        if isinstance(leaf, RestoreFailed):
            raise leaf from None
        raise RestoreFailed(f"scenario 6 on {backend}: {leaf!r}") from exc


def measure(*, quick: bool, rounds: int, timeout: float) -> dict[str, Any]:
    """Record once, then every handler on (a) and (b), on every backend, ``rounds`` times."""
    pages = QUICK_PAGES if quick else PAGES
    runs_a = boot_set(pages, random.Random(SEED))
    runs_b = drifted(runs_a, pages, random.Random(SEED + 1))
    order_a = page_order(runs_a)
    overlap = len(set(order_a) & set(page_order(runs_b))) / len(order_a)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    peer_program()
    with tempfile.TemporaryDirectory(prefix="uffd-bench-", dir=shm) as where:
        directory = Path(where)
        _write_snapshot(directory / "snapshot.mem", pages)
        _write_runs(directory / "a.set", runs_a)
        _write_runs(directory / "b.set", runs_b)
        with ua.Snapshot(directory / "snapshot.mem") as snapshot:
            setup = Setup(
                directory=directory,
                snapshot=snapshot,
                pages=pages,
                sets={"a": directory / "a.set", "b": directory / "b.set"},
                timeout=timeout,
            )
            recorded = directory / "a.ws"
            recording = _run(_record, setup, recorded, backend="asyncio")
            working_set = ua.WorkingSet.load(recorded)
            if list(working_set.pages) != order_a:
                raise RestoreFailed(
                    f"the recording holds {len(working_set.pages)} pages, not the "
                    f"{len(order_a)} the process touched, in its order"
                )
            results: list[dict[str, Any]] = []
            for backend in BACKENDS:
                samples = _run(_rounds, setup, working_set, rounds, backend=backend)
                results.extend(_summary(backend, samples))
    return {
        "key": "6",
        "title": "Restore to ready",
        "pages": pages,
        "set_pages": len(order_a),
        "set_runs": len(runs_a),
        "overlap": overlap,
        "recorded_pages": len(working_set.pages),
        "recording_ms": recording.ready_ns / 1e6,
        "rounds": rounds,
        "results": results,
        "targets": targets(results),
    }


def _summary(backend: str, samples: dict[tuple[str, str], list[Sample]]) -> list[dict[str, Any]]:
    out = []
    for workload in WORKLOADS:
        lazy = samples[(workload, "lazy")]
        lazy_ms = statistics.median(s.ready_ns for s in lazy) / 1e6
        lazy_faults = statistics.median(s.faults for s in lazy)
        for handler in HANDLERS:
            runs = samples[(workload, handler.key)]
            ms = statistics.median(s.ready_ns for s in runs) / 1e6
            faults = statistics.median(s.faults for s in runs)
            out.append(
                {
                    "backend": backend,
                    "workload": workload,
                    "handler": handler.key,
                    "label": handler.label,
                    "median_ms": ms,
                    "first_ms": statistics.median(s.first_ns for s in runs) / 1e6,
                    "faults": faults,
                    "prefetched": statistics.median(s.prefetched for s in runs),
                    "vs_lazy": lazy_ms / ms,
                    "fewer_faults": lazy_faults / faults if faults else None,
                    "samples": [attrs.asdict(s) for s in runs],
                }
            )
    return out


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, per backend: met or missed."""
    out = []
    for backend in BACKENDS:
        got = {(r["workload"], r["handler"]): r for r in results if r["backend"] == backend}
        if got:
            out.extend(_targets_of(backend, got))
    return out


def _targets_of(backend: str, got: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    def faster(workload: str, than: str) -> float:
        return float(got[(workload, than)]["median_ms"] / got[(workload, "prefetch")]["median_ms"])

    fewer = got[("a", "lazy")]["faults"] / max(got[("a", "prefetch")]["faults"], 1)
    checks = [
        ("prefetch vs lazy (a)", faster("a", "lazy"), 8.0),
        (f"prefetch vs readahead {READAHEAD} (a)", faster("a", "readahead"), 2.0),
        ("prefetch vs lazy (b)", faster("b", "lazy"), 4.0),
        ("demand faults, lazy / prefetch (a)", float(fewer), 30.0),
    ]
    for workload in WORKLOADS:
        checks.append((f"prefetch vs REAP-style ({workload})", faster(workload, "reap"), 1.0))
        checks.append((f"prefetch vs eager ({workload})", faster(workload, "eager"), 1.0))
    return [
        {"backend": backend, "what": what, "value": value, "target": want, "met": value >= want}
        for what, value, want in checks
    ]


def restore_table(report: dict[str, Any]) -> str:
    mib = report["pages"] * ua.PAGE_SIZE >> 20
    lines = [
        "6. Restore to ready",
        f"   a process maps {mib} MiB, hands its uffd over as Firecracker 1.12 does, and reads a "
        f"boot-like set: {report['set_pages']:,} pages "
        f"({report['set_pages'] / report['pages']:.0%}) in {report['set_runs']} runs of "
        f"1-{LONGEST_RUN}, seeded order",
        f"   (b) moves {DRIFT:.0%} of the runs ({report['overlap']:.1%} of the pages overlap); the "
        f"set was recorded once from a lazy run of (a): {report['recorded_pages']:,} pages",
        "   ms: handshake sent -> set touched (the process's clock, median); faults: demand "
        "faults the server read; x: vs lazy",
        f"  {'backend':<8} {'handler':<24} {'(a) ms':>8} {'x':>6} {'faults':>7} {'x':>6}"
        f"   {'(b) ms':>8} {'x':>6} {'faults':>7} {'x':>6}",
    ]
    rows = {(r["backend"], r["handler"], r["workload"]): r for r in report["results"]}
    for backend in BACKENDS:
        for handler in HANDLERS:
            cells = []
            for workload in WORKLOADS:
                r = rows.get((backend, handler.key, workload))
                if r is None:
                    continue
                fewer = f"{r['fewer_faults']:>5.1f}x" if r["fewer_faults"] else f"{'-':>6}"
                cells.append(
                    f"{r['median_ms']:>8.1f} {r['vs_lazy']:>5.1f}x {r['faults']:>7,.0f} {fewer}"
                )
            if cells:
                lines.append(f"  {backend:<8} {handler.label:<24} " + "   ".join(cells))
    for backend in BACKENDS:
        checks = [t for t in report["targets"] if t["backend"] == backend]
        if checks:
            lines.append(f"  targets ({backend}):")
        for t in checks:
            verdict = "met" if t["met"] else "MISSED"
            lines.append(f"    {t['what']:<40} {t['value']:>6.1f}x  >= {t['target']:g}x  {verdict}")
    return "\n".join(lines)
