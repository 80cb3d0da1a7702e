"""Which snapshot source a spec names, decided in one place: a file, a base with layers, a URL,
an object in a cloud's store.

The command line and :class:`~uffd_async.HandoffServer` both take a source by name;
both ask here, so a new kind (an object store's ``s3://``, say) is added once. A spec
that is already a :class:`~uffd_async._restore._source.SnapshotSource` is its own
source.

* A URL (``http://``, ``https://``) is an :class:`~uffd_async.HttpSource`, made
  here and opened by ``async with`` (one request). Anything else is a path: a
  :class:`~uffd_async.Snapshot` file, or with ``layers`` a
  :class:`~uffd_async.LayeredSnapshot`, mapped when made.
* An object URL (``s3://``, ``gs://``, ``az://``, ``azure://``) is an
  :class:`~uffd_async.ObjectSource`: ``store`` holds its settings (obstore's
  names), and of ``http`` the options every chunked source takes.
* A pack's index (a file that starts with the pack magic, written by
  ``python -m uffd_async pack``) is a :class:`~uffd_async.PackSource`, and so is
  an object URL whose name ends in ``.index`` (``s3://BUCKET/PREFIX/NAME.index``:
  ``pack`` names every index so; reading the object to tell would cost a request
  before the source is opened). ``http`` gives it what applies: the host cache,
  the chunks kept and read at once, and (from a store) timeout and retries.
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
from ._chunked_source import refuse_readahead
from ._http_source import HttpSource, is_url
from ._object_source import ObjectSource, is_object_url
from ._pack_format import is_pack_index
from ._pack_source import PackSource
from ._pack_store import is_pack_url

__all__ = ["SourceSpec", "check_source", "open_source"]

#: What names a snapshot source: a path, a URL, or the source itself.
SourceSpec = str | os.PathLike[str] | SnapshotSource


def open_source(
    spec: SourceSpec,
    *,
    layers: Sequence[str | os.PathLike[str]] = (),
    http: Mapping[str, Any] | None = None,
    store: Mapping[str, str] | None = None,
) -> SnapshotSource:
    """The source ``spec`` names; use it with ``async with`` (which opens a URL's).

    ``layers``: layer files on top of the file ``spec``, oldest first. ``http``:
    keyword arguments of :class:`~uffd_async.HttpSource` for a URL (chunk size,
    headers, ...). ``store``: settings of an object URL's store (``endpoint``,
    ``region``, credentials; see :class:`~uffd_async.ObjectSource`). A spec that is
    a source already is returned as it is.
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
    if is_object_url(path):
        if layers:
            raise InvalidArgument(
                errno.EINVAL, "layers are files on top of a local base image, not of a URL"
            )
        chunked = dict(http or {})
        if chunked.pop("headers", None) or chunked.pop("http2", False):
            raise InvalidArgument(
                errno.EINVAL,
                "headers and http2 apply to an http(s):// URL; an object store's settings "
                "go in store",
            )
        if is_pack_url(path):
            chunked.pop("chunk_size", None)  # a pack's chunk size is its index's
            return PackSource(path, options=store, **chunked)
        return ObjectSource(path, options=store, **chunked)
    if store:
        raise InvalidArgument(errno.EINVAL, "store options apply to an s3://, gs:// or az:// URL")
    if is_pack_index(path):
        if layers:
            raise InvalidArgument(
                errno.EINVAL, f"{path} is a pack index: pack the layers into it instead"
            )
        return PackSource(path, **_local_pack_options(http))
    if layers:
        return LayeredSnapshot(path, *layers)
    return Snapshot(path)


def _local_pack_options(http: Mapping[str, Any] | None) -> dict[str, Any]:
    """Of the chunked sources' options, those a local pack takes (a host cache, the
    chunks kept and read at once); the rest (chunk size, requests) mean nothing there."""
    given = http or {}
    return {name: given[name] for name in _LOCAL_PACK_OPTIONS if name in given}


#: What a pack in a local directory takes of ``http``.
_LOCAL_PACK_OPTIONS = ("host_cache", "cache_bytes", "concurrency", "chunk_readahead", "outage")


def check_source(spec: SourceSpec, *, readahead: int) -> None:
    """Refuse what the source ``spec`` names cannot do, without opening it: readahead
    from a source fetched a chunk at a time (its chunk size plays that part)."""
    if isinstance(spec, SnapshotSource):
        chunked = not spec.mappable
    else:
        name = os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else None
        chunked = name is not None and (is_url(name) or is_object_url(name) or is_pack_index(name))
    if chunked:
        refuse_readahead(readahead)
