"""Scenario 8: live snapshots. What does a snapshot cost a program that never stops writing?

A 256 MiB region (16 MiB with ``--quick``) of this process is registered WP on a
uffd opened with ``WP_UNPOPULATED | EVENT_REMOVE | EVENT_REMAP | EVENT_UNMAP``,
and 4 native writer threads (``benchmarks/c/live_writers.c``: pthreads driven
through ctypes, so they never hold the GIL) write to it continuously, with no
sleep: each write stores 64 bytes (one cache line) at a random 64-byte aligned
offset of a random page, as a program's scattered stores do (a full-page
memset would be a bulk copy, rarer, and 40 times fewer writes for the same
faults). Each writer counts its writes and times each one on CLOCK_MONOTONIC;
one that took more than 20 us (a fault, or the thread descheduled) is a stall,
recorded with its length and whether the writer was preempted meanwhile (an
involuntary context switch); the others are "waits" (in a fault or a pause,
then for a CPU). The writers run from the start to the end of the scenario;
one round is run first and not counted (not with ``--quick``: fresh page
cache and first files); each round measures, in turn:

* **none**: a window with no snapshot (the baseline rate, and the stalls the
  scheduler alone causes: 4 writers on 2 vCPUs are preempted);
* **stop-copy-resume**, what people do without live snapshots: pause the
  writers (a flag they check between writes; wait until all have stopped),
  write the region to a new file with ``write()`` + ``fsync()`` and rename it
  into place, resume. The copy (open to rename) is "a plain copy of the
  region"; every writer stalls for the whole pause;
* **snapshot_live** on asyncio, asyncio + uvloop (when installed) and trio: the
  image is written to a new file, msync'ed + fsync'ed and renamed into place
  by ``snapshot_live`` itself, so both methods pay the same write-back;
* **incremental** (each loop): under a ``WriteTracker``, a full live snapshot,
  then a layer (``incremental=True``) of the pages written since: here the
  writers write only a chosen 5% of the pages (seeded), so that is what changes.

Correctness, every time: before each snapshot the writers are paused (not
measured) and the region refilled with a fresh pattern (a generation per
page); they resume the moment ``task_status.started()`` returns, the
snapshot's instant, so the image must be exactly that pattern. The copy of
stop-copy-resume must equal the memory (compared before resuming, and not
counted in the writers' stall). The layer must name the base as its parent,
hold exactly the pages of the 5% set, each with the pattern written into them
just before its instant (its hashes checked too). A wrong image fails the
run (``LiveFailed``).

Reported, medians over the rounds (stalls pooled): the writers' rate during
each snapshot (from its instant to its end) as a fraction of the baseline of
the same round; their stall p50/p99/max, and the longest wait; the snapshot's
time and that time as a multiple of the plain copy's in the same round; the
CPU the snapshot itself took (the process's CPU time less the writers'), since
on 2 vCPUs it comes out of the writers'. ``python -m benchmarks._live
--threads N`` runs this scenario alone with another number of writers.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

import uffd_async as ua
from uffd_async._core._loops import choose_backend, uvloop_available

from . import _build

PAGES = 65536  # 256 MiB of 4 KiB pages
QUICK_PAGES = 4096  # 16 MiB
THREADS = 4
WRITE_BYTES = 64  # live_writers.c: LINE
STALL_US = 20
BASELINE_S, QUICK_BASELINE_S = 1.0, 0.2
DIRTY = 0.05  # of the pages: the incremental writers' set
RUN_AFTER_S, QUICK_RUN_AFTER_S = 0.2, 0.05  # writers on the set between base and layer
SEED = 8
FEATURES = (
    ua.Feature.WP_UNPOPULATED
    | ua.Feature.EVENT_REMOVE
    | ua.Feature.EVENT_REMAP
    | ua.Feature.EVENT_UNMAP
)
LOOPS = {"asyncio": "asyncio", "uvloop": "asyncio+uvloop", "trio": "trio"}
TARGET_RATE = 0.5  # of the baseline's writes/s during a snapshot
TARGET_STALL_MS = 5.0
TARGET_VS_COPY = 2.0
TARGET_LAYER = 10.0  # layer this many times faster than a full snapshot
STALL_CAP = 1 << 20
WARM_UP = 1  # rounds run first and not counted (not with --quick)


class LiveFailed(RuntimeError):
    """An image that is not the memory at its instant, or writers that would not run."""


def loops() -> dict[str, str]:
    """The loops measured here: uvloop only when it is installed."""
    return {name: loop for name, loop in LOOPS.items() if name != "uvloop" or uvloop_available()}


# -- the writers (C) ------------------------------------------------------------------


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_build.build("live_writers")), use_errno=True)
    u64, i64, ptr = ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p
    lib.lw_start.argtypes = [u64, u64, u64, ctypes.c_uint32, i64, u64]
    lib.lw_start.restype = ptr
    lib.lw_pause.argtypes = [ptr, ctypes.c_int]
    lib.lw_pause.restype = None
    lib.lw_release.argtypes = [ptr]
    lib.lw_release.restype = i64
    lib.lw_resume.argtypes = [ptr]
    lib.lw_resume.restype = i64
    lib.lw_set_pages.argtypes = [ptr, ptr, u64]
    lib.lw_set_pages.restype = ctypes.c_int
    lib.lw_writes.argtypes = [ptr]
    lib.lw_writes.restype = u64
    lib.lw_cpu_ns.argtypes = [ptr]
    lib.lw_cpu_ns.restype = i64
    lib.lw_stalls.argtypes = [ptr, i64, i64, ptr, u64, ctypes.POINTER(ctypes.c_int32)]
    lib.lw_stalls.restype = u64
    lib.lw_stop.argtypes = [ptr]
    lib.lw_stop.restype = None
    lib.lw_fill.argtypes = [u64, u64, u64, u64, ptr, u64]
    lib.lw_fill.restype = None
    lib.lw_verify.argtypes = [u64, u64, u64, u64, ptr]
    lib.lw_verify.restype = i64
    lib.lw_compare.argtypes = [u64, u64, u64, u64]
    lib.lw_compare.restype = i64
    return lib


def _indexes(pages: Sequence[int]) -> ctypes.Array[ctypes.c_uint32]:
    return (ctypes.c_uint32 * len(pages))(*pages)


def fill(address: int, pages: int, generation: int, only: Sequence[int] | None = None) -> None:
    """Write generation's pattern into every page (or only those listed)."""
    if only is None:
        _lib().lw_fill(address, pages, ua.PAGE_SIZE, generation, None, 0)
    else:
        listed = _indexes(only)
        _lib().lw_fill(address, pages, ua.PAGE_SIZE, generation, listed, len(only))


def verify(address: int, count: int, generation: int, indexes: Sequence[int] | None = None) -> int:
    """The first of ``count`` pages at ``address`` without generation's pattern, or -1."""
    listed = _indexes(indexes) if indexes is not None else None
    return int(_lib().lw_verify(address, count, ua.PAGE_SIZE, generation, listed))


class Writers:
    """``threads`` writer threads on ``[address, address + pages * PAGE_SIZE)``, writing
    from the moment they are created until :meth:`stop`."""

    def __init__(self, address: int, pages: int, threads: int, seed: int) -> None:
        self._lib = _lib()
        handle = self._lib.lw_start(address, pages, ua.PAGE_SIZE, threads, STALL_US * 1000, seed)
        if not handle:
            err = ctypes.get_errno()
            raise OSError(err, f"the writers could not start: {os.strerror(err)}")
        self._handle: int | None = handle
        self._out = (ctypes.c_int64 * STALL_CAP)()

    def pause(self, measured: bool = False) -> None:
        """Stop them between writes; returns once all have stopped. Never from the loop's
        thread while a write may be blocked in a fault only the loop can serve."""
        self._lib.lw_pause(self._handle, int(measured))

    def release(self) -> int:
        """A measured pause's stall counts up to now (then again from the resume)."""
        return int(self._lib.lw_release(self._handle))

    def resume(self) -> int:
        """Let them go on; returns when (CLOCK_MONOTONIC ns)."""
        return int(self._lib.lw_resume(self._handle))

    def only(self, pages: Sequence[int] | None) -> None:
        """Write only these pages from now on (None: all); only while paused."""
        listed = _indexes(pages) if pages else None
        err = self._lib.lw_set_pages(self._handle, listed, len(pages) if pages else 0)
        if err:
            raise OSError(err, f"setting the writers' pages failed: {os.strerror(err)}")

    def writes(self) -> int:
        return int(self._lib.lw_writes(self._handle))

    def cpu_ns(self) -> int:
        return int(self._lib.lw_cpu_ns(self._handle))

    def stalls(self, start: int, end: int) -> list[int]:
        """Lengths (ns) of the stalls that overlap ``[start, end]`` (monotonic ns), negated
        where the writer was preempted meanwhile (the rest only waited)."""
        overrun = ctypes.c_int32()
        found = self._lib.lw_stalls(
            self._handle, start, end, self._out, STALL_CAP, ctypes.byref(overrun)
        )
        if overrun.value or found > STALL_CAP:
            raise LiveFailed("the writers recorded more stalls than their rings hold")
        return list(self._out[:found])

    def stop(self) -> None:
        handle, self._handle = self._handle, None
        if handle:
            self._lib.lw_stop(handle)


# -- one measurement ------------------------------------------------------------------


class Lab:
    """What every measurement of one run shares."""

    def __init__(self, directory: Path, region: ua.Region, uffd: ua.Userfaultfd,
                 writers: Writers, timeout: float) -> None:  # fmt: skip
        self.directory = directory
        self.region = region
        self.uffd = uffd
        self.writers = writers
        self.pages = region.length // ua.PAGE_SIZE
        self.timeout = timeout
        self.generation = 0

    def refill(self, only: Sequence[int] | None = None) -> int:
        """A fresh generation of the pattern (the writers paused); returns it."""
        self.generation = (self.generation + 1) & 0xFFFF
        fill(self.region.address, self.pages, self.generation, only)
        return self.generation


@contextmanager
def _mapped(path: Path, length: int) -> Iterator[int]:
    """The file at ``path`` mapped (private, never written): its address."""
    size = path.stat().st_size
    if size != length:
        raise LiveFailed(f"{path.name} is {size} bytes, not {length}")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), length, access=mmap.ACCESS_COPY) as view:
        buffer = (ctypes.c_char * length).from_buffer(view)
        try:
            yield ctypes.addressof(buffer)
        finally:
            del buffer


def _check_image(path: Path, length: int, generation: int, what: str) -> None:
    with _mapped(path, length) as address:
        bad = verify(address, length // ua.PAGE_SIZE, generation)
    if bad >= 0:
        raise LiveFailed(f"{what}: page {bad} of the image is not the memory at the instant")


class _Cpu:
    """The process's CPU time less the writers': what the snapshot itself took."""

    def __init__(self, writers: Writers) -> None:
        self._writers = writers
        self._process = time.process_time_ns()
        self._theirs = writers.cpu_ns()

    def used_ns(self) -> int:
        process = time.process_time_ns() - self._process
        return process - (self._writers.cpu_ns() - self._theirs)


def _window(start: int, end: int, writes: int, **more: Any) -> dict[str, Any]:
    return {"window_ns": end - start, "writes": writes, "stalls": (start, end), **more}


def baseline(lab: Lab, seconds: float) -> dict[str, Any]:
    before, start = lab.writers.writes(), time.monotonic_ns()
    time.sleep(seconds)
    end, after = time.monotonic_ns(), lab.writers.writes()
    return _window(start, end, after - before)


def stop_copy_resume(lab: Lab) -> dict[str, Any]:
    """Pause, write the region to a new file + fsync + rename, resume."""
    region, writers = lab.region, lab.writers
    final, partial = lab.directory / "copy.img", lab.directory / "copy.img.tmp"
    source = memoryview((ctypes.c_char * region.length).from_address(region.address)).cast("B")
    cpu = _Cpu(writers)
    before, start = writers.writes(), time.monotonic_ns()
    writers.pause(measured=True)
    paused, stopped = time.monotonic_ns(), writers.writes()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        done = 0
        while done < region.length:
            done += os.write(fd, source[done:])
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, final)
    copied = writers.release()
    used = cpu.used_ns()
    try:
        with _mapped(final, region.length) as address:
            bad = int(_lib().lw_compare(region.address, address, region.length, ua.PAGE_SIZE))
        if bad >= 0:
            raise LiveFailed(f"stop-copy-resume: page {bad} of the copy is not the memory")
    finally:
        resumed = writers.resume()
    return _window(
        start, copied, stopped - before, snapshot_ns=copied - start,
        copy_ns=copied - paused, stall_end=resumed, cpu_ns=used,
    )  # fmt: skip


async def _paused(lab: Lab) -> None:
    """Pause the writers (setup) from a thread: one may be in a fault the loop serves."""
    await anyio.to_thread.run_sync(lab.writers.pause)


async def _snapshot(lab: Lab, dest: Path, **options: Any) -> tuple[dict[str, Any], Any]:
    """One timed ``snapshot_live`` with the writers (paused) resumed at its instant."""
    region, writers = lab.region, lab.writers
    cpu = _Cpu(writers)
    before = writers.writes()
    began = time.monotonic_ns()
    with anyio.fail_after(lab.timeout):
        async with anyio.create_task_group() as tg:
            run = functools.partial(
                ua.snapshot_live, lab.uffd, region.address, region.length, dest, **options
            )
            stats = await tg.start(run)
            resumed = writers.resume()
    ended, after = time.monotonic_ns(), writers.writes()
    used = cpu.used_ns()
    if stats.pages != stats.total or stats.lost or stats.discarded:
        raise LiveFailed(f"{dest.name}: {stats}")
    sample = _window(
        resumed, ended, after - before, snapshot_ns=ended - began, early=stats.early,
        pages=stats.pages, longest_wait_ns=int(stats.longest_wait * 1e9), cpu_ns=used,
    )  # fmt: skip
    return sample, stats


async def live(lab: Lab) -> dict[str, Any]:
    await _paused(lab)
    generation = lab.refill()
    dest = lab.directory / "live.img"
    sample, stats = await _snapshot(lab, dest)
    if stats.total != lab.pages:
        raise LiveFailed(f"live: {stats.total} pages to save, not {lab.pages}")
    _check_image(dest, lab.region.length, generation, "snapshot_live")
    return sample


async def incremental(lab: Lab, dirty: list[int], run_after: float) -> dict[str, Any]:
    """Under a tracker: a full live snapshot, the writers on ``dirty`` only, then a layer."""
    region, writers = lab.region, lab.writers
    await _paused(lab)
    first = lab.refill()
    writers.only(dirty)
    base, layer = lab.directory / "base.img", lab.directory / "1.layer"
    try:
        async with ua.WriteTracker(
            lab.uffd, region.address, region.length, register=False
        ) as tracker:
            full, base_stats = await _snapshot(lab, base, tracker=tracker)
            _check_image(base, region.length, first, "snapshot_live (tracker)")
            await anyio.sleep(run_after)  # the writers go on changing the set
            await _paused(lab)
            second = (lab.generation + 1) & 0xFFFF
            lab.generation = second  # into the set's pages: each faults once, to the tracker
            await anyio.to_thread.run_sync(fill, region.address, lab.pages, second, dirty)
            part, layer_stats = await _snapshot(
                lab, layer, tracker=tracker, incremental=True, parent=base_stats.identity
            )
    finally:
        with anyio.CancelScope(shield=True):
            await _paused(lab)
        writers.only(None)
        writers.resume()
    if layer_stats.total != len(dirty):
        raise LiveFailed(f"the layer has {layer_stats.total} pages, not the {len(dirty)} written")
    with ua.Layer.open(layer) as opened:
        pages = [p for first_page, n in opened.runs for p in range(first_page, first_page + n)]
        if opened.parent != base_stats.identity or pages != dirty:
            raise LiveFailed("the layer does not name the base, or holds other pages")
        bad = verify(opened._data, opened.page_count, second, dirty)  # its pages, mapped
        if bad >= 0:
            raise LiveFailed(f"page {dirty[bad]} of the layer is not the memory at its instant")
        opened.verify()
    return {"full": full, "layer": part}


async def _live_rounds(lab: Lab, dirty: list[int], run_after: float) -> dict[str, Any]:
    return {"live": await live(lab), **await incremental(lab, dirty, run_after)}


def _run(function: Callable[..., Any], *args: Any, loop: str) -> Any:
    backend, options = choose_backend(loop)
    return anyio.run(function, *args, backend=backend, backend_options=options)


# -- the scenario ---------------------------------------------------------------------


def measure(*, quick: bool, rounds: int, timeout: float, threads: int = THREADS) -> dict[str, Any]:
    """Every method, ``rounds`` times, alternately, with the writers running throughout."""
    pages = QUICK_PAGES if quick else PAGES
    window = QUICK_BASELINE_S if quick else BASELINE_S
    run_after = QUICK_RUN_AFTER_S if quick else RUN_AFTER_S
    dirty = sorted(random.Random(SEED).sample(range(pages), round(pages * DIRTY)))
    names = loops()
    samples: dict[str, list[dict[str, Any]]] = {}
    _lib()
    with (
        tempfile.TemporaryDirectory(prefix="uffd-bench-live-") as where,
        ua.Region.anonymous(pages * ua.PAGE_SIZE) as region,
        ua.Userfaultfd.open(FEATURES) as uffd,
    ):
        uffd.register(region.address, region.length, ua.Mode.WP)
        fill(region.address, pages, 0)
        writers = Writers(region.address, pages, threads, SEED)
        lab = Lab(Path(where), region, uffd, writers, timeout)
        try:
            for index in range(WARM_UP * (not quick) + rounds):
                taken: dict[str, dict[str, Any]] = {"none": baseline(lab, window)}
                taken["stop-copy-resume"] = stop_copy_resume(lab)
                for name, loop in names.items():
                    got = _run(_live_rounds, lab, dirty, run_after, loop=loop)
                    for kind, sample in got.items():
                        taken[f"{kind}/{name}"] = sample
                time.sleep(0.02)  # every writer has written once more: its stall is recorded
                rate = taken["none"]["writes"] / taken["none"]["window_ns"]
                if index < WARM_UP * (not quick):
                    continue  # fresh page cache, first files: not what a snapshot costs
                for key, sample in taken.items():
                    start, end = sample.pop("stalls")
                    sample["stalls_ns"] = writers.stalls(start, sample.get("stall_end", end))
                    if not key.startswith(("full/", "layer/")):  # those write 5% of the pages
                        sample["vs_none"] = sample["writes"] / sample["window_ns"] / rate
                    if "snapshot_ns" in sample:
                        sample["vs_copy"] = (
                            sample["snapshot_ns"] / taken["stop-copy-resume"]["copy_ns"]
                        )
                    samples.setdefault(key, []).append(sample)
        finally:
            if not uffd.closed:  # no writer may stay blocked: unprotect all, then stop them
                uffd.writeprotect(region.address, region.length, protect=False)
            writers.stop()
    return _report(pages, rounds, threads, dirty, names, samples)


def _percentile(values: Sequence[int], p: float) -> float:
    """Nearest-rank percentile, ns to ms; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))] / 1e6


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    stalls = [abs(s) for run in runs for s in run["stalls_ns"]]
    waits = [s for run in runs for s in run["stalls_ns"] if s > 0]
    out: dict[str, Any] = {
        "writes_per_s": statistics.median(r["writes"] / r["window_ns"] * 1e9 for r in runs),
        "stalls": statistics.median(len(r["stalls_ns"]) for r in runs),
        "stall_p50_ms": _percentile(stalls, 50),
        "stall_p99_ms": _percentile(stalls, 99),
        "stall_max_ms": _percentile(stalls, 100),
        # stalls in which the writer was never preempted: a fault (or pause), then a CPU
        "waits": statistics.median(sum(s > 0 for s in r["stalls_ns"]) for r in runs),
        "wait_p99_ms": _percentile(waits, 99),
        "wait_max_ms": _percentile(waits, 100),
        "window_ms": statistics.median(r["window_ns"] for r in runs) / 1e6,
    }
    if "vs_none" in runs[0]:
        out["vs_none"] = statistics.median(r["vs_none"] for r in runs)
    for key in ("snapshot_ns", "copy_ns", "cpu_ns", "longest_wait_ns"):
        if key in runs[0]:
            out[key.replace("_ns", "_ms")] = statistics.median(r[key] for r in runs) / 1e6
    for key in ("vs_copy", "early", "pages"):
        if key in runs[0]:
            out[key] = statistics.median(r[key] for r in runs)
    out["samples"] = [
        {k: v for k, v in r.items() if k != "stalls_ns"} | {"stalls": len(r["stalls_ns"])}
        for r in runs
    ]
    return out


def _report(pages: int, rounds: int, threads: int, dirty: list[int], names: dict[str, str],
            samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:  # fmt: skip
    methods = {key: _summary(runs) for key, runs in samples.items()}
    incremental_rows = []
    for name in names:
        full, layer = samples[f"full/{name}"], samples[f"layer/{name}"]
        incremental_rows.append(
            {
                "loop": name,
                "dirty_pages": len(dirty),
                "full_ms": statistics.median(r["snapshot_ns"] for r in full) / 1e6,
                "layer_ms": statistics.median(r["snapshot_ns"] for r in layer) / 1e6,
                "faster": statistics.median(
                    f["snapshot_ns"] / p["snapshot_ns"] for f, p in zip(full, layer, strict=True)
                ),
                "layer_stall_max_ms": methods[f"layer/{name}"]["stall_max_ms"],
            }
        )
    return {
        "key": "8",
        "title": "Live snapshot",
        "pages": pages,
        "threads": threads,
        "write_bytes": WRITE_BYTES,
        "stall_us": STALL_US,
        "rounds": rounds,
        "methods": methods,
        "incremental": incremental_rows,
        "targets": targets(methods, incremental_rows, names),
    }


def targets(methods: dict[str, dict[str, Any]], incremental_rows: list[dict[str, Any]],
            names: dict[str, str]) -> list[dict[str, Any]]:  # fmt: skip
    out = []
    for name in names:
        got = methods[f"live/{name}"]
        out.append(_target(name, "writes/s during the snapshot vs none", got["vs_none"],
                           TARGET_RATE, higher=True))  # fmt: skip
        out.append(_target(name, "longest writer stall (ms)", got["stall_max_ms"],
                           TARGET_STALL_MS, higher=False))  # fmt: skip
        out.append(_target(name, "... of those never preempted (ms)", got["wait_max_ms"],
                           TARGET_STALL_MS, higher=False))  # fmt: skip
        out.append(_target(name, "snapshot time vs a plain copy", got["vs_copy"],
                           TARGET_VS_COPY, higher=False))  # fmt: skip
    for row in incremental_rows:
        out.append(_target(row["loop"], "layer faster than a full snapshot", row["faster"],
                           TARGET_LAYER, higher=True))  # fmt: skip
    return out


def _target(loop: str, what: str, value: float, target: float, *, higher: bool) -> dict[str, Any]:
    met = value >= target if higher else value < target
    return {"loop": loop, "what": what, "value": value, "target": target,
            "higher": higher, "met": met}  # fmt: skip


# -- the table ------------------------------------------------------------------------


def _row(label: str, m: dict[str, Any]) -> str:
    def cell(key: str, width: int, form: str, scale: float = 1.0) -> str:
        return f"{m[key] * scale:>{width}{form}}" if key in m else f"{'-':>{width}}"

    return (
        f"  {label:<24} {cell('snapshot_ms', 8, '.1f')} {cell('vs_copy', 7, '.2f')}"
        f"{'x' if 'vs_copy' in m else ' '} {cell('writes_per_s', 7, '.2f', 1e-6)} "
        f"{cell('vs_none', 5, '.2f')} {cell('stalls', 7, ',.0f')} {cell('stall_p50_ms', 6, '.2f')} "
        f"{cell('stall_p99_ms', 6, '.2f')} {cell('stall_max_ms', 7, '.2f')} "
        f"{cell('waits', 7, ',.0f')} {cell('wait_max_ms', 7, '.2f')} "
        f"{cell('cpu_ms', 6, '.0f')} {cell('early', 7, ',.0f')}"
    )


def live_table(report: dict[str, Any]) -> str:
    mib = report["pages"] * ua.PAGE_SIZE >> 20
    methods = report["methods"]
    none = methods["none"]
    names = [r["loop"] for r in report["incremental"]]
    lines = [
        "8. Live snapshot",
        f"   {mib} MiB WP-registered; {report['threads']} C writer threads store "
        f"{report['write_bytes']} B at random places of random pages without pause; a write "
        f"taking over {report['stall_us']} us is a stall",
        "   ms: the snapshot (stop-copy-resume: pause to renamed); vs copy: vs its copy (open to "
        "renamed); Mw/s: writes during the snapshot, x: vs none;",
        "   stalls (p50/p99/max ms), and waits: the stalls with no preemption (a fault or pause, "
        "then a CPU); cpu: the snapshot's CPU ms (process less writers); early: pages saved "
        "because a writer hit them",
        f"  {'method':<24} {'ms':>8} {'vs copy':>8} {'Mw/s':>7} {'x':>5} {'stalls':>7} "
        f"{'p50':>6} {'p99':>6} {'max':>7} {'waits':>7} {'max':>7} {'cpu':>6} {'early':>7}",
        _row("none (baseline)", none),
        _row("stop-copy-resume", methods["stop-copy-resume"]),
    ]
    lines += [_row(f"snapshot_live {name}", methods[f"live/{name}"]) for name in names]
    lines.append(
        f"   incremental: a WriteTracker; writers on {report['incremental'][0]['dirty_pages']:,} "
        "pages (5%) only; a full live snapshot, then a layer of the pages written since"
    )
    for name in names:
        lines.append(_row(f"full (tracker) {name}", methods[f"full/{name}"]))
        lines.append(_row(f"layer {name}", methods[f"layer/{name}"]))
    lines.append("  targets:")
    for t in report["targets"]:
        verdict = "met" if t["met"] else "MISSED"
        bound = ">=" if t["higher"] else "<"
        lines.append(
            f"    {t['loop']:<8} {t['what']:<38} {t['value']:>7.2f}  {bound} {t['target']:g}  "
            f"{verdict}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks._live``: this scenario alone, with other writer counts too."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks._live")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=THREADS, help="writer threads")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    report = measure(
        quick=args.quick, rounds=args.rounds, timeout=args.timeout, threads=args.threads
    )
    print(live_table(report))


if __name__ == "__main__":
    main()
