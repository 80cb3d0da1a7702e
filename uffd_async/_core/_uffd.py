"""The userfaultfd handle: the one owner of the fd and the only place ioctls run.

Kernel facts this module relies on (``man 2 ioctl_userfaultfd``,
admin-guide/mm/userfaultfd, and the kernel's own handlers):

* Ranges must be page-aligned with a non-zero length; the kernel answers
  EINVAL otherwise. This module checks first, so a bad call costs no syscall.
* COPY, ZEROPAGE, CONTINUE, POISON and MOVE write back a signed result: bytes
  done, or a negative errno. When the kernel stops part-way (it met a page
  that already exists, or was interrupted) it returns EAGAIN *with a positive
  count*: the work continues from there. EAGAIN with no progress means the
  mapping is changing: a remove/remap/unmap/fork event is unread, and every
  resolving ioctl fails until it is read. That is raised at once
  (:class:`MappingChanged`), with the bytes done so far.
* EEXIST means a page is already there, and the kernel did NOT wake the
  threads waiting on it: the caller must ``wake()`` the range.
* Unless ``DONTWAKE`` is given, a successful ioctl wakes the threads faulting
  in the range it covered. ``UFFDIO_WRITEPROTECT`` with DONTWAKE is only
  meaningful when *removing* protection.
* Closing the uffd unregisters its ranges and wakes every blocked thread,
  which then faults the ordinary way (anonymous memory reads as zeros). The
  fd number is reused at once by the next open, so the handle forgets it
  before closing, and nothing may run an ioctl on it concurrently.
* COPY into hugetlbfs reads the source with page faults disabled. Where a
  source page is not mapped in this process yet (a snapshot file's fresh
  mapping), the kernel copies it into a *temporary* huge page from the pool
  with faults allowed, then allocates the destination's page while it still
  holds the temporary one (``mfill_atomic_hugetlb``). Into a MAP_NORESERVE
  mapping (Firecracker's guest memory) with one free huge page left, that
  second allocation fails: ENOMEM, and the temporary page goes back. That
  failed attempt has mapped the source here, so a second one reads it in
  place and needs one page: a COPY that fails with ENOMEM is retried once
  (nothing is done before the first try). With the pool empty, Linux 6.18
  answers a hugetlbfs COPY with EEXIST, older kernels with ENOMEM again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import warnings
from collections.abc import Callable
from typing import Any

import anyio

from . import _abi
from ._abi import PAGE_SIZE, Feature, Ioctl, Mode
from ._checks import check_int
from ._errors import (
    InvalidArgument,
    InvalidArgumentType,
    MappingChanged,
    PageExists,
    ProcessExited,
    UffdClosed,
    UffdError,
    UnsupportedFeature,
)
from ._events import Event, fork_fds
from ._events import decode as decode_records
from ._memory import BYTES_DATA_OFFSET, buffer_address
from ._open import Method, feature_names, handshake, open_fd
from ._read_loan import ReadLoan

_ADDRESS_LIMIT = 1 << 64
_EAGAIN = errno.EAGAIN
_ENOMEM = errno.ENOMEM
_ioctl = fcntl.ioctl
_pack_copy = _abi.COPY.pack
_pack_zeropage = _abi.ZEROPAGE.pack
_pack_writeprotect = _abi.WRITEPROTECT.pack
_pack_range = _abi.RANGE.pack
_UFFDIO_COPY = _abi.UFFDIO_COPY
_UFFDIO_ZEROPAGE = _abi.UFFDIO_ZEROPAGE
_UFFDIO_WRITEPROTECT = _abi.UFFDIO_WRITEPROTECT
_UFFDIO_WAKE = _abi.UFFDIO_WAKE
_MSG_SIZE = _abi.MSG.size
_MAX_EVENTS = 1 << 16  # a 2 MiB read buffer

_HINTS = {
    errno.EEXIST: "a page in the range is already populated; the kernel did not wake the "
    "threads waiting on it, so call wake() for the range",
    errno.EAGAIN: "a non-cooperative event (remove, remap, unmap or fork) is unread; read the "
    "events, apply them, then retry",
    errno.ESRCH: "the process that owns this memory has exited",
    errno.ENOENT: "the range is not (or no longer) mapped and registered with this userfaultfd",
    errno.EBUSY: "the range is registered with another userfaultfd, or (MOVE) the source page "
    "is shared with another process",
    errno.EFAULT: "the source bytes could not be read: a snapshot file shorter than its "
    "mapping (truncated since it was opened?), or a source address that is not mapped",
}


#: The ioctls that map pages in (counted in ``Userfaultfd._filled``).
_FILLING = frozenset({"COPY", "ZEROPAGE", "CONTINUE", "MOVE"})


def _check_range(start: int, length: int, what: str = "start") -> None:
    check_int(what, start)
    check_int("length", length)
    if start < 0 or start % PAGE_SIZE:
        raise InvalidArgument(
            errno.EINVAL, f"{what} {start:#x} is not aligned to the page size ({PAGE_SIZE})"
        )
    if length <= 0 or length % PAGE_SIZE:
        raise InvalidArgument(
            errno.EINVAL,
            f"length {length} is not a positive multiple of the page size ({PAGE_SIZE})",
        )
    if start + length >= _ADDRESS_LIMIT:
        raise InvalidArgument(
            errno.EINVAL, f"{what} {start:#x} + length {length:#x} overflows the address space"
        )


def _translate(exc: OSError, what: str, done: int) -> UffdError:
    err = exc.errno or errno.EIO
    message = f"UFFDIO_{what} failed: {os.strerror(err)}"
    hint = _HINTS.get(err)
    if hint:
        message += f" ({hint})"
    if done:
        message += f"; {done} bytes were done first"
    cls: type[UffdError]
    if err == errno.EEXIST:
        cls = PageExists
    elif err == _EAGAIN:
        cls = MappingChanged
    elif err == errno.ESRCH:
        cls = ProcessExited
    elif err == errno.EINVAL:
        cls = InvalidArgument
    elif err == errno.EBADF:
        return UffdClosed(message)
    else:
        cls = UffdError
    return cls(err, message, done=done)


class Userfaultfd:
    """An open, handshaken userfaultfd: registration, every ioctl, and event reads.

    Open one with :meth:`open`. It is non-blocking and close-on-exec; use it
    as a context manager or call :meth:`close`. Not for concurrent use from
    several threads while it is being closed.
    """

    def __init__(
        self,
        fd: int,
        *,
        features: Feature,
        available: Feature,
        ioctls: Ioctl,
        method: Method,
    ) -> None:
        self._fd = fd
        self._features = features
        self._available = available
        self._ioctls = ioctls
        self._method = method
        self._thread_ids = bool(features & Feature.THREAD_ID)
        self._children: list[Userfaultfd] = []
        self._before_close: list[Callable[[int], None]] = []
        self._unhandled: list[Event] = []
        self._loan: ReadLoan | None = None
        self._readiness_waits = 0  # readers waiting for the fd to be readable (_reader)
        #: Bytes this handle's ioctls (and the server's C loop) mapped in: COPY, ZEROPAGE,
        #: CONTINUE and MOVE, readahead included.
        self._filled = 0

    @classmethod
    def open(
        cls, features: Feature | int = Feature(0), *, user_mode_only: bool | None = None
    ) -> Userfaultfd:
        """Open a uffd and enable ``features``.

        ``user_mode_only=None`` tries a full uffd (userfaultfd(2), then
        ``/dev/userfaultfd``), then a user-mode-only one; ``False`` only full
        ones; ``True`` only user-mode-only. Raises :class:`UnsupportedFeature`
        naming what the kernel lacks, :class:`UffdPermissionError` with the
        remedy when no way in is allowed.
        """
        requested = int(check_int("features", features))
        if requested < 0 or requested >= 1 << 64:
            raise InvalidArgument(errno.EINVAL, f"features {requested:#x} is not a 64-bit mask")
        fd, method = open_fd(user_mode_only)
        try:
            enabled, available, ioctls = handshake(fd, method, requested)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, features=enabled, available=available, ioctls=ioctls, method=method)

    @classmethod
    def _adopt(
        cls,
        fd: int,
        *,
        features: Feature = Feature(0),
        available: Feature = Feature(0),
        method: Method = Method.SYSCALL,
    ) -> Userfaultfd:
        """Own an fd that is already handshaken (a fork child's, or one handed over)."""
        ioctls = Ioctl.API | Ioctl.REGISTER | Ioctl.UNREGISTER
        return cls(fd, features=features, available=available, ioctls=ioctls, method=method)

    # -- the fd -----------------------------------------------------------

    def fileno(self) -> int:
        return self._require_open()

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def features(self) -> Feature:
        """The features enabled on this uffd (what was asked for, plus implied bits)."""
        return self._features

    @property
    def available_features(self) -> Feature:
        """Every feature the kernel offered at the handshake."""
        return self._available

    @property
    def ioctls(self) -> Ioctl:
        """The ioctls the handshake reported (range ioctls come from :meth:`register`)."""
        return self._ioctls

    @property
    def method(self) -> Method:
        return self._method

    @property
    def user_mode_only(self) -> bool:
        return self._method is Method.USER_MODE_ONLY

    def _require_open(self) -> int:
        fd = self._fd
        if fd < 0:
            raise UffdClosed()
        return fd

    def _on_close(self, callback: Callable[[int], None]) -> None:
        """Run ``callback(fd)`` just before the fd is closed (readers wake their waiters)."""
        if callback not in self._before_close:
            self._before_close.append(callback)

    def _forget_on_close(self, callback: Callable[[int], None]) -> None:
        if callback in self._before_close:
            self._before_close.remove(callback)

    def lend_reads(
        self,
        before_close: Callable[[], None],
        *,
        pause: Callable[[], None] | None = None,
        resume: Callable[[], None] | None = None,
    ) -> ReadLoan | None:
        """Lend this uffd's reads to another reader until the loan is given back (see
        :mod:`~uffd_async._core._read_loan`); None when they are lent already.

        ``before_close()`` runs if the uffd is closed meanwhile, before the fd is: the
        borrower must stop using it then (the fd's number is reused once closed).
        ``pause()`` holds the borrower between two steps with its counts up to date, and
        ``resume()`` lets it go (:meth:`borrower_paused`)."""
        self._require_open()
        if self._loan is not None:
            return None
        self._loan = ReadLoan(self, before_close, pause, resume)
        self._on_close(self._loan.closing)
        if self._readiness_waits:  # a reader waits for readiness: make it wait on the loan
            anyio.notify_closing(self._fd)
        return self._loan

    def borrower_paused(self) -> contextlib.AbstractContextManager[None]:
        """Hold whoever its reads are lent to (a native replay) while its counts and the
        resolvers' bitmaps are read together; nothing when they are not lent."""
        loan = self._loan
        return loan.paused() if loan is not None else contextlib.nullcontext()

    def _push_back(self, events: list[Event]) -> None:
        """Keep events a server read but never handled: the kernel will not send them again."""
        self._unhandled = list(events) + self._unhandled

    def close(self) -> None:
        """Close the uffd and the fork children it handed out.

        Threads blocked on its faults wake and fault the ordinary way
        (anonymous memory becomes zero pages). Idempotent.
        """
        fd = self._fd
        if fd < 0:
            return
        callbacks, self._before_close = self._before_close, []
        self._fd = -1
        self._unhandled = []
        for callback in callbacks:
            callback(fd)
        try:
            os.close(fd)
        finally:
            children, self._children = self._children, []
            for child in children:
                child.close()

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        features = feature_names(self._features)
        return f"<Userfaultfd {state} via {self._method.value} features={features}>"

    # -- registration -----------------------------------------------------

    def register(self, start: int, length: int, mode: Mode | int = Mode.MISSING) -> Ioctl:
        """Report faults in ``[start, start + length)``; returns the ioctls valid there."""
        _check_range(start, length)
        mode_bits = int(check_int("mode", mode))
        if mode_bits <= 0 or mode_bits & ~_abi.ALL_MODES:
            raise InvalidArgument(
                errno.EINVAL, f"mode must be a non-empty combination of Mode flags, not {mode!r}"
            )
        if mode_bits & Mode.WP and not self._available & Feature.PAGEFAULT_FLAG_WP:
            raise UnsupportedFeature(
                Feature.PAGEFAULT_FLAG_WP, "this kernel does not offer write-protect mode"
            )
        if mode_bits & Mode.MINOR and not self._available & (
            Feature.MINOR_SHMEM | Feature.MINOR_HUGETLBFS
        ):
            raise UnsupportedFeature(
                Feature.MINOR_SHMEM, "this kernel does not offer minor-fault mode"
            )
        fd = self._require_open()
        buf = bytearray(_abi.REGISTER.pack(start, length, mode_bits, 0))
        try:
            fcntl.ioctl(fd, _abi.UFFDIO_REGISTER, buf, True)
        except OSError as exc:
            error = _translate(exc, "REGISTER", 0)
            if exc.errno == errno.EINVAL:
                error = InvalidArgument(
                    errno.EINVAL,
                    f"UFFDIO_REGISTER refused [{start:#x}, {start + length:#x}) in mode "
                    f"{Mode(mode_bits)!r}: the range is not fully mapped, or its memory does "
                    "not support the mode (MINOR needs shmem or hugetlbfs; hugetlbfs ranges "
                    "must be huge-page aligned)",
                )
            raise error from None
        return Ioctl(_abi.REGISTER.unpack(buf)[3])

    def unregister(self, start: int, length: int) -> None:
        """Stop reporting faults in the range (threads already blocked stay blocked)."""
        _check_range(start, length)
        self._simple(_abi.UFFDIO_UNREGISTER, _abi.RANGE.pack(start, length), "UNREGISTER")

    # -- resolving --------------------------------------------------------

    def copy(
        self,
        dst: int,
        src: Any,
        length: int | None = None,
        *,
        wp: bool = False,
        wake: bool = True,
    ) -> int:
        """UFFDIO_COPY: fill missing pages at ``dst`` from ``src``; returns bytes copied.

        ``src`` is a bytes-like object (``length`` defaults to its size) or an
        int address in this process with ``length``. ``wp=True`` maps the pages
        write-protected (COPY_MODE_WP); ``wake=False`` is DONTWAKE.
        """
        if type(src) is bytes and type(dst) is int and BYTES_DATA_OFFSET is not None and not wp:
            # The resolvers' common case, checked as below but without the general path.
            size = len(src)
            if length is None:
                length = size
            if (
                type(length) is int
                and 0 < length <= size
                and not (dst | length) % PAGE_SIZE
                and 0 <= dst
                and dst + length < _ADDRESS_LIMIT
                and self._fd >= 0
            ):
                return self._copy_from(dst, id(src) + BYTES_DATA_OFFSET, length, wake)
        if isinstance(src, int) and not isinstance(src, bool):
            if length is None:
                raise InvalidArgumentType("copy() from an address needs a length")
            check_int("length", length)
            if src < 0 or src + max(length, 0) > _ADDRESS_LIMIT:
                raise InvalidArgument(
                    errno.EINVAL, f"src {src:#x} + length {length:#x} is not a valid address range"
                )
            source, keepalive = src, None
        else:
            source, size, keepalive = buffer_address(src)
            if length is None:
                length = size
            elif check_int("length", length) > size:
                raise InvalidArgument(
                    errno.EINVAL, f"length {length} exceeds the {size} bytes of src"
                )
        _check_range(dst, length, "dst")
        if wp and not self._available & Feature.PAGEFAULT_FLAG_WP:
            raise UnsupportedFeature(
                Feature.PAGEFAULT_FLAG_WP, "this kernel does not offer write-protect mode"
            )
        mode = (_abi.COPY_MODE_WP if wp else 0) | (0 if wake else _abi.COPY_MODE_DONTWAKE)
        copy_struct = _abi.COPY

        def args(done: int) -> bytes:
            return copy_struct.pack(dst + done, source + done, length - done, mode, 0)

        try:
            return self._fill(_abi.UFFDIO_COPY, copy_struct, args, length, "COPY")
        finally:
            del keepalive

    def zeropage(self, start: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_ZEROPAGE: map zero pages; returns bytes zeroed."""
        _check_range(start, length)
        mode = 0 if wake else _abi.ZEROPAGE_MODE_DONTWAKE
        layout = _abi.ZEROPAGE
        return self._fill(
            _abi.UFFDIO_ZEROPAGE,
            layout,
            lambda done: layout.pack(start + done, length - done, mode, 0),
            length,
            "ZEROPAGE",
        )

    def writeprotect(
        self, start: int, length: int, *, protect: bool = True, wake: bool = True
    ) -> None:
        """UFFDIO_WRITEPROTECT: ``protect=False`` removes protection (resolves a WP fault).

        ``wake=False`` (DONTWAKE) is only valid when unprotecting.
        """
        _check_range(start, length)
        if protect and not wake:
            raise InvalidArgument(
                errno.EINVAL,
                "wake=False (DONTWAKE) is only valid when unprotecting (protect=False): "
                "write-protecting wakes no one",
            )
        if protect:
            mode = _abi.WRITEPROTECT_MODE_WP
        else:
            mode = 0 if wake else _abi.WRITEPROTECT_MODE_DONTWAKE
        self._simple(
            _abi.UFFDIO_WRITEPROTECT,
            _abi.WRITEPROTECT.pack(start, length, mode),
            "WRITEPROTECT",
        )

    def continue_(self, start: int, length: int, *, wp: bool = False, wake: bool = True) -> int:
        """UFFDIO_CONTINUE: map the page-cache pages (resolves MINOR faults); returns bytes mapped.

        ``wp=True`` maps them write-protected (CONTINUE_MODE_WP).
        """
        _check_range(start, length)
        mode = (_abi.CONTINUE_MODE_WP if wp else 0) | (0 if wake else _abi.CONTINUE_MODE_DONTWAKE)
        layout = _abi.CONTINUE
        return self._fill(
            _abi.UFFDIO_CONTINUE,
            layout,
            lambda done: layout.pack(start + done, length - done, mode, 0),
            length,
            "CONTINUE",
        )

    def poison(self, start: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_POISON: accesses to the range get SIGBUS; returns bytes poisoned."""
        _check_range(start, length)
        if not self._available & Feature.POISON:
            raise UnsupportedFeature(Feature.POISON, "this kernel does not offer UFFDIO_POISON")
        mode = 0 if wake else _abi.POISON_MODE_DONTWAKE
        layout = _abi.POISON
        return self._fill(
            _abi.UFFDIO_POISON,
            layout,
            lambda done: layout.pack(start + done, length - done, mode, 0),
            length,
            "POISON",
        )

    def move(
        self,
        dst: int,
        src: int,
        length: int,
        *,
        wake: bool = True,
        allow_src_holes: bool = False,
    ) -> int:
        """UFFDIO_MOVE: move private anonymous pages from ``src`` to ``dst``; returns bytes."""
        _check_range(src, length, "src")
        _check_range(dst, length, "dst")
        if not self._available & Feature.MOVE:
            raise UnsupportedFeature(Feature.MOVE, "this kernel does not offer UFFDIO_MOVE")
        mode = (0 if wake else _abi.MOVE_MODE_DONTWAKE) | (
            _abi.MOVE_MODE_ALLOW_SRC_HOLES if allow_src_holes else 0
        )
        layout = _abi.MOVE
        return self._fill(
            _abi.UFFDIO_MOVE,
            layout,
            lambda done: layout.pack(dst + done, src + done, length - done, mode, 0),
            length,
            "MOVE",
        )

    def wake(self, start: int, length: int) -> None:
        """UFFDIO_WAKE: wake the threads waiting on faults in the range."""
        _check_range(start, length)
        self._simple(_abi.UFFDIO_WAKE, _abi.RANGE.pack(start, length), "WAKE")

    # -- the server's hot path: callers validated the arguments already -------

    def _copy_from(self, dst: int, src: int, length: int, wake: bool) -> int:
        """``copy()`` with checked arguments; the caller keeps ``src``'s memory alive."""
        self._copy_nocheck(dst, src, length, 0 if wake else _abi.COPY_MODE_DONTWAKE)
        return length

    def _copy_nocheck(self, dst: int, src: int, length: int, mode: int) -> None:
        buf = bytearray(_pack_copy(dst, src, length, mode, 0))
        try:
            _ioctl(self._fd, _UFFDIO_COPY, buf, True)
        except OSError as exc:
            self._continue_fill(exc, buf, _abi.UFFDIO_COPY, _abi.COPY, "COPY",
                                lambda done: _pack_copy(dst + done, src + done, length - done,
                                                        mode, 0), length)  # fmt: skip
        else:
            self._filled += length

    def _zeropage_nocheck(self, start: int, length: int) -> None:
        buf = bytearray(_pack_zeropage(start, length, 0, 0))
        try:
            _ioctl(self._fd, _UFFDIO_ZEROPAGE, buf, True)
        except OSError as exc:
            self._continue_fill(exc, buf, _abi.UFFDIO_ZEROPAGE, _abi.ZEROPAGE, "ZEROPAGE",
                                lambda done: _pack_zeropage(start + done, length - done, 0, 0),
                                length)  # fmt: skip
        else:
            self._filled += length

    def _unprotect_nocheck(self, start: int, length: int, wake: bool) -> None:
        mode = 0 if wake else _abi.WRITEPROTECT_MODE_DONTWAKE
        try:
            _ioctl(self._fd, _UFFDIO_WRITEPROTECT, _pack_writeprotect(start, length, mode))
        except OSError as exc:
            raise _translate(exc, "WRITEPROTECT", 0) from None

    def _wake_nocheck(self, start: int, length: int) -> None:
        try:
            _ioctl(self._fd, _UFFDIO_WAKE, _pack_range(start, length))
        except OSError as exc:
            raise _translate(exc, "WAKE", 0) from None

    def _continue_fill(
        self,
        exc: OSError,
        buf: bytearray,
        request: int,
        layout: Any,
        what: str,
        args: Callable[[int], bytes],
        length: int,
    ) -> None:
        """After a failed first attempt: continue partial progress, or raise the typed error."""
        result = layout.unpack_from(buf)[-1]
        if exc.errno == _EAGAIN and result > 0:
            self._fill(request, layout, args, length, what, done=result)
            return
        if exc.errno == _ENOMEM and request == _UFFDIO_COPY:  # hugetlbfs: see "Kernel facts"
            self._fill(request, layout, args, length, what, retried=True)
            return
        if result > 0:
            self._filled += result
        raise _translate(exc, what, 0) from None

    def _simple(self, request: int, arg: bytes, what: str) -> None:
        fd = self._require_open()
        try:
            fcntl.ioctl(fd, request, arg)
        except OSError as exc:
            raise _translate(exc, what, 0) from None

    def _fill(
        self,
        request: int,
        layout: Any,
        args: Callable[[int], bytes],
        length: int,
        what: str,
        done: int = 0,
        retried: bool = False,
    ) -> int:
        """Run a result-writing ioctl, continuing after partial progress (and retrying
        a COPY that failed with ENOMEM once: see "Kernel facts")."""
        fd = self._require_open()
        while True:
            buf = bytearray(args(done))
            try:
                fcntl.ioctl(fd, request, buf, True)
            except OSError as exc:
                result = layout.unpack_from(buf)[-1]
                if exc.errno == _EAGAIN and result > 0:
                    done += result
                    continue
                if exc.errno == _ENOMEM and request == _UFFDIO_COPY and not retried:
                    retried = True
                    continue
                if what in _FILLING:
                    self._filled += done + max(result, 0)
                raise _translate(exc, what, done) from None
            if what in _FILLING:
                self._filled += length
            return length

    # -- events -----------------------------------------------------------

    def read_events(self, max_events: int = 64) -> list[Event]:
        """Read and decode pending events without blocking; ``[]`` when none are pending."""
        check_int("max_events", max_events, minimum=1, maximum=_MAX_EVENTS)
        return self._read(max_events)

    def _read_raw(self, max_events: int) -> bytes:
        """Raw records from the fd (b"" when none are pending, or the reads are lent);
        pushed-back events not included."""
        if self._loan is not None:
            self._require_open()
            return b""
        try:
            return os.read(self._fd, _MSG_SIZE * max_events)
        except BlockingIOError:
            return b""
        except OSError as exc:
            if exc.errno == errno.EBADF or self._fd < 0:
                raise UffdClosed() from None
            raise UffdError(exc.errno or errno.EIO, f"read() from the uffd failed: {exc}") from None

    def _read(self, max_events: int) -> list[Event]:
        if self._unhandled:
            events = self._unhandled[:max_events]
            del self._unhandled[:max_events]
            return events
        data = self._read_raw(max_events)
        return self.decode(data) if data else []

    def decode(self, data: bytes) -> list[Event]:
        """Decode bytes read from this uffd; fork children become owned handles."""
        try:
            return decode_records(data, adopt=self._adopt_child, thread_ids=self._thread_ids)
        except Exception:
            for fd in fork_fds(data):
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise

    def _adopt_child(self, fd: int) -> Userfaultfd:
        child = Userfaultfd._adopt(
            fd, features=self._features, available=self._available, method=self._method
        )
        self._children = [c for c in self._children if not c.closed]
        self._children.append(child)
        return child


def decode(
    data: bytes | bytearray | memoryview,
    *,
    thread_ids: bool = True,
    adopt: Callable[[int], Userfaultfd] | None = None,
) -> list[Event]:
    """Decode whole ``uffd_msg`` records into events, without I/O (``uffd_async.decode``).

    ``thread_ids=False`` reports ``thread_id=None`` (the uffd did not negotiate
    THREAD_ID, so the field is meaningless). ``adopt`` turns the fd of a FORK
    record into a handle; by default a :class:`Userfaultfd` with no features.
    For bytes read from a handle, ``uffd.decode(data)`` adopts its fork children
    with its features, and closes them with it. The whole buffer is validated
    before any fd is adopted, so a :class:`DecodeError` takes ownership of nothing.
    """
    return decode_records(data, adopt=adopt or Userfaultfd._adopt, thread_ids=thread_ids)
