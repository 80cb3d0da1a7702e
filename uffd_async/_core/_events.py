"""Typed events, and the sans-IO decoder from raw ``uffd_msg`` bytes.

Kernel facts this module relies on:

* ``read()`` on a uffd returns whole 32-byte ``struct uffd_msg`` records. The
  first byte is the event code; bytes 8-31 are a union whose meaning depends
  on it. Reading the union as three native 64-bit words covers every member:
  page fault (flags, address, ptid in the low half of the third word), fork
  (ufd in the low half of the first), remap (from, to, len), remove and unmap
  (start, end).
* A FORK record carries a *new file descriptor* that the kernel installed in
  our fd table during the ``read()``: decoding it takes ownership, and bytes
  that never came from ``read()`` must not contain FORK records.
* ``ptid`` is filled in only when ``UFFD_FEATURE_THREAD_ID`` was negotiated;
  otherwise it is 0, which is why ``thread_id`` is ``None`` then.
* Page fault addresses are rounded down to the page unless
  ``UFFD_FEATURE_EXACT_ADDRESS`` was negotiated.

The decoder never performs I/O: bytes in, events out.
"""

from __future__ import annotations

import struct
import sys
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from . import _abi
from ._abi import PAGE_SIZE, FaultFlags
from ._errors import DecodeError

if TYPE_CHECKING:
    from ._uffd import Userfaultfd

_PAGE_MASK = ~(PAGE_SIZE - 1)
_RECORD = struct.Struct("=B7xQQQ")
_LOW32 = 0xFFFFFFFF
_HIGH_HALF_SHIFT = 0 if sys.byteorder == "little" else 32


@attrs.frozen(kw_only=True)
class PageFault:
    """A thread is blocked on ``address`` until the fault is resolved."""

    address: int
    flags: FaultFlags
    thread_id: int | None = None

    @property
    def page(self) -> int:
        """The address aligned down to the base page, what resolving ioctls take.

        On hugetlbfs the kernel already reports the huge page's start (unless
        EXACT_ADDRESS), and ioctls there take whole huge pages.
        """
        return self.address & _PAGE_MASK

    @property
    def is_write(self) -> bool:
        return bool(self.flags & FaultFlags.WRITE)

    @property
    def is_wp(self) -> bool:
        return bool(self.flags & FaultFlags.WP)

    @property
    def is_minor(self) -> bool:
        return bool(self.flags & FaultFlags.MINOR)


@attrs.frozen(kw_only=True)
class Fork:
    """The registered process forked; ``uffd`` serves the child's memory.

    The handle is owned: it is closed when the handle that read this event is
    closed, or earlier by ``uffd.close()``. The forking thread is blocked
    until the event is read.
    """

    uffd: Userfaultfd


@attrs.frozen(kw_only=True)
class Remap:
    """``mremap()`` moved ``length`` bytes from ``from_address`` to ``to_address``."""

    from_address: int
    to_address: int
    length: int


@attrs.frozen(kw_only=True)
class Remove:
    """``MADV_DONTNEED``/``MADV_REMOVE`` dropped ``[start, end)``: it faults as missing again."""

    start: int
    end: int


@attrs.frozen(kw_only=True)
class Unmap:
    """``munmap()`` (or an mmap/mremap over it) unmapped ``[start, end)``."""

    start: int
    end: int


Event = PageFault | Fork | Remap | Remove | Unmap

_PAGEFAULT = _abi.EVENT_PAGEFAULT
_FLAGS = {value: FaultFlags(value) for value in range(8)}
_MSG_SIZE = _abi.MSG.size
_unpack = _RECORD.unpack


def _setter(name: str) -> Callable[[PageFault, Any], None]:
    """Sets a field of a frozen PageFault: its slot's descriptor, else object.__setattr__."""
    slot = PageFault.__dict__.get(name)
    if isinstance(slot, types.MemberDescriptorType):
        return slot.__set__

    def set_field(fault: PageFault, value: Any) -> None:
        object.__setattr__(fault, name, value)

    return set_field


_set_address = _setter("address")
_set_flags = _setter("flags")
_set_thread_id = _setter("thread_id")


def fork_fds(data: bytes | bytearray | memoryview) -> list[int]:
    """The fd numbers in the FORK records of ``data``, to close them if decoding fails."""
    usable = len(data) - len(data) % _abi.MSG.size
    return [
        (first >> _HIGH_HALF_SHIFT) & _LOW32
        for code, first, _, _ in _RECORD.iter_unpack(memoryview(data)[:usable])
        if code == _abi.EVENT_FORK
    ]


def decode(
    data: bytes | bytearray | memoryview,
    *,
    adopt: Callable[[int], Userfaultfd],
    thread_ids: bool = True,
) -> list[Event]:
    """Decode whole ``uffd_msg`` records into events.

    ``adopt`` turns the fd of a FORK record into a handle: the owner of the
    handle that read the bytes passes it (``Userfaultfd.decode``), so this
    module needs nothing of the handle's. ``thread_ids=False`` reports
    ``thread_id=None`` (the uffd did not negotiate THREAD_ID, so the field is
    meaningless). The whole buffer is validated before any fd is adopted, so a
    :class:`DecodeError` takes ownership of nothing.
    """
    size = len(data)
    if size % _MSG_SIZE:
        raise DecodeError(
            f"{size} bytes is not a whole number of {_MSG_SIZE}-byte uffd_msg records"
        )
    if size == _MSG_SIZE:  # one record: what a busy server mostly reads
        code, first, second, third = _unpack(data)
        if code == _PAGEFAULT:
            return [_fault(first, second, third if thread_ids else None)]
    events: list[Event] = []
    append = events.append
    forks: list[tuple[int, int]] = []  # (position, fd): adopted once all is validated
    fault_of = _fault
    for code, first, second, third in _RECORD.iter_unpack(data):
        if code == _PAGEFAULT:
            append(fault_of(first, second, third if thread_ids else None))
        elif code == _abi.EVENT_REMOVE:
            append(Remove(start=first, end=second))
        elif code == _abi.EVENT_UNMAP:
            append(Unmap(start=first, end=second))
        elif code == _abi.EVENT_REMAP:
            append(Remap(from_address=first, to_address=second, length=third))
        elif code == _abi.EVENT_FORK:
            forks.append((len(events), (first >> _HIGH_HALF_SHIFT) & _LOW32))
            append(None)  # type: ignore[arg-type]  # replaced below
        else:
            raise DecodeError(f"record {len(events)} has unknown event code {code:#x}")
    for position, fd in forks:
        events[position] = Fork(uffd=adopt(fd))
    return events


def _fault(
    flags: int,
    address: int,
    third: int | None,
    _new: Callable[[type[PageFault]], PageFault] = object.__new__,
    _flags: Callable[[int], FaultFlags | None] = _FLAGS.get,
) -> PageFault:
    """The hot path: a frozen PageFault built without attrs' ``__init__``."""
    fault = _new(PageFault)
    _set_address(fault, address)
    _set_flags(fault, _flags(flags) or FaultFlags(flags))
    _set_thread_id(fault, None if third is None else (third >> _HIGH_HALF_SHIFT) & _LOW32)
    return fault


def encode(event: PageFault | Remap | Remove | Unmap) -> bytes:
    """The ``uffd_msg`` record for ``event``: for tests and fuzzing the decoder."""
    if isinstance(event, PageFault):
        ptid = (event.thread_id or 0) << _HIGH_HALF_SHIFT
        return _RECORD.pack(_abi.EVENT_PAGEFAULT, int(event.flags), event.address, ptid)
    if isinstance(event, Remap):
        return _RECORD.pack(_abi.EVENT_REMAP, event.from_address, event.to_address, event.length)
    code = _abi.EVENT_REMOVE if isinstance(event, Remove) else _abi.EVENT_UNMAP
    return _RECORD.pack(code, event.start, event.end, 0)
