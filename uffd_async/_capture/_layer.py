"""Reading layer files, and composing a base image with its layers: which file holds each byte.

The file format is :mod:`._layer_file`'s. Facts this module relies on:

* A layer is checked (header and index: the CRC) and mapped read-only once;
  its page data is read through the mapping, never copied in Python, and
  only :meth:`Layer.verify` reads all of it.
* Each page of the composed image comes from the newest file that holds it:
  newest first, each layer gets what no newer one holds, and the base the
  rest. The composition is a sorted list of pieces, each naming one file and
  where in it the piece's bytes are; a serving copy (and a squash) reads one
  piece from one place.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import stat
from collections.abc import Sequence

from .._core._errors import LayerError
from .._core._memory import MAP_SHARED, map_memory
from .._core._native import libc
from ._identity import read_at
from ._layer_file import (
    HEADER_SIZE,
    LayerFormatError,
    LayerHeader,
    layer_identity,
    read_prefix_size,
)

__all__ = ["Layer", "Piece", "check_chain", "compose"]


class Layer:
    """A layer file, checked and mapped read-only (see :class:`LayerWriter`).

    A file that is not a layer, or is damaged (header or index: the CRC), truncated or of
    another version raises :class:`~uffd_async.LayerError` naming it; :meth:`verify` also
    checks the page data against the identity.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._address = self._length = 0
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise LayerError(f"{self.path}: not a regular file")
            try:
                prefix = read_prefix_size(read_at(fd, HEADER_SIZE, 0))
                data = read_at(fd, min(prefix, status.st_size), 0)
                self._header = LayerHeader.from_bytes(data, file_size=status.st_size)
            except LayerFormatError as exc:
                raise LayerError(f"{self.path}: {exc}") from None
            if self._header.pages:
                self._length = status.st_size
                self._address = map_memory(self._length, MAP_SHARED, fd, prot=mmap.PROT_READ)
        finally:
            os.close(fd)  # the mapping keeps the file
        self._closed = False

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Layer:
        """The layer at ``path``: the same as ``Layer(path)``."""
        return cls(path)

    @property
    def page_size(self) -> int:
        return self._header.page_size

    @property
    def image_size(self) -> int:
        """Bytes of the full image it overlays."""
        return self._header.image_size

    @property
    def parent(self) -> bytes:
        """The identity of what it applies on top of."""
        return self._header.parent

    @property
    def identity(self) -> bytes:
        return self._header.identity

    @property
    def runs(self) -> tuple[tuple[int, int], ...]:
        """(first page, pages) of the pages it holds, sorted."""
        return self._header.runs

    @property
    def page_count(self) -> int:
        return self._header.pages

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def _data(self) -> int:
        """The address of the first page's bytes."""
        if self._closed:
            raise LayerError(f"{self.path}: the layer is closed")
        return self._address + self._header.data_offset

    def _view(self, offset: int, length: int) -> memoryview:
        """``length`` bytes of the data from ``offset``, without a copy."""
        return memoryview((ctypes.c_char * length).from_address(self._data + offset)).cast("B")

    def verify(self) -> None:
        """Read every page and check the identity covers them; :class:`LayerError` if not."""
        size = self.page_size
        digests = bytearray()
        for slot in range(self.page_count):
            digests += hashlib.sha256(self._view(slot * size, size)).digest()
        if layer_identity(self._header, bytes(digests)) != self.identity:
            raise LayerError(
                f"{self.path}: its page data is damaged (it does not hash to its identity)"
            )

    def close(self) -> None:
        """Unmap the file. Idempotent."""
        self._closed = True
        address, self._address = self._address, 0
        if address:
            libc.munmap(address, self._length)

    def __enter__(self) -> Layer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return (
            f"<Layer{state} {self.path!r}: {self.page_count} pages of {self.page_size} in "
            f"{len(self.runs)} runs>"
        )


#: A piece of the composed image: image bytes [start, end) come from source ``source``
#: (0: the base; n: the n-th layer) from byte ``at`` of its data.
Piece = tuple[int, int, int, int]


def compose(size: int, layers: Sequence[LayerHeader]) -> list[Piece]:
    """Where each byte of the image comes from: the newest layer holding it, else the base.

    Sorted pieces covering [0, size); touching pieces of one source joined when its bytes
    run on. Newest first, each layer gets what no newer one holds; linear in the runs.
    """
    pieces: list[Piece] = []
    covered: list[tuple[int, int]] = []  # what newer layers hold: sorted, disjoint
    for source in range(len(layers), 0, -1):
        header = layers[source - 1]
        size_of_page = header.page_size
        held: list[tuple[int, int]] = []
        slot = skip = 0
        for first, count in header.runs:
            start, end = first * size_of_page, (first + count) * size_of_page
            data = slot * size_of_page
            slot += count
            held.append((start, end))
            while skip < len(covered) and covered[skip][1] <= start:
                skip += 1
            position, next_covered = start, skip
            while position < end:
                if next_covered < len(covered) and covered[next_covered][0] < end:
                    low, high = covered[next_covered]
                    if low > position:
                        pieces.append((position, low, source, data + position - start))
                    position = max(position, high)
                    next_covered += 1
                else:
                    pieces.append((position, end, source, data + position - start))
                    position = end
        covered = _union(covered, held)
    position = 0
    for low, high in covered:
        if low > position:
            pieces.append((position, low, 0, position))
        position = high
    if position < size:
        pieces.append((position, size, 0, position))
    pieces.sort()
    joined: list[Piece] = []
    for piece in pieces:
        if joined:
            start, end, source, at = joined[-1]
            if source == piece[2] and end == piece[0] and at + end - start == piece[3]:
                joined[-1] = (start, piece[1], source, at)
                continue
        joined.append(piece)
    return joined


def _union(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(a + b):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def check_chain(base: str, size: int, identity: bytes | None, layers: Sequence[Layer]) -> None:
    """Every layer overlays an image of the base's size; with ``identity`` (the base's),
    each applies on top of what is below it."""
    for layer in layers:
        if layer.image_size != size:
            raise LayerError(
                f"{layer.path}: it overlays a {layer.image_size}-byte image, but the base "
                f"{base!r} has {size} bytes"
            )
    if identity is None:
        return
    below, below_identity = f"the base {base!r}", identity
    for layer in layers:
        if layer.parent != below_identity:
            raise LayerError(
                f"{layer.path}: the chain is broken here: it applies on top of "
                f"{layer.parent.hex()[:16]}..., but below it is {below} "
                f"({below_identity.hex()[:16]}...); give the layers oldest first, on the "
                "image they were written for"
            )
        below, below_identity = f"the layer {layer.path!r}", layer.identity
