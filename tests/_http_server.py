"""A real HTTP object server on loopback, for HttpSource's tests and benchmarks.

Run as ``python -m tests._http_server --root DIR [--host H] [--port P]``: it binds
its socket, prints ``listening http://HOST:PORT`` (one line, flushed) and serves,
with uvicorn (h11) and Starlette, until SIGTERM (exit status 0). The sync
controller that starts it and drives the control API is
``tests._support.HttpObjectServer``.

``GET``/``HEAD /o/NAME`` serves the file ``DIR/NAME``: single byte ranges (206),
416 for unsatisfiable ones, strong ETags (or weak ones, or none) and Last-Modified,
If-Match, If-Unmodified-Since (honoured, or ignored as a lax server would) and
If-Range. ``/_control/...`` sets a latency, queues misbehaviours (see ``ACTIONS``)
and reports what was served: a real server, so the client's pool, framing and
error paths are exercised as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import gzip
import json
import os
import re
import signal
import socket
import stat
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

#: Body pieces are read with os.pread and sent this big: a large object is never
#: held whole, and loopback still runs at hundreds of MB/s.
CHUNK = 1 << 20

#: Misbehaviours, queued with ``POST /_control/actions``; each is taken by one request
#: (see ``ON``), after the delay:
#:
#: * ``500``, ``503``, ``403``: that status, a short text body, nothing else.
#: * ``drop``: the TCP connection is closed without a byte of response
#:   (httpx: RemoteProtocolError, "Server disconnected without sending a response").
#: * ``replace``: first the object gets new contents of the same size (every byte
#:   inverted) under a new inode, its mtime at least a second later, so both its
#:   ETag and Last-Modified change; then the request is answered as usual (so a
#:   412 if it carries If-Match or If-Unmodified-Since for the old object).
#:
#: These shape a GET's 200 or 206 (a HEAD, a 404, 412 or 416 is answered as usual):
#:
#: * ``full``: 200 with the whole object, the Range ignored.
#: * ``short``: the usual headers (Content-Length of the whole answer), then half the
#:   body (rounded down), then the connection is closed (httpx: RemoteProtocolError,
#:   "peer closed connection without sending complete message body").
#: * ``short_declared``: 206 for the first half (rounded down) of what was asked,
#:   Content-Range and Content-Length saying so, body to match; a 1-byte range
#:   cannot be halved and is answered as usual.
#: * ``wrong_range``: 206 for another range of the same length (``_other_range``),
#:   Content-Range saying so, with that range's bytes.
#: * ``range_end_off``: the bytes asked for, Content-Length to match, but a
#:   Content-Range that ends one byte earlier (a buggy cache's label).
#: * ``chunked_short``: no Content-Length (chunked transfer coding), the Content-Range
#:   asked for, the first half of its bytes (rounded down), then the last chunk: a
#:   well-framed body, too short for its own Content-Range.
#: * ``chunked_cut``: no Content-Length, the first half of the body, then the
#:   connection is closed before the last chunk (httpx: RemoteProtocolError).
#: * ``gzip``: the bytes asked for, gzip-compressed, with ``Content-Encoding: gzip``
#:   and the compressed Content-Length (what a server that compresses on the fly
#:   sends whatever ``Accept-Encoding`` said).
#: * ``hold``: the request waits, after the delay, until ``POST /_control/release``
#:   (or a reset, or the client leaving; at most ``HOLD_LIMIT`` seconds), then is
#:   answered as usual: a test acts while a fetch is surely in flight (``held``
#:   in the stats counts the requests waiting so).
ERROR_STATUSES = {"500": 500, "503": 503, "403": 403}
ACTIONS = frozenset(
    {
        *ERROR_STATUSES,
        *("drop", "full", "short", "short_declared", "wrong_range", "range_end_off"),
        *("chunked_short", "chunked_cut", "gzip", "replace", "hold"),
    }
)
#: Which requests an action is for: ``range`` (the default), a GET with a Range
#: header; ``any``, any object request (GET or HEAD, with or without Range). An
#: action may also be for one object only (its ``path``). Each request, as it
#: arrives, takes the first queued action that is for it (FIFO among those).
ON = frozenset({"range", "any"})

#: Entries the request log keeps (a long benchmark must not grow it without end).
LOG_LIMIT = 100_000

#: How long the app waits for a connection it closed to be gone (bounded).
CLOSE_TIMEOUT = 5.0

#: The longest a ``hold`` keeps a request waiting for its release.
HOLD_LIMIT = 30.0


_RANGE_SPEC = re.compile(r"\s*([0-9]*)\s*-\s*([0-9]*)\s*")


class _Unsatisfiable(Exception):
    """The Range names no byte of the object: 416."""


@dataclass
class Action:
    name: str
    path: str | None = None
    on: str = "range"

    def takes(self, path: str, ranged: bool) -> bool:
        return (self.path is None or self.path == path) and (ranged or self.on == "any")


@dataclass
class Stats:
    """What was served since the last reset; ``ServerState.snapshot`` reports it."""

    requests: int = 0
    methods: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    ranged: int = 0
    #: One entry per object request, as it ended; the oldest go past ``LOG_LIMIT``.
    log: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=LOG_LIMIT))
    logged: int = 0
    bytes_sent: int = 0
    max_in_flight: int = 0
    connections_total: int = 0
    control_requests: int = 0


class ServerState:
    """Settings, queued actions, counters and open connections of one server process."""

    def __init__(self, root: str, *, delay_ms: float = 0, etag: bool = True) -> None:
        self.root = os.path.realpath(root)
        self.delay_ms = delay_ms
        self.etag = etag
        #: ETags sent weak (``W/"..."``): If-Match, a strong comparison, then never holds.
        self.weak = False
        #: If-Match and If-Unmodified-Since honoured (412); False: a lax server (or a
        #: cache) that ignores them and serves whatever the object is now.
        self.preconditions = True
        self.actions: deque[Action] = deque()
        self.stats = Stats()
        self.in_flight = 0
        #: Requests waiting on ``hold``; ``release`` sets the event (then a new one).
        self.held = 0
        self.gate = anyio.Event()
        #: Open connections by the client's (host, port), as uvicorn puts it in the scope.
        self.connections: dict[tuple[str, int], Connection] = {}
        self.port = 0
        self.server: uvicorn.Server | None = None

    def reset(self) -> None:
        """Back to a fresh server's settings and counters; open connections stay counted."""
        self.actions.clear()
        self.delay_ms = 0
        self.etag = True
        self.weak = False
        self.preconditions = True
        self.release()
        self.stats = Stats(max_in_flight=self.in_flight)

    def release(self) -> None:
        """Every request held so far goes on."""
        self.gate.set()
        self.gate = anyio.Event()

    def take_action(self, path: str, ranged: bool) -> Action | None:
        """The first queued action this request may take, removed from the queue."""
        for action in self.actions:
            if action.takes(path, ranged):
                self.actions.remove(action)
                return action
        return None

    def snapshot(self, asker: tuple[str, int] | None, *, log: bool = True) -> dict[str, Any]:
        """The stats as JSON; the connection carrying the question is left out of the
        counts. ``log=False`` leaves out the per-request lists (``log``, ``ranges``)."""
        stats = self.stats
        connections = [key for key in self.connections if key != asker]
        lists = {
            "ranges": [entry for entry in stats.log if entry["range"] is not None],
            "log": list(stats.log),
        }
        return {
            "requests": stats.requests,
            "methods": dict(stats.methods),
            "statuses": dict(stats.statuses),
            "ranged": stats.ranged,
            **(lists if log else {}),
            "log_dropped": stats.logged - len(stats.log),
            "bytes_sent": stats.bytes_sent,
            "in_flight": self.in_flight,
            "held": self.held,
            "max_in_flight": stats.max_in_flight,
            "connections_open": len(connections),
            "connections_total": stats.connections_total,
            "sockets_open": established_sockets(self.port, asker[1] if asker else None),
            "control_requests": stats.control_requests,
            "actions_pending": [vars(action) for action in self.actions],
            "delay_ms": self.delay_ms,
            "etag": self.etag,
            "weak": self.weak,
            "preconditions": self.preconditions,
        }


def established_sockets(port: int, but_peer_port: int | None = None) -> int:
    """This process's TCP sockets on ``port`` that are not listening, from the
    kernel's tables (/proc/self/net/tcp{,6}, matched by inode to our fds): the
    kernel's count of what ``connections_open`` counts at the protocol level."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as rows:
                lines = rows.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if state == "0A" or inode not in inodes:  # 0A: TCP_LISTEN
                continue
            if int(local.rsplit(":", 1)[1], 16) != port:
                continue
            if int(remote.rsplit(":", 1)[1], 16) == but_peer_port:
                continue
            count += 1
    return count


class Connection(H11Protocol):
    """uvicorn's h11 protocol, which also tells the server state when a TCP connection
    opens and closes: uvicorn has no hook for that, and ``drop`` and ``short`` need
    the transport to close a connection without finishing the response."""

    state: ServerState
    #: The stats that counted this connection in ``connections_total``.
    counted_in: Stats | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.lost = asyncio.Event()
        assert self.client is not None
        self.state.connections[self.client] = self

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.client is not None and self.state.connections.get(self.client) is self:
            del self.state.connections[self.client]
        self.lost.set()

    async def close_now(self) -> None:
        """Close the TCP connection (what was written is still sent first) and wait
        until uvicorn knows, so it logs no complaint about an unfinished response."""
        self.transport.close()
        with anyio.move_on_after(CLOSE_TIMEOUT):
            await self.lost.wait()


def _validators(info: os.stat_result) -> tuple[str, str]:
    """A strong ETag (changes with the size, the mtime or the inode) and Last-Modified."""
    etag = f'"{info.st_size:x}-{info.st_mtime_ns:x}-{info.st_ino:x}"'
    return etag, email.utils.formatdate(info.st_mtime_ns // 10**9, usegmt=True)


def _http_date(value: str) -> int | None:
    try:
        return int(email.utils.parsedate_to_datetime(value).timestamp())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _etag_matches(value: str, etag: str | None) -> bool:
    """If-Match's strong comparison: ``*`` matches any object, weak tags match nothing."""
    if value.strip() == "*":
        return True
    if etag is None or etag.startswith("W/"):
        return False
    return etag in (tag.strip() for tag in value.split(","))


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """The [start, stop) a single-range ``Range`` asks for, clamped to the object;
    None where the header is to be ignored (not bytes, several ranges, bad syntax);
    raises ``_Unsatisfiable`` when no byte of it exists."""
    unit, _, spec = value.partition("=")
    match = _RANGE_SPEC.fullmatch(spec)
    if unit.strip().lower() != "bytes" or match is None or match.group(1, 2) == ("", ""):
        return None
    first, last = match.group(1, 2)
    if not first:  # "-n": the last n bytes
        if int(last) == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - int(last)), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise _Unsatisfiable
    return start, min(int(last) + 1, size) if last else size


def _asked(range_header: str, path: str) -> tuple[int, int] | tuple[None, None]:
    """The [start, stop) a Range asks of the object as it is now, for the log:
    (None, None) where it asks for nothing (no object, ignored, unsatisfiable)."""
    try:
        return parse_range(range_header, os.stat(path).st_size) or (None, None)
    except (OSError, _Unsatisfiable):
        return None, None


def _other_range(start: int, stop: int, size: int) -> tuple[int, int]:
    """A range of the same length as [start, stop) that starts elsewhere: the next one,
    else the previous, else the object's tail or head; where the range is the whole
    object there is none, and it is one byte shorter, starting at 1."""
    length = stop - start
    for other in (stop, start - length, size - length, 0):
        if other != start and 0 <= other <= size - length:
            return other, other + length
    return min(1, size), size


_INVERTED = bytes(255 - byte for byte in range(256))


def _replace(path: str) -> None:
    """New contents of the same size (every byte inverted) under a new inode, with an
    mtime at least a second later: both the ETag and Last-Modified change."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    temporary = f"{path}.replacing"
    with open(path, "rb") as old, open(temporary, "wb") as new:
        while piece := old.read(CHUNK):
            new.write(piece.translate(_INVERTED))
    mtime_ns = max(time.time_ns(), info.st_mtime_ns + 10**9)
    os.utime(temporary, ns=(mtime_ns, mtime_ns))
    os.replace(temporary, path)


class Objects:
    """The ASGI app behind ``/o/{name}``: one object request, start to end."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        method: str = scope["method"]
        name: str = scope["path_params"]["name"]
        headers = Headers(scope=scope)
        range_header = headers.get("range") if method == "GET" else None
        action = state.take_action(name, range_header is not None)
        client = scope.get("client")
        connection = state.connections.get((client[0], client[1])) if client else None
        entry: dict[str, Any] = {
            "method": method,
            "path": name,
            "range": range_header,
            "start": None,
            "stop": None,
            "status": None,
            "action": action.name if action else None,
            "sent": 0,
            "accept_encoding": headers.get("accept-encoding"),
            "if_match": headers.get("if-match"),
            "if_unmodified_since": headers.get("if-unmodified-since"),
            "authorization": headers.get("authorization"),
        }
        stats = state.stats  # a reset meanwhile starts new ones: this request stays out
        if connection is not None and connection.counted_in is not stats:
            connection.counted_in = stats
            stats.connections_total += 1
        stats.requests += 1
        stats.methods[method] += 1
        stats.ranged += range_header is not None
        state.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, state.in_flight)
        try:
            if state.delay_ms > 0:
                # The delay, cut short if the client leaves (nobody to answer then).
                with anyio.move_on_after(state.delay_ms / 1000):
                    await (connection.lost.wait() if connection else anyio.sleep_forever())
                if connection and connection.lost.is_set():
                    return
            if action is not None and action.name == "hold":
                await self._hold(connection)
                if connection and connection.lost.is_set():
                    return
            await self._respond(name, headers, action, connection, entry, send)
        finally:
            state.in_flight -= 1
            stats.statuses[str(entry["status"] or "none")] += 1
            stats.bytes_sent += entry["sent"]
            stats.log.append(entry)
            stats.logged += 1

    async def _hold(self, connection: Connection | None) -> None:
        """Wait for a release (bounded), or the client leaving."""
        state, gate = self.state, self.state.gate
        state.held += 1
        try:
            with anyio.move_on_after(HOLD_LIMIT):
                async with anyio.create_task_group() as tg:

                    async def released() -> None:
                        await gate.wait()
                        tg.cancel_scope.cancel()

                    tg.start_soon(released)
                    if connection is not None:
                        await connection.lost.wait()
                        tg.cancel_scope.cancel()
        finally:
            state.held -= 1

    async def _respond(
        self,
        name: str,
        headers: Headers,
        action: Action | None,
        connection: Connection | None,
        entry: dict[str, Any],
        send: Send,
    ) -> None:
        state = self.state
        what = action.name if action else None
        path = os.path.join(state.root, name)
        unsafe = os.path.isabs(name) or ".." in name.split("/")
        if entry["range"] is not None and not unsafe:
            entry["start"], entry["stop"] = _asked(entry["range"], path)
        if what == "drop":
            assert connection is not None, "no connection to drop"
            await connection.close_now()
            return
        if what in ERROR_STATUSES:
            entry["status"] = ERROR_STATUSES[what]
            await _plain(send, entry["status"], f"injected {what}\n")
            return
        if unsafe:
            entry["status"] = 404
            await _plain(send, 404, "no such object\n")
            return
        if what == "replace":
            _replace(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            entry["status"] = 404
            await _plain(send, 404, "no such object\n")
            return
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                entry["status"] = 404
                await _plain(send, 404, "no such object\n")
                return
            await self._serve(fd, info, headers, what, connection, entry, send)
        finally:
            os.close(fd)

    async def _serve(
        self,
        fd: int,
        info: os.stat_result,
        headers: Headers,
        what: str | None,
        connection: Connection | None,
        entry: dict[str, Any],
        send: Send,
    ) -> None:
        size = info.st_size
        etag, last_modified = _validators(info)
        if self.state.weak:
            etag = f"W/{etag}"
        common = [("accept-ranges", "bytes"), ("last-modified", last_modified)]
        if self.state.etag:
            common.append(("etag", etag))
        current = etag if self.state.etag else None
        # Preconditions first (RFC 9110 section 13.2.2), then the range.
        if_match = headers.get("if-match")
        unmodified_since = headers.get("if-unmodified-since")
        if if_match is not None:
            failed = not _etag_matches(if_match, current)
        elif unmodified_since is not None:
            date = _http_date(unmodified_since)
            failed = date is not None and info.st_mtime_ns // 10**9 > date
        else:
            failed = False
        if failed and self.state.preconditions:
            entry["status"] = 412
            await _plain(send, 412, "precondition failed\n", common)
            return
        range_header = entry["range"]
        asked: tuple[int, int] | None = None
        if range_header is not None and _if_range_holds(headers.get("if-range"), current, info):
            try:
                asked = parse_range(range_header, size)
            except _Unsatisfiable:
                entry["status"] = 416
                await _plain(
                    send,
                    416,
                    "range not satisfiable\n",
                    [*common, ("content-range", f"bytes */{size}")],
                )
                return
        start, stop = asked or (0, size)
        partial = asked is not None
        cut: int | None = None  # "short": close after this many body bytes
        label: tuple[int, int] | None = None  # the Content-Range's [start, stop), if not these
        chunked = False  # no Content-Length: the body in chunks
        if entry["method"] != "GET":
            pass
        elif what == "full":
            start, stop, partial = 0, size, False
        elif what == "short":
            cut = (stop - start) // 2
        elif what == "short_declared" and stop - start >= 2:
            stop, partial = start + (stop - start) // 2, True
        elif what == "wrong_range":
            (start, stop), partial = _other_range(start, stop, size), True
        elif what == "range_end_off" and partial and stop - start >= 2:
            label = start, stop - 1
        elif what in ("chunked_short", "chunked_cut"):
            chunked = True
            if what == "chunked_cut":
                cut = (stop - start) // 2
            else:  # the Content-Range still says the whole range
                label, stop = (start, stop), start + (stop - start) // 2
        elif what == "gzip":
            body = gzip.compress(os.pread(fd, stop - start, start))
            await self._gzip(body, common, (start, stop, size) if partial else None, entry, send)
            return
        response = [*common, ("content-type", "application/octet-stream")]
        if not chunked:
            response.append(("content-length", str(stop - start)))
        if partial:
            first, end = label or (start, stop)
            response.append(("content-range", f"bytes {first}-{end - 1}/{size}"))
        entry["status"] = 206 if partial else 200
        await send(
            {
                "type": "http.response.start",
                "status": entry["status"],
                "headers": [(key.encode(), value.encode()) for key, value in response],
            }
        )
        if entry["method"] == "HEAD":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        end = stop if cut is None else start + cut
        position = start
        while position < end:
            if connection is not None and connection.lost.is_set():
                return  # the client went away: stop reading the file for nobody
            piece = os.pread(fd, min(CHUNK, end - position), position)
            if not piece:
                break  # the file shrank under us: the declared length cannot be met
            position += len(piece)
            last = position == stop
            await send({"type": "http.response.body", "body": piece, "more_body": not last})
            entry["sent"] += len(piece)
        if position < stop:
            assert connection is not None, "no connection to cut short"
            await connection.close_now()
        elif start == stop:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _gzip(
        self,
        body: bytes,
        common: list[tuple[str, str]],
        span: tuple[int, int, int] | None,
        entry: dict[str, Any],
        send: Send,
    ) -> None:
        """``body`` (already compressed) as ``Content-Encoding: gzip``; ``span`` is the
        (start, stop, size) of a 206."""
        fields = [
            *common,
            ("content-type", "application/octet-stream"),
            ("content-encoding", "gzip"),
            ("content-length", str(len(body))),
        ]
        if span is not None:
            start, stop, size = span
            fields.append(("content-range", f"bytes {start}-{stop - 1}/{size}"))
        entry["status"] = 206 if span is not None else 200
        await send(
            {
                "type": "http.response.start",
                "status": entry["status"],
                "headers": [(key.encode(), value.encode()) for key, value in fields],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})
        entry["sent"] += len(body)


def _if_range_holds(value: str | None, etag: str | None, info: os.stat_result) -> bool:
    """Whether a Range is to be honoured under ``If-Range`` (absent: yes). An entity
    tag must equal the current strong ETag, a date the Last-Modified second."""
    if value is None:
        return True
    value = value.strip()
    if value.startswith(('"', "W/")):
        return etag is not None and value == etag
    return _http_date(value) == info.st_mtime_ns // 10**9


async def _plain(
    send: Send, status: int, text: str, headers: list[tuple[str, str]] | None = None
) -> None:
    body = text.encode()
    fields = [
        *(headers or []),
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(body))),
    ]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(key.encode(), value.encode()) for key, value in fields],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def make_app(state: ServerState, watch_pid: int | None = None) -> Starlette:
    """The Starlette app: objects under ``/o/``, the control API under ``/_control/``."""

    async def body(request: Request) -> dict[str, Any]:
        state.stats.control_requests += 1
        raw = await request.body()
        value = json.loads(raw) if raw else {}
        if not isinstance(value, dict):
            raise ValueError("expected a JSON object")
        return value

    def asker(request: Request) -> tuple[str, int] | None:
        return (request.client.host, request.client.port) if request.client else None

    async def delay(request: Request) -> Response:
        state.delay_ms = float((await body(request))["ms"])
        return JSONResponse({"delay_ms": state.delay_ms})

    async def etag(request: Request) -> Response:
        value = await body(request)
        state.etag = bool(value["enabled"])
        state.weak = bool(value.get("weak", False))
        return JSONResponse({"etag": state.etag, "weak": state.weak})

    async def preconditions(request: Request) -> Response:
        state.preconditions = bool((await body(request))["honoured"])
        return JSONResponse({"preconditions": state.preconditions})

    async def actions(request: Request) -> Response:
        value = await body(request)
        path, on = value.get("path"), value.get("on", "range")
        names = value["actions"]
        unknown = [name for name in names if name not in ACTIONS]
        if unknown or on not in ON or not (path is None or isinstance(path, str)):
            return JSONResponse(
                {"error": f"unknown actions {unknown} or on={on!r}", "actions": sorted(ACTIONS)},
                status_code=400,
            )
        state.actions.extend(Action(name, path, on) for name in names)
        return JSONResponse({"actions_pending": len(state.actions)})

    async def release(request: Request) -> Response:
        await body(request)
        state.release()
        return JSONResponse({"released": True})

    async def stats(request: Request) -> Response:
        state.stats.control_requests += 1
        log = request.query_params.get("log", "1") != "0"
        return JSONResponse(state.snapshot(asker(request), log=log))

    async def reset(request: Request) -> Response:
        await body(request)
        state.reset()
        return JSONResponse({"reset": True})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        with _exit_with(watch_pid, state):
            yield

    return Starlette(
        routes=[
            Route("/o/{name:path}", Objects(state), methods=["GET", "HEAD"]),
            Route("/_control/delay", delay, methods=["POST"]),
            Route("/_control/etag", etag, methods=["POST"]),
            Route("/_control/preconditions", preconditions, methods=["POST"]),
            Route("/_control/actions", actions, methods=["POST"]),
            Route("/_control/release", release, methods=["POST"]),
            Route("/_control/stats", stats, methods=["GET"]),
            Route("/_control/reset", reset, methods=["POST"]),
        ],
        lifespan=lifespan,
    )


@contextlib.contextmanager
def _exit_with(pid: int | None, state: ServerState) -> Iterator[None]:
    """Shut down when process ``pid`` ends (a pidfd in the loop): a test run killed
    by its watchdog, which runs no teardown, leaves no server behind."""
    if pid is None:
        yield
        return

    def gone() -> None:
        if state.server is not None:
            state.server.should_exit = True

    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        gone()
        yield
        return
    loop = asyncio.get_running_loop()
    loop.add_reader(pidfd, gone)
    try:
        yield
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests._http_server", description=__doc__)
    parser.add_argument("--root", required=True, help="directory of the objects")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--delay-ms", type=float, default=0, help="latency of object requests")
    parser.add_argument("--no-etag", action="store_true", help="send Last-Modified only")
    parser.add_argument(
        "--keep-alive",
        type=int,
        default=3600,
        help="seconds an idle connection is kept (long: a client's leaked pool stays visible)",
    )
    parser.add_argument("--exit-with", type=int, help="shut down when this process ends")
    args = parser.parse_args(argv)

    # uvicorn raises the SIGTERM it caught again once it has shut down gracefully;
    # this handler turns that (or one that comes before uvicorn's) into exit status 0.
    signal.signal(signal.SIGTERM, _exit)
    state = ServerState(args.root, delay_ms=args.delay_ms, etag=not args.no_etag)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)
    state.port = sock.getsockname()[1]

    protocol = type("BoundConnection", (Connection,), {"state": state})
    config = uvicorn.Config(
        make_app(state, args.exit_with),
        http=protocol,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_keep_alive=args.keep_alive,
        timeout_graceful_shutdown=3,
    )
    state.server = uvicorn.Server(config)
    host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    print(f"listening http://{host}:{state.port}", flush=True)
    state.server.run(sockets=[sock])


if __name__ == "__main__":
    main()
