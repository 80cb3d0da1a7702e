"""The snapshot layer file format, without I/O: bytes in, a header out, and back.

A layer holds the pages of a memory image that changed since what it applies
on top of (its *parent*: a full image, or the previous layer). Facts the
format relies on:

* Layout, little-endian::

      header   magic "UALAYER\\n", version (u16, 1), flags (u16, 0), page size (u32),
               image size (u64: bytes of the full image it overlays), parent (32 bytes),
               identity (32 bytes), runs (u64), pages (u64), data offset (u64)
      index    runs x (first page: u64, pages: u64), sorted and disjoint
      CRC-32   of header and index (u32)
      padding  zeros up to the data offset: the first multiple of the page size after them
      data     the pages, page_size bytes each, in index order

  The data starts page-aligned, so a reader maps the file and ``UFFDIO_COPY``
  copies a page straight from the page cache; nothing reads it in Python.
* Page ``first + k`` of a run sits at ``data offset + (slot of first + k) *
  page size``, where a run's slot is the pages of the runs before it. So
  consecutive image pages that the layer holds are consecutive in the data,
  even across two touching runs.
* The CRC catches a damaged header or index, not damaged page data (it would
  have to read every page). The identity covers the data: it is the SHA-256
  of the header with its identity field zeroed, the index, and then the
  SHA-256 of each page in index order. A writer computes it as pages arrive,
  in any order (32 bytes kept per page), with no second pass over the data;
  a reader checks it with one pass (``Layer.verify``).
* A layer's ``parent`` is what it was written on top of: the
  ``snapshot_identity`` of a full image (see :mod:`._identity`), or the
  previous layer's ``identity``. A chain of layers is checked link by link.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterable

import attrs

from .._core._checks import is_page_size

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "VERSION",
    "LayerFormatError",
    "LayerHeader",
    "layer_identity",
    "runs_of",
]

MAGIC = b"UALAYER\n"
VERSION = 1
#: magic, version, flags, page size, image size, parent, identity, runs, pages, data offset.
_HEADER = struct.Struct("<8sHHIQ32s32sQQQ")
_RUN = struct.Struct("<QQ")
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size
IDENTITY_SIZE = 32
_NO_IDENTITY = bytes(IDENTITY_SIZE)
#: Bigger pages than this are no pages: a corrupt field, refused before any arithmetic.
MAX_PAGE_SIZE = 1 << 30

assert HEADER_SIZE == 112


class LayerFormatError(ValueError):
    """Bytes that are not a usable layer header; the I/O layer adds the file's name."""


def _runs(runs: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    return tuple((int(first), int(count)) for first, count in runs)


@attrs.frozen(kw_only=True)
class LayerHeader:
    """What a layer file says before its data: sizes, the chain link, and which pages."""

    page_size: int
    #: Bytes of the full image the layer overlays.
    image_size: int
    #: The identity of what the layer applies on top of.
    parent: bytes
    #: The layer's own identity (zeros until its writer commits it).
    identity: bytes = _NO_IDENTITY
    #: (first page, pages) of each run, sorted and disjoint.
    runs: tuple[tuple[int, int], ...] = attrs.field(converter=_runs)

    @property
    def pages(self) -> int:
        return sum(count for _, count in self.runs)

    @property
    def prefix_size(self) -> int:
        """Bytes of header, index and CRC."""
        return prefix_size(len(self.runs))

    @property
    def data_offset(self) -> int:
        """Where the page data starts: the first multiple of the page size after the CRC."""
        return -(-self.prefix_size // self.page_size) * self.page_size

    @property
    def file_size(self) -> int:
        return self.data_offset + self.pages * self.page_size

    def to_bytes(self) -> bytes:
        """Header, index and CRC (the padding up to ``data_offset`` is not included)."""
        body = self._unchecked_body(self.identity)
        return body + _CRC.pack(zlib.crc32(body))

    def _unchecked_body(self, identity: bytes) -> bytes:
        header = _HEADER.pack(
            MAGIC, VERSION, 0, self.page_size, self.image_size, self.parent, identity,
            len(self.runs), self.pages, self.data_offset,
        )  # fmt: skip
        return header + b"".join(_RUN.pack(first, count) for first, count in self.runs)

    def identity_prefix(self) -> bytes:
        """What the identity hashes before the pages' digests: header (identity zeroed)
        and index."""
        return self._unchecked_body(_NO_IDENTITY)

    @classmethod
    def from_bytes(cls, data: bytes, *, file_size: int | None = None) -> LayerHeader:
        """Decode and check header, index and CRC (``data`` may go on past them);
        ``file_size``: the whole file's, which must then hold exactly the data.
        Raises :class:`LayerFormatError` saying what is wrong."""
        prefix = read_prefix_size(data)
        if len(data) < prefix:
            raise LayerFormatError(
                f"{len(data)} bytes is too short for its header and index of {prefix} (truncated?)"
            )
        (crc,) = _CRC.unpack_from(data, prefix - _CRC.size)
        if zlib.crc32(data[: prefix - _CRC.size]) != crc:
            raise LayerFormatError("its header or index is damaged (CRC mismatch)")
        fields = _HEADER.unpack_from(data)
        _, _, flags, page_size, image_size, parent, identity, runs, pages, data_offset = fields
        if flags:
            raise LayerFormatError(f"it has flags {flags:#x} this library does not know")
        if not is_page_size(page_size, MAX_PAGE_SIZE):
            raise LayerFormatError(
                f"the page size {page_size} is not a power of two from 4096 to 1 GiB"
            )
        if image_size <= 0:
            raise LayerFormatError("it overlays an empty image")
        index = [
            _RUN.unpack_from(data, HEADER_SIZE + n * _RUN.size) for n in range(runs)
        ]  # fmt: skip
        check_runs(index, page_size, image_size)
        header = cls(
            page_size=page_size, image_size=image_size, parent=parent, identity=identity,
            runs=index,
        )  # fmt: skip
        if header.pages != pages:
            raise LayerFormatError(f"it says {pages} pages, but its runs hold {header.pages}")
        if header.data_offset != data_offset:
            raise LayerFormatError(
                f"its data starts at {data_offset}, not at {header.data_offset} (the first "
                "multiple of the page size after the index)"
            )
        if file_size is not None and file_size != header.file_size:
            state = "truncated" if file_size < header.file_size else "too long"
            raise LayerFormatError(
                f"it is {state}: {file_size} bytes, but {pages} pages of {page_size} bytes "
                f"from offset {data_offset} make {header.file_size}"
            )
        return header


def prefix_size(runs: int) -> int:
    return HEADER_SIZE + runs * _RUN.size + _CRC.size


def read_prefix_size(head: bytes) -> int:
    """How many bytes header, index and CRC take, from the header's first bytes (at least
    ``HEADER_SIZE`` of them); checks the magic and the version first."""
    if len(head) < HEADER_SIZE:
        raise LayerFormatError(f"{len(head)} bytes is too short for a layer header (truncated?)")
    if not head.startswith(MAGIC):
        raise LayerFormatError("not a layer file (its magic is wrong)")
    fields = _HEADER.unpack_from(head)
    version, runs = fields[1], fields[7]
    if version != VERSION:
        raise LayerFormatError(f"layer version {version}; this library reads {VERSION}")
    if runs > 1 << 40:
        raise LayerFormatError(f"it says {runs} runs: damaged")
    return prefix_size(runs)


def check_runs(runs: Iterable[tuple[int, int]], page_size: int, image_size: int) -> None:
    """Runs must be non-empty, sorted, disjoint, and inside the image."""
    end = 0
    for first, count in runs:
        if count <= 0:
            raise LayerFormatError(f"a run at page {first} is empty")
        if first < end:
            raise LayerFormatError(
                f"its runs are not sorted and disjoint: [{first}, {first + count}) starts "
                f"before page {end}, where the run before it ends"
            )
        end = first + count
        if end * page_size > image_size:
            raise LayerFormatError(
                f"a run of pages [{first}, {end}) lies outside the {image_size}-byte image"
            )


def layer_identity(header: LayerHeader, page_digests: bytes) -> bytes:
    """The identity of a layer from its header and the SHA-256 of each page, in index
    order, laid end to end."""
    digest = hashlib.sha256(header.identity_prefix())
    digest.update(page_digests)
    return digest.digest()


def runs_of(pages: Iterable[int]) -> list[tuple[int, int]]:
    """(first, count) runs of the distinct ``pages``, sorted, touching runs joined."""
    runs: list[tuple[int, int]] = []
    start = count = 0
    for page in sorted(set(pages)):
        if count and page == start + count:
            count += 1
            continue
        if count:
            runs.append((start, count))
        start, count = page, 1
    if count:
        runs.append((start, count))
    return runs
