"""ctypes bindings for the C side: the reference handler and the workload.

Every call here goes through ctypes, which releases the GIL for the length of
the foreign call: the workload may fault and sleep in the kernel while a
Python handler in this process keeps running. The libraries are compiled
once per process, on first use (see ``_build``).
"""

from __future__ import annotations

import ctypes
import functools
import os

from . import _build

MISSING, WP = 0, 1  # handler.c: BENCH_MISSING, BENCH_WP
ACCESS = {"read": 0, "touch": 1, "mark": 2}  # workload.c: BENCH_READ, BENCH_TOUCH, BENCH_MARK


class HandlerConfig(ctypes.Structure):
    """``struct bench_handler_config`` in handler.c."""

    _fields_ = [
        ("uffd", ctypes.c_int32),
        ("mode", ctypes.c_int32),
        ("base", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
        ("source", ctypes.c_uint64),
        ("page_size", ctypes.c_uint64),
        ("pages", ctypes.c_void_p),
        ("readahead", ctypes.c_uint32),
        ("slow_us", ctypes.c_uint32),
        ("wake_separately", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class HandlerStats(ctypes.Structure):
    """``struct bench_handler_stats`` in handler.c."""

    _fields_ = [
        ("faults", ctypes.c_uint64),
        ("resolved", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
        ("wakes", ctypes.c_uint64),
        ("error", ctypes.c_int32),
        ("failed", ctypes.c_char * 44),
    ]


assert ctypes.sizeof(HandlerConfig) == 64 and ctypes.sizeof(HandlerStats) == 80


class Native:
    """The two compiled libraries, with typed wrappers."""

    def __init__(self) -> None:
        handler = ctypes.CDLL(str(_build.build("handler")), use_errno=True)
        handler.bench_handler_start.argtypes = [ctypes.POINTER(HandlerConfig)]
        handler.bench_handler_start.restype = ctypes.c_void_p
        handler.bench_handler_stop.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.POINTER(HandlerStats),
        ]
        handler.bench_handler_stop.restype = ctypes.c_int
        workload = ctypes.CDLL(str(_build.build("workload")))
        workload.bench_workload_run.argtypes = [
            ctypes.c_uint64,
            ctypes.c_uint64,
            ctypes.c_uint64,
            ctypes.c_uint32,
            ctypes.c_int32,
        ]
        workload.bench_workload_run.restype = ctypes.c_int64
        workload.bench_fill_pattern.argtypes = [ctypes.c_uint64] * 3
        workload.bench_fill_pattern.restype = None
        workload.bench_verify.argtypes = [ctypes.c_uint64] * 4 + [ctypes.c_int32]
        workload.bench_verify.restype = ctypes.c_int64
        self._handler = handler
        self._workload = workload

    def handler_start(self, config: HandlerConfig) -> int:
        """Start the C handler thread; returns its handle."""
        handle = self._handler.bench_handler_start(ctypes.byref(config))
        if not handle:
            err = ctypes.get_errno()
            raise OSError(err, f"bench_handler_start failed: {os.strerror(err)}")
        return int(handle)

    def handler_stop(self, handle: int, timeout: float) -> HandlerStats:
        """Stop the handler, waiting at most ``timeout`` seconds; returns its counters."""
        stats = HandlerStats()
        err = self._handler.bench_handler_stop(handle, int(timeout * 1000), ctypes.byref(stats))
        if err:
            raise OSError(err, f"stopping the C handler failed: {os.strerror(err)}")
        return stats

    def workload_run(
        self, address: int, pages: int, page_size: int, threads: int, access: str
    ) -> int:
        """Run the workload to the end; returns elapsed nanoseconds measured in C."""
        result = int(
            self._workload.bench_workload_run(address, pages, page_size, threads, ACCESS[access])
        )
        if result < 0:
            raise OSError(-result, f"the workload could not start: {os.strerror(-result)}")
        return result

    def fill_pattern(self, address: int, pages: int, page_size: int) -> None:
        """Write the per-page source pattern."""
        self._workload.bench_fill_pattern(address, pages, page_size)

    def verify(self, region: int, source: int, pages: int, page_size: int, marked: bool) -> int:
        """Index of the first page that differs from the source, or -1."""
        return int(self._workload.bench_verify(region, source, pages, page_size, int(marked)))


@functools.cache
def native() -> Native:
    """The libraries, built and loaded once per process."""
    return Native()
