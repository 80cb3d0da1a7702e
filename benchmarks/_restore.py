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
``ServerStats.faults``). The process's clock starts as it sends the handshake
(just before ``sendmsg``: see restore_peer.c for why not after).

Beside them, the **floors** (``_floor``): the same runs copied alone into a
fresh registered region, no process: in C (the fairest floor), through the
library's copy path from Python, and by ``ua.prefetch`` on the loop. Each round
runs the floors and every handler on (a) and (b), alternately, on asyncio,
asyncio + uvloop (where installed) and trio; the table shows medians, and
ratios from the same run: to lazy, to the C floor, to REAP-style.

Then the **zero-heavy snapshots** (``_zero_images``): a real process's memory
image (scenario 10's) and a guest-like image, 90% zeros (holes and written zero
pages); the process reads set (a) from each, each page checked against the
image, served lazily, eagerly (everything copied first: the time of populating
all) and with prefetch + populate all, with zero pages mapped as zero pages
(the default) and, where ``Snapshot(zero_pages=False)`` exists, copied as any
page (the before of the before/after ratio).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import functools
import inspect
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
from uffd_async._core._loops import choose_backend, uvloop_available
from uffd_async._restore._native_replay import native_replay

from . import _build
from ._c import native
from ._floor import c_floor, prefetch_floor, python_floor
from ._memory_image import memory_image
from ._runs import LONGEST_RUN, boot_set
from ._zero_images import guest_like_image, zero_share

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

PAGES = 65536  # 256 MiB of 4 KiB pages
QUICK_PAGES = 8192  # 32 MiB
FRACTION = 0.2  # of the pages in the working set
DRIFT = 0.1  # of (a)'s runs moved elsewhere in (b)
SEED = 6  # (a)'s runs; (b)'s drift uses SEED + 1
READAHEAD = 15
#: "uvloop": asyncio on uvloop, where it is installed.
BACKENDS = ("asyncio", "uvloop", "trio")
QUICK_SCALE = 0.02  # the quick memory image's heap (as scenario 10's)

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
    #: No process at all: the set copied alone (see ``_floor``), in C, from Python with
    #: no loop, or by ``ua.prefetch``.
    floor: Literal["c", "python", "prefetch"] | None = None
    #: The prefetch's replay on the event loop (``native_replay(False)``), not in C.
    loop: bool = False


FLOORS = (
    Handler(key="floor_c", label="floor: C copy, no process", floor="c"),
    Handler(key="floor_python", label="floor: Python copy path", floor="python"),
    Handler(key="floor_prefetch", label="floor: ua.prefetch alone", floor="prefetch"),
)


HANDLERS = (
    Handler(key="lazy", label="lazy"),
    Handler(key="readahead", label=f"lazy + readahead {READAHEAD}", readahead=READAHEAD),
    Handler(key="prefetch", label="prefetch", prefetch=True),
    Handler(key="prefetch_loop", label="prefetch, replay on the loop", prefetch=True, loop=True),
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
#: Zero-heavy snapshots: lazy, and the two ways of populating everything.
ZERO_HANDLERS = (HANDLERS[0], HANDLERS[6], HANDLERS[7])


# -- the working sets ---------------------------------------------------------


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
    #: restore_peer's CHECK: "pattern" (the pattern file) or "file" (read from the snapshot).
    check: str = "pattern"
    #: Each workload's runs (the floors copy these).
    runs: dict[Workload, list[tuple[int, int]]] = attrs.field(factory=dict)
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
        "1",
        setup.check,
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
    ready, first = (int(word) for word in out.split()[:2])  # CHECK "file" adds a field
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
    with native_replay(not handler.loop):
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


def _set_of(setup: Setup, workload: Workload, recorded: ua.WorkingSet) -> ua.WorkingSet:
    """The working set of the pages ``workload`` reads (for the floors of (b))."""
    if workload == "a":
        return recorded
    return attrs.evolve(recorded, pages=page_order(setup.runs[workload]))


async def _floor(
    setup: Setup, handler: Handler, workload: Workload, working_set: ua.WorkingSet
) -> Sample:
    runs = setup.runs[workload]
    if handler.floor == "c":
        ns = c_floor(setup.snapshot.path, runs, setup.pages)
    elif handler.floor == "python":
        ns = python_floor(setup.snapshot, runs, setup.pages)
    else:
        chosen = _set_of(setup, workload, working_set)
        ns = await prefetch_floor(setup.snapshot, chosen, setup.pages)
    return Sample(ready_ns=ns, first_ns=0, faults=0, prefetched=len(page_order(runs)))


async def run_once(
    setup: Setup, handler: Handler, workload: Workload, working_set: ua.WorkingSet
) -> Sample:
    with anyio.fail_after(setup.timeout):
        if handler.floor is not None:
            return await _floor(setup, handler, workload, working_set)
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
            for handler in FLOORS + HANDLERS:
                sample = await run_once(setup, handler, workload, working_set)
                samples.setdefault((workload, handler.key), []).append(sample)
    return samples


async def _zero_rounds(
    setups: dict[str, Setup], working_set: ua.WorkingSet, rounds: int
) -> dict[tuple[str, str], list[Sample]]:
    """Every zero-heavy handler on (a), for each snapshot (keyed by ``setups``)."""
    samples: dict[tuple[str, str], list[Sample]] = {}
    for _ in range(rounds):
        for name, setup in setups.items():
            for handler in ZERO_HANDLERS:
                sample = await run_once(setup, handler, "a", working_set)
                samples.setdefault((name, handler.key), []).append(sample)
    return samples


# -- the scenario ---------------------------------------------------------------


def backends() -> tuple[str, ...]:
    """The loops measured: uvloop only where it is installed."""
    return tuple(b for b in BACKENDS if b != "uvloop" or uvloop_available())


def _run(function: Callable[..., Any], *args: Any, backend: str) -> Any:
    """``anyio.run`` (``backend`` "uvloop": asyncio on uvloop), with a failure inside task
    groups raised as one RestoreFailed."""
    name, options = choose_backend("asyncio+uvloop" if backend == "uvloop" else backend)
    try:
        return anyio.run(function, *args, backend=name, backend_options=options)
    except Exception as exc:
        leaf: BaseException = exc
        while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
            leaf = leaf.exceptions[0]
        if isinstance(leaf, RestoreFailed):
            raise leaf from None
        raise RestoreFailed(f"scenario 6 on {backend}: {leaf!r}") from exc


def measure(*, quick: bool, rounds: int, timeout: float) -> dict[str, Any]:
    """Record once, then the floors and every handler on (a) and (b), on every backend,
    ``rounds`` times; then the zero-heavy snapshots."""
    pages = QUICK_PAGES if quick else PAGES
    runs_a = boot_set(pages, random.Random(SEED), fraction=FRACTION)
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
                runs={"a": runs_a, "b": runs_b},
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
            for backend in backends():
                samples = _run(_rounds, setup, working_set, rounds, backend=backend)
                results.extend(_summary(backend, samples))
        zero_heavy = _zero_heavy(directory, pages, runs_a, rounds, timeout, quick=quick)
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
        "targets": targets(results) + zero_targets(zero_heavy["results"]),
        "zero_heavy": zero_heavy,
    }


# -- zero-heavy snapshots -------------------------------------------------------


def zero_modes() -> tuple[str, ...]:
    """``zero_pages`` (the default) and ``copied`` (``Snapshot(zero_pages=False)``: every
    page a copy, as before), or ``default`` alone where the library has no such switch."""
    if "zero_pages" in inspect.signature(ua.Snapshot).parameters:
        return ("zero_pages", "copied")
    return ("default",)


def _open_snapshot(path: Path, mode: str) -> ua.Snapshot:
    if mode == "copied":
        return ua.Snapshot(path, zero_pages=False)  # type: ignore[call-arg,unused-ignore]
    return ua.Snapshot(path)


async def _warm(setups: dict[str, Setup], record: Path) -> None:
    """One lazy run on each snapshot, untimed (its zero map learnt, its pages cached), the
    first recording the working set that the prefetching handlers then replay."""
    for setup in setups.values():
        await _record(setup, record)


def _zero_heavy(
    directory: Path,
    pages: int,
    runs_a: list[tuple[int, int]],
    rounds: int,
    timeout: float,
    *,
    quick: bool,
) -> dict[str, Any]:
    """Lazy, eager and prefetch + populate all on the memory image and the guest-like
    image, each with zero pages mapped as zero pages and (where the switch exists) copied."""
    size = pages * ua.PAGE_SIZE
    image, _ = memory_image(size, QUICK_SCALE if quick else 1.0)
    guest = directory / "guest.mem"
    guest_like_image(guest, pages)
    images: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for name, path in (("memory", image), ("guest", guest)):
        images.append({"image": name, **zero_share(path)})
        with contextlib.ExitStack() as stack:
            setups = {
                mode: Setup(
                    directory=directory,
                    snapshot=stack.enter_context(_open_snapshot(path, mode)),
                    pages=pages,
                    sets={"a": directory / "a.set"},
                    timeout=timeout,
                    check="file",
                    runs={"a": runs_a},
                )
                for mode in zero_modes()
            }
            recorded = directory / f"{name}.ws"
            _run(_warm, setups, recorded, backend="asyncio")
            working_set = ua.WorkingSet.load(recorded)
            if list(working_set.pages) != page_order(runs_a):
                raise RestoreFailed(f"the recording on the {name} image is not the set read")
            for backend in backends():
                samples = _run(_zero_rounds, setups, working_set, rounds, backend=backend)
                results.extend(_zero_summary(backend, name, samples))
    guest.unlink()
    return {"modes": zero_modes(), "images": images, "results": results}


def _zero_summary(
    backend: str, image: str, samples: dict[tuple[str, str], list[Sample]]
) -> list[dict[str, Any]]:
    out = []
    for (mode, key), runs in samples.items():
        handler = next(h for h in ZERO_HANDLERS if h.key == key)
        ms = statistics.median(s.ready_ns for s in runs) / 1e6
        copied = samples.get(("copied", key))
        copied_ms = statistics.median(s.ready_ns for s in copied) / 1e6 if copied else None
        out.append(
            {
                "backend": backend,
                "image": image,
                "mode": mode,
                "handler": key,
                "label": handler.label,
                "median_ms": ms,
                "faults": statistics.median(s.faults for s in runs),
                "prefetched": statistics.median(s.prefetched for s in runs),
                "vs_copied": copied_ms / ms if copied_ms is not None else None,
                "samples": [attrs.asdict(s) for s in runs],
            }
        )
    return out


def zero_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue #21's zero-page target: on the guest-like image (90% zeros), everything
    populated first (eager) at least 5x faster with zero pages than with every page copied."""
    out = []
    for r in results:
        if (r["image"], r["mode"], r["handler"]) == ("guest", "zero_pages", "eager"):
            out.append(
                {
                    "backend": r["backend"],
                    "what": "populate all, zero pages vs copied (guest)",
                    "value": r["vs_copied"],
                    "target": 5.0,
                    "at_most": False,
                    "met": r["vs_copied"] >= 5.0,
                }
            )
    return out


# -- the report -----------------------------------------------------------------


def _median_ms(runs: list[Sample]) -> float:
    return statistics.median(s.ready_ns for s in runs) / 1e6


def _summary(backend: str, samples: dict[tuple[str, str], list[Sample]]) -> list[dict[str, Any]]:
    out = []
    for workload in WORKLOADS:
        lazy = samples[(workload, "lazy")]
        lazy_ms = _median_ms(lazy)
        lazy_faults = statistics.median(s.faults for s in lazy)
        floor_ms = _median_ms(samples[(workload, "floor_c")])
        reap_ms = _median_ms(samples[(workload, "reap")])
        for handler in FLOORS + HANDLERS:
            runs = samples[(workload, handler.key)]
            ms = _median_ms(runs)
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
                    #: times the C floor (1.0: as fast as copying the set alone)
                    "vs_floor": ms / floor_ms,
                    #: REAP-style's time over this one's (above 1.0: faster than REAP-style)
                    "vs_reap": reap_ms / ms,
                    "samples": [attrs.asdict(s) for s in runs],
                }
            )
    return out


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issues' targets, per backend: met or missed."""
    out = []
    for backend in BACKENDS:
        got = {(r["workload"], r["handler"]): r for r in results if r["backend"] == backend}
        if got:
            out.extend(_targets_of(backend, got))
    return out


def _targets_of(backend: str, got: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    def faster(workload: str, than: str, handler: str = "prefetch") -> float:
        return float(got[(workload, than)]["median_ms"] / got[(workload, handler)]["median_ms"])

    fewer = got[("a", "lazy")]["faults"] / max(got[("a", "prefetch")]["faults"], 1)
    # (what, value, target, at most): "at most" checks are met at or below the target
    checks = [
        ("prefetch vs lazy (a)", faster("a", "lazy"), 8.0, False),
        (f"prefetch vs readahead {READAHEAD} (a)", faster("a", "readahead"), 2.0, False),
        ("prefetch vs lazy (b)", faster("b", "lazy"), 4.0, False),
        ("demand faults, lazy / prefetch (a)", float(fewer), 30.0, False),
        ("#21: prefetch / C floor (a)", float(got[("a", "prefetch")]["vs_floor"]), 1.5, True),
        (f"#21: prefetch vs readahead {READAHEAD} (b)", faster("b", "readahead"), 1.0, False),
        (
            f"#21: prefetch + readahead vs readahead {READAHEAD} (b)",
            faster("b", "readahead", "prefetch_readahead"),
            1.0,
            False,
        ),
    ]
    for workload in WORKLOADS:
        checks.append((f"prefetch vs REAP-style ({workload})", faster(workload, "reap"), 1, False))
        checks.append((f"prefetch vs eager ({workload})", faster(workload, "eager"), 1, False))
    return [
        {
            "backend": backend,
            "what": what,
            "value": value,
            "target": want,
            "at_most": at_most,
            "met": value <= want if at_most else value >= want,
        }
        for what, value, want, at_most in checks
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
        "   ms: handshake sent -> set touched (the process's clock, median); floors: the set "
        "copied alone, no process; x lazy: speed-up; x floor: times the C floor; x REAP: "
        "REAP-style's time / this one's",
        f"  {'backend':<8} {'handler':<26} {'(a) ms':>8} {'xlazy':>6} {'xfloor':>6} {'xREAP':>6}"
        f" {'faults':>7}   {'(b) ms':>8} {'xlazy':>6} {'xfloor':>6} {'xREAP':>6} {'faults':>7}",
    ]
    rows = {(r["backend"], r["handler"], r["workload"]): r for r in report["results"]}
    for backend in BACKENDS:
        for handler in FLOORS + HANDLERS:
            cells = []
            for workload in WORKLOADS:
                r = rows.get((backend, handler.key, workload))
                if r is None:
                    continue
                cells.append(
                    f"{r['median_ms']:>8.1f} {r['vs_lazy']:>5.1f}x {r['vs_floor']:>5.1f}x "
                    f"{r['vs_reap']:>5.2f}x {r['faults']:>7,.0f}"
                )
            if cells:
                lines.append(f"  {backend:<8} {handler.label:<26} " + "   ".join(cells))
    lines.extend(_zero_lines(report.get("zero_heavy")))
    for backend in BACKENDS:
        checks = [t for t in report["targets"] if t["backend"] == backend]
        if checks:
            lines.append(f"  targets ({backend}):")
        for t in checks:
            verdict = "met" if t["met"] else "MISSED"
            sign = "<=" if t.get("at_most") else ">="
            lines.append(
                f"    {t['what']:<52} {t['value']:>6.2f}x  {sign} {t['target']:g}x  {verdict}"
            )
    return "\n".join(lines)


def _zero_lines(zero: dict[str, Any] | None) -> list[str]:
    if not zero:
        return []
    lines = ["   zero-heavy snapshots (set (a), the page checked against the image):"]
    for about in zero["images"]:
        lines.append(
            f"   {about['image']}: {about['zero_pages']:.0%} zero pages, {about['holes']:.0%} holes"
        )
    if "copied" not in zero["modes"]:
        lines.append("   (this library has no Snapshot(zero_pages=False): one mode only)")
    lines.append(
        f"  {'backend':<8} {'image':<7} {'handler':<26} "
        + " ".join(f"{mode + ' ms':>15} {'faults':>7}" for mode in zero["modes"])
        + (f" {'x copied':>9}" if "copied" in zero["modes"] else "")
    )
    rows = {(r["backend"], r["image"], r["handler"], r["mode"]): r for r in zero["results"]}
    for backend in BACKENDS:
        for about in zero["images"]:
            for handler in ZERO_HANDLERS:
                got = [rows.get((backend, about["image"], handler.key, m)) for m in zero["modes"]]
                if any(r is None for r in got):
                    continue
                cells = " ".join(f"{r['median_ms']:>15.1f} {r['faults']:>7,.0f}" for r in got if r)
                speed = got[0]["vs_copied"] if got[0] else None
                tail = f" {speed:>8.1f}x" if speed is not None and len(got) > 1 else ""
                lines.append(
                    f"  {backend:<8} {about['image']:<7} {handler.label:<26} {cells}{tail}"
                )
    return lines
