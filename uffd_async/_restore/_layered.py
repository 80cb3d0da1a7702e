"""Serving a base image with its layers on top: each page straight from the file holding it.

Facts this module relies on (the composition is
:mod:`uffd_async._capture._layer`'s):

* Each page of the composed image comes from the newest file that holds it,
  and ``UFFDIO_COPY`` copies it straight from that file's read-only mapping,
  as :class:`~uffd_async.Snapshot` does from one file. One copy reads one
  address range, so a readahead (or prefetch) run stops where the page source
  changes: from one file to another, or between two runs of a layer. The
  one-address fast paths of ``CopyFrom`` (one page at ``source + index *
  page_size``, and the C loop) are off for mappings that span several pieces;
  a mapping served entirely from one file keeps them.
* A huge page is copied whole from one place: every huge page of a hugetlbfs
  mapping must come from one file, so layers of such a guest are written in
  its huge page size. A mapping whose huge page mixes files is refused when its
  resolver is made.
* The composed image's identity is what a full image with the same bytes has
  (:func:`~uffd_async._capture._identity.snapshot_identity`, its samples read
  through the layers): a working set recorded on the layers replays on the
  squashed file, and back.
* A page of the composed image that holds only zeros is mapped with
  ``UFFDIO_ZEROPAGE``: a page from the base where the base's zero map says so
  (a hole, or zero data: :mod:`._zero_map`), a page from a layer when the scan
  of the layer's bytes for that mapping (made with its resolver) finds it zero.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import functools
import os

import attrs

from .._capture._identity import identity_of, identity_samples, snapshot_identity
from .._capture._layer import Layer, check_chain, compose
from .._core._abi import PAGE_SIZE
from .._core._errors import InvalidArgument, SnapshotClosed
from .._core._events import PageFault
from .._core._memory import Region
from .._core._native import lib
from .._core._uffd import Userfaultfd
from .._serve._resolvers import CopyFrom, MemoryPart
from ._guest_mapping import GuestMapping
from ._snapshot import Snapshot

__all__ = ["LayeredSnapshot"]


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
        zero_pages: bool = True,
    ) -> None:
        super().__init__(base_path, zero_pages=zero_pages)
        layers: list[Layer] = []
        try:
            for path in layer_paths:
                layers.append(Layer(path))
            base_identity = snapshot_identity(self._address, self.size) if check else None
            check_chain(self.path, self.size, base_identity, layers)
            self._pieces = compose(self.size, [layer._header for layer in layers])
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

    def _zeros_of(self, mapping: GuestMapping) -> bytearray | None:
        """The zero map of ``mapping``'s pages: the base's zero map where the base holds
        them, a scan of the layer's bytes where a layer does."""
        if self._data_ranges is None or mapping.page_size != PAGE_SIZE:
            return None
        base_zeros = self._zero_map
        zeros = bytearray(mapping.size // PAGE_SIZE)
        view = (ctypes.c_uint8 * len(zeros)).from_buffer(zeros)
        for start, end, origin in self._spans(mapping):
            at = origin + start * PAGE_SIZE
            if self._address <= at < self._address + self.size:  # the base
                from_page = (at - self._address) // PAGE_SIZE
                zeros[start:end] = base_zeros[from_page : from_page + end - start]
            else:
                out = ctypes.addressof(view) + start
                lib.ua_zero_pages(at, end - start, PAGE_SIZE, out)
        del view
        return zeros

    def _copier(self, mapping: GuestMapping, readahead: int) -> CopyFrom:
        """One mapping's resolver: from its one file when it has one, else piece by piece."""
        spans = self._spans(mapping)
        zeros = self._zeros_of(mapping)
        if len(spans) == 1:
            return CopyFrom(
                Region(spans[0][2], mapping.size),  # 4 KiB aligned, as UFFDIO_COPY needs
                base=mapping.base_host_virt_addr,
                size=mapping.size,
                readahead=readahead,
                wp=False,
                page_size=mapping.page_size,
                zeros=zeros,
            )
        return _LayeredCopy(spans, mapping, readahead, zeros)

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
        self,
        spans: list[tuple[int, int, int]],
        mapping: GuestMapping,
        readahead: int,
        zeros: bytearray | None,
    ) -> None:
        super().__init__(
            Region(spans[0][2], mapping.size),
            base=mapping.base_host_virt_addr,
            size=mapping.size,
            readahead=readahead,
            wp=False,
            page_size=mapping.page_size,
            zeros=zeros,
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
        zero, count = self._zero_split(index, count)
        if zero:
            self._copy(uffd, page, index, count, None)
        else:
            origin = self._origins[bisect.bisect_right(self._span_starts, index) - 1]
            self._copy(uffd, page, index, count, origin + index * self._page_size)
        if self._recorder is not None:
            self._record(index)
        return True

    def memory_parts(self) -> list[MemoryPart] | None:
        """CopyFrom's, each cut where a span ends: each span's bytes come from its own
        origin."""
        pieces = super().memory_parts()
        if pieces is None:
            return None
        size, ratio = self._page_size, self._page_size // PAGE_SIZE
        starts, ends = self._span_starts, self._span_ends
        parts = []
        for piece in pieces:
            end = piece.index + piece.pages
            span = max(bisect.bisect_right(starts, piece.index) - 1, 0)
            while span < len(starts) and starts[span] < end:
                low, high = max(piece.index, starts[span]), min(end, ends[span])
                if low < high:
                    parts.append(
                        attrs.evolve(
                            piece,
                            base=piece.base + (low - piece.index) * size,
                            pages=high - low,
                            source=self._origins[span] + low * size,
                            first=low * ratio,
                            index=low,
                        )
                    )
                span += 1
        return parts

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
