"""A pack: a snapshot as zstd chunks named by their digest, and an index that lists them.

``python -m uffd_async pack SNAPSHOT DEST`` writes one; :class:`~uffd_async.PackSource`
serves from it. The layout of a pack ``DEST`` (a local directory, or an object-store prefix such as
``s3://BUCKET/PREFIX/``: the same names under it, see :mod:`._pack_store`)::

    DEST/NAME.index        one per snapshot packed (NAME: the snapshot file's name)
    DEST/chunks/<sha256>   one zstd frame per distinct non-zero chunk, shared by every index

The index (little-endian; every field checked on read)::

    header   64 bytes: magic b"UFFDPAK\\0", format version (u32, 1), chunk size (u32),
             snapshot size (u64), chunk count (u64), snapshot identity (32 bytes)
    entries  per chunk, 40 bytes: SHA-256 of its uncompressed bytes (32), then the
             length of its compressed file (u64); an all-zero chunk has length 0 and
             a digest of zeros (no file: it is served with UFFDIO_ZEROPAGE)
    trailer  SHA-256 of everything before it (32 bytes)

Why it is so:

* **Content-addressed.** A chunk's file is named by the SHA-256 of its
  uncompressed bytes, so a second snapshot of the same guest (a later version,
  a layer squashed on top) packed into the same ``DEST`` writes only the chunks
  ``DEST`` does not have. SHA-256 rather than BLAKE2b: the digest is what makes
  a chunk trusted, so it must resist collisions, and with the SHA extensions
  that x86-64 and ARMv8 CPUs have, OpenSSL's SHA-256 ran at 910 MiB/s here
  against hashlib's BLAKE2b at 460 MiB/s; and ``zstd -dc CHUNK | sha256sum``
  checks a chunk by hand.
* **Checked twice.** A chunk is read whole, its length must be the index's, it
  is decompressed to at most its chunk's size, and its digest must be the
  index's: anything else is a :class:`PackError`, never bytes in a guest. The
  index's own checksum catches a damaged or truncated index before any fault.
* **The identity a working set carries** (``snapshot_identity``: a SHA-256 of the
  size and 64 sampled blocks) is stored in the header, so a working set recorded
  against the raw image replays on its pack, and ``version()`` needs no read.
* **zstd**, one frame per chunk, from ``compression.zstd`` (Python 3.14) or the
  ``backports.zstd`` package with the same API (``pip install 'uffd_async[pack]'``).
  Not ``zstandard``: a ``ZstdDecompressor`` shared between threads corrupted data
  here, and its API differs from the standard library's. Every call makes its own
  decompressor, so the worker threads share nothing.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
from collections.abc import Sequence
from typing import Any

import attrs

from .._core._errors import FetchError, InvalidArgument

__all__ = [
    "CHUNK_DIR",
    "EXTRA",
    "FORMAT_VERSION",
    "INDEX_SUFFIX",
    "MAGIC",
    "PackError",
    "PackIndex",
    "chunk_digest",
    "chunk_name",
    "decode_index",
    "encode_index",
    "is_pack_index",
    "read_index",
    "zstd",
]

MAGIC = b"UFFDPAK\0"
FORMAT_VERSION = 1
INDEX_SUFFIX = ".index"
CHUNK_DIR = "chunks"
#: What to install for packs before Python 3.14.
EXTRA = "pip install 'uffd_async[pack]'"

_HEADER = struct.Struct("<8sIIQQ32s")
_ENTRY = struct.Struct("<32sQ")
_DIGEST = 32
_NO_DIGEST = bytes(_DIGEST)
#: Largest chunk: a u32 in the header, and a chunk is held whole in memory.
MAX_CHUNK_SIZE = 1 << 30


def zstd() -> Any:
    """The zstd module: ``compression.zstd`` (3.14+) or ``backports.zstd``."""
    try:
        from compression import zstd as module  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        try:
            from backports import zstd as module  # type: ignore[import-not-found,no-redef,unused-ignore]
        except ImportError:
            raise ImportError(
                f"packs need zstd: Python 3.14's compression.zstd, or {EXTRA}"
            ) from None
    return module


def chunk_digest(data: bytes | memoryview) -> bytes:
    """The SHA-256 a chunk is named and checked by."""
    return hashlib.sha256(data).digest()


class PackError(FetchError):
    """A pack's index or chunk is missing, damaged or not what its index says.

    A :class:`~uffd_async.FetchError`: the faults that waited on a bad chunk get what
    the server's ``on_error`` says (poison by default), never its bytes. ``url`` is
    the file at fault; ``start``/``end`` the snapshot bytes the chunk holds (for the
    index: 0 and its length).
    """


@attrs.frozen
class PackIndex:
    """What an index says: the snapshot's size and identity, and each chunk's digest and
    compressed length (0: an all-zero chunk, with no file)."""

    path: str
    chunk_size: int
    size: int
    identity: bytes
    digests: Sequence[bytes]
    stored: Sequence[int]

    @property
    def count(self) -> int:
        return len(self.stored)

    @property
    def directory(self) -> str:
        """The pack directory: where ``chunks/`` is."""
        return os.path.dirname(os.path.abspath(self.path))

    def zero(self, index: int) -> bool:
        """Whether chunk ``index`` is all zeros (no file: UFFDIO_ZEROPAGE)."""
        return self.stored[index] == 0

    def span(self, index: int) -> tuple[int, int]:
        """The snapshot bytes ``[start, end)`` chunk ``index`` holds."""
        start = index * self.chunk_size
        return start, min(self.size, start + self.chunk_size)

    def chunk_path(self, index: int) -> str:
        return chunk_path(self.directory, self.digests[index])

    def chunk_name(self, index: int) -> str:
        """Chunk ``index``'s name within its pack (``chunks/<sha256>``), wherever it is kept."""
        return chunk_name(self.digests[index])


def chunk_path(directory: str, digest: bytes) -> str:
    return os.path.join(directory, CHUNK_DIR, digest.hex())


def chunk_name(digest: bytes) -> str:
    """The name of the chunk of SHA-256 ``digest`` within a pack."""
    return f"{CHUNK_DIR}/{digest.hex()}"


def encode_index(
    *, chunk_size: int, size: int, identity: bytes, entries: Sequence[tuple[bytes, int]]
) -> bytes:
    """The bytes of an index; ``entries``: (digest, compressed length), 0 for a zero chunk."""
    parts = [_HEADER.pack(MAGIC, FORMAT_VERSION, chunk_size, size, len(entries), identity)]
    parts += [
        _ENTRY.pack(_NO_DIGEST if stored == 0 else digest, stored) for digest, stored in entries
    ]
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def decode_index(data: bytes, path: str) -> PackIndex:
    """The index in ``data`` (read from ``path``), checked: a :class:`PackError` names the file."""

    def damaged(why: str) -> PackError:
        return PackError(
            f"{path}: not a usable pack index: {why}", url=path, start=0, end=max(0, len(data) - 1)
        )

    if len(data) < _HEADER.size + _DIGEST or data[: len(MAGIC)] != MAGIC:
        raise damaged("no pack index header (wrong magic or too short)")
    body, checksum = data[:-_DIGEST], data[-_DIGEST:]
    _, version, chunk_size, size, count, identity = _HEADER.unpack_from(body)
    if version != FORMAT_VERSION:
        raise damaged(f"format version {version}, this library reads {FORMAT_VERSION}")
    if len(body) != _HEADER.size + count * _ENTRY.size:
        raise damaged(
            f"{len(data)} bytes for {count} chunks (truncated or extended: expected "
            f"{_HEADER.size + count * _ENTRY.size + _DIGEST})"
        )
    if hashlib.sha256(body).digest() != checksum:
        raise damaged("its checksum does not match its contents (the file is damaged)")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE or chunk_size % 4096 or size <= 0:
        raise damaged(f"chunk size {chunk_size}, snapshot size {size}")
    if count != -(-size // chunk_size):
        raise damaged(f"{count} chunks cannot hold {size} bytes of {chunk_size}-byte chunks")
    digests: list[bytes] = []
    stored: list[int] = []
    for digest, length in _ENTRY.iter_unpack(memoryview(body)[_HEADER.size :]):
        digests.append(digest)
        stored.append(length)
    return PackIndex(
        path=path, chunk_size=chunk_size, size=size, identity=identity, digests=digests,
        stored=stored,
    )  # fmt: skip


def read_index(path: str | os.PathLike[str]) -> PackIndex:
    """The index at ``path``, checked (:class:`PackError` if it is damaged; ``OSError`` if
    it cannot be read)."""
    name = os.fspath(path)
    if not name:
        raise InvalidArgument(errno.EINVAL, "a pack index's path is empty")
    with open(name, "rb") as file:
        return decode_index(file.read(), name)


def is_pack_index(path: str) -> bool:
    """Whether the file at ``path`` starts as a pack index does (it may still be damaged)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO: no wait
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, len(MAGIC), 0) == MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)
