"""A snapshot in S3, GCS or Azure Blob storage, read through obstore with the cloud's own
credentials (``s3://BUCKET/KEY``, ``gs://BUCKET/KEY``, ``az://CONTAINER/BLOB``).

obstore (the Python binding of Rust's ``object_store``) signs requests the way each
cloud wants and reads each cloud's standard settings from the environment
(``AWS_*``, ``GOOGLE_*``, ``AZURE_*``); ``options`` add or override settings by
obstore's names. What this module adds, and why:

* **One version, pinned at open.** ``head`` gives the size, the ETag, and the
  version where the store keeps one (an S3 ``versionId``, a GCS generation).
  Every read then asks ``if_match`` the ETag and, if there is one, that version
  (or, with no ETag, ``if_unmodified_since``): an object replaced during a
  restore fails the precondition (412) or is gone (404), and either is
  :class:`~uffd_async.SourceChanged`, which stops the source for good
  (:mod:`._chunked_source`). Every answer's metadata is compared with the open's
  too (size, ETag, version): a store that ignores preconditions (fake-gcs-server
  does) still never mixes two versions.
* **Every length checked.** obstore returns a range that runs past the object's
  end cut short, without an error; a read here must bring exactly the bytes
  asked, and the range the answer says it holds must be that one.
* **Blocking calls in worker threads, on every loop.** obstore's async API
  needs asyncio (under trio it raises "no running event loop"), and its tokio
  threads waking an asyncio loop race with interpreter exit (an abort, 7 runs
  in 120 here); its blocking API in worker threads (``anyio.to_thread``, at most
  ``concurrency`` at once) ran clean on both loops, at about 0.13 ms of CPU a
  request, against httpx's 1.7 ms.
* **Our retries, not obstore's** (its are turned off: stacked, 5 of ours times
  10 of its would hide an outage for minutes): the same backoff with full
  jitter, counts and ``retries`` as every chunked source.
* **Closed when ``aclose`` returns.** obstore closes a dropped store's
  connections a moment later, on its own threads; ``aclose`` waits for them,
  bounded (:mod:`._closing_sockets`).
* **No credential in any output.** obstore's error texts copy the request URL
  and the server's whole error body, and ``store.config`` holds the secrets in
  clear. Nothing of obstore's is shown: errors are built here from the object's
  name, the byte range, the HTTP status and the cloud's error code (such as
  ``SignatureDoesNotMatch``), and ``repr`` shows the URL only. A URL with user
  info (``s3://KEY:SECRET@bucket/...``) is refused without being echoed.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import attrs

from .._core._checks import check_seconds
from .._core._errors import FetchError, InvalidArgument
from ._chunk_cache import HostChunkCache
from ._chunked_source import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_READAHEAD_CHUNKS,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    ChunkedSource,
    FetchStats,
    Retry,
)
from ._closing_sockets import ClosingSockets
from ._outage import SourcePolicy

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = [
    "EXTRA",
    "SCHEMES",
    "ObjectSource",
    "ObjectStats",
    "StoreFailure",
    "build_store",
    "is_object_url",
    "parse_object_url",
    "store_failure",
    "store_options",
]

#: The URL schemes served here, and the cloud each names.
SCHEMES = {"s3": "S3", "gs": "GCS", "az": "Azure", "azure": "Azure"}
#: What to install for it.
EXTRA = "pip install 'uffd_async[objectstore]'"
#: The prefix of each cloud's environment variables.
_ENV_PREFIX = {"S3": "AWS_", "GCS": "GOOGLE_", "Azure": "AZURE_"}
#: obstore's client settings (its ``ClientConfig``); every other option is the store's.
_CLIENT_KEYS = frozenset(
    {
        "allow_http",
        "allow_invalid_certificates",
        "connect_timeout",
        "default_content_type",
        "http1_only",
        "http2_only",
        "pool_idle_timeout",
        "pool_max_idle_per_host",
        "proxy_url",
        "proxy_ca_certificate",
        "proxy_excludes",
        "randomize_addresses",
        "read_timeout",
        "root_certificate",
        "timeout",
        "user_agent",
    }
)
_STATUS = re.compile(r"(?:status code: |status: )(\d{3})\b")
_CODE = re.compile(r"<Code>([A-Za-z]{1,64})</Code>")


def is_object_url(source: object) -> bool:
    """Whether ``source`` names an object in S3, GCS or Azure (``s3://``, ``gs://``, ...)."""
    if not isinstance(source, str):
        return False
    scheme, sep, _ = source.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def store_options(options: Mapping[str, str] | None, *, needs: str) -> dict[str, str]:
    """A copy of the client options, checked (str names, str values: obstore's own
    types), once obstore is known to be installed (``needs``: who needs it, for the
    error naming the extra)."""
    options = dict(options or {})
    for name, value in options.items():
        if not isinstance(name, str) or not isinstance(value, str):
            shown = name if isinstance(name, str) else type(name).__name__
            raise InvalidArgument(
                errno.EINVAL, f"options: {shown!r} must be a str naming a str value"
            )
    try:
        import obstore  # noqa: F401
    except ImportError:
        raise ImportError(f"{needs} obstore: {EXTRA}") from None
    return options


def parse_object_url(url: str) -> tuple[str, str, str]:
    """``(scheme, bucket, key)`` of ``s3://BUCKET/KEY`` and the like; errors never echo
    what may be a credential (user info, a query)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise InvalidArgument(
            errno.EINVAL, f"not an object URL ({', '.join(s + '://' for s in SCHEMES)})"
        )
    bucket, _, key = rest.partition("/")
    if "@" in bucket:
        raise InvalidArgument(
            errno.EINVAL,
            f"a {scheme}:// URL with user info: credentials go in the environment or in "
            "options, never in the URL (which logs and process lists show)",
        )
    if "?" in rest or "#" in rest:
        raise InvalidArgument(
            errno.EINVAL,
            f"{scheme}://{bucket}/...: a query or fragment has no meaning here (a presigned "
            "URL is an https:// URL)",
        )
    bad = [char for char in url if ord(char) < 32 or ord(char) == 127]
    if bad:
        raise InvalidArgument(
            errno.EINVAL, f"the URL holds a control character ({bad[0]!r}): is it quoted right?"
        )
    if not bucket or not key or key.endswith("/"):
        raise InvalidArgument(
            errno.EINVAL,
            f"{scheme}://{bucket}/{key}: name one object, as {scheme}://BUCKET/KEY",
        )
    return scheme, bucket, key


@attrs.define(kw_only=True)
class ObjectStats(FetchStats):
    """What an :class:`ObjectSource` did; read it while it runs or after (requests are
    the store's GETs, with the open's HEAD)."""


class ObjectSource(ChunkedSource):
    """A snapshot object in S3, GCS or Azure, fetched a chunk at a time with the cloud's
    credentials; use it as an :class:`~uffd_async.HttpSource` (``async with``).

    ``url``: ``s3://BUCKET/KEY``, ``gs://BUCKET/KEY``, ``az://CONTAINER/BLOB``
    (``azure://`` too). Credentials and settings come from the environment, as
    each cloud's tools read them (the README lists them), then from ``options``:
    obstore's setting names and string values, for the store (``endpoint``,
    ``region``, ``access_key_id``, ``account_name``, ``base_url``, ...) or its
    HTTP client (``allow_http``, ``proxy_url``, ...). ``timeout``: seconds for a
    whole request (unless ``options`` sets ``timeout``). The other arguments
    are :class:`~uffd_async.HttpSource`'s. Needs the ``objectstore`` extra.
    """

    stats: ObjectStats

    def __init__(
        self,
        url: str,
        *,
        options: Mapping[str, str] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        host_cache: HostChunkCache | None = None,
        chunk_readahead: int = DEFAULT_READAHEAD_CHUNKS,
        outage: SourcePolicy | None = None,
    ) -> None:
        if not isinstance(url, str):
            raise InvalidArgument(errno.EINVAL, f"url must be a str, not {type(url).__name__}")
        scheme, bucket, key = parse_object_url(url)
        super().__init__(
            chunk_size=chunk_size,
            concurrency=concurrency,
            retries=retries,
            cache_bytes=cache_bytes,
            stats=ObjectStats(),
            host_cache=host_cache,
            chunk_readahead=chunk_readahead,
            outage=outage,
        )
        check_seconds("timeout", timeout)
        options = store_options(options, needs="ObjectSource needs")
        self.url = f"{scheme}://{bucket}/{key}"
        #: What errors call this source: its URL (which holds no credential).
        self.path = self.url
        self.cloud = SCHEMES[scheme]
        self.bucket = bucket
        self.key = key
        self._options = options
        self._timeout = float(timeout)
        self._store: ObjectStore | None = None
        self._sockets: ClosingSockets | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._etag: str | None = None
        self._object_version: str | None = None
        self._modified: datetime | None = None

    @property
    def pinned(self) -> str | None:
        """The object's version every read asks for (an S3 versionId, a GCS generation),
        where the store keeps versions."""
        return self._object_version

    @property
    def validator(self) -> str | None:
        """What each read checks the object against: its ETag, and its version if any."""
        parts = []
        if self._etag:
            parts.append(f"ETag {self._etag}")
        if self._object_version:
            parts.append(f"version {self._object_version}")
        if not parts and self._modified:
            parts.append(f"Last-Modified {self._modified.isoformat()}")
        return " and ".join(parts) or None

    def __repr__(self) -> str:
        state = " closed" if self._closed else "" if self._opened else " unopened"
        return f"<ObjectSource{state} {self.url} size={self.size} chunk_size={self.chunk_size}>"

    # -- the ChunkedSource seam ---------------------------------------------------------

    async def _open_object(self) -> None:
        if self._store is None:
            self._sockets = ClosingSockets()
            self._store = self._build_store()
            self._limiter = anyio.CapacityLimiter(self.concurrency)
        meta = await self._call(self._head, 0, 0)
        if meta["size"] == 0:
            raise self._error("the object is empty: there is nothing to serve", 0, 0, None)
        self.size = meta["size"]
        self._etag = meta["e_tag"]
        self._object_version = meta["version"]
        self._modified = meta["last_modified"]

    async def _fetch(self, start: int, end: int) -> bytes:
        fetched: tuple[bytes, Any, tuple[int, int]] = await self._call(self._get, start, end)
        data, meta, got = fetched
        self.stats.bytes += len(data)
        if meta["size"] != self.size:
            raise self._changed_error(
                f"the object is now {meta['size']} bytes, not {self.size}", start, end
            )
        if self._etag and meta["e_tag"] and meta["e_tag"] != self._etag:
            raise self._changed_error(
                f"its ETag is now {meta['e_tag']}, not {self._etag}", start, end
            )
        version = meta["version"]
        if self._object_version and version and version != self._object_version:
            raise self._changed_error(
                f"its version is now {version}, not {self._object_version}", start, end
            )
        if tuple(got) != (start, end + 1):
            raise self._error(
                f"the store answered bytes {got[0]}-{got[1] - 1} instead", start, end, None
            )
        if len(data) != end - start + 1:
            raise Retry(
                self._error(f"{len(data)} of {end - start + 1} bytes arrived", start, end, None)
            )
        return data

    def _pinned(self) -> str | None:
        if not self._etag and not self._object_version:
            return None  # nothing names the version: never cached across processes
        return f"size={self.size} etag={self._etag or ''} version={self._object_version or ''}"

    async def _close_object(self) -> None:
        # obstore closes the store's connections when it is dropped, a moment later, on
        # its own threads: wait for them (bounded), so that none outlives aclose().
        self._store = None
        if self._sockets is not None:
            await self._sockets.wait()

    # -- the calls, in worker threads ---------------------------------------------------

    def _build_store(self) -> ObjectStore:
        return build_store(self.url, self.cloud, self.bucket, self._options, self._timeout)

    def _head(self, start: int, end: int) -> Any:
        import obstore

        assert self._store is not None
        return obstore.head(self._store, self.key)

    def _get(self, start: int, end: int) -> tuple[bytes, Any, tuple[int, int]]:
        import obstore

        store = self._store
        if store is None:
            raise self._error("the source was closed", start, end, None)
        options: dict[str, Any] = {"range": (start, end + 1)}
        if self._etag:
            options["if_match"] = self._etag
        elif self._modified is not None:
            options["if_unmodified_since"] = self._modified
        if self._object_version:
            options["version"] = self._object_version
        result = obstore.get(store, self.key, options=options)  # type: ignore[arg-type]
        data = bytes(result.bytes())
        return data, result.meta, result.range

    async def _call(self, call: Any, start: int, end: int) -> Any:
        """``call(start, end)`` in a worker thread, its failures as our errors."""
        self.stats.requests += 1
        try:
            return await anyio.to_thread.run_sync(call, start, end, limiter=self._limiter)
        except (FetchError, InvalidArgument):
            raise
        except Exception as exc:
            mapped = self._mapped(exc, start, end)
            exc.__traceback__ = None  # its frames hold the store: it would outlive aclose()
        # Raised outside the handler: no __context__ chaining obstore's error (its text
        # quotes the server's error body) or its frames to ours.
        raise mapped

    def _mapped(self, exc: Exception, start: int, end: int) -> Exception:
        """obstore's error as ours, in words built here (the module says why)."""
        failure = store_failure(exc)
        if failure.kind == "changed":
            return self._changed_error(
                f"the object changed since it was opened ({self.validator} no longer matches)",
                start,
                end,
                412,
            )
        if failure.kind == "missing" and self._opened:  # the version it was opened at is gone
            return self._changed_error(
                "the object (at its opened version) is gone", start, end, 404
            )
        error = self._error(failure.what, start, end, failure.status)
        return Retry(error) if failure.kind == "transient" else error


def build_store(
    url: str, cloud: str, bucket: str, options: Mapping[str, str], timeout: float
) -> ObjectStore:
    """The obstore store of ``bucket`` in ``cloud``: settings from the environment, then
    ``options``; obstore's own retries off (ours run instead). ``url`` names it in an
    error, which never quotes a value (it may be a secret)."""
    from obstore.store import AzureStore, GCSStore, S3Store

    config: dict[str, Any] = {}
    client: dict[str, Any] = {
        "timeout": timedelta(seconds=timeout),
        "connect_timeout": timedelta(seconds=timeout),
    }
    # obstore reads client settings from the environment (AWS_ALLOW_HTTP, ...) only
    # when given no client options at all; we give some (the timeouts), so read them.
    prefix = _ENV_PREFIX[cloud]
    for name, value in os.environ.items():
        key = name[len(prefix) :].lower()
        if name.startswith(prefix) and key in _CLIENT_KEYS and key != "timeout":
            client[key] = value
    for name, value in options.items():
        (client if name.lower() in _CLIENT_KEYS else config)[name.lower()] = value
    retry = {"max_retries": 0, "retry_timeout": timedelta(seconds=timeout)}
    kinds: dict[str, Any] = {"S3": S3Store, "GCS": GCSStore, "Azure": AzureStore}
    try:
        store: ObjectStore = kinds[cloud](
            bucket, config=config, client_options=client, retry_config=retry
        )
    except Exception as exc:  # obstore's text may quote a value: name the options only
        names = ", ".join(sorted(options)) or "none"
        raise InvalidArgument(
            errno.EINVAL,
            f"{url}: cannot configure the {cloud} store ({type(exc).__name__}; "
            f"options given: {names}; check the names and the environment)",
        ) from None
    return store


@attrs.frozen
class StoreFailure:
    """What a failed obstore call means, in words built here (never obstore's text).

    ``kind``: ``changed`` (a precondition failed), ``exists`` (a create found the object),
    ``missing`` (404), ``transient`` (worth trying again: a 5xx, a connection error, a
    timeout) or ``final`` (the request itself is refused: 4xx, credentials).
    """

    kind: str
    what: str
    status: int | None


def store_failure(exc: Exception) -> StoreFailure:
    """What obstore's ``exc`` says: its class, its HTTP status and the cloud's error code
    (such as ``SignatureDoesNotMatch``), nothing else of its text (the module says why)."""
    from obstore import exceptions as oe

    text = str(exc)
    match = _STATUS.search(text)
    status = int(match.group(1)) if match else None
    code = _CODE.search(text)
    said = f" ({code.group(1)})" if code else ""
    if isinstance(exc, oe.PreconditionError):
        return StoreFailure("changed", f"a precondition failed (HTTP 412{said})", 412)
    if isinstance(exc, oe.AlreadyExistsError):
        return StoreFailure("exists", f"it exists already (HTTP {status or 412}{said})", status)
    if isinstance(exc, (FileNotFoundError, oe.NotFoundError)):
        return StoreFailure("missing", f"no such object (HTTP 404{said})", 404)
    if isinstance(exc, oe.PermissionDeniedError):
        return StoreFailure(
            "final",
            f"permission denied (HTTP {status or 403}{said}): check the credentials "
            "and their rights on the object",
            status or 403,
        )
    if isinstance(exc, oe.UnauthenticatedError):
        return StoreFailure(
            "final",
            f"not authenticated (HTTP {status or 401}{said}): check the credentials",
            status or 401,
        )
    if isinstance(exc, oe.GenericError):
        if status in (408, 429):  # Request Timeout, Too Many Requests: try again later
            return StoreFailure("transient", f"HTTP {status}{said}", status)
        if status is not None and 400 <= status < 500:
            return StoreFailure("final", f"HTTP {status}{said}", status)
        what = f"HTTP {status}{said}" if status else _transport_kind(text)
        return StoreFailure("transient", what, status)
    return StoreFailure("final", f"{type(exc).__name__}{said}", status)


def _transport_kind(text: str) -> str:
    """A failure with no HTTP status, in a word: obstore has one class for all of them."""
    lowered = text.lower()
    if "builder error" in lowered:
        return "the client refused the request (a plain http:// endpoint needs allow_http)"
    if "timed out" in lowered or "timeout" in lowered:
        return "timed out"
    if "connect" in lowered:
        return "could not connect"
    return "the request failed (connection, timeout or server error)"
