# What this shows: a breakpoint on a memory access, in a pytest-trio test.
# libc's strlen() runs in a thread over a string that spans two pages; the
# second page is registered with a FaultGate, so strlen stops exactly when it
# crosses into it. The test checks where it stopped, decides what the page
# holds, and lets it finish: native code driven through an exact interleaving.
#
# Run it: python -m pytest examples/fault_gate.py   (uses the fault_gate fixture's
# machinery directly; pytest-trio runs the test)
from __future__ import annotations

import ctypes
import ctypes.util
import threading

import pytest
import trio

import uffd_async as ua
from uffd_async.testing import FaultGate

P = ua.PAGE_SIZE
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.strlen.argtypes = [ctypes.c_void_p]
libc.strlen.restype = ctypes.c_size_t


@pytest.mark.trio
async def test_strlen_stops_at_the_page_boundary() -> None:
    with ua.Region.anonymous(2 * P) as region:
        region.fill(0, P, ord("a"))  # page 0: 4096 'a's, no terminator
        result: list[int] = []
        async with FaultGate(region.address + P, P) as gate:
            thread = threading.Thread(target=lambda: result.append(libc.strlen(region.address)))
            thread.start()  # ctypes drops the GIL: strlen may block on the fault
            with trio.fail_after(10):
                fault = await gate.next_fault()
            assert fault.page == region.address + P  # strlen crossed into page 1
            assert not fault.is_write and result == []  # ... and is paused there
            await gate.resolve(fault, b"xyz\0".ljust(P, b"\0"))
            thread.join(10)
        assert result == [P + 3]
