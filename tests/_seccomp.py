"""Seccomp filters for child processes: a kernel (or a container profile) that lacks a call.

Each filter is Python source run by a child before the code under test:
:data:`INSTALL` defines ``install(program)``, which loads a classic BPF
program (a list of ``(code, jt, jf, k)``) with ``PR_SET_NO_NEW_PRIVS`` and
``PR_SET_SECCOMP``. Facts it relies on: ``seccomp_data`` holds ``nr`` (u32)
at offset 0, ``arch`` (u32) at 4 and ``args[6]`` (u64 each) from 16; a filter
returns ``SECCOMP_RET_ALLOW`` or ``SECCOMP_RET_ERRNO | errno``; a filter
installed once stays for the process and every child it starts.
"""

from __future__ import annotations

import platform

#: BPF opcodes: load a word of seccomp_data, jump if equal, return.
LD, JEQ, RET = 0x20, 0x15, 0x06
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
#: Offsets into seccomp_data.
NR, ARCH = 0, 4


def arg(index: int) -> int:
    """The offset of syscall argument ``index`` (its low 32 bits, on little-endian)."""
    return 16 + 8 * index


#: AUDIT_ARCH_* and the syscall numbers the filters here use, where they are known.
ARCHES = {
    "x86_64": {"arch": 0xC000003E, "userfaultfd": 323, "ioctl": 16, "getsockopt": 55,
               "pidfd_open": 434},
    "aarch64": {"arch": 0xC00000B7, "userfaultfd": 282, "ioctl": 29, "getsockopt": 209,
                "pidfd_open": 434},
}  # fmt: skip
MACHINE = ARCHES.get(platform.machine())

INSTALL = """
import ctypes, struct, sys
def install(program):
    raw = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in program))
    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    prog = Program(len(program), ctypes.addressof(raw))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p,
                           ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(38, 1, None, 0, 0):  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(22, 2, ctypes.addressof(prog), 0, 0):  # PR_SET_SECCOMP, FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")
"""


#: One BPF instruction: (code, jump if true, jump if false, k).
Instruction = tuple[int, int, int, int]


def installing(program: list[Instruction]) -> str:
    """Source that installs ``program`` in the process that runs it."""
    return f"{INSTALL}\ninstall({program!r})\n"
