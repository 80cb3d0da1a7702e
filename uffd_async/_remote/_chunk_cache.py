"""A host chunk cache: fetched chunks kept as files that every serving process shares.

Sixteen guests restored on one host from one snapshot would fetch every chunk
sixteen times, and a second restore all of it again; with this cache a chunk
crosses the network once per host (once per version of the object) while it
stays within the bound. Facts this relies on:

* ``rename`` is atomic and ``O_EXCL`` temporary names never collide
  (``_core._atomic_file``): a reader sees a whole chunk file or none.
* A file that is mapped, then unlinked (evicted) or renamed over (stored
  again), stays readable through the mapping until it is unmapped: the inode
  lives on. So a chunk handed out as a mapping is never pulled from under its
  reader by another process. Only a truncation in place could (SIGBUS on the
  page past the end), and this cache never truncates a file in place: only
  someone writing into its directory by hand could.
* A hit is mapped (``MAP_POPULATE``: the page cache's pages, no copy) and
  checked in a worker thread. Measured in a real warm restore (149 hits of
  1 MiB): reading it with ``pread`` into a fresh ``bytes`` instead cost 2.3x
  the lookup's CPU (a new 1 MiB allocation, faulted and zeroed, per hit).
* ``flock`` locks belong to an open file description and the kernel drops
  them when the last fd of it closes, however the process ended (SIGKILL
  included): a dead fetcher's claim frees itself, no pid to check. Two threads
  sharing one description do not exclude each other through it, hence the
  in-process mutex beside the lock file's flock.
* A file's mtime can be set to any value by its owner (``futimens``) and is
  kept exactly (nanoseconds): it is the LRU clock, set when a chunk is stored
  and on every hit. The wall clock of every process on a host is the same one,
  so the order holds across processes (a clock stepped back makes it approximate,
  never wrong about the bound).
* Checksums catch what a crash, a bad disk or a stray write leaves behind;
  they do not make a directory someone else can write safe: that is why it
  must belong to this user and not be world-writable.

The on-disk layout, the header and the locking are written down in
``_chunk_cache_format.LAYOUT`` (also in the README); the header is read and
written there, without I/O.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator

import anyio
import anyio.to_thread
import attrs

from .._core._atomic_file import PRIVATE, AtomicFile, write_atomically
from .._core._checks import check_int, check_seconds
from .._core._errors import InvalidArgument
from ._chunk_cache_format import (
    HEADER_SIZE,
    LAYOUT_TEXT,
    LAYOUT_VERSION,
    OLDER_LAYOUTS,
    CacheLayoutError,
    ChunkKey,
    check_header,
    digest_of,
    file_name,
    pack_header,
)
from ._chunk_cache_format import (
    layout_text as _layout_text,
)

__all__ = ["DEFAULT_CLAIM_TIMEOUT", "HostCacheStats", "HostChunkCache"]

logger = logging.getLogger("uffd_async")

_USAGE = struct.Struct("<Q")
#: How long a waiter lets another fetcher hold a chunk's claim before fetching it too.
DEFAULT_CLAIM_TIMEOUT = 120.0
#: A temporary file this old was left by a crashed writer.
_STALE_PARTIAL_NS = 3600 * 10**9
_NO_CLAIMS = -1
_POLL_FIRST = 0.001
_POLL_MAX = 0.05
#: What a full, read-only or otherwise unwritable filesystem says: misses, never errors.
_DEGRADING = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EMFILE}
)


@attrs.define(kw_only=True)
class HostCacheStats:
    """What this process's handle on the cache did (other processes count their own)."""

    #: get()/fetch() served from a verified file; get() found nothing.
    hits: int = 0
    misses: int = 0
    #: Files found damaged (bad header, checksum, size): removed, counted as misses.
    damaged: int = 0
    #: Chunks written, and chunks (and their bytes) evicted by this process.
    stored: int = 0
    evicted: int = 0
    evicted_bytes: int = 0
    #: Reads and writes that failed (full, read-only filesystem...): misses, not errors.
    read_errors: int = 0
    write_errors: int = 0
    #: fetch() calls that ran the fetcher; that waited on another's claim; that gave up
    #: waiting after ``claim_timeout`` and fetched too.
    fetched: int = 0
    waited: int = 0
    took_over: int = 0


class HostChunkCache:
    """Chunks stored as files under ``directory``, at most ``max_bytes`` in all (file sizes,
    header pages included), evicted least recently used first, shared by every process that
    opens the same directory.

    :meth:`get` and :meth:`put` are synchronous file work (a hash of the chunk, a few
    syscalls); :meth:`fetch` runs them in a worker thread and is the one to await from an
    event loop. What :meth:`get` returns is a read-only :class:`memoryview` of a private
    mapping of the file's data: valid for as long as it (or a view of it) is referenced,
    eviction or not; the mapping, and the fd Python's ``mmap`` keeps, go with the last
    reference. A directory that cannot be written (read-only or full filesystem) makes a
    cache that misses, logged once, never an error out of get/put/fetch.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_bytes: int,
        *,
        claim_timeout: float = DEFAULT_CLAIM_TIMEOUT,
        mode: int = 0o700,
    ) -> None:
        self.max_bytes = check_int("max_bytes", max_bytes, minimum=HEADER_SIZE + 1)
        self.claim_timeout = check_seconds("claim_timeout", claim_timeout)
        self._mode = check_int("mode", mode, minimum=0, maximum=0o777)
        if mode & 0o700 != 0o700 or mode & stat.S_IWOTH:
            raise InvalidArgument(
                errno.EINVAL,
                f"mode {mode:#o} for a cache directory: rwx for its owner, "
                "never writable by others",
            )
        try:
            self.directory = os.path.abspath(os.fspath(directory))
        except TypeError:
            raise InvalidArgument(
                errno.EINVAL, f"directory must be a path, not {type(directory).__name__}"
            ) from None
        if "\0" in self.directory:
            raise InvalidArgument(errno.EINVAL, f"a cache directory with a NUL: {directory!r}")
        self.stats = HostCacheStats()
        self._chunks = os.path.join(self.directory, "chunks")
        self._claims = os.path.join(self.directory, "claims")
        self._mutex = threading.Lock()  # flock does not exclude threads sharing _lock_fd
        self._lock_fd = -1
        self._last_tick = 0
        self._logged: set[tuple[str, int | None]] = set()
        self.usable = False  # get() can read
        self.writable = False  # put() can write
        try:
            self._open()
        except OSError as exc:
            if isinstance(exc, InvalidArgument) or exc.errno not in _DEGRADING:
                self.close()
                raise
            self._degrade("open", exc)

    # -- opening -----------------------------------------------------------------

    def _open(self) -> None:
        created = self._make_directory(self.directory)
        self._check_owner()
        older = self._check_layout(created)
        self.usable = older is None
        for sub in (self._chunks, self._claims):
            self._make_directory(sub)
        try:
            self._lock_fd = os.open(
                os.path.join(self.directory, "lock"),
                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                PRIVATE,
            )
            os.fchmod(self._lock_fd, PRIVATE)  # whatever the umask took away
        except OSError as exc:
            if exc.errno not in _DEGRADING:
                raise
            self._failed("write", exc)  # a read-only filesystem: what is there can be read
            return
        self.writable = True
        with self._locked():
            if older is not None:
                self._take_over(older)
            self._evict(0)  # recounts, and brings a cache opened with a smaller bound within it

    def _make_directory(self, path: str) -> bool:
        """Create ``path`` with the cache's mode; whether it was created now."""
        try:
            os.mkdir(path, self._mode)
        except FileExistsError:
            if not os.path.isdir(path):
                raise InvalidArgument(
                    errno.ENOTDIR, f"the cache directory {path!r} exists and is not a directory"
                ) from None
            return False
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            return self._make_directory(path)
        os.chmod(path, self._mode)  # whatever the umask took away
        return True

    def _check_owner(self) -> None:
        info = os.stat(self.directory)
        if info.st_uid != os.geteuid() or info.st_mode & stat.S_IWOTH:
            raise InvalidArgument(
                errno.EPERM,
                f"the cache directory {self.directory!r} is "
                + ("world-writable" if info.st_uid == os.geteuid() else "another user's")
                + ": its chunks would go into guests' memory; use a directory of your own "
                "(mode 0700)",
            )

    def _take_over(self, older: str) -> None:
        """Make a directory of an older layout this one's (the caller holds the lock):
        its chunks dropped first, then its layout file rewritten, so that a crash between
        the two leaves a directory the next opener takes over again."""
        for _, path, _ in self._scan():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        write_atomically(older, LAYOUT_TEXT.encode())
        self.usable = True
        logger.warning(
            "chunk cache %s: layout %d now, its older chunks dropped",
            self.directory,
            LAYOUT_VERSION,
        )

    def _check_layout(self, created: bool) -> str | None:
        """Refuse a directory this version cannot use; the layout file's path if the
        directory has an older layout to take over (under the lock, by ``_open``)."""
        path = os.path.join(self.directory, "layout")
        try:
            with open(path, encoding="utf-8", errors="replace") as file:
                found = file.read(256)
        except FileNotFoundError:
            if not created and os.listdir(self.directory):
                raise CacheLayoutError(
                    f"{self.directory!r} is not empty and has no 'layout' file, so it is not "
                    "a chunk cache (eviction would delete its files): give an empty or new "
                    "directory"
                ) from None
            write_atomically(path, LAYOUT_TEXT.encode())
            return None
        if found == LAYOUT_TEXT:
            return None
        if found in {_layout_text(older) for older in OLDER_LAYOUTS}:
            return path
        version = found.rpartition("layout ")[2].strip() or "unknown"
        raise CacheLayoutError(
            f"the chunk cache {self.directory!r} has layout {version[:20]!r}, this "
            f"version of uffd_async reads layout {LAYOUT_VERSION}: give another "
            "directory, or empty this one"
        )

    def close(self) -> None:
        """Release the lock file; chunks already handed out stay readable. Idempotent."""
        with self._mutex:  # not while a worker thread is in _locked(): its fd number
            fd, self._lock_fd = self._lock_fd, -1  # could be reused by then
            self.usable = self.writable = False
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> HostChunkCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- names ----------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self._chunks, name[:2], name[2:])

    def path_of(self, key: ChunkKey) -> str:
        """Where ``key``'s file is (or would be)."""
        return self._path(file_name(key.encoded()))

    def __contains__(self, key: ChunkKey) -> bool:
        """Whether a file for ``key`` is there (not verified, not touched)."""
        return self.usable and os.path.isfile(self.path_of(key))

    def _tick(self) -> int:
        """Now, in ns, later than any tick before it in this process: the LRU clock."""
        with self._mutex:
            self._last_tick = max(time.time_ns(), self._last_tick + 1)
            return self._last_tick

    # -- reading ----------------------------------------------------------------------

    def get(self, key: ChunkKey) -> memoryview | None:
        """``key``'s verified data (a read-only view of a mapping), or None."""
        data = self._lookup(key)
        if data is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        return data

    def _lookup(self, key: ChunkKey, verify: bool = True) -> memoryview | None:
        encoded = key.encoded()
        if not self.usable:
            return None
        path = self._path(file_name(encoded))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._failed("read", exc)
            return None
        try:
            data, problem = self._verified(fd, encoded, verify)
            if problem is not None:
                self._remove_damaged(path, os.fstat(fd), problem)
                return None
            with contextlib.suppress(OSError):  # a read-only filesystem: no LRU touch
                tick = self._tick()
                os.utime(fd, ns=(tick, tick))
            return data
        except OSError as exc:
            self._failed("read", exc)
            return None
        finally:
            os.close(fd)

    def _verified(
        self, fd: int, encoded: bytes, verify: bool = True
    ) -> tuple[memoryview | None, str | None]:
        """(the data, None) or (None, what is wrong with the file); ``verify=False``: its
        header checked, not its checksum (the caller checks the data itself)."""
        size = os.fstat(fd).st_size
        checked = check_header(os.pread(fd, HEADER_SIZE, 0), size, encoded)
        if isinstance(checked, str):
            return None, checked
        length, kind, digest = checked
        if length == 0:
            view = memoryview(b"")
        else:
            flags = mmap.MAP_PRIVATE | mmap.MAP_POPULATE  # it is all read now, by the hash
            mapping = mmap.mmap(fd, length, flags, mmap.PROT_READ, offset=HEADER_SIZE)
            view = memoryview(mapping)
        if verify and digest_of(kind, encoded, view) != digest:
            view.release()
            return None, "its data does not match its checksum"
        return view, None

    def _remove_damaged(self, path: str, opened: os.stat_result, problem: str) -> None:
        self.stats.damaged += 1
        logger.warning("chunk cache: %s is damaged (%s): removed, fetched again", path, problem)
        if not self.writable:
            return
        with self._locked():
            try:
                now = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                return
            if (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino):  # not a new one
                os.unlink(path)
                self._set_usage(max(0, self._usage() - now.st_size))

    # -- writing ----------------------------------------------------------------------

    def put(self, key: ChunkKey, data: bytes | bytearray | memoryview) -> bool:
        """Store ``data`` as ``key``'s chunk, atomically, evicting the least recently used
        chunks to stay within the bound. Whether it was stored (not: a chunk bigger than
        the whole cache, or a filesystem that refused; the latter logged once)."""
        encoded = key.encoded()
        view = memoryview(data).cast("B")
        if len(view) > key.chunk_size:
            raise InvalidArgument(
                errno.EINVAL, f"{len(view)} bytes for a chunk of {key.chunk_size} bytes"
            )
        size = HEADER_SIZE + len(view)
        if not self.writable or size > self.max_bytes:
            return False
        header = pack_header(encoded, view)
        path = self._path(file_name(encoded))
        file: AtomicFile | None = None
        try:
            self._make_directory(os.path.dirname(path))
            file = AtomicFile(path, size)
            file.pwrite(header, 0)
            file.pwrite(view, HEADER_SIZE)
            os.fsync(file.fd)  # outside the lock: commit's own fsync then finds nothing to do
            tick = self._tick()
            os.utime(file.fd, ns=(tick, tick))
            with self._locked():
                try:
                    replaced = os.stat(path, follow_symlinks=False).st_size
                except FileNotFoundError:
                    replaced = 0
                self._evict(size - replaced, keep=path)
                file.commit()
                self._set_usage(self._usage() - replaced + size)
        except OSError as exc:
            if file is not None:
                file.abort()
            self._failed("write", exc)
            return False
        self.stats.stored += 1
        return True

    # -- accounting and eviction (the caller holds the lock) --------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._mutex:
            if self._lock_fd < 0:
                raise OSError(errno.EBADF, "the chunk cache is closed")
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _usage(self) -> int:
        raw = os.pread(self._lock_fd, _USAGE.size, 0)
        return _USAGE.unpack(raw)[0] if len(raw) == _USAGE.size else -1

    def _set_usage(self, total: int) -> None:
        os.pwrite(self._lock_fd, _USAGE.pack(total), 0)

    def _evict(self, incoming: int, keep: str = "") -> None:
        """Make room for ``incoming`` more bytes: recount the files (when the total says
        there is no room, or it is unknown) and remove the least recently used ones, but
        ``keep`` (the file about to be replaced: ``incoming`` counted it already)."""
        usage = self._usage()
        if incoming and 0 <= usage and usage + incoming <= self.max_bytes:
            return
        files = sorted(self._scan())
        total = sum(size for _, _, size in files)
        for _, path, size in files:
            if total + incoming <= self.max_bytes:
                break
            if path == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                self.stats.evicted += 1
                self.stats.evicted_bytes += size
            total -= size
        self._set_usage(total)

    def _scan(self) -> Iterator[tuple[int, str, int]]:
        """(mtime in ns, path, size) of every chunk file; stale temporary files removed."""
        stale = time.time_ns() - _STALE_PARTIAL_NS
        with os.scandir(self._chunks) as shards:
            for shard in shards:
                if not shard.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(shard.path) as entries:
                    for entry in entries:
                        with contextlib.suppress(FileNotFoundError):
                            info = entry.stat(follow_symlinks=False)
                            if not stat.S_ISREG(info.st_mode):
                                continue
                            if entry.name.startswith("."):
                                if info.st_mtime_ns < stale:
                                    os.unlink(entry.path)
                                continue
                            yield info.st_mtime_ns, entry.path, info.st_size

    # -- fetching once for every process ------------------------------------------------

    async def fetch(
        self, key: ChunkKey, fetch: Callable[[], Awaitable[bytes]], *, verify: bool = True
    ) -> memoryview:
        """``key``'s chunk from the cache, or from ``fetch()`` (then stored), fetched by one
        process at a time: whoever holds the chunk's claim fetches, the others wait for
        its file. A claim held longer than ``claim_timeout`` is not waited on any more
        (its holder hangs): the waiter fetches too. A dead holder's claim frees itself.
        ``verify=False``: a hit's checksum is not computed, for a caller that checks the
        data against a digest of its own anyway (a pack's chunk: its SHA-256)."""
        encoded = key.encoded()
        data = await anyio.to_thread.run_sync(self._lookup, key, verify)
        if data is not None:
            self.stats.hits += 1
            return data
        if not self.writable:
            return await self._fetch_and_put(key, fetch)
        claim_path = os.path.join(self._claims, file_name(encoded))
        deadline = time.monotonic() + self.claim_timeout
        delay = _POLL_FIRST
        waited = False
        while True:
            claim = self._claim(claim_path)
            if claim == _NO_CLAIMS:  # claims cannot be made here: waiting would not help
                return await self._fetch_and_put(key, fetch)
            if claim is not None:
                try:
                    data = await anyio.to_thread.run_sync(self._lookup, key, verify)
                    if data is not None:  # the claim's previous holder stored it
                        self.stats.hits += 1
                        return data
                    return await self._fetch_and_put(key, fetch)
                finally:
                    self._release(claim, claim_path)
            if not waited:
                waited = True
                self.stats.waited += 1
            if time.monotonic() >= deadline:
                self.stats.took_over += 1
                logger.warning(
                    "chunk cache: %s has been claimed for over %g s; fetching it here too",
                    claim_path,
                    self.claim_timeout,
                )
                return await self._fetch_and_put(key, fetch)
            await anyio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)
            data = await anyio.to_thread.run_sync(self._lookup, key, verify)
            if data is not None:
                self.stats.hits += 1
                return data

    async def _fetch_and_put(
        self, key: ChunkKey, fetch: Callable[[], Awaitable[bytes]]
    ) -> memoryview:
        self.stats.fetched += 1
        data = bytes(await fetch())
        await anyio.to_thread.run_sync(self.put, key, data)
        return memoryview(data)

    def _claim(self, path: str) -> int | None:
        """An fd holding ``path``'s flock, or None if another holds it (or it just changed
        hands: the caller tries again), or ``_NO_CLAIMS`` if no claim file can be made."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, PRIVATE)
        except OSError as exc:
            self._failed("write", exc)
            return _NO_CLAIMS
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Its holder unlinks it before it lets go: a file no longer at the path is a
            # claim nobody else will look at. Take the path's file, or nothing.
            if os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
                raise BlockingIOError
        except OSError as exc:
            os.close(fd)
            if isinstance(exc, (BlockingIOError, FileNotFoundError)):
                return None  # held, or just let go of: look again
            self._failed("write", exc)
            return _NO_CLAIMS
        with contextlib.suppress(OSError):  # for a human; a full disk may refuse it
            os.fchmod(fd, PRIVATE)  # whatever the umask took away
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    @staticmethod
    def _release(fd: int, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)

    # -- failures that make misses ---------------------------------------------------------

    def _failed(self, what: str, exc: OSError) -> None:
        if what == "read":
            self.stats.read_errors += 1
        else:
            self.stats.write_errors += 1
        if (what, exc.errno) not in self._logged:  # one line per kind of failure, not per chunk
            self._logged.add((what, exc.errno))
            logger.warning(
                "chunk cache %s: %s failed (%s): serving on without what it cannot %s",
                self.directory,
                what,
                exc,
                "read" if what == "read" else "store",
            )

    def _degrade(self, what: str, exc: OSError) -> None:
        self.close()
        self._logged.add(("write", exc.errno))
        logger.warning(
            "chunk cache %s unusable (%s failed: %s): every chunk is fetched",
            self.directory,
            what,
            exc,
        )
