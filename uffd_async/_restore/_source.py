"""The declared interface of a snapshot source: what resolvers are made from, wherever it is.

As httpx has one small ``BaseTransport`` behind every way of sending a request, every
kind of snapshot source implements :class:`SnapshotSource`: a file mapped read-only
(:class:`~uffd_async.Snapshot`), a base image with layers on top
(:class:`~uffd_async.LayeredSnapshot`), an object read by HTTP Range requests
(:class:`~uffd_async.HttpSource`). The handoff server, ``copy_from``, working sets and
the prefetcher ask a source only what is declared here, so a new kind (an object store,
a host cache) is one new class. What callers rely on, whatever the kind:

* It is used open. ``size`` is known from then on, and ``closed`` says whether it
  can still serve: a resolver of a closed source refuses to serve
  (:class:`~uffd_async.SnapshotClosed`) rather than copy from memory that may
  hold something else by then. ``async with source`` opens what opens lazily
  (an HTTP source: one request) and closes the source on the way out.
* Its identity (``await source.version()``) depends on its bytes only (see
  :mod:`uffd_async._capture._identity`): a file, its layers squashed or not, and
  the same bytes at a URL have the same one, so a working set recorded on one
  replays on the others.
* ``fetch_unit`` is what one read of it naturally costs, and so the least a
  fault brings in: a page for a mapped file, a chunk for a remote object.
  ``mappable`` says whether its bytes are in file mappings: then ``UFFDIO_COPY``
  copies straight from the page cache, with no read and no await in Python
  (and the prefetcher copies runs; otherwise it fetches units ahead).
* ``copier(mapping)`` makes the resolver of one mapping's pages; ``group()``
  tells the copiers of one process about each other (a fetched unit fills
  every mapping's pages within it); ``resolver(mappings)``, written once
  here, routes a process's faults to them (:class:`SnapshotResolver`).
"""

from __future__ import annotations

import abc
import errno
from collections.abc import Iterable, Sequence
from typing import TypeVar

import anyio

from .._core._checks import check_int
from .._core._errors import InvalidArgument, SourceChanged
from .._serve._resolvers import CopyFrom
from ._guest_mapping import GuestMapping
from ._snapshot_resolver import SnapshotResolver
from ._working_set import WorkingSetRecorder

__all__ = ["SnapshotSource"]

_Source = TypeVar("_Source", bound="SnapshotSource")


class SnapshotSource(abc.ABC):
    """A snapshot's bytes, wherever they are kept: what resolvers are made from.

    Subclasses set ``path`` (what errors call the source: a file name, a URL without its
    credentials) and ``size`` (its bytes, once open), and implement the abstract members.
    """

    path: str
    size: int

    # -- what it is -----------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """Whether it was closed: nothing is served from it any more."""

    @property
    @abc.abstractmethod
    def fetch_unit(self) -> int:
        """Bytes one read of it naturally costs: the least a fault brings in."""

    @property
    @abc.abstractmethod
    def mappable(self) -> bool:
        """Whether its bytes are in file mappings, copied from the page cache without a read."""

    @abc.abstractmethod
    def check_open(self) -> None:
        """Raise what says why it cannot serve now (closed, not opened yet, changed)."""

    @abc.abstractmethod
    async def version(self) -> bytes:
        """Its identity: what a working set recorded for it carries (``snapshot_identity``)."""

    # -- reading and serving --------------------------------------------------------------

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of it from ``offset``."""

    @abc.abstractmethod
    def copier(self, mapping: GuestMapping, *, readahead: int = 0, wp: bool = False) -> CopyFrom:
        """The resolver of ``mapping``'s pages alone: UFFDIO_COPY of its bytes from here."""

    def group(self, copiers: Sequence[CopyFrom]) -> None:  # noqa: B027 (optional: no-op)
        """Tell the copiers of one process's mappings about each other (nothing, by default:
        only a source fetched by units shares what it fetched for one with the others)."""

    def resolver(
        self,
        mappings: Iterable[GuestMapping],
        *,
        readahead: int = 0,
        recorder: WorkingSetRecorder | None = None,
    ) -> SnapshotResolver:
        """A resolver for a process that maps ``mappings`` of this source; see
        :class:`~uffd_async.SnapshotResolver`."""
        self.check_open()
        return SnapshotResolver(self, mappings, readahead=readahead, recorder=recorder)

    def check_span(self, offset: int, length: int) -> None:
        """Refuse a read that is not within the source (``read``'s arguments)."""
        check_int("offset", offset, minimum=0)
        check_int("length", length, minimum=1)
        if offset + length > self.size:
            raise InvalidArgument(
                errno.EINVAL,
                f"bytes {offset}-{offset + length - 1} are past the source's {self.size} bytes",
            )

    def prepare(self) -> None:  # noqa: B027 (optional: no-op)
        """Work worth doing before the first process is served, off its critical path (a
        snapshot's zero-page scan): a server calls it in a worker thread while it waits for
        its first process. What it learns is also learnt on first need without it."""

    async def wait_changed(self) -> SourceChanged:
        """Return the :class:`~uffd_async.SourceChanged` that stopped it, once one did: a
        server stops taking new processes then. A source whose bytes are pinned for as
        long as it is open (a mapped file) never returns."""
        await anyio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    # -- opening and closing --------------------------------------------------------------

    async def open(self: _Source) -> _Source:
        """Make it ready to serve (a source that opens when made already is). Idempotent."""
        return self

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close it. Idempotent."""

    async def __aenter__(self: _Source) -> _Source:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
