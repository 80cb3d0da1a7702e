"""Where a pack lives: a local directory or an object-store prefix, behind one small seam.

The writer (:mod:`._pack_writer`) and the source (:mod:`._pack_source`) need five
things of the place a pack is kept, and nothing else; :class:`PackStore` is that
seam, with two kinds:

* :class:`DirectoryStore`: a local directory. A file is written through
  :func:`~uffd_async._core._atomic_file.write_atomically` (a temporary name, fsync,
  rename): a reader sees a whole file or none.
* :class:`ObjectPackStore`: a prefix in S3, GCS or Azure (``s3://BUCKET/PREFIX/``),
  through obstore's blocking API (callers run it in worker threads, or in the
  command line's own threads). Facts it relies on: a ``put`` of a whole object
  is atomic in all three (a reader sees the old object or the new one, never a
  part: no multipart upload is used); ``put(mode="create")`` is a conditional
  create (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, Azure
  ``If-None-Match: *``) that fails with 412 when the name is taken, so a chunk
  already there is never uploaded twice, and two writers racing on the same
  chunk both succeed in effect (same digest, same bytes: whichever landed is
  right); a ranged GET past an object's end comes back cut short, without an
  error, which bounds what a damaged chunk can make us read. The store is built
  and its errors are worded by the functions ObjectSource uses
  (:func:`~._object_source.build_store`, :func:`~._object_source.store_failure`):
  no credential in any error, log or repr, and obstore's own retries off (ours
  here: transient failures, with full-jitter backoff).

Names are relative to the pack (``NAME.index``, ``chunks/<sha256>``). A failure is
an ``OSError``: ``FileNotFoundError`` when the name is not there, another with a
short text (the HTTP status and the cloud's code, for a store) otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import stat
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol, TypeVar

from .._core._atomic_file import write_atomically
from .._core._errors import InvalidArgument
from ._closing_sockets import ClosingSockets
from ._object_source import (
    SCHEMES,
    build_store,
    is_object_url,
    parse_object_url,
    store_failure,
    store_options,
)
from ._pack_format import INDEX_SUFFIX

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = [
    "DEFAULT_STORE_RETRIES",
    "DEFAULT_STORE_TIMEOUT",
    "DirectoryStore",
    "ObjectPackStore",
    "PackStore",
    "is_pack_url",
    "open_pack_store",
    "split_index",
]

DEFAULT_STORE_TIMEOUT = 30.0
DEFAULT_STORE_RETRIES = 5
_BACKOFF = 0.05  # as every chunked source: doubled at each retry, full jitter
_BACKOFF_CAP = 2.0
_T = TypeVar("_T")


class PackStore(Protocol):
    """The place a pack is kept, as the writer and the source use it."""

    #: The pack's place, as shown (a directory, ``s3://BUCKET/PREFIX/``): no credential.
    location: str
    #: The client's TCP sockets to wait for once closed (an object store's), or None.
    closing: ClosingSockets | None

    def url(self, name: str) -> str:
        """``name`` as shown in errors and printed (no credential)."""

    def read(self, name: str, limit: int | None = None) -> bytes:
        """The object ``name``, or its first ``limit`` bytes when it is longer."""

    def sizes(self, prefix: str, suffix: str = "") -> dict[str, int]:
        """The names under ``prefix`` (one level, ending in ``suffix``) and their sizes."""

    def put_if_absent(self, name: str, data: bytes) -> int | None:
        """Write ``name`` unless it exists; None if written, else the size found there."""

    def replace(self, name: str, data: bytes) -> None:
        """Write ``name`` whole, atomically, over whatever was there."""

    def close(self) -> None:
        """Release the client. Idempotent."""


def is_pack_url(source: object) -> bool:
    """Whether ``source`` names a pack's index in an object store (``s3://.../NAME.index``)."""
    return is_object_url(source) and str(source).endswith(INDEX_SUFFIX)


def split_index(spec: str | os.PathLike[str]) -> tuple[str, str]:
    """(the pack's place, the index's name) of an index's path or URL."""
    text = os.fspath(spec)
    if is_object_url(text):
        scheme, bucket, key = parse_object_url(text)
        prefix, _, name = key.rpartition("/")
        return f"{scheme}://{bucket}/{prefix + '/' if prefix else ''}", name
    if not text:
        raise InvalidArgument(errno.EINVAL, "a pack index's path is empty")
    return os.path.dirname(os.path.abspath(text)), os.path.basename(text)


def open_pack_store(
    place: str | os.PathLike[str],
    *,
    options: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_STORE_TIMEOUT,
    retries: int = DEFAULT_STORE_RETRIES,
    create: bool = False,
) -> PackStore:
    """The store of ``place``: an object-store prefix (``s3://BUCKET/PREFIX/``, ``gs://``,
    ``az://``) with ``options`` (obstore's names, as :class:`~uffd_async.ObjectSource`),
    or a local directory (made if ``create``)."""
    text = os.fspath(place)
    if is_object_url(text):
        return ObjectPackStore(text, options=options, timeout=timeout, retries=retries)
    if options:
        raise InvalidArgument(errno.EINVAL, "store options apply to an s3://, gs:// or az:// URL")
    return DirectoryStore(text, create=create)


# -- a local directory ---------------------------------------------------------------------


class DirectoryStore:
    """A pack in the local directory ``directory``."""

    def __init__(self, directory: str, *, create: bool = False) -> None:
        if not directory:
            raise InvalidArgument(errno.EINVAL, "a pack directory's path is empty")
        self.location = os.path.abspath(directory)
        self.closing: ClosingSockets | None = None
        if create:
            os.makedirs(self.location, exist_ok=True)

    def url(self, name: str) -> str:
        return os.path.join(self.location, name)

    def read(self, name: str, limit: int | None = None) -> bytes:
        with open(self.url(name), "rb") as file:
            return file.read(-1 if limit is None else limit)

    def sizes(self, prefix: str, suffix: str = "") -> dict[str, int]:
        found: dict[str, int] = {}
        try:
            entries = os.scandir(self.url(prefix) if prefix else self.location)
        except FileNotFoundError:
            return found
        with entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.endswith(suffix):
                    continue  # a writer's temporary file
                with contextlib.suppress(FileNotFoundError):
                    info = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(info.st_mode):
                        found[prefix + entry.name] = info.st_size
        return found

    def put_if_absent(self, name: str, data: bytes) -> int | None:
        path = self.url(name)
        with contextlib.suppress(FileNotFoundError):
            return os.stat(path).st_size
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomically(path, data)  # a racing writer of the same chunk: same bytes
        return None

    def replace(self, name: str, data: bytes) -> None:
        path = self.url(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomically(path, data)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<DirectoryStore {self.location}>"


# -- an object-store prefix ----------------------------------------------------------------


class ObjectPackStore:
    """A pack under ``s3://BUCKET/PREFIX/`` (or ``gs://``, ``az://``): see the module."""

    def __init__(
        self,
        url: str,
        *,
        options: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_STORE_TIMEOUT,
        retries: int = DEFAULT_STORE_RETRIES,
    ) -> None:
        if not isinstance(url, str):
            raise InvalidArgument(errno.EINVAL, f"url must be a str, not {type(url).__name__}")
        # parse_object_url checks what a URL may hold (no user info, query, control
        # character) and wants a key: give it one past the prefix.
        scheme, bucket, key = parse_object_url(url.rstrip("/") + "/-")
        self.prefix = key[: -len("-")]
        self.location = f"{scheme}://{bucket}/{self.prefix}"
        self.cloud = SCHEMES[scheme]
        options = store_options(options, needs="packs in an object store need")
        self.retries = retries
        #: Requests sent (retries included), by kind: what a test counts.
        self.requests: dict[str, int] = {"get": 0, "put": 0, "list": 0, "head": 0}
        self._counting = threading.Lock()  # uploads run in several threads
        self.closing: ClosingSockets | None = ClosingSockets()
        self._store: ObjectStore | None = build_store(
            self.location, self.cloud, bucket, options, timeout
        )

    def url(self, name: str) -> str:
        return self.location + name

    def read(self, name: str, limit: int | None = None) -> bytes:
        import obstore

        def get(store: ObjectStore) -> bytes:
            self._count("get")
            if limit is None:
                return bytes(obstore.get(store, self.prefix + name).bytes())
            # Past the end, a range comes back cut short: a longer object shows as limit bytes.
            got = obstore.get(store, self.prefix + name, options={"range": (0, limit)})
            return bytes(got.bytes())

        return self._call(name, get)

    def sizes(self, prefix: str, suffix: str = "") -> dict[str, int]:
        import obstore

        def listed(store: ObjectStore) -> dict[str, int]:
            self._count("list")
            found: dict[str, int] = {}
            result = obstore.list_with_delimiter(store, self.prefix + prefix)
            for meta in result["objects"]:
                name = meta["path"][len(self.prefix) :]
                if name.startswith(prefix) and name.endswith(suffix):
                    found[name] = meta["size"]
            return found

        if prefix and not prefix.endswith("/"):
            raise InvalidArgument(errno.EINVAL, f"a listing's prefix ends with '/': {prefix!r}")
        return self._call(prefix or ".", listed)

    def put_if_absent(self, name: str, data: bytes) -> int | None:
        import obstore

        def create(store: ObjectStore) -> int | None:
            self._count("put")
            try:
                obstore.put(store, self.prefix + name, data, mode="create", use_multipart=False)
            except Exception as exc:
                if store_failure(exc).kind != "exists":
                    raise
                self._count("head")
                found: int = obstore.head(store, self.prefix + name)["size"]
                return found
            return None

        return self._call(name, create)

    def replace(self, name: str, data: bytes) -> None:
        import obstore

        def put(store: ObjectStore) -> None:
            self._count("put")
            obstore.put(store, self.prefix + name, data, use_multipart=False)

        self._call(name, put)

    def _count(self, kind: str) -> None:
        with self._counting:
            self.requests[kind] += 1

    def _call(self, name: str, call: Callable[[ObjectStore], _T]) -> _T:
        """``call(store)``, transient failures retried; a failure as an ``OSError`` in
        words built here (obstore's text quotes the request and the server's body)."""
        tries = 0
        while True:
            store = self._store
            if store is None:
                raise OSError(errno.EBADF, f"{self.url(name)}: the pack's store was closed")
            try:
                return call(store)
            except Exception as exc:
                failure = store_failure(exc)
                exc.__traceback__ = None  # its frames hold the store
            if failure.kind != "transient" or tries >= self.retries:
                break
            tries += 1
            time.sleep(random.uniform(0, min(_BACKOFF_CAP, _BACKOFF * 2**tries)))
        after = f" (after {tries + 1} attempts)" if tries else ""
        # Raised outside the handler: no __context__ chaining obstore's error to ours.
        if failure.kind == "missing":
            raise FileNotFoundError(errno.ENOENT, failure.what)
        code = errno.EACCES if failure.status in (401, 403) else errno.EIO
        raise OSError(code, f"{failure.what}{after}")

    def close(self) -> None:
        self._store = None

    def __repr__(self) -> str:
        return f"<ObjectPackStore {self.location}>"
