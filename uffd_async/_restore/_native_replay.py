"""A working set's runs copied from native code, off the event loop and without the GIL.

:func:`~uffd_async._restore._prefetch.prefetch` hands its runs here first inside
``with native_replay():`` (off by default; a context variable, so tasks started inside
the block inherit it): a worker thread copies them with ``ua_replay``
(``_core/_native_lib.c``) while the loop serves the demand faults; the loop only plans the
runs, starts the thread, and stops it.
Kernel and loop facts it relies on:

* Only sources whose bytes are in memory here (``copy_from`` from memory, a
  :class:`~uffd_async.Snapshot`'s mapping) and only while no Remove/Remap/Unmap was
  applied: then every page is where it was mapped, so a run is (destination, source,
  length) and needs no decision. Anything else goes the loop's way (chunked, layered,
  remote sources, or a layout changed since).
* A Remove (``MADV_DONTNEED``) lets the discard go on once its event is *read*: a copy
  issued after the read would leave snapshot bytes where zeros belong. So while the
  thread runs, the uffd's records are read through ``ua_gated_read``, which holds the
  same gate as each copy and stops the replay (before its next copy) when a record is
  not a page fault. A copy is then wholly before the read (the discard drops it) or
  never issued.
* An event still unread makes every COPY fail (EAGAIN): the thread returns, the server
  reads it, and the rest of the set is planned again, by the loop's path, which knows
  where each page is now. EEXIST (a demand fault got there first) is skipped.
* Cancelled, it sets the stop flag and waits (shielded) for the thread, which stops
  at its next copy: no thread outlives it. Closing the uffd stops it too, and waits
  out the copy in flight under the gate: the fd's number is reused once closed.
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import ctypes
import errno
import os
import threading
from collections.abc import Callable, Iterator, Sequence

import anyio
import attrs

from .._core import _native
from .._core._abi import MSG, PAGE_SIZE
from .._core._errors import UffdClosed, UffdError
from .._core._uffd import Userfaultfd
from .._serve._resolvers import AnyResolver, CopyFrom
from ._snapshot_resolver import SnapshotResolver

__all__ = [
    "NativeProgress",
    "can_replay_natively",
    "native_replay",
    "native_replay_enabled",
    "replay_natively",
]

_STOP_POLL = 0.0005
_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("native_replay", default=False)


@contextlib.contextmanager
def native_replay(enabled: bool = True) -> Iterator[None]:
    """Prefetches started inside the block (and in tasks started there) replay natively."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def native_replay_enabled() -> bool:
    return _ENABLED.get()


@attrs.define
class NativeProgress:
    """What a native replay got through: working-set runs, and base pages it copied."""

    runs: int = 0
    pages: int = 0


def _copiers(resolver: AnyResolver) -> list[tuple[CopyFrom, int, int]] | None:
    """(copier, its first snapshot base page, base pages) for each part, or None when the
    resolver is not one whose runs can be copied without a decision."""
    if isinstance(resolver, SnapshotResolver):
        parts = [
            (part.copier, part.mapping.offset // PAGE_SIZE, part.mapping.size // PAGE_SIZE)
            for part in resolver._parts
        ]
    elif isinstance(resolver, CopyFrom):
        parts = [(resolver, 0, resolver._pages * resolver._page_size // PAGE_SIZE)]
    else:
        return None
    for copier, _, _ in parts:
        if (
            type(copier)._fill_ahead is not CopyFrom._fill_ahead
            or not copier.can_prefetch
            or not copier._address
            or copier._changed
        ):
            return None
    return parts


def can_replay_natively(resolver: AnyResolver) -> bool:
    """Whether :func:`replay_natively` would copy anything for ``resolver`` now."""
    return _native.HAS_REPLAY and _copiers(resolver) is not None


class _Plan:
    """The C array of runs, and for each working-set run the native runs it ends at."""

    def __init__(self, parts: list[tuple[CopyFrom, int, int]], runs: Sequence[tuple[int, int]]):
        entries: list[tuple[int, int, int, int, int, int]] = []
        self.ends: list[int] = []
        self._keep: list[object] = []
        bitmaps = []
        for copier, _, _ in parts:
            buffer = (ctypes.c_uint8 * len(copier._populated)).from_buffer(copier._populated)
            self._keep.append(buffer)
            bitmaps.append(ctypes.addressof(buffer))
        for first, count in runs:
            for (copier, offset, pages), bitmap in zip(parts, bitmaps, strict=True):
                low, high = max(first, offset), min(first + count, offset + pages)
                if low >= high:
                    continue
                size = copier._page_size
                ratio = size // PAGE_SIZE
                index = (low - offset) // ratio
                end = min(-(-(high - offset) // ratio), copier._pages)
                entries.append(
                    (
                        copier._base + index * size,
                        copier._address + index * size,
                        end - index,
                        size,
                        copier._mode,
                        bitmap + index,
                    )
                )
            self.ends.append(len(entries))
        self.array = (_native.ReplayRun * max(1, len(entries)))(
            *(_native.ReplayRun(*entry) for entry in entries)
        )
        self.count = len(entries)

    def runs_through(self, native_done: int) -> int:
        """Working-set runs wholly gone through once ``native_done`` native runs were."""
        return bisect.bisect_right(self.ends, native_done)


def _gated_reader(uffd: Userfaultfd, control: _native.ReplayControl) -> Callable[[int], bytes]:
    """``Userfaultfd._read_raw`` through the replay's gate (see the module's facts)."""

    def read_raw(max_events: int) -> bytes:
        length = MSG.size * max_events
        buffer = ctypes.create_string_buffer(length)
        got = _native.lib.ua_gated_read(uffd._fd, buffer, length, ctypes.byref(control))
        if got >= 0:
            return buffer.raw[:got]
        err = -got
        if err == errno.EAGAIN:
            return b""
        if err == errno.EBADF or uffd._fd < 0:
            raise UffdClosed()
        raise UffdError(err, f"read() from the uffd failed: {os.strerror(err)}")

    return read_raw


async def replay_natively(
    uffd: Userfaultfd, resolver: AnyResolver, runs: Sequence[tuple[int, int]]
) -> NativeProgress:
    """Copy ``runs`` (a working set's, in snapshot base pages) from a worker thread, as far
    as it can go without a decision; the rest is the caller's (from ``progress.runs`` on).

    Nothing is copied when the resolver does not qualify (see the module's facts)."""
    parts = _copiers(resolver) if _native.HAS_REPLAY else None
    if parts is None or not runs or uffd.closed:
        return NativeProgress()
    plan = _Plan(parts, runs)
    control = _native.ReplayControl()
    finished = threading.Event()
    fd = uffd._fd

    def work() -> int:
        try:
            return int(_native.lib.ua_replay(fd, plan.array, plan.count, ctypes.byref(control)))
        finally:
            finished.set()

    def stop_before_close(_fd: int) -> None:
        """The fd's number is reused once closed: no copy may follow the close."""
        control.stop = 1
        _native.lib.ua_gated_read(-1, None, 0, ctypes.byref(control))  # waits out a copy

    uffd._on_close(stop_before_close)
    uffd._read_raw = _gated_reader(uffd, control)  # type: ignore[method-assign,assignment]
    try:
        await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
    except BaseException:
        control.stop = 1  # the thread stops at its next copy
        with anyio.CancelScope(shield=True):
            while not finished.is_set():
                await anyio.sleep(_STOP_POLL)
        raise
    finally:
        if finished.is_set():
            del uffd._read_raw
        _count_filled(uffd, control)
    # An event read or unread (EAGAIN), an error (the loop's path meets it again and
    # says what it is), or done: the caller goes on from the first run not gone through.
    return NativeProgress(
        runs=plan.runs_through(control.runs_done),
        pages=control.bytes_copied // PAGE_SIZE,
    )


def _count_filled(uffd: Userfaultfd, control: _native.ReplayControl) -> None:
    """The uffd's count of bytes mapped in (``_filled``) includes the replay's."""
    uffd._filled += control.bytes_copied
