"""A process that hands its memory over exactly as a released Firecracker does.

Standard library only (it also runs as another user under the system's python3):
it opens a userfaultfd as Firecracker's ``UffdBuilder`` does (non-blocking,
close-on-exec, EVENT_REMOVE), maps two guest regions (two mmaps) laid end to end
in the snapshot, registers both in MISSING mode, connects, and sends one
``sendmsg``: the mappings as ``serde_json::to_string`` writes them for that
version (compact, fields in ``GuestRegionUffdMapping``'s order), the uffd as the
only SCM_RIGHTS fd. Then it does with its socket what that version does: 1.1 to
1.11 drop it at the end of ``guest_memory_from_uffd`` (closed at once), 1.12 and
later ``forget`` it (open until exit). The bytes below come from
``src/vmm/src/persist.rs`` at each tag.

Then, from plain Python (the handler is another process), it reads every byte
of both regions and compares them with the snapshot file, discards a range with
MADV_DONTNEED (a balloon inflating) and checks it reads zeros while the rest
still reads the snapshot, prints ``ok`` and exits. argv[1] is a JSON config:
``socket``, ``snapshot``, ``version`` ("1.1", "1.7" or "1.12"), ``page_size``,
``pages`` (of each region), and optionally ``page_size_kib`` (a different value,
for a hostile message), ``steps`` (default ``["read", "discard", "read"]``; also
``"wait"``: block until a line arrives on stdin, and ``"hold"``: a thread faults
on the first page while the main thread waits for stdin, then exits).
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import json
import mmap
import os
import platform
import signal
import socket
import struct
import sys
import threading

_SYSCALL_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
_UFFDIO_API = 0xC018AA3F
_UFFDIO_REGISTER = 0xC020AA00
_UFFD_API = 0xAA
_UFFD_USER_MODE_ONLY = 1
_FEATURE_EVENT_REMOVE = 1 << 3
_MODE_MISSING = 1
_MAP_HUGETLB = 0x40000


def firecracker_message(version: str, regions: list[tuple[int, int, int]], page_size: int,
                        page_size_kib: int | None = None) -> bytes:  # fmt: skip
    """``serde_json::to_string(&backend_mappings)`` for ``regions`` (address, size, offset)."""
    kib = page_size if page_size_kib is None else page_size_kib
    items = []
    for address, size, offset in regions:
        item = f'{{"base_host_virt_addr":{address},"size":{size},"offset":{offset}'
        if version == "1.7":
            item += f',"page_size_kib":{kib}'
        elif version == "1.12":
            item += f',"page_size":{page_size},"page_size_kib":{kib}'
        items.append(item + "}")
    return ("[" + ",".join(items) + "]").encode()


def open_uffd() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    number = _SYSCALL_USERFAULTFD[platform.machine()]
    flags = os.O_NONBLOCK | os.O_CLOEXEC
    fd: int = libc.syscall(number, flags)
    if fd < 0:  # an unprivileged user: user-mode-only (enough for faults from Python)
        fd = libc.syscall(number, flags | _UFFD_USER_MODE_ONLY)
    if fd < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"userfaultfd: {os.strerror(error)}")
    fcntl.ioctl(fd, _UFFDIO_API, bytearray(struct.pack("QQQ", _UFFD_API, _FEATURE_EVENT_REMOVE, 0)))
    return fd


def main() -> None:
    config = json.loads(sys.argv[1])
    signal.alarm(60)  # a page that never comes ends this process, not the test run
    page_size, pages = config["page_size"], config["pages"]
    size = pages * page_size
    with open(config["snapshot"], "rb") as f:
        snapshot = f.read()
    uffd = open_uffd()
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if page_size != mmap.PAGESIZE:
        flags |= _MAP_HUGETLB
    regions = [mmap.mmap(-1, size, flags=flags) for _ in range(2)]
    addresses = [ctypes.addressof(ctypes.c_char.from_buffer(region)) for region in regions]
    for address in addresses:
        fcntl.ioctl(uffd, _UFFDIO_REGISTER, bytearray(struct.pack("QQQQ", address, size, 1, 0)))
    declared = [(address, size, index * size) for index, address in enumerate(addresses)]
    message = firecracker_message(
        config["version"], declared, page_size, config.get("page_size_kib")
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(config["socket"])
    sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [uffd]))])
    if config["version"] != "1.12":
        sock.close()  # dropped at the end of guest_memory_from_uffd
    print("sent", flush=True)
    model = [bytearray(snapshot[index * size : (index + 1) * size]) for index in range(2)]
    for step in config.get("steps", ["read", "discard", "read"]):
        if step == "read":
            for index, region in enumerate(regions):
                got = region[:]
                if got != model[index]:
                    want = model[index]
                    bad = next(i for i in range(0, size, page_size)
                               if got[i : i + page_size] != want[i : i + page_size])  # fmt: skip
                    print(f"region {index} byte {bad:#x} holds {got[bad : bad + 16]!r}", flush=True)
                    os._exit(1)
        elif step == "discard":  # a balloon inflating over the end of one region and the other
            start, length = size // 2, size // 4
            regions[1].madvise(mmap.MADV_DONTNEED, start, length)
            model[1][start : start + length] = bytes(length)
        elif step == "wait":
            sys.stdin.readline()
        elif step == "hold":  # a fault left pending: a thread blocks on it, then we exit
            buffer = ctypes.create_string_buffer(1)  # memmove is a foreign call: no GIL held
            args = (buffer, addresses[0], 1)
            threading.Thread(target=ctypes.memmove, args=args, daemon=True).start()
            sys.stdin.readline()
            os._exit(0)
    print("ok", flush=True)


if __name__ == "__main__":
    main()
