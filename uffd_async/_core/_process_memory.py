"""Reading a process's memory (this one's or a peer's) without ever faulting on it here.

``process_vm_readv(2)`` copies from another address space, or from our own:
Kernel facts this relies on:

* An address that is not mapped (unmapped, or moved away by mremap) fails
  with EFAULT, or cuts a read short at the first such page, instead of
  killing the process with SIGSEGV as a plain memcpy would: a snapshot races
  the program that unmaps its memory.
* The read goes through the kernel's get_user_pages: a page that is not
  populated is faulted in as a read (the zero page for anonymous memory), and
  a page registered MISSING with a userfaultfd waits for that uffd's handler.
  So reads that may meet MISSING pages run in a worker thread, never in the
  thread of the event loop that resolves those faults.
* Reading a peer's memory needs ptrace access to it (the same user under
  ``kernel.yama.ptrace_scope`` 0 or 1 for a child; else CAP_SYS_PTRACE); it
  fails with EPERM otherwise. Reading our own needs nothing.
* The copy runs without the GIL (a ctypes call), so it does not stall the loop
  when called from a worker thread.
"""

from __future__ import annotations

import ctypes
import errno
import os

from ._native import libc

__all__ = ["ProcessMemory"]


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


_readv = libc.process_vm_readv
_readv.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(_IoVec),
    ctypes.c_ulong,
    ctypes.POINTER(_IoVec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_readv.restype = ctypes.c_ssize_t


class ProcessMemory:
    """The memory of process ``pid`` (this one by default), read into buffers of ours."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = os.getpid() if pid is None else pid

    def read_into(self, address: int, buffer: ctypes.Array[ctypes.c_char], page_size: int) -> int:
        """Fill ``buffer`` from ``address``; pages that cannot be read (unmapped) are left
        as they are. Returns the number of such pages. Raises OSError for anything else
        (EPERM: no ptrace access; ESRCH: the process is gone)."""
        length = len(buffer)
        base = ctypes.addressof(buffer)
        unreadable = 0
        done = 0
        while done < length:
            got = self._read(address + done, base + done, length - done)
            if got > 0:
                done += got
                continue
            done += page_size  # the page at ``done`` is not mapped: skip it
            unreadable += 1
        return unreadable

    def _read(self, address: int, into: int, length: int) -> int:
        local = _IoVec(into, length)
        remote = _IoVec(address, length)
        got = _readv(self.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got >= 0:
            return int(got)
        err = ctypes.get_errno()
        if err == errno.EFAULT:
            return 0
        raise OSError(err, f"process_vm_readv of pid {self.pid} at {address:#x}: "
                      f"{os.strerror(err)}")  # fmt: skip
