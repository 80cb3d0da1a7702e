"""A snapshot in object storage (S3, GCS, MinIO, any HTTP server), read by Range requests.

The I/O of remote snapshots, built on httpx (anyio-native: asyncio and trio).
What it checks, and why:

* One request at open, ``GET`` with ``Range: bytes=0-0``: its ``Content-Range``
  gives the size and its ``ETag`` (else ``Last-Modified``) the version. Not
  ``HEAD``: a presigned URL is signed for one method, and is usually GET's.
* Every later request carries ``If-Match`` (a strong ETag) or
  ``If-Unmodified-Since`` (a weak one, or none: If-Match compares strongly, so a
  weak tag there would never match): an object replaced during a restore
  answers 412, and :class:`~uffd_async.SourceChanged` stops every fetch from
  then on, so a process never holds two versions of a snapshot.
* Preconditions are not enough: a cache or a lax server ignores them, and
  If-Unmodified-Since passes for an object replaced by an *older* file of the
  same size (``mv``, ``rsync -a``). So every 206 is also compared with what
  the open saw: its total size, its ETag (weak or strong), and, where there
  was no strong ETag, its Last-Modified. Any difference is the same
  ``SourceChanged``.
* A response must be 206 with exactly the ``Content-Range`` asked for and
  exactly that many bytes: a 200 (a server ignoring Range), a short body, a
  different range or a compressed body (``Accept-Encoding: identity`` is sent,
  since a range of a compressed representation is not the object's bytes) is
  an error, never copied into anyone's memory.
* Connection errors, timeouts, bodies cut short and 5xx are retried (by
  :class:`~._chunked_source.ChunkedSource`: backoff with full jitter), up to
  ``retries`` times; other 4xx are not (the request itself is wrong: it would
  fail the same way again).
* URLs are shown without their query string, fragment or user info: a
  presigned URL carries its credentials in the query. (httpx logs full URLs
  at INFO on its ``httpx`` logger; the CLI keeps that logger at WARNING.)
"""

from __future__ import annotations

import errno
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs

from .._core._checks import check_seconds
from .._core._errors import InvalidArgument, SnapshotClosed
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
    refuse_readahead,
)
from ._outage import SourcePolicy

if TYPE_CHECKING:
    import httpx

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT",
    "HttpSource",
    "HttpStats",
    "display_url",
    "is_url",
    "refuse_readahead",
    "url_problem",
]

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


def is_url(source: object) -> bool:
    """Whether ``source`` names an HTTP(S) object rather than a file."""
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def display_url(url: str) -> str:
    """``url`` without what may carry credentials: query string, fragment, user info."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url.split("?", 1)[0].split("#", 1)[0]
    rest = rest.split("#", 1)[0].split("?", 1)[0]
    host, slash, path = rest.partition("/")
    host = host.rpartition("@")[2]
    return f"{scheme}://{host}{slash}{path}"


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be fetched at all, in words (never the URL's query), or None."""
    bad = [char for char in url if ord(char) < 32 or ord(char) == 127]
    if bad:
        return f"holds a control character ({bad[0]!r}): is it quoted right?"
    try:
        import httpx
    except ImportError:
        return None  # HttpSource says which extra to install
    try:
        httpx.URL(url)
    except httpx.InvalidURL as exc:
        return f"is not a valid URL: {str(exc).replace(url, display_url(url))}"
    return None


@attrs.define(kw_only=True)
class HttpStats(FetchStats):
    """What an :class:`HttpSource` did; read it while it runs or after (requests are
    HTTP requests, bytes their bodies')."""


class HttpSource(ChunkedSource):
    """A snapshot object served over HTTP(S) Range requests, fetched a chunk at a time.

    Use it open: ``async with HttpSource(url) as source:``. Then give it to
    :func:`~uffd_async.copy_from` (in-process memory), to
    :func:`~uffd_async.serve_handoffs` (every handoff's mappings are served from
    it, and share its chunks) or call :meth:`read` yourself. Every fault in a
    chunk awaits one request for it; when it lands, every page of the chunk
    still missing is copied in, so the rest of the chunk never faults.

    ``chunk_size``: bytes per request (a multiple of 4 KiB). ``concurrency``:
    requests at once (the connection pool's size; demand faults go before
    prefetching). ``timeout``: seconds for connecting and for each read.
    ``retries``: tries after the first for a retriable failure. ``headers``:
    sent with every request (an ``Authorization``, say). ``cache_bytes``: recent
    chunks kept for fork children and other processes restored from this
    source. ``chunk_readahead``: chunks fetched ahead of faults that walk the
    chunks in order (0: none). ``outage``: what a fault does while the object cannot
    be fetched (a :class:`~uffd_async.SourcePolicy`: wait, by default). ``http2``:
    HTTP/2 (needs the ``http2`` extra). ``client``: an ``httpx.AsyncClient`` of yours
    (proxies, certificates); it is not closed.
    """

    stats: HttpStats

    def __init__(
        self,
        url: str,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        headers: Mapping[str, str] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        host_cache: HostChunkCache | None = None,
        chunk_readahead: int = DEFAULT_READAHEAD_CHUNKS,
        outage: SourcePolicy | None = None,
        http2: bool = False,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if not is_url(url):
            raise InvalidArgument(errno.EINVAL, f"not an http:// or https:// URL: {url!r}")
        super().__init__(
            chunk_size=chunk_size,
            concurrency=concurrency,
            retries=retries,
            cache_bytes=cache_bytes,
            stats=HttpStats(),
            host_cache=host_cache,
            chunk_readahead=chunk_readahead,
            outage=outage,
        )
        check_seconds("timeout", timeout)
        try:
            import httpx
        except ImportError:
            raise ImportError("HttpSource needs httpx: pip install 'uffd_async[http]'") from None
        problem = url_problem(url)
        if problem:  # httpx would raise its own InvalidURL, outside the error tree
            raise InvalidArgument(errno.EINVAL, f"url {display_url(url)!r} {problem}")
        self._url = url
        self.url = display_url(url)
        #: What errors call this source: the URL without credentials.
        self.path = self.url
        self._timeout = float(timeout)
        self._headers = {**(headers or {}), "Accept-Encoding": "identity"}
        self._http2 = http2
        self._client = client
        self._own_client = client is None
        self._httpx = httpx
        self._condition: dict[str, str] = {}
        self._etag: str | None = None
        self._modified: str | None = None

    # -- the ChunkedSource seam ---------------------------------------------------------

    async def _open_object(self) -> None:
        """One ``GET`` of byte 0: its size, ETag and Last-Modified (the module says why)."""
        if self._client is None:
            httpx = self._httpx
            self._client = httpx.AsyncClient(
                http2=self._http2,
                timeout=httpx.Timeout(self._timeout),
                limits=httpx.Limits(
                    max_connections=self.concurrency, max_keepalive_connections=self.concurrency
                ),
                follow_redirects=True,
            )
        await self._first_request(0, 0)

    async def _first_request(self, start: int, end: int) -> bytes:
        response, body = await self._get(start, end, {})
        total = self._check_range(response, start, end)
        if total == 0:
            raise self._error("the object is empty: there is nothing to serve", 0, 0, 206)
        self.size = total
        etag = response.headers.get("ETag")
        modified = response.headers.get("Last-Modified")
        self._etag = etag
        self._modified = modified
        if etag and not etag.startswith("W/"):
            self._condition = {"If-Match": etag}
        elif modified:
            self._condition = {"If-Unmodified-Since": modified}
        return body

    async def _fetch(self, start: int, end: int) -> bytes:
        return await self._ranged(start, end)

    def _pinned(self) -> str | None:
        if not self._etag and not self._modified:
            return None  # nothing names the version: never cached across processes
        etag, modified = self._etag or "", self._modified or ""
        return f"size={self.size} etag={etag} modified={modified}"

    async def _close_object(self) -> None:
        """Close the connections (not a client given to us)."""
        client, self._client = self._client, None
        if client is not None and self._own_client:
            await client.aclose()

    async def __aenter__(self) -> HttpSource:
        return await self.open()

    @property
    def validator(self) -> str | None:
        """What each request checks the object against: ``If-Match: "etag"``, say."""
        return next((f"{k}: {v}" for k, v in self._condition.items()), None)

    # -- the requests -------------------------------------------------------------

    async def _ranged(self, start: int, end: int) -> bytes:
        response, body = await self._get(start, end, self._condition)
        total = self._check_range(response, start, end)
        if total != self.size:
            raise self._changed_error(
                f"the object is now {total} bytes, not {self.size}",
                start,
                end,
                response.status_code,
            )
        etag = response.headers.get("ETag")
        if self._etag and etag and _opaque(etag) != _opaque(self._etag):
            raise self._changed_error(
                f"the object's ETag is now {etag}, not {self._etag}",
                start,
                end,
                response.status_code,
            )
        modified = response.headers.get("Last-Modified")
        strong = "If-Match" in self._condition
        if not strong and self._modified and modified and modified != self._modified:
            raise self._changed_error(
                f"the object's Last-Modified is now {modified}, not {self._modified}",
                start,
                end,
                response.status_code,
            )
        return body

    async def _get(
        self, start: int, end: int, condition: Mapping[str, str]
    ) -> tuple[httpx.Response, bytes]:
        """One ranged GET: (response, its body, exactly ``end - start + 1`` bytes long)."""
        httpx = self._httpx
        if self._client is None:
            raise SnapshotClosed(self.url)
        headers = {**self._headers, **condition, "Range": f"bytes={start}-{end}"}
        expected = end - start + 1
        self.stats.requests += 1
        pieces: list[bytes] = []
        received = 0
        try:
            async with self._client.stream("GET", self._url, headers=headers) as response:
                self._check_status(response, start, end)
                encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise self._error(
                        f"a {encoding}-encoded body: its ranges are not the object's bytes",
                        start,
                        end,
                        206,
                    )
                declared = response.headers.get("Content-Length")
                if declared is not None and declared.strip() != str(expected):
                    raise self._error(
                        f"Content-Length {declared} for {expected} bytes asked", start, end, 206
                    )
                async for piece in response.aiter_raw():
                    received += len(piece)
                    if received > expected:
                        raise self._error(
                            f"more than the {expected} bytes asked for", start, end, 206
                        )
                    pieces.append(piece)
        except httpx.TransportError as exc:  # connect, read, write, timeouts, protocol
            self.stats.bytes += received
            detail = str(exc).replace(self._url, self.url) or type(exc).__name__
            raise Retry(self._error(f"{type(exc).__name__}: {detail}", start, end, None)) from None
        self.stats.bytes += received
        if received != expected:
            raise Retry(self._error(f"{received} of {expected} bytes arrived", start, end, 206))
        return response, b"".join(pieces)

    def _check_status(self, response: httpx.Response, start: int, end: int) -> None:
        status = response.status_code
        if status == 206:
            return
        if status == 412:
            raise self._changed_error(
                f"the object changed since it was opened ({self.validator} failed)",
                start,
                end,
                status,
            )
        if status == 200:
            raise self._error(
                "the server ignored the Range header (200 with the whole object): it cannot "
                "serve a snapshot by ranges",
                start,
                end,
                status,
            )
        error = self._error(f"HTTP {status} {response.reason_phrase}".rstrip(), start, end, status)
        if status >= 500:
            raise Retry(error)
        if status in (408, 429):  # Request Timeout, Too Many Requests: try again later
            raise Retry(error)
        raise error

    def _check_range(self, response: httpx.Response, start: int, end: int) -> int:
        """The object's total size, from a ``Content-Range`` that must be ``start-end``."""
        header = response.headers.get("Content-Range", "")
        match = _CONTENT_RANGE.match(header)
        if match is None or match.group(3) == "*":
            raise self._error(f"a 206 with Content-Range {header!r}", start, end, 206)
        first, last = int(match.group(1)), int(match.group(2))
        if (first, last) != (start, end):
            raise self._error(f"the server sent bytes {first}-{last} instead", start, end, 206)
        return int(match.group(3))

    def __repr__(self) -> str:
        state = " closed" if self._closed else "" if self._opened else " unopened"
        return f"<HttpSource{state} {self.url} size={self.size} chunk_size={self.chunk_size}>"


def _opaque(etag: str) -> str:
    return etag.removeprefix("W/").strip()
