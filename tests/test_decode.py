"""The sans-IO decoder: bytes in, events out, with no kernel involved."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import uffd_async as ua
from uffd_async._core import _abi, _events
from uffd_async._core._events import encode

u64 = st.integers(min_value=0, max_value=2**64 - 1)
u32 = st.integers(min_value=0, max_value=2**32 - 1)

page_faults = st.builds(
    ua.PageFault,
    address=u64,
    flags=st.integers(min_value=0, max_value=2**64 - 1).map(ua.FaultFlags),
    thread_id=u32,
)
remaps = st.builds(ua.Remap, from_address=u64, to_address=u64, length=u64)
removes = st.builds(ua.Remove, start=u64, end=u64)
unmaps = st.builds(ua.Unmap, start=u64, end=u64)
events = st.one_of(page_faults, remaps, removes, unmaps)


def record(code: int, *words: int) -> bytes:
    payload = struct.pack("=3Q", *(list(words) + [0] * (3 - len(words))))
    return _abi.MSG.pack(code, 0, 0, 0, payload)


def test_page_fault_fields() -> None:
    address = 0x7F00_1234_5678
    data = record(_abi.EVENT_PAGEFAULT, 0b11, address, 4242)
    [fault] = ua.decode(data)
    assert fault == ua.PageFault(
        address=address, flags=ua.FaultFlags.WRITE | ua.FaultFlags.WP, thread_id=4242
    )
    assert isinstance(fault, ua.PageFault)
    assert fault.page == address & ~(ua.PAGE_SIZE - 1)
    assert fault.is_write and fault.is_wp and not fault.is_minor


def test_thread_id_is_none_without_the_feature() -> None:
    [fault] = ua.decode(record(_abi.EVENT_PAGEFAULT, 4, 0x1000, 99), thread_ids=False)
    assert isinstance(fault, ua.PageFault)
    assert fault.thread_id is None and fault.is_minor and not fault.is_write


def test_non_cooperative_events() -> None:
    data = (
        record(_abi.EVENT_REMAP, 0x1000, 0x9000, 0x2000)
        + record(_abi.EVENT_REMOVE, 0x1000, 0x3000)
        + record(_abi.EVENT_UNMAP, 0x4000, 0x5000)
    )
    assert ua.decode(data) == [
        ua.Remap(from_address=0x1000, to_address=0x9000, length=0x2000),
        ua.Remove(start=0x1000, end=0x3000),
        ua.Unmap(start=0x4000, end=0x5000),
    ]


def test_fork_record_adopts_the_fd() -> None:
    adopted: list[int] = []

    def adopt(fd: int) -> ua.Userfaultfd:
        adopted.append(fd)
        return ua.Userfaultfd._adopt(os.dup(0))

    [event] = ua.decode(record(_abi.EVENT_FORK, 17), adopt=adopt)
    assert isinstance(event, ua.Fork)
    assert adopted == [17]
    event.uffd.close()


def test_the_public_decode_adopts_a_fork_fd_as_a_featureless_handle() -> None:
    """``ua.decode`` without ``adopt`` does what it always did: the fd becomes a
    :class:`Userfaultfd` of its own, with no features (use ``uffd.decode`` for a read)."""
    fd = os.dup(0)
    [event] = ua.decode(record(_abi.EVENT_FORK, fd))
    assert isinstance(event, ua.Fork) and isinstance(event.uffd, ua.Userfaultfd)
    assert event.uffd.fileno() == fd and event.uffd.features == ua.Feature(0)
    event.uffd.close()


def test_the_sans_io_decoder_takes_its_adopt_from_the_caller() -> None:
    """The decoder knows nothing of the handle: whoever owns the fd says how to adopt it."""
    with pytest.raises(TypeError, match="adopt"):
        _events.decode(record(_abi.EVENT_FORK, 17))  # type: ignore[call-arg]
    adopted: list[int] = []

    def adopt(fd: int) -> ua.Userfaultfd:
        adopted.append(fd)
        return ua.Userfaultfd._adopt(os.dup(0))

    [event] = _events.decode(record(_abi.EVENT_FORK, 17), adopt=adopt)
    assert adopted == [17] and isinstance(event, ua.Fork)
    event.uffd.close()


def test_the_decoder_loads_without_the_handle_module() -> None:
    """``_events`` never imports ``_uffd``, not even lazily (no import circle): loaded on
    its own (the packages' ``__init__`` would import everything), it decodes a fork with
    an adopt that is not a handle at all, and ``_uffd`` is still not loaded."""
    package = Path(ua.__file__).parent
    stubs = [("uffd_async", str(package)), ("uffd_async._core", str(package / "_core"))]
    script = f"""
import importlib, sys, types
for name, path in {stubs!r}:
    stub = types.ModuleType(name)
    stub.__path__ = [path]
    sys.modules[name] = stub
events = importlib.import_module("uffd_async._core._events")
record = bytes([{_abi.EVENT_FORK}]) + bytes(7) + (33).to_bytes(8, sys.byteorder) + bytes(16)
[fork] = events.decode(record, adopt=lambda fd: ("adopted", fd))
assert fork.uffd == ("adopted", 33), fork
loaded = sorted(name for name in sys.modules if name.startswith("uffd_async"))
assert "uffd_async._core._uffd" not in loaded, loaded
print(" ".join(loaded))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "uffd_async._core._events" in done.stdout.split()


def test_empty_buffer_is_no_events() -> None:
    assert ua.decode(b"") == []


@pytest.mark.parametrize("size", [1, 31, 33, 63])
def test_partial_record_is_rejected(size: int) -> None:
    with pytest.raises(ua.DecodeError, match="not a whole number"):
        ua.decode(bytes(size))


@pytest.mark.parametrize("code", [0x00, 0x11, 0x17, 0xFF])
def test_unknown_event_code_is_rejected(code: int) -> None:
    with pytest.raises(ua.DecodeError, match=f"unknown event code {code:#x}"):
        ua.decode(record(_abi.EVENT_PAGEFAULT, 0, 0x1000) + record(code))


def test_no_fd_is_adopted_when_a_later_record_is_bad() -> None:
    adopted: list[int] = []

    def adopt(fd: int) -> ua.Userfaultfd:
        adopted.append(fd)
        return ua.Userfaultfd._adopt(os.dup(0))

    with pytest.raises(ua.DecodeError):
        ua.decode(record(_abi.EVENT_FORK, 5) + record(0x99), adopt=adopt)
    assert adopted == []


@given(st.lists(events, max_size=64))
def test_round_trip(evs: list[ua.PageFault | ua.Remap | ua.Remove | ua.Unmap]) -> None:
    data = b"".join(encode(event) for event in evs)
    assert ua.decode(data) == evs


@given(st.binary(max_size=32 * 8))
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    adopted: list[int] = []

    def adopt(fd: int) -> ua.Userfaultfd:
        adopted.append(fd)
        return ua.Userfaultfd._adopt(os.dup(0))

    try:
        decoded = ua.decode(data, adopt=adopt)
    except ua.DecodeError:
        assert adopted == []
        return
    assert len(decoded) == len(data) // 32
    for event in decoded:
        if isinstance(event, ua.Fork):
            event.uffd.close()
