"""The plain Python handler: what a user would write without this library.

One thread, ``select.poll`` on the uffd and a stop pipe, ``os.read`` of up to
64 messages, ``struct`` to decode them and one ``fcntl.ioctl`` per fault, with
the numbers copied from ``<linux/userfaultfd.h>``. It does what ``handler.c``
does, fault for fault (readahead, EEXIST -> wake, slow fetches, DONTWAKE +
WAKE), so the difference between the two is the cost of Python itself. The
workload runs in C pthreads meanwhile, without the GIL.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import threading
import time

from ._job import Job, Served

# From <linux/userfaultfd.h>: _IOWR/_IOR(0xAA, nr, struct).
UFFDIO_WAKE = 0x8010AA02  # struct uffdio_range {start, len}
UFFDIO_COPY = 0xC028AA03  # struct uffdio_copy {dst, src, len, mode, s64 copy}
UFFDIO_WRITEPROTECT = 0xC018AA06  # struct uffdio_writeprotect {start, len, mode}
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1

MSG = struct.Struct("=B7xQQ8x")  # uffd_msg: event, pagefault.flags, pagefault.address
RANGE = struct.Struct("=QQ")
COPY = struct.Struct("=QQQQq")
WRITEPROTECT = struct.Struct("=QQQ")
BATCH = 64


class PlainHandler:
    """Serves one job's faults in a thread until :meth:`stop`."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.fd = job.uffd.fileno()
        self.faults = 0
        self.resolved = 0
        self.error: BaseException | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._main, name="plain-python-handler")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Ask the thread to finish (it drains pending messages first), and wait for it."""
        os.write(self._stop_w, b"x")
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the plain Python handler did not stop within {timeout} s")
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _main(self) -> None:
        try:
            self._serve()
        except BaseException as exc:
            self.error = exc
            self.job.abort(f"the plain Python handler failed: {exc!r}")

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if ready.get(self.fd, 0) & (select.POLLERR | select.POLLNVAL):
                raise OSError(errno.EIO, "poll() reported an error on the uffd")
            self._drain()
            if self._stop_r in ready:
                return

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.fd, MSG.size * BATCH)
            except BlockingIOError:
                return
            for event, flags, address in MSG.iter_unpack(data):
                if event != UFFD_EVENT_PAGEFAULT:
                    raise OSError(errno.EPROTO, f"unexpected uffd event {event:#x}")
                self.faults += 1
                self._handle(flags, address)

    def _handle(self, flags: int, address: int) -> None:
        job = self.job
        index = (address - job.address) // job.page_size
        if not 0 <= index < job.pages:
            raise OSError(errno.EFAULT, f"fault at {address:#x} is outside the region")
        is_wp = bool(flags & UFFD_PAGEFAULT_FLAG_WP)
        if is_wp != (job.mode == "wp"):
            raise OSError(errno.EPROTO, f"fault flags {flags:#x} do not fit mode {job.mode}")
        if is_wp:
            self._unprotect(index)
        elif job.seen[index]:
            self._wake(index, 1)
        else:
            self._copy(index)

    def _copy(self, index: int) -> None:
        job, size = self.job, self.job.page_size
        run = 1
        while run <= job.readahead and index + run < job.pages and not job.seen[index + run]:
            run += 1
        if job.slow_us:
            time.sleep(job.slow_us / 1e6)
        done, total = 0, run * size
        while done < total:
            offset = index * size + done
            arg = bytearray(
                COPY.pack(job.address + offset, job.source + offset, total - done, 0, 0)
            )
            try:
                fcntl.ioctl(self.fd, UFFDIO_COPY, arg, True)
            except OSError as exc:
                copied = COPY.unpack(arg)[4]
                if exc.errno == errno.EAGAIN and copied > 0:
                    done += copied
                    continue
                if exc.errno == errno.EEXIST:  # already there, and not woken
                    job.seen[index] = 1
                    self._wake(index, 1)
                    return
                raise
            break
        job.seen[index : index + run] = b"\x01" * run
        self.resolved += run

    def _unprotect(self, index: int) -> None:
        job = self.job
        start = job.address + index * job.page_size
        mode = UFFDIO_WRITEPROTECT_MODE_DONTWAKE if job.wake_separately else 0
        fcntl.ioctl(self.fd, UFFDIO_WRITEPROTECT, WRITEPROTECT.pack(start, job.page_size, mode))
        if job.wake_separately:
            self._wake(index, 1)
        job.seen[index] = 1
        self.resolved += 1

    def _wake(self, index: int, pages: int) -> None:
        job = self.job
        start = job.address + index * job.page_size
        fcntl.ioctl(self.fd, UFFDIO_WAKE, RANGE.pack(start, pages * job.page_size))


def run_plain(job: Job) -> Served:
    """Runner: the plain Python handler in a thread, the workload in this one."""
    handler = PlainHandler(job)
    handler.start()
    try:
        job.workload.run()
    finally:
        handler.stop(job.timeout)
    if handler.error is not None:
        raise RuntimeError(f"the plain Python handler failed: {handler.error!r}") from handler.error
    return Served(faults=handler.faults, resolved=handler.resolved)
