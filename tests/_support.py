"""Shared helpers for tests that take real faults.

Every wait here is bounded: a fault nobody resolves must fail the test, not
hang the run. Faulting threads only ever touch memory through ctypes (ua.touch,
Region.read/write), so they never hold the GIL while blocked on a fault.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import uffd_async as ua
from uffd_async._core._memory import huge_page_size

#: Upper bound for any single wait on the kernel in these tests.
TIMEOUT = 10.0


class Worker:
    """Runs ``target`` in a daemon thread and remembers how it ended."""

    def __init__(self, target: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(target,), daemon=True)
        self._thread.start()

    def _run(self, target: Callable[[], Any]) -> None:
        try:
            self.result = target()
        except BaseException as exc:
            self.error = exc

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float = TIMEOUT) -> Any:
        """Wait for the thread; fail if it is still blocked after ``timeout``."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"worker still blocked after {timeout}s"
        if self.error is not None:
            raise self.error
        return self.result

    def stays_blocked(self, seconds: float = 0.2) -> bool:
        """True if the thread is still running after ``seconds`` (it is waiting on a fault)."""
        self._thread.join(seconds)
        return self._thread.is_alive()


def wait_events(uffd: ua.Userfaultfd, timeout: float = TIMEOUT) -> list[ua.Event]:
    """Block (bounded) until the uffd has events, then read them."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no userfaultfd event within {timeout}s"
        readable, _, _ = select.select([uffd], [], [], remaining)
        if readable:
            events = uffd.read_events()
            if events:
                return events


def wait_fault(uffd: ua.Userfaultfd, timeout: float = TIMEOUT) -> ua.PageFault:
    events = wait_events(uffd, timeout)
    assert len(events) == 1, events
    fault = events[0]
    assert isinstance(fault, ua.PageFault), fault
    return fault


class Lab:
    """Owns the regions, uffds and faulting threads of one test, and tears them
    down in the only safe order: close the uffds (which wakes every blocked
    thread), join the threads, and only then unmap the memory they touch."""

    def __init__(self) -> None:
        self.regions: list[ua.Region] = []
        self.uffds: list[ua.Userfaultfd] = []
        self.workers: list[Worker] = []

    def anonymous(self, pages: int) -> ua.Region:
        region = ua.Region.anonymous(pages * ua.PAGE_SIZE)
        self.regions.append(region)
        return region

    def shared(self, pages: int) -> ua.Region:
        region = ua.Region.shared(pages * ua.PAGE_SIZE)
        self.regions.append(region)
        return region

    def adopt_region(self, region: ua.Region) -> ua.Region:
        self.regions.append(region)
        return region

    def uffd(self, features: ua.Feature | int = ua.Feature(0), **kwargs: Any) -> ua.Userfaultfd:
        uffd = ua.Userfaultfd.open(features, **kwargs)
        self.uffds.append(uffd)
        return uffd

    def run(self, target: Callable[[], Any]) -> Worker:
        worker = Worker(target)
        self.workers.append(worker)
        return worker

    def touch(self, address: int, length: int = ua.PAGE_SIZE, *, write: bool = True) -> Worker:
        return self.run(lambda: ua.touch(address, length, write=write))

    def close(self) -> None:
        for uffd in self.uffds:
            uffd.close()
        stuck = []
        for worker in self.workers:
            worker._thread.join(TIMEOUT)
            if worker.alive:
                stuck.append(worker)
        if stuck:
            # Unmapping under a blocked thread would crash the process: leak instead.
            raise AssertionError(f"{len(stuck)} faulting threads never finished")
        for region in self.regions:
            region.close()


def pattern(page_index: int, size: int = ua.PAGE_SIZE) -> bytes:
    """Distinct, recognisable contents for page ``page_index``."""
    stamp = f"page {page_index:08d} ".encode()
    return (stamp * (size // len(stamp) + 1))[:size]


async def finished(worker: Worker, timeout: float = TIMEOUT) -> Any:
    """Wait (async, bounded) for a worker thread without blocking the event loop."""
    import anyio

    with anyio.fail_after(timeout):
        while worker.alive:
            await anyio.sleep(0.002)
    return worker.join(0)


def source_bytes(pages: int) -> bytes:
    return b"".join(pattern(i) for i in range(pages))


# -- huge pages -------------------------------------------------------------------
#
# Region.hugetlb maps huge pages of the default size from the pool that
# vm.nr_hugepages sizes (/proc/sys/vm/nr_hugepages, writable by root only). Pages
# promised to a mapping but not faulted in yet are still counted free
# (HugePages_Free), and also reserved (HugePages_Rsvd). Growing the pool can give
# fewer pages than asked for (memory too fragmented); shrinking it frees only
# pages nobody uses.

NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
_Test = TypeVar("_Test", bound=Callable[..., Any])


def free_huge_pages() -> int:
    """Huge pages of the default size that a new mapping can have."""
    fields: dict[str, int] = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            name, _, value = line.partition(":")
            if name in ("HugePages_Free", "HugePages_Rsvd"):
                fields[name] = int(value.split()[0])
    return fields.get("HugePages_Free", 0) - fields.get("HugePages_Rsvd", 0)


@contextlib.contextmanager
def huge_pages_free(count: int) -> Iterator[int]:
    """``count`` free huge pages for the block, which gets their size.

    Where fewer are free, root grows the pool by what is missing and shrinks it
    by as much afterwards; without root (or huge page support), or where the
    kernel cannot find the memory, the test skips, naming the sysctl.
    """
    size = huge_page_size()
    missing = count - free_huge_pages()
    if missing <= 0:
        yield size
        return
    pages = "page" if count == 1 else "pages"
    reason = f"needs {count} free huge {pages} (sysctl vm.nr_hugepages={count})"
    try:
        total = int(NR_HUGEPAGES.read_text())
        NR_HUGEPAGES.write_text(str(total + missing))
        added = int(NR_HUGEPAGES.read_text()) - total
    except OSError as exc:
        pytest.skip(f"{reason}; cannot reserve them here: {exc.strerror}")
    try:
        if free_huge_pages() < count:
            pytest.skip(f"{reason}; the kernel could only free {free_huge_pages()}")
        yield size
    finally:
        # Shrink by what was added, not back to ``total``: others may have
        # resized the pool meanwhile (another test run, say).
        if added > 0:
            now = int(NR_HUGEPAGES.read_text())
            NR_HUGEPAGES.write_text(str(max(0, now - added)))


def with_huge_pages(count: int) -> Callable[[_Test], _Test]:
    """Mark a test that maps up to ``count`` huge pages: the ``huge_pages`` fixture
    (conftest.py) makes them free for it (see :func:`huge_pages_free`)."""

    def mark(test: _Test) -> _Test:
        marked: _Test = pytest.mark.usefixtures("huge_pages")(pytest.mark.huge_pages(count)(test))
        return marked

    return mark


# -- what a test may leave behind -------------------------------------------------
#
# Facts the leak checks rely on (fs/proc/task_mmu.c, and glibc's malloc/arena.c):
#
# * /proc/self/smaps lists every mapping with its ``VmFlags``: ``um``, ``uw`` and
#   ``ui`` mark a range registered with a userfaultfd (MISSING, WP, MINOR), ``nr``
#   a MAP_NORESERVE mapping, ``ht`` a hugetlb one. Closing the last reference to a
#   uffd unregisters its ranges, so no VMA may keep those flags after a test.
# * Region.anonymous maps with MAP_NORESERVE; Region.shared maps a memfd named
#   "uffd_async" (shown as ``/memfd:uffd_async``). Python's allocator (arenas,
#   large mallocs, thread stacks) never uses MAP_NORESERVE, but glibc does, for
#   the 64 MiB-aligned heaps of its per-thread malloc arenas, which live as long
#   as the process: an ``nr`` mapping inside a 64 MiB block where another ``nr``
#   mapping starts at the block's first byte is taken for one of those. A leaked
#   Region that happens to share such a block goes unseen.
# * Creating such a heap passes through states that look like a Region, for a few
#   microseconds, in whichever thread needs a new heap (a new thread's first malloc
#   or free, say faulthandler's watchdog starting): glibc maps twice the heap size
#   (128 MiB) PROT_NONE and MAP_NORESERVE, unmaps the parts outside one 64 MiB
#   aligned block, then mprotects the start read-write (strace shows
#   ``mmap(NULL, 134217728, PROT_NONE, ...|MAP_NORESERVE)``, two ``munmap``s, an
#   ``mprotect``). So a PROT_NONE one is only reported if it is still there after a
#   grace period; a Region is mapped read-write (``Region.move`` maps its target
#   PROT_NONE, then mremaps over it at once), and a leaked one stays. Nothing else
#   is noise.
# * /proc/self/task/TID/wchan names the kernel function a sleeping thread waits
#   in: ``handle_userfault`` for a thread blocked on a userfaultfd fault. Where
#   wchan is hidden (it reads "0"), that check sees nothing.

_UFFD_VMFLAGS = frozenset({"um", "uw", "ui"})
_GLIBC_HEAP = 64 << 20
_MEMFD_NAME = "/memfd:uffd_async"


class Mapping:
    """One line of /proc/self/smaps, with its VmFlags."""

    def __init__(self, start: int, end: int, perms: str, path: str, flags: frozenset[str]):
        self.start, self.end, self.perms, self.path, self.flags = start, end, perms, path, flags

    @property
    def key(self) -> tuple[int, int, str, str, frozenset[str]]:
        return (self.start, self.end, self.perms, self.path, self.flags)

    def __repr__(self) -> str:
        flags = " ".join(sorted(self.flags))
        return f"{self.start:#x}-{self.end:#x} {self.perms} {self.path or '[anon]'} ({flags})"


def mappings() -> list[Mapping]:
    """Every mapping of this process, from /proc/self/smaps."""
    with open("/proc/self/smaps") as smaps:
        text = smaps.read()
    # Each mapping's block starts with its header line and ends with its VmFlags line.
    found: list[Mapping] = []
    header = text.split("\n", 1)[0]
    for part in text.split("VmFlags: ")[1:]:
        flags, _, rest = part.partition("\n")
        fields = header.split(None, 5)
        start, end = fields[0].split("-")
        path = fields[5] if len(fields) > 5 else ""
        found.append(
            Mapping(int(start, 16), int(end, 16), fields[1], path, frozenset(flags.split()))
        )
        header = rest.partition("\n")[0]
    return found


def _glibc_heap_blocks(all_mappings: list[Mapping]) -> set[int]:
    return {
        m.start
        for m in all_mappings
        if "nr" in m.flags and not m.path and m.start % _GLIBC_HEAP == 0
    }


def looks_like_ours(mapping: Mapping, heap_blocks: set[int]) -> bool:
    """A mapping a Region (or a registration) made, as far as smaps can tell."""
    if mapping.flags & _UFFD_VMFLAGS or "ht" in mapping.flags:
        return True
    if mapping.path.startswith(_MEMFD_NAME):
        return True
    if mapping.path or "nr" not in mapping.flags:
        return False
    block = mapping.start - mapping.start % _GLIBC_HEAP
    in_one_block = (mapping.end - 1) - (mapping.end - 1) % _GLIBC_HEAP == block
    return not (in_one_block and block in heap_blocks)


def settling(mapping: Mapping) -> bool:
    """A PROT_NONE reservation glibc may be trimming into a heap (see above)."""
    return (
        not mapping.path
        and mapping.perms.startswith("---")
        and "nr" in mapping.flags
        and not mapping.flags & _UFFD_VMFLAGS
        and "ht" not in mapping.flags
    )


def threads_in_userfault() -> dict[int, str]:
    """Threads of this process asleep in handle_userfault: {native id: name}."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    blocked: dict[int, str] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/wchan") as wchan:
                if wchan.read().strip() != "handle_userfault":
                    continue
        except OSError:
            continue  # the thread has just exited
        blocked[int(tid)] = names.get(int(tid), "(not a Python thread)")
    return blocked


class Resources:
    """What a test might leak, taken before it runs; :meth:`leaks` compares."""

    def __init__(self, *, threads: bool = True) -> None:
        self.fds = self._open_fds()
        self.threads = threads
        self.blocked = set(threads_in_userfault()) if threads else set()
        self.ours = self._ours()

    @staticmethod
    def _ours() -> dict[tuple[int, int, str, str, frozenset[str]], Mapping]:
        every = mappings()
        heaps = _glibc_heap_blocks(every)
        return {m.key: m for m in every if looks_like_ours(m, heaps)}

    @staticmethod
    def _open_fds() -> set[str]:
        # The listing's own fd is in the listing, and closed once it is done: leave it
        # out, or the next fd opened (which gets its number) would go unnoticed.
        return {fd for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")}

    def leaked_fds(self) -> list[str]:
        leaked = []
        for fd in sorted(self._open_fds() - self.fds, key=int):
            try:
                leaked.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
            except OSError:
                continue  # closed meanwhile
        return leaked

    def blocked_threads(self, grace: float = 2.0) -> dict[int, str]:
        """Threads newly blocked on a fault, after ``grace`` seconds to wake (bounded)."""
        deadline = time.monotonic() + grace
        while True:
            blocked = {
                tid: name for tid, name in threads_in_userfault().items() if tid not in self.blocked
            }
            if not blocked or time.monotonic() > deadline:
                return blocked
            time.sleep(0.01)

    def leaked_mappings(self, grace: float = 2.0) -> list[Mapping]:
        """Registrations and Region-like mappings that were not there before; while
        one is a PROT_NONE reservation, look again for up to ``grace`` seconds
        (bounded), so glibc can finish making a heap of it."""
        deadline = time.monotonic() + grace
        while True:
            leaked = [m for key, m in self._ours().items() if key not in self.ours]
            if not any(settling(m) for m in leaked) or time.monotonic() > deadline:
                return leaked
            time.sleep(0.01)

    def leaks(self, grace: float = 2.0) -> Iterator[str]:
        """A line per leak: fds, blocked threads (given ``grace`` seconds to wake),
        registrations and mappings (PROT_NONE ones given ``grace`` to settle)."""
        for fd in self.leaked_fds():
            yield f"leaked fd {fd}"
        for tid, name in (self.blocked_threads(grace) if self.threads else {}).items():
            yield f"thread {name!r} (tid {tid}) is still blocked on a userfaultfd fault"
        for mapping in self.leaked_mappings(grace):
            what = "registration" if mapping.flags & _UFFD_VMFLAGS else "mapping"
            yield f"leaked {what} {mapping!r}"


# -- the HTTP object server -------------------------------------------------------
#
# HttpSource is tested against a real server process on loopback
# (tests/_http_server.py: uvicorn and Starlette), never a mocked transport, so its
# pool, framing and error paths run as they would against object storage.

_REPO = Path(__file__).resolve().parent.parent
#: Bound on each control call and on the server's shutdown after SIGTERM.
HTTP_CONTROL_TIMEOUT = 5.0
# Control calls go straight to loopback, whatever *_proxy variables say.
_CONTROL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class HttpObjectServer:
    """Drives one ``tests._http_server`` process: its objects (files under ``root``),
    its latency, the misbehaviours it is to commit, and what it served."""

    def __init__(self, process: subprocess.Popen[bytes], root: Path, base_url: str) -> None:
        self.process, self.root, self.base_url = process, root, base_url

    def url(self, name: str) -> str:
        return f"{self.base_url}/o/{urllib.parse.quote(name)}"

    def put(self, name: str, data: bytes) -> Path:
        """Write object ``name`` atomically (a request sees the old or the new file,
        whole); a new inode and mtime, so a new ETag."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        return path

    def delay(self, ms: float) -> None:
        """Latency before every object response from now on (0: none)."""
        self._control("delay", {"ms": ms})

    def etag(self, enabled: bool, *, weak: bool = False) -> None:
        """Without ETags, responses carry Last-Modified only (HttpSource's fallback);
        ``weak``: the ETags are weak (``W/"..."``), which If-Match never matches."""
        self._control("etag", {"enabled": enabled, "weak": weak})

    def preconditions(self, honoured: bool) -> None:
        """``False``: If-Match and If-Unmodified-Since are ignored (a lax server or
        cache), so a replaced object is served as it is now, never a 412."""
        self._control("preconditions", {"honoured": honoured})

    def queue(self, *actions: str, path: str | None = None, on: str = "range") -> None:
        """Append misbehaviours (``tests._http_server.ACTIONS``), each taken by the
        next ranged GET (``on="any"``: next object request, HEAD too) of object
        ``path`` (None: of any object)."""
        self._control("actions", {"actions": list(actions), "path": path, "on": on})

    def release(self) -> None:
        """Every request a ``hold`` action keeps waiting goes on."""
        self._control("release", {})

    def wait_held(self, count: int = 1, timeout: float = TIMEOUT) -> None:
        """Until ``count`` requests wait on ``hold`` (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self.stats(log=False)["held"] < count:
            assert time.monotonic() < deadline, f"no {count} held requests after {timeout}s"
            time.sleep(0.005)

    def stats(self, *, log: bool = True) -> dict[str, Any]:
        """What was served since the last reset (see ``ServerState.snapshot``);
        ``log=False`` leaves out the per-request lists (long benchmarks)."""
        return self._control("stats" if log else "stats?log=0")

    def reset(self) -> None:
        """Counters, queued actions, delay and ETag mode back to a fresh server's."""
        self._control("reset", {})

    def wait_idle(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The stats once no connection is open (the client closed its pool) and no
        request is in flight; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats(log=False)
            if not (stats["connections_open"] or stats["sockets_open"] or stats["in_flight"]):
                return self.stats()
            assert time.monotonic() < deadline, f"server still busy after {timeout}s: {stats}"
            time.sleep(0.01)

    def _control(self, what: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.base_url}/_control/{what}",
            data=data,
            method="GET" if body is None else "POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with _CONTROL.open(request, timeout=HTTP_CONTROL_TIMEOUT) as response:
                answer: dict[str, Any] = json.loads(response.read())
                return answer
        except urllib.error.HTTPError as exc:
            try:
                detail = exc.read()
            finally:
                exc.close()
            raise AssertionError(f"/_control/{what}: {exc.code} {detail!r}") from None

    def close(self) -> None:
        """SIGTERM, then SIGKILL if it is not gone within a bound; always reaped."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(HTTP_CONTROL_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> HttpObjectServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_http_server(
    root: Path | str, timeout: float = TIMEOUT, *, exit_with: int | None = None
) -> HttpObjectServer:
    """Start ``python -m tests._http_server`` serving the files under ``root``, on a
    free loopback port; returns once it says where it listens (within ``timeout``).
    The server also ends when process ``exit_with`` (default: this one) does (it
    watches a pidfd), so a run the watchdog kills leaves none behind."""
    root = Path(root)
    command = [sys.executable, "-m", "tests._http_server", "--root", str(root)]
    process = subprocess.Popen(
        [*command, "--exit-with", str(os.getpid() if exit_with is None else exit_with)],
        cwd=_REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    server = HttpObjectServer(process, root, "")
    try:
        assert process.stdout is not None
        fd, seen = process.stdout.fileno(), b""
        deadline = time.monotonic() + timeout
        while b"\n" not in seen:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the HTTP server said nothing within {timeout}s: {seen!r}"
            if select.select([fd], [], [], remaining)[0]:
                chunk = os.read(fd, 4096)
                assert chunk, f"the HTTP server ended ({process.wait()}) before listening"
                seen += chunk
        word, _, server.base_url = seen.decode().strip().partition(" ")
        assert word == "listening" and server.base_url.startswith("http://"), seen
        process.stdout.close()  # it writes nothing more there
    except BaseException:
        server.close()
        raise
    return server


@contextlib.contextmanager
def short_directory(prefix: str = "ua-") -> Iterator[Path]:
    """A directory with a short path that any user may enter (a socket path holds at most
    107 bytes, and pytest's tmp_path can be longer), removed after."""
    name = tempfile.mkdtemp(prefix=prefix)
    try:
        os.chmod(name, 0o755)
        yield Path(name)
    finally:
        shutil.rmtree(name)
