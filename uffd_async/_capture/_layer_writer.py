"""Writing snapshot images and layers: pages by slot, in any order, committed whole or not at all.

The file format is :mod:`._layer_file`'s. Facts this module relies on:

* A writer knows the layer's pages up front (a live snapshotter knows what
  changed before it copies it), so every page has a fixed slot and is written
  with one ``pwrite`` there: pages may come in any order, again (the last write
  wins), and from several threads at once. Space for the data is reserved
  (``posix_fallocate``) when the writer starts, so a full disk shows then and
  not half-way through. A full image reserves nothing: pages never written are
  holes, which read as zeros.
* Files are written atomically (:mod:`uffd_async._core._atomic_file`): a reader
  sees the old file or the whole new one, never part of one. They are created
  0600: they hold a process's memory.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import os
from collections.abc import Iterable
from typing import Any

import attrs

from .._core._atomic_file import AtomicFile
from .._core._checks import check_int, check_page_size
from .._core._errors import InvalidArgument, LayerError
from ._identity import file_identity
from ._layer_file import (
    IDENTITY_SIZE,
    MAX_PAGE_SIZE,
    LayerFormatError,
    LayerHeader,
    check_runs,
    layer_identity,
    runs_of,
)

__all__ = ["ImageWriter", "LayerWriter"]


class _PageWriter:
    """What both writers share: pages written by slot, what is missing, abort, ``with``."""

    page_size: int
    image_size: int
    _file: AtomicFile
    _written: bytearray

    @property
    def path(self) -> str:
        return self._file.path

    @property
    def closed(self) -> bool:
        """Committed or aborted: nothing more can be written."""
        return self._file.closed

    def _slot(self, index: int) -> int:
        raise NotImplementedError

    def _index(self, slot: int) -> int:
        raise NotImplementedError

    def _offset(self, slot: int) -> int:
        raise NotImplementedError

    def _wrote(self, slot: int, page: memoryview) -> None:
        pass

    def write_page(self, index: int, data: Any) -> None:
        """Write page ``index`` (``page_size`` bytes of any bytes-like object) at its place."""
        self._check_open()
        check_int("index", index)
        slot = self._slot(index)
        page = memoryview(data).cast("B")
        if page.nbytes != self.page_size:
            raise InvalidArgument(
                errno.EINVAL,
                f"page {index} is {page.nbytes} bytes, not a page of {self.page_size}",
            )
        self._file.pwrite(page, self._offset(slot))
        self._wrote(slot, page)
        self._written[slot] = 1

    def missing(self) -> list[int]:
        """The indices of the pages not written yet, in ascending order."""
        written = self._written
        return [self._index(slot) for slot in range(len(written)) if not written[slot]]

    def _check_missing(self, allowed: bool = False) -> None:
        missing = self._written.count(0)
        if missing and not allowed:
            first = self._index(self._written.index(0))
            raise LayerError(
                f"{self.path}: {missing} of its {len(self._written)} pages were never written "
                f"(the first: page {first}); write them, or abort()"
            )

    def abort(self) -> None:
        """Remove the temporary file; ``path`` keeps what it held. Idempotent."""
        self._file.abort()

    def _check_open(self) -> None:
        if self._file.closed:
            raise InvalidArgument(
                errno.EBADF, f"the writer of {self.path!r} was committed or aborted"
            )

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()  # after commit() nothing is left to abort


class LayerWriter(_PageWriter):
    """Writes a layer file: the ``pages`` (indices, any order, repeats ignored) of an image
    of ``image_size`` bytes, in pages of ``page_size``, on top of ``parent`` (the identity of
    what it applies to: a full image's ``snapshot_identity``, or the layer below's).

    Pages are written with :meth:`write_page` in any order; :meth:`commit` then makes the
    file appear at ``path``, complete, or not at all. The page digests that the identity
    needs are kept as pages arrive (32 bytes each). In a ``with`` block, leaving it without
    ``commit()`` (an exception, say) discards the file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        page_size: int,
        image_size: int,
        pages: Iterable[int],
        parent: bytes,
    ) -> None:
        check_page_size("page_size", page_size, maximum=MAX_PAGE_SIZE)
        check_int("image_size", image_size, minimum=1)
        if not isinstance(parent, (bytes, bytearray)) or len(parent) != IDENTITY_SIZE:
            raise InvalidArgument(
                errno.EINVAL, f"parent must be {IDENTITY_SIZE} bytes (an identity), not {parent!r}"
            )
        indices = list(pages)
        for index in indices:
            check_int("each of pages", index, minimum=0, expected="a page index (an int >= 0)")
        runs = runs_of(indices)
        try:
            check_runs(runs, page_size, image_size)
        except LayerFormatError as exc:
            raise InvalidArgument(errno.EINVAL, str(exc)) from None
        self.page_size = page_size
        self.image_size = image_size
        self.parent = bytes(parent)
        self._header = LayerHeader(
            page_size=page_size, image_size=image_size, parent=self.parent, runs=runs
        )
        self._firsts = [first for first, _ in runs]
        self._ends = [first + count for first, count in runs]
        self._slots = [0]
        for _, count in runs:
            self._slots.append(self._slots[-1] + count)
        pages_held = self._slots[-1]
        self._written = bytearray(pages_held)
        self._digests = bytearray(pages_held * 32)
        self._file = AtomicFile(path, self._header.file_size, reserve=True)
        try:
            self._file.pwrite(self._header.to_bytes(), 0)
        except BaseException:
            self._file.abort()
            raise

    @property
    def runs(self) -> tuple[tuple[int, int], ...]:
        """(first page, pages) of the layer's pages, sorted."""
        return self._header.runs

    def _slot(self, index: int) -> int:
        run = bisect.bisect_right(self._firsts, index) - 1
        if run < 0 or index >= self._ends[run]:
            raise InvalidArgument(
                errno.EINVAL,
                f"page {index} is not one of the layer's {len(self._written)} pages "
                "(the pages are given when the writer is made)",
            )
        return self._slots[run] + index - self._firsts[run]

    def _index(self, slot: int) -> int:
        run = bisect.bisect_right(self._slots, slot) - 1
        return self._firsts[run] + slot - self._slots[run]

    def _offset(self, slot: int) -> int:
        return self._header.data_offset + slot * self.page_size

    def _wrote(self, slot: int, page: memoryview) -> None:
        self._digests[slot * 32 : slot * 32 + 32] = hashlib.sha256(page).digest()

    def commit(self) -> bytes:
        """Complete the file at ``path`` (every page must have been written: else
        :class:`~uffd_async.LayerError`, and the writer stays open) and return its identity,
        the ``parent`` of a layer written on top of it."""
        self._check_open()
        self._check_missing()
        try:
            identity = layer_identity(self._header, bytes(self._digests))
            self._file.pwrite(attrs.evolve(self._header, identity=identity).to_bytes(), 0)
            self._file.commit()
        except BaseException:
            self._file.abort()
            raise
        return identity

    def __enter__(self) -> LayerWriter:
        return self

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return f"<LayerWriter{state} {self.path!r}: {len(self._written)} pages>"


class ImageWriter(_PageWriter):
    """Writes a full image of ``image_size`` bytes (a multiple of ``page_size``) a page at a
    time, in any order, made to appear at ``path`` by :meth:`commit`, as
    :class:`LayerWriter` does a layer. Pages never written are holes (zeros)."""

    def __init__(self, path: str | os.PathLike[str], image_size: int, page_size: int) -> None:
        check_page_size("page_size", page_size, maximum=MAX_PAGE_SIZE)
        check_int("image_size", image_size, minimum=1)
        if image_size % page_size:
            raise InvalidArgument(
                errno.EINVAL, f"image_size {image_size} is not a multiple of {page_size}"
            )
        self.page_size = page_size
        self.image_size = image_size
        self._written = bytearray(image_size // page_size)
        self._file = AtomicFile(path, image_size, reserve=False)

    def _slot(self, index: int) -> int:
        if not 0 <= index < len(self._written):
            raise InvalidArgument(
                errno.EINVAL, f"page {index} is outside the image's {len(self._written)} pages"
            )
        return index

    def _index(self, slot: int) -> int:
        return slot

    def _offset(self, slot: int) -> int:
        return slot * self.page_size

    def commit(self, *, allow_missing: bool = False) -> bytes:
        """Complete the file at ``path`` and return its identity (``snapshot_identity``: the
        ``parent`` of the first layer on top of it). Every page must have been written,
        unless ``allow_missing``: those then read as zeros."""
        self._check_open()
        self._check_missing(allow_missing)
        try:
            identity = file_identity(self._file.fd, self.image_size)
            self._file.commit()
        except BaseException:
            self._file.abort()
            raise
        return identity

    def __enter__(self) -> ImageWriter:
        return self

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return f"<ImageWriter{state} {self.path!r}: {len(self._written)} pages>"
