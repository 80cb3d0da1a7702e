"""The host chunk cache's files, without I/O: the key, the header, the layout's version.

A chunk file is a 4096-byte header, then the chunk's data, page-aligned so that it can
be mapped and copied into a guest straight from the page cache. The header names the
chunk's key in full (its digest names the file: two keys never share a file, and a file
moved under another key's name is caught) and a 128-bit checksum of the key and the
data, so a file damaged anywhere that matters (a flipped bit, a truncation, a crash in
the middle of a write that ``rename`` should have made impossible) is told apart from a
whole one. Bytes past the key in the header are zeros and checked by nothing: nothing
reads them.

The header names its checksum, so every reader checks every file whose checksum it can
compute: xxh3-128 (the ``xxhash`` package, the ``cache`` extra: ~0.03 ms per MiB here)
when it is installed, else blake2b-128 (hashlib: ~2 ms per MiB, a warm hit's main cost).
Both catch damage, neither an attacker (see ``_chunk_cache``: the directory is the
user's own). A file whose checksum this process cannot compute (xxh3 without xxhash)
is a miss, fetched and stored again with the one it can.
"""

from __future__ import annotations

import errno
import hashlib
import json
import struct
from typing import Protocol

import attrs

try:
    import xxhash
except ImportError:  # pragma: no cover - the test extra installs it
    xxhash = None  # type: ignore[assignment]

from .._core._checks import check_int
from .._core._errors import InvalidArgument

__all__ = [
    "BLAKE2B_128",
    "CHECK_NAMES",
    "HEADER_SIZE",
    "LAYOUT",
    "LAYOUT_TEXT",
    "LAYOUT_VERSION",
    "OLDER_LAYOUTS",
    "XXH3_128",
    "CacheLayoutError",
    "ChunkKey",
    "can_check",
    "check_header",
    "digest_of",
    "file_name",
    "layout_text",
    "pack_header",
    "write_check",
]

LAYOUT_VERSION = 2
#: The layouts a directory may be taken over from: their chunks are dropped (misses).
OLDER_LAYOUTS = frozenset({1})


def layout_text(version: int) -> str:
    """What DIR/layout holds in a directory of layout ``version``."""
    return f"uffd_async host chunk cache\nlayout {version}\n"


#: The contents of DIR/layout.
LAYOUT_TEXT = layout_text(LAYOUT_VERSION)

LAYOUT = """\
DIR/layout             "uffd_async host chunk cache\\nlayout 2\\n": the layout's version. A
                       directory of layout 1 is taken over (its chunks dropped: misses, then
                       fetched again); one of another version is refused (CacheLayoutError),
                       and so is a non-empty directory without this file: eviction deletes
                       files.
DIR/lock               flock(LOCK_EX) around every change of the set of chunk files (a
                       rename into chunks/, an eviction, a damaged file's removal); it holds
                       their total size (8 bytes, little-endian), recounted at every open.
DIR/chunks/XX/YYYY...  one chunk per file, named by blake2b-128 of its key (object, version,
                       chunk size, index; XX is the first two hex digits of 32). A 4096-byte
                       header (magic "UACHUNK\\n", layout, checksum kind: 1 blake2b-128,
                       2 xxh3-128; key length, data length, that checksum of key and
                       data, then the key as JSON), then the data, page-aligned so that
                       it can be mapped. mtime is the LRU clock.
DIR/claims/YYYY...     per-chunk fetch lock (flock): one fetcher per chunk across processes.
"""
_MAGIC = b"UACHUNK\n"
#: magic, layout, checksum kind, key length, data length, checksum of key and data.
_HEADER = struct.Struct("<8sIIIQ16s")
#: Where the data starts: a page, so that it maps page-aligned.
HEADER_SIZE = 4096
_MAX_KEY = HEADER_SIZE - _HEADER.size
_DIGEST_SIZE = 16


class CacheLayoutError(InvalidArgument):
    """A cache directory this version cannot use: another layout, or not a cache at all.

    The message names the directory and says what to do (another directory, or empty it).
    """

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)


@attrs.frozen(kw_only=True)
class ChunkKey:
    """Which bytes a chunk holds: chunk ``index`` (of ``chunk_size`` bytes) of ``object``
    as it was at ``version`` (its ETag or generation). A chunk of another version, or of
    another chunk size, is another key: never returned for this one.

    ``object`` is written into every chunk file's header: name the object without
    credentials (a presigned URL's query string is one: ``display_url`` drops it).
    """

    object: str
    version: str
    chunk_size: int
    index: int

    def encoded(self) -> bytes:
        """The key as stored in the file's header (JSON, ASCII); its digest names the file."""
        for name in ("object", "version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise InvalidArgument(errno.EINVAL, f"a chunk key's {name} must be a non-empty str")
        check_int("chunk_size", self.chunk_size, minimum=1)
        check_int("index", self.index, minimum=0)
        text = json.dumps([self.object, self.version, self.chunk_size, self.index])
        encoded = text.encode("ascii")  # json.dumps escapes everything else
        if len(encoded) > _MAX_KEY:
            raise InvalidArgument(
                errno.EINVAL, f"a chunk key of {len(encoded)} bytes: at most {_MAX_KEY} fit"
            )
        return encoded


def file_name(encoded: bytes) -> str:
    """32 hex digits naming the file of the key ``encoded``."""
    return hashlib.blake2b(encoded, digest_size=_DIGEST_SIZE).hexdigest()


#: The checksums a header may name (its kind), by name.
BLAKE2B_128 = 1
XXH3_128 = 2
CHECK_NAMES = {BLAKE2B_128: "blake2b-128", XXH3_128: "xxh3-128"}


class _Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...
    def digest(self) -> bytes: ...


def can_check(kind: int) -> bool:
    """Whether this process can compute the checksum of ``kind``."""
    return kind == BLAKE2B_128 or (kind == XXH3_128 and xxhash is not None)


def write_check() -> int:
    """The checksum new files carry: the fastest this process can compute."""
    return XXH3_128 if can_check(XXH3_128) else BLAKE2B_128


def digest_of(kind: int, encoded: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """The checksum of ``kind`` a header carries: of the key and the data."""
    check: _Hasher
    if kind == XXH3_128 and xxhash is not None:
        check = xxhash.xxh3_128(encoded)
    elif kind == BLAKE2B_128:
        check = hashlib.blake2b(encoded, digest_size=_DIGEST_SIZE)
    else:
        raise ValueError(f"no checksum of kind {kind} here")
    check.update(data)
    return check.digest()


def pack_header(encoded: bytes, data: bytes | bytearray | memoryview) -> bytearray:
    """The header of the file holding ``data`` for the key ``encoded``."""
    header = bytearray(HEADER_SIZE)
    length = memoryview(data).nbytes
    kind = write_check()
    digest = digest_of(kind, encoded, data)
    _HEADER.pack_into(header, 0, _MAGIC, LAYOUT_VERSION, kind, len(encoded), length, digest)
    header[_HEADER.size : _HEADER.size + len(encoded)] = encoded
    return header


def check_header(header: bytes, size: int, encoded: bytes) -> tuple[int, int, bytes] | str:
    """(data length, checksum kind, checksum) from the header of a file of ``size`` bytes
    that should hold the key ``encoded``; or what is wrong with it (or why this process
    cannot check it)."""
    if size < HEADER_SIZE or len(header) < HEADER_SIZE:
        return f"{size} bytes, shorter than its header"
    magic, layout, kind, key_length, length, digest = _HEADER.unpack_from(header)
    if magic != _MAGIC or layout != LAYOUT_VERSION:
        return "not a chunk file of this layout"
    if not can_check(kind):
        name = CHECK_NAMES.get(kind)
        if name is None:
            return f"a checksum of unknown kind {kind}"
        return f"its checksum is {name}, which needs the xxhash package (uffd_async[cache])"
    if key_length > _MAX_KEY or header[_HEADER.size : _HEADER.size + key_length] != encoded:
        return "the header names another chunk"
    if size != HEADER_SIZE + length:
        return f"{size - HEADER_SIZE} bytes of data where its header says {length}"
    return length, kind, digest
