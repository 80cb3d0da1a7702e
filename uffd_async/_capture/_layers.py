"""Incremental snapshot layers: writing them, reading them, and serving an image with its layers.

The file format is :mod:`._layer_file`'s. Facts this module relies on:

* A writer knows the layer's pages up front (a live snapshotter knows what
  changed before it copies it), so every page has a fixed slot and is written
  with one ``pwrite`` there: pages may come in any order, again (the last write
  wins), and from several threads at once. Space for the data is reserved
  (``posix_fallocate``) when the writer starts, so a full disk shows then and
  not half-way through. A full image reserves nothing: pages never written are
  holes, which read as zeros.
* Writes go to a temporary file in the target's directory (``.NAME.*.partial``),
  which commit fsyncs, renames over the target and then fsyncs the directory
  (:mod:`._atomic_file`): a reader sees the old file or the whole new one, never
  part of one. A crash leaves only the temporary file behind. Files are created
  0600: they hold a process's memory.
* Serving: each page of the composed image comes from the newest file that
  holds it, and ``UFFDIO_COPY`` copies it straight from that file's read-only
  mapping, as :class:`~uffd_async.Snapshot` does from one file. One copy reads
  one address range, so a readahead (or prefetch) run stops where the page
  source changes: from one file to another, or between two runs of a layer.
  The one-address fast paths of ``CopyFrom`` (one page at ``source + index *
  page_size``, and the C loop) are off for mappings that span several pieces;
  a mapping served entirely from one file keeps them.
* A huge page is copied whole from one place: every huge page of a hugetlbfs
  mapping must come from one file, so layers of such a guest are written in
  its huge page size. A mapping whose huge page mixes files is refused when its
  resolver is made.
* The composed image's identity is what a full image with the same bytes has
  (:func:`~uffd_async._restore._working_set.snapshot_identity`, its samples read through
  the layers): a working set recorded on the layers replays on the squashed
  file, and back.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import functools
import hashlib
import mmap
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import attrs

from .._core._atomic_file import AtomicFile
from .._core._checks import check_int, check_page_size
from .._core._errors import InvalidArgument, LayerError, SnapshotClosed
from .._core._events import PageFault
from .._core._memory import _MAP_SHARED, Region, _mmap
from .._core._native import libc
from .._core._uffd import Userfaultfd
from .._handoff._wire import GuestMapping
from .._restore._snapshot import Snapshot
from .._restore._working_set import identity_of, identity_samples, snapshot_identity
from .._serve._resolvers import CopyFrom
from ._layer_file import (
    HEADER_SIZE,
    IDENTITY_SIZE,
    MAX_PAGE_SIZE,
    LayerFormatError,
    LayerHeader,
    check_runs,
    layer_identity,
    read_prefix_size,
    runs_of,
)

__all__ = ["ImageWriter", "Layer", "LayerWriter", "LayeredSnapshot", "squash"]

#: Bytes copied per call when squashing without copy_file_range.
_COPY_CHUNK = 8 << 20


# -- writing --------------------------------------------------------------------------


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
            identity = identity_of(self.image_size, _samples(self._file.fd, self.image_size))
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


# -- reading --------------------------------------------------------------------------


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
                prefix = read_prefix_size(_pread(fd, HEADER_SIZE, 0))
                data = _pread(fd, min(prefix, status.st_size), 0)
                self._header = LayerHeader.from_bytes(data, file_size=status.st_size)
            except LayerFormatError as exc:
                raise LayerError(f"{self.path}: {exc}") from None
            if self._header.pages:
                self._length = status.st_size
                self._address = _mmap(self._length, _MAP_SHARED, fd, prot=mmap.PROT_READ)
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


def _pread(fd: int, length: int, offset: int) -> bytes:
    """Up to ``length`` bytes from ``offset``: fewer only at the end of the file."""
    parts = []
    while length > 0:
        part = os.pread(fd, length, offset)
        if not part:
            break
        parts.append(part)
        length, offset = length - len(part), offset + len(part)
    return b"".join(parts)


def _samples(fd: int, size: int) -> Iterator[bytes]:
    """The bytes an identity hashes (``identity_samples``), read from a file."""
    for offset, length in identity_samples(size):
        yield _pread(fd, length, offset)


# -- composing ------------------------------------------------------------------------

#: A piece of the composed image: image bytes [start, end) come from source ``source``
#: (0: the base; n: the n-th layer) from byte ``at`` of its data.
_Piece = tuple[int, int, int, int]


def _compose(size: int, layers: Sequence[LayerHeader]) -> list[_Piece]:
    """Where each byte of the image comes from: the newest layer holding it, else the base.

    Sorted pieces covering [0, size); touching pieces of one source joined when its bytes
    run on. Newest first, each layer gets what no newer one holds; linear in the runs.
    """
    pieces: list[_Piece] = []
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
    joined: list[_Piece] = []
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


def _check_chain(base: str, size: int, identity: bytes | None, layers: Sequence[Layer]) -> None:
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


class LayeredSnapshot(Snapshot):
    """A base image (a snapshot file) with layers on top, oldest first: newest wins.

    It is a :class:`~uffd_async.Snapshot` of the composed image, and serves wherever one
    does (``resolver()``, ``serve_handoffs``, working sets): each page is copied from the
    file holding its newest version, straight from its mapping. With ``check`` (the
    default), each layer must apply on top of what is below it (its ``parent`` is the
    base's identity, or the previous layer's): else :class:`~uffd_async.LayerError`
    naming the broken link. ``path`` is the base's; ``layers`` the open :class:`Layer`\\ s.
    """

    layers: tuple[Layer, ...] = ()

    def __init__(
        self,
        base_path: str | os.PathLike[str],
        *layer_paths: str | os.PathLike[str],
        check: bool = True,
    ) -> None:
        super().__init__(base_path)
        layers: list[Layer] = []
        try:
            for path in layer_paths:
                layers.append(Layer(path))
            base_identity = snapshot_identity(self._address, self.size) if check else None
            _check_chain(self.path, self.size, base_identity, layers)
            self._pieces = _compose(self.size, [layer._header for layer in layers])
        except BaseException:
            for layer in layers:
                layer.close()
            Snapshot.close(self)
            raise
        self.layers = tuple(layers)
        self._starts = [piece[0] for piece in self._pieces]

    @functools.cached_property
    def identity(self) -> bytes:
        """The composed image's: what the squashed file's ``Snapshot.identity`` is."""
        return identity_of(self.size, (self._read(o, n) for o, n in identity_samples(self.size)))

    def _sources(self) -> list[int]:
        """The address of each source's data: the base's, then each layer's."""
        if self.closed:
            raise SnapshotClosed(self.path)
        return [self._address, *(layer._data for layer in self.layers)]

    def _read(self, offset: int, length: int) -> bytes:
        """Composed image bytes (for identities and tests; serving never reads bytes)."""
        sources = self._sources()
        out = bytearray()
        i = bisect.bisect_right(self._starts, offset) - 1
        end = offset + length
        while offset < end:
            start, stop, source, at = self._pieces[i]
            n = min(stop, end) - offset
            out += ctypes.string_at(sources[source] + at + offset - start, n)
            offset += n
            i += 1
        return bytes(out)

    def _spans(self, mapping: GuestMapping) -> list[tuple[int, int, int]]:
        """(first page, end page, origin) of each piece of ``mapping`` (in its pages): page
        ``i`` of the piece is at ``origin + i * page_size``."""
        sources = self._sources()
        low, high, size = mapping.offset, mapping.offset + mapping.size, mapping.page_size
        spans = []
        i = bisect.bisect_right(self._starts, low) - 1
        while i < len(self._pieces) and self._pieces[i][0] < high:
            start, stop, source, at = self._pieces[i]
            a, b = max(start, low), min(stop, high)
            if (a - low) % size or (b - low) % size:
                boundary = a if (a - low) % size else b
                split = boundary - (boundary - low) % size
                raise InvalidArgument(
                    errno.EINVAL,
                    f"the {size}-byte page at offset {split:#x} of the image would come from "
                    f"more than one file ({self._name(source)} holds only part of it): "
                    f"layers of a guest with {size}-byte pages must be written in that size",
                )
            spans.append(((a - low) // size, (b - low) // size, sources[source] + at - start + low))
            i += 1
        return spans

    def _name(self, source: int) -> str:
        return f"the base {self.path!r}" if source == 0 else f"{self.layers[source - 1].path!r}"

    def _copier(self, mapping: GuestMapping, readahead: int) -> CopyFrom:
        """One mapping's resolver: from its one file when it has one, else piece by piece."""
        spans = self._spans(mapping)
        if len(spans) == 1:
            return CopyFrom(
                Region(spans[0][2], mapping.size),  # 4 KiB aligned, as UFFDIO_COPY needs
                base=mapping.base_host_virt_addr,
                size=mapping.size,
                readahead=readahead,
                wp=False,
                page_size=mapping.page_size,
            )
        return _LayeredCopy(spans, mapping, readahead)

    def _view(self, mapping: GuestMapping) -> Region:
        """The mapping's bytes as one source, when one file holds them all."""
        spans = self._spans(mapping)
        if len(spans) != 1:
            raise InvalidArgument(
                errno.EINVAL, "the mapping's bytes come from several files: no one view of them"
            )
        return Region(spans[0][2], mapping.size)

    def close(self) -> None:
        """Unmap the base and every layer. Idempotent."""
        super().close()
        for layer in self.layers:
            layer.close()

    def __enter__(self) -> LayeredSnapshot:
        return self

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return (
            f"<LayeredSnapshot{state} {self.path!r} + {len(self.layers)} layers size={self.size}>"
        )


class _LayeredCopy(CopyFrom):
    """``CopyFrom`` whose source page ``i`` is at ``origin + i * page_size`` for the span
    holding ``i`` (see ``LayeredSnapshot._spans``).

    Everything else is CopyFrom's: which pages are populated, remaps and removes, forks,
    recording, guided runs, readahead planning; only runs are cut where a span ends.
    Its ``_address`` (the first span's origin) is never copied from: the two paths that
    would (``_direct``, the C loop) are off, and the two methods that would are overridden.
    """

    def __init__(
        self, spans: list[tuple[int, int, int]], mapping: GuestMapping, readahead: int
    ) -> None:
        super().__init__(
            Region(spans[0][2], mapping.size),
            base=mapping.base_host_virt_addr,
            size=mapping.size,
            readahead=readahead,
            wp=False,
            page_size=mapping.page_size,
        )
        self._direct = self._fast_ok = False  # both copy page i from _address + i * page_size
        self._span_starts = [first for first, _, _ in spans]
        self._span_ends = [end for _, end, _ in spans]
        self._origins = [origin for _, _, origin in spans]

    def _plan(self, fault: PageFault) -> tuple[int, int, int, bool]:
        page, index, count, removed = super()._plan(fault)
        if count > 1:
            span = bisect.bisect_right(self._span_starts, index) - 1
            count = min(count, self._span_ends[span] - index)
        return page, index, count, removed

    def resolve_now(self, fault: PageFault, uffd: Userfaultfd) -> bool:
        page, index, count, removed = self._plan(fault)
        if removed:  # zeros: nothing of the snapshot was asked for, nothing to record
            self._zero(uffd, page, index)
            return True
        origin = self._origins[bisect.bisect_right(self._span_starts, index) - 1]
        self._copy(uffd, page, index, count, origin + index * self._page_size)
        if self._recorder is not None:
            self._record(index)
        return True

    def _fill_ahead(self, uffd: Userfaultfd, first: int, count: int) -> None:
        """CopyFrom's, one span at a time (each from its own origin)."""
        end = first + count
        starts = self._span_starts
        span = max(bisect.bisect_right(starts, first) - 1, 0)
        while span < len(starts) and starts[span] < end:
            low, high = max(first, starts[span]), min(end, self._span_ends[span])
            if low < high:
                self._fill_runs(uffd, low, high - low, self._origins[span])
            span += 1


# -- squashing ------------------------------------------------------------------------


def squash(
    base_path: str | os.PathLike[str],
    layer_paths: Iterable[str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    *,
    check: bool = True,
) -> bytes:
    """Write the image the base and its layers (oldest first) make to ``out_path``, as one
    full image, atomically; return its identity. ``check``: as for :class:`LayeredSnapshot`.

    The base's holes stay holes (``SEEK_DATA``), and its data is copied in the kernel
    (``copy_file_range``: a reflink where the filesystem can) where it can.
    """
    base = os.fspath(base_path)
    inputs = [os.fspath(path) for path in layer_paths]
    check_output(os.fspath(out_path), base, inputs)
    layers: list[Layer] = []
    fd = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or status.st_size == 0:
            raise InvalidArgument(errno.EINVAL, f"the base {base!r} is not a non-empty file")
        size = status.st_size
        for path in inputs:
            layers.append(Layer(path))
        _check_chain(base, size, identity_of(size, _samples(fd, size)) if check else None, layers)
        out = AtomicFile(out_path, size, reserve=False)
        try:
            for start, end, source, at in _compose(size, [layer._header for layer in layers]):
                if source == 0:
                    _copy_data(fd, out.fd, start, end, base)
                else:
                    out.pwrite(layers[source - 1]._view(at, end - start), start)
            identity = identity_of(size, _samples(out.fd, size))
            out.commit()
        except BaseException:
            out.abort()
            raise
    finally:
        for layer in layers:
            layer.close()
        os.close(fd)
    return identity


def check_output(out: str, base: str, layer_paths: list[str]) -> None:
    """The output must be none of the inputs (the same file by any name: samefile)."""
    for role, path in [("the base", base), *(("a layer", p) for p in layer_paths)]:
        try:
            same = os.path.samefile(out, path)
        except OSError:  # one of them does not exist (yet): not the same file
            continue
        if same:
            raise InvalidArgument(
                errno.EINVAL,
                f"the output {out!r} is {role} ({path!r}): squashing would replace it; "
                "write to another file",
            )


def _copy_data(source: int, target: int, start: int, end: int, name: str) -> None:
    """Copy the data of ``source`` in [start, end) to the same offsets of ``target``,
    leaving its holes alone (``target`` reads zeros there already)."""
    position = start
    while position < end:
        try:
            data = os.lseek(source, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(source, data, os.SEEK_HOLE), end)
        _copy_range(source, target, data, hole, name)
        position = hole


def _copy_range(source: int, target: int, start: int, end: int, name: str) -> None:
    position = start
    while position < end:
        try:
            copied = os.copy_file_range(
                source, target, end - position, offset_src=position, offset_dst=position
            )
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            copied = _copy_by_hand(source, target, position, min(end, position + _COPY_CHUNK))
        if copied == 0:
            raise LayerError(f"{name}: it ended at byte {position} while being read (truncated?)")
        position += copied


def _copy_by_hand(source: int, target: int, start: int, end: int) -> int:
    data = _pread(source, end - start, start)
    view, offset = memoryview(data), start
    while view:
        written = os.pwrite(target, view, offset)
        view, offset = view[written:], offset + written
    return len(data)
