"""``copy_from``: the resolver of one range of memory, from any source of its bytes.

Memory and callables are :class:`~uffd_async.resolvers.CopyFrom`'s own; a snapshot
source (a file, layers, an HTTP object: anything that implements
:class:`~._source.SnapshotSource`) is asked for its copier of the whole source, so a
new kind of source needs nothing here.
"""

from __future__ import annotations

import errno
from typing import Any

from .._core._abi import PAGE_SIZE
from .._core._errors import InvalidArgument
from .._serve._resolvers import CopyFrom, PageRecorder
from ._guest_mapping import GuestMapping
from ._source import SnapshotSource

__all__ = ["copy_from"]


def copy_from(
    source: Any,
    *,
    base: int,
    readahead: int = 0,
    wp: bool = False,
    size: int | None = None,
    page_size: int = PAGE_SIZE,
    recorder: PageRecorder | None = None,
) -> CopyFrom:
    """Answer missing faults with UFFDIO_COPY from ``source``.

    ``source`` is a bytes-like object or :class:`Region` (the page at offset
    ``fault.page - base``), a sync or async callable ``(offset, length) ->
    bytes``, an open :class:`~uffd_async.HttpSource` (a fault then awaits
    its whole chunk, which fills every missing page of it), or a
    :class:`~uffd_async.Snapshot` or :class:`~uffd_async.LayeredSnapshot`
    (its bytes from offset 0, copied from the files' mappings). ``readahead=N``
    copies up to N further pages not populated yet in the same ioctl.
    ``wp=True`` maps pages write-protected (for MISSING|WP ranges). Pages
    removed by MADV_DONTNEED are served zeros afterwards, and remapped pages
    keep their contents at their new address. ``recorder`` (a
    :class:`~uffd_async.WorkingSetRecorder`, or any
    :class:`~uffd_async._serve._resolvers.PageRecorder`) records the source pages
    demand faults ask for (with ``readahead=0``: readahead pages never fault);
    from memory, :func:`~uffd_async.prefetch` replays such a set.
    """
    resolver: CopyFrom
    if isinstance(source, SnapshotSource):
        source.check_open()  # its size is known once open
        length = source.size if size is None else min(size, source.size)
        length -= length % page_size
        if length <= 0:
            raise InvalidArgument(
                errno.EINVAL, f"the snapshot holds no whole {page_size}-byte page"
            )
        mapping = GuestMapping(base_host_virt_addr=base, size=length, offset=0, page_size=page_size)
        resolver = source.copier(mapping, readahead=readahead, wp=wp)
    else:
        resolver = CopyFrom(
            source, base=base, size=size, readahead=readahead, wp=wp, page_size=page_size
        )
    if recorder is not None:
        resolver._record_into(recorder, 0)
    return resolver
