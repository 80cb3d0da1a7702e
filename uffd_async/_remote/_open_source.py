"""Which snapshot source a spec names, decided in one place: a file, a base with layers, a URL.

The command line and :class:`~uffd_async.HandoffServer` both take a source by name;
both ask here, so a new kind (an object store's ``s3://``, say) is added once. A spec
that is already a :class:`~uffd_async._restore._source.SnapshotSource` is its own
source.

* A URL (``http://``, ``https://``) is an :class:`~uffd_async.HttpSource`, made
  here and opened by ``async with`` (one request). Anything else is a path: a
  :class:`~uffd_async.Snapshot` file, or with ``layers`` a
  :class:`~uffd_async.LayeredSnapshot`, mapped when made.
* What a source cannot do is refused before anything is opened or served
  (:func:`check_source`): readahead from a source fetched by chunks, layers on
  a URL.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .._core._errors import InvalidArgument
from .._restore._layered import LayeredSnapshot
from .._restore._snapshot import Snapshot
from .._restore._source import SnapshotSource
from ._http_source import HttpSource, is_url, refuse_readahead

__all__ = ["SourceSpec", "check_source", "open_source"]

#: What names a snapshot source: a path, a URL, or the source itself.
SourceSpec = str | os.PathLike[str] | SnapshotSource


def open_source(
    spec: SourceSpec,
    *,
    layers: Sequence[str | os.PathLike[str]] = (),
    http: Mapping[str, Any] | None = None,
) -> SnapshotSource:
    """The source ``spec`` names; use it with ``async with`` (which opens a URL's).

    ``layers``: layer files on top of the file ``spec``, oldest first. ``http``:
    keyword arguments of :class:`~uffd_async.HttpSource` for a URL (chunk size,
    headers, ...). A spec that is a source already is returned as it is.
    """
    if isinstance(spec, SnapshotSource):
        if layers:
            raise InvalidArgument(errno.EINVAL, "layers apply to a snapshot file's path")
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise InvalidArgument(
            errno.EINVAL,
            f"a snapshot source is a path, an http(s):// URL or an open source, not "
            f"{type(spec).__name__}",
        )
    path = os.fspath(spec)
    if is_url(path):
        if layers:
            raise InvalidArgument(
                errno.EINVAL, "layers are files on top of a local base image, not of a URL"
            )
        return HttpSource(path, **(http or {}))
    if layers:
        return LayeredSnapshot(path, *layers)
    return Snapshot(path)


def check_source(spec: SourceSpec, *, readahead: int) -> None:
    """Refuse what the source ``spec`` names cannot do, without opening it: readahead
    from a source fetched a chunk at a time (its chunk size plays that part)."""
    if isinstance(spec, SnapshotSource):
        chunked = not spec.mappable
    else:
        chunked = isinstance(spec, (str, os.PathLike)) and is_url(os.fspath(spec))
    if chunked:
        refuse_readahead(readahead)
