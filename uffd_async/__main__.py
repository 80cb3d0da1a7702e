"""``python -m uffd_async``: ``probe`` (can this user serve page faults here, and how?),
``serve`` (a page-fault handler for other processes, Firecracker's among them), and tools
for working sets and snapshot layers.

``probe`` exits with status 0 when a userfaultfd can be opened, 1 when not (the
output then says exactly what to change). ``serve`` runs until SIGINT (or a
SIGTERM that drains: no new process accepted, those served until they exit,
unless a second signal or ``--drain-timeout`` comes first), then removes its
socket (unless socket activation passed it) and exits with status 0; with 1 when it cannot
start, or when the object behind its URL changed. Every command exits with 2 on
a usage error, said in one line that names the flag.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

import anyio
from anyio.abc import TaskStatus

from ._capture._layer import Layer
from ._capture._squash import check_output, squash
from ._core._abi import PAGE_SIZE, Feature, Ioctl
from ._core._checks import check_seconds
from ._core._errors import InvalidArgument, LayerError, SourceChanged
from ._core._loops import LOOPS, choose_backend, describe_loop
from ._core._open import probe
from ._handoff._fdstore import fd_store_available
from ._handoff._listener import passed_listening_socket
from ._handoff._metrics import MetricsExporter, parse_address
from ._handoff._options import PeerPolicy, ReplayOptions, check_record_path
from ._handoff._server import HandoffServer, HandoffStats, serve_handoffs
from ._handoff._systemd import listen_fds, notify
from ._remote._chunk_cache import HostChunkCache
from ._remote._chunked_source import DEFAULT_READAHEAD_CHUNKS, FetchStats
from ._remote._http_source import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    HttpSource,
    display_url,
    is_url,
    url_problem,
)
from ._remote._object_source import ObjectSource, is_object_url, parse_object_url
from ._remote._open_source import open_source
from ._remote._outage import DEFAULT_SOURCE_DEADLINE, SourcePolicy
from ._remote._pack_format import is_pack_index
from ._remote._pack_source import PackSource
from ._remote._pack_store import is_pack_url
from ._remote._pack_writer import DEFAULT_LEVEL, DEFAULT_UPLOADS, pack_snapshot, summarize
from ._restore._layered import LayeredSnapshot
from ._restore._source import SnapshotSource
from ._restore._working_set import WorkingSet, WorkingSetError

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup


def _flag_names(value: Feature | Ioctl) -> list[str]:
    names = [member.name for member in type(value) if member.name and value & member]
    unknown = int(value) & ~sum(member.value for member in type(value))
    if unknown:
        names.append(f"{unknown:#x}")
    return names


def _probe(args: argparse.Namespace) -> int:
    support = probe()
    if args.json:
        print(
            json.dumps(
                {
                    "available": support.available,
                    "method": support.method.value if support.method else None,
                    "features": _flag_names(support.features),
                    "ioctls": _flag_names(support.ioctls),
                    "reason": support.reason,
                },
                indent=2,
            )
        )
    elif support.available:
        assert support.method is not None
        print(f"userfaultfd: available ({support.method.value})")
        print(f"features: {' '.join(_flag_names(support.features)) or 'none'}")
        print(f"ioctls: {' '.join(_flag_names(support.ioctls))}")
        print(f"note: {support.reason}")
    else:
        print("userfaultfd: NOT available")
        print(f"what to change: {support.reason}")
    return 0 if support.available else 1


# -- serve ----------------------------------------------------------------------


def _progress(
    stats: HandoffStats, elapsed: float, rate: float, http: FetchStats | None = None
) -> str:
    line = (
        f"[{elapsed:8.1f}s] connections {stats.connections} ({stats.active} active, "
        f"{stats.refused} refused, {stats.failed} failed)  faults {stats.faults:,} "
        f"({rate:,.0f}/s)  pages copied {stats.pages:,} ({stats.pages * PAGE_SIZE / 2**20:,.1f} "
        f"MiB)  forks {stats.forks}  errors {stats.errors}"
    )
    if stats.mapped_pages:  # now, of the processes being served: they add up while it runs
        line += (
            f"  resident {stats.populated_pages:,} of {stats.mapped_pages:,} pages "
            f"({stats.populated:.0%})"
        )
    if stats.prefetched or stats.resident:  # so far (the prefetched are in pages copied)
        line += f"  prefetched {stats.prefetched:,}  fully resident {stats.resident}"
        if stats.faults_answered:  # faults the native replay answered: not in faults above
            line += f"  faults answered by the replay {stats.faults_answered:,}"
    if http is not None:
        line += (
            f"  fetched {http.bytes / 2**20:,.1f} MiB in {http.requests:,} requests "
            f"({http.retries} retried, {http.cache_hits:,} cache hits, {http.failed} failed)"
        )
    if stats.over_limit:
        line += f"  refused over --max-peers {stats.over_limit}"
    if stats.draining:
        line += "  draining"
    return line


def _status(server: HandoffServer) -> str:
    """The service manager's STATUS= line."""
    stats = server.stats
    if stats.draining:
        return f"draining: {len(server.peers)} peers"
    return f"serving {stats.active} processes ({stats.served} served, {stats.refused} refused)"


async def _report(server: HandoffServer, interval: float) -> None:
    """A progress line every ``interval`` seconds, when something changed."""
    started = last_time = time.monotonic()
    last = server.stats
    while True:
        await anyio.sleep(interval)
        now, stats = time.monotonic(), server.stats
        if stats != last:
            rate = (stats.faults - last.faults) / (now - last_time)
            line = _progress(stats, now - started, rate, server.http_stats)
            print(line, file=sys.stderr, flush=True)
            notify(f"STATUS={_status(server)}")
        last, last_time = stats, now


async def _serve_until_signalled(args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        host_cache = None
        if args.cache_dir is not None:
            cache = HostChunkCache(args.cache_dir, args.host_cache_size)
            host_cache = stack.enter_context(cache)
        http: dict[str, Any] = {
            "chunk_size": args.chunk_size,
            "concurrency": args.concurrency,
            "chunk_readahead": args.chunk_readahead,
            "timeout": args.http_timeout,
            "retries": args.retries,
            "headers": dict(args.header),
            "cache_bytes": args.cache_size,
            "http2": args.http2,
            "outage": SourcePolicy(on_error=args.on_source_error, deadline=args.source_deadline),
        }
        if host_cache is not None:
            http["host_cache"] = host_cache
        store = dict(args.store_option)
        spec = args.snapshot
        async with open_source(spec, layers=args.layer, http=http, store=store) as source:
            await _serve_source(args, source, _described(spec, source))


def _described(spec: str, source: SnapshotSource) -> str:
    """What the start-up line says is served."""
    if isinstance(source, LayeredSnapshot):
        count = len(source.layers)
        return f"{spec} with {count} layer{'s' if count != 1 else ''} on top"
    if isinstance(source, (HttpSource, ObjectSource)):
        checked = source.validator or "nothing: the server sends no ETag or Last-Modified"
        return (
            f"{source.url} ({source.size:,} bytes, {source.chunk_size // 1024:,} KiB chunks, "
            f"{source.concurrency} at a time, checked by {checked})"
        )
    if isinstance(source, PackSource):
        index = source.index
        zero = sum(1 for n in range(index.count) if index.zero(n))
        return (
            f"{source.path} (a pack: {source.size:,} bytes, {index.count:,} chunks of "
            f"{source.chunk_size // 1024:,} KiB, {zero:,} of them zero)"
        )
    return spec


def _handoff_options(args: argparse.Namespace) -> tuple[PeerPolicy, ReplayOptions]:
    """The handoff server's options, from the flags: built here, once, and handed down."""
    policy = PeerPolicy(
        allowed_uids=args.allow_uid,
        socket_mode=args.socket_mode,
        socket_group=args.socket_group,
        timeout=args.timeout,
        max_peers=args.max_peers,
    )
    replay = ReplayOptions(
        readahead=args.readahead,
        record=args.record,
        prefetch=args.prefetch,
        populate=args.populate == "all",
    )
    return policy, replay


async def _serve_source(args: argparse.Namespace, source: SnapshotSource, described: str) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            policy, replay = _handoff_options(args)
            serving = functools.partial(
                serve_handoffs, args.socket, source, policy=policy, replay=replay,
                listening_socket=args.listening_socket, takeover=args.takeover,
                fd_store=fd_store_available(), stored_fds=getattr(args, "passed_fds", []),
            )  # fmt: skip
            server: HandoffServer = await tg.start(_serve_until_drained, serving, tg.cancel_scope)
            if args.metrics is not None:
                host, port = args.metrics
                try:
                    exporter: MetricsExporter = await tg.start(
                        MetricsExporter(server, host, port, interval=min(args.interval, 1.0)).run
                    )
                except OSError as exc:  # EADDRINUSE above all: say which flag chose it
                    raise OSError(
                        exc.errno, f"--metrics {host}:{port}: cannot listen there: {exc.strerror}"
                    ) from None
                print(
                    f"metrics: http://{host}:{exporter.port}/metrics", file=sys.stderr, flush=True
                )
            print(
                f"serving {described} to processes that hand their uffd over on "
                f"{args.socket} (uids {sorted(server.allowed_uids)}) on {describe_loop()}; "
                "listening",
                file=sys.stderr,
                flush=True,
            )
            notify("READY=1", f"STATUS={_status(server)}")
            tg.start_soon(_report, server, args.interval)
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGTERM and not server.draining:
                    print(
                        f"{name}: stopping: draining: no new process is accepted, the "
                        f"{len(server.peers)} connected are served until they exit (SIGINT or "
                        "another SIGTERM stops at once)",
                        file=sys.stderr,
                        flush=True,
                    )
                    server.drain()
                    notify("STOPPING=1", f"STATUS={_status(server)}")
                    if args.drain_timeout is not None:
                        tg.start_soon(_drain_deadline, server, args.drain_timeout, tg.cancel_scope)
                    continue
                print(f"{name}: stopping", file=sys.stderr, flush=True)
                break
            tg.cancel_scope.cancel()
    final = _progress(server.stats, 0, 0, server.http_stats)
    if server.handed_over:  # a successor (serve --takeover) serves every process from now on
        print("handed over to a successor; " + final.split("] ", 1)[1], file=sys.stderr)
        return
    print("stopped; " + final.split("] ", 1)[1], file=sys.stderr)


async def _serve_until_drained(
    serving: Callable[..., Any],
    scope: anyio.CancelScope,
    *,
    task_status: TaskStatus[HandoffServer] = anyio.TASK_STATUS_IGNORED,
) -> None:
    await serving(task_status=task_status)
    scope.cancel()  # drained: the signals, the progress lines and the metrics end with it


async def _drain_deadline(server: HandoffServer, seconds: float, scope: anyio.CancelScope) -> None:
    await anyio.sleep(seconds)
    left = ", ".join(f"pid {pid}" for pid, _ in server.peers)
    print(
        f"--drain-timeout {seconds:g}: stopping; still served, whose faults are no longer "
        f"answered: {left}",
        file=sys.stderr,
        flush=True,
    )
    scope.cancel()


def _take_passed_socket(args: argparse.Namespace) -> str | None:
    """Take socket activation's fds (once: the environment is cleared); the handoff socket
    becomes ``args.listening_socket``. What is wrong, or None."""
    args.listening_socket, args.passed_fds = passed_listening_socket(listen_fds())
    if args.listening_socket is None:
        return None if args.socket else "--socket is required (no socket activation socket)"
    name = args.listening_socket.getsockname()
    name = name if isinstance(name, str) else "@" + name[1:].decode(errors="replace")
    if args.socket is None:
        args.socket = name
    elif os.path.abspath(args.socket) != os.path.abspath(name):
        return f"--socket {args.socket}, but socket activation passed a socket bound to {name}"
    return None


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request's full URL at INFO: a presigned URL's credentials with it.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        problem = _take_passed_socket(args)
        if problem:
            print(f"cannot serve: {problem}", file=sys.stderr)
            return 1
        backend, options = choose_backend(args.backend)
        anyio.run(_serve_until_signalled, args, backend=backend, backend_options=options)
    except BaseException as exc:
        if _interrupted(exc):  # SIGINT before its handler was in place (trio wraps it)
            print("SIGINT: stopping", file=sys.stderr)
            return 0
        if not isinstance(exc, Exception):
            raise
        while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if isinstance(exc, SourceChanged):  # the server stopped taking processes at once
            print(f"the object changed; restart with the new version ({exc})", file=sys.stderr)
            return 1
        if not isinstance(exc, (OSError, ValueError, ImportError)):
            raise
        print(f"cannot serve: {exc}", file=sys.stderr)  # a bad path, a socket in use, ...
        return 1
    return 0


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is a KeyboardInterrupt, alone or in (nested) exception groups only."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_interrupted(inner) for inner in exc.exceptions)
    return isinstance(exc, KeyboardInterrupt)


def _show_working_set(args: argparse.Namespace) -> int:
    try:
        working_set = WorkingSet.load(args.file)
    except (OSError, WorkingSetError) as exc:
        print(f"cannot read the working set: {exc}", file=sys.stderr)
        return 1
    runs = list(working_set.runs())
    pages = len(working_set.pages)
    snapshot_pages = working_set.snapshot_size // working_set.page_size
    print(f"working set: {args.file} ({os.path.getsize(args.file):,} bytes)")
    mib = pages * working_set.page_size / 2**20
    share = pages / max(snapshot_pages, 1)
    print(
        f"pages: {pages:,} of {working_set.page_size} bytes ({mib:,.1f} MiB, {share:.1%} of "
        f"the snapshot) in {len(runs):,} runs"
    )
    _print_runs(runs, pages, "page+count, in first-touch order")
    print(f"snapshot: {working_set.snapshot_size:,} bytes, identity {working_set.identity.hex()}")
    return 0


def _print_runs(runs: list[tuple[int, int]], pages: int, order: str) -> None:
    if runs:
        longest = max(count for _, count in runs)
        print(f"runs: longest {longest:,} pages, mean {pages / len(runs):,.1f}")
        head = ", ".join(f"{first}+{count}" for first, count in runs[:8])
        more = " ..." if len(runs) > 8 else ""
        print(f"first runs ({order}): {head}{more}")


def _show_layer(args: argparse.Namespace) -> int:
    try:
        with Layer.open(args.file) as layer:
            if args.verify:
                layer.verify()
            runs, pages, size = layer.runs, layer.page_count, layer.page_size
            image_pages = -(-layer.image_size // size)
            print(f"layer: {args.file} ({os.path.getsize(args.file):,} bytes)")
            print(
                f"pages: {pages:,} of {size} bytes ({pages * size / 2**20:,.1f} MiB, "
                f"{pages / image_pages:.1%} of the image) in {len(runs):,} runs"
            )
            _print_runs(list(runs), pages, "page+count")
            print(f"image: {layer.image_size:,} bytes")
            print(f"parent: {layer.parent.hex()}")
            print(f"identity: {layer.identity.hex()}")
            if args.verify:
                print("verified: every page hashes to the identity")
    except (OSError, LayerError) as exc:
        print(f"cannot read the layer: {exc}", file=sys.stderr)
        return 1
    return 0


def _squash(args: argparse.Namespace) -> int:
    try:
        check_output(args.output, args.base, args.layers)
    except InvalidArgument as exc:
        return _usage_error(args, f"argument -o/--output: {exc}")
    try:
        identity = squash(args.base, args.layers, args.output, check=not args.no_check)
    except (OSError, ValueError) as exc:
        print(f"cannot squash: {exc}", file=sys.stderr)
        return 1
    count = len(args.layers)
    print(
        f"squashed {args.base} and {count} layer{'s' if count != 1 else ''} into {args.output} "
        f"({os.path.getsize(args.output):,} bytes, identity {identity.hex()})"
    )
    return 0


def _pack(args: argparse.Namespace) -> int:
    """``pack SNAPSHOT DEST``, or ``pack show INDEX``."""
    if args.snapshot == "show":
        if args.dest is None or args.layer:
            return _usage_error(args, "pack show takes one INDEX and no --layer")
        try:
            summary = summarize(args.dest, options=dict(args.store_option or ()))
        except (OSError, ValueError, ImportError) as exc:
            print(f"cannot read the pack: {exc}", file=sys.stderr)
            return 1
        print("\n".join(summary.lines()))
        return 0
    if args.dest is None:
        return _usage_error(args, "the DEST directory is missing")
    try:
        result = pack_snapshot(
            args.snapshot, args.dest, layers=args.layer, chunk_size=args.chunk_size,
            level=args.level, name=args.name, options=dict(args.store_option or ()),
            uploads=args.uploads,
        )  # fmt: skip
    except (OSError, ValueError, ImportError) as exc:
        print(f"cannot pack: {exc}", file=sys.stderr)
        return 1
    print(
        f"packed {result.size:,} bytes in {result.chunks:,} chunks: {result.zero:,} zero, "
        f"{result.written:,} written ({result.written_bytes:,} bytes), {result.reused:,} "
        "already there",
        file=sys.stderr,
    )
    print(result.index)
    return 0


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 660") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not within 000 to 777")
    return mode


def _group(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _at_least(least: int) -> Callable[[str], int]:
    """A whole number ``>= least``; argparse names the flag in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be {least} or more, not {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    """A duration in seconds, > 0: 0 would mean a busy loop or no time at all."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    try:
        return check_seconds("seconds", value)
    except InvalidArgument:  # argparse names the flag: say the rule in its words
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text!r}") from None


_SIZE = re.compile(r"^(\d+)\s*(|k|kib|m|mib|g|gib)$", re.IGNORECASE)


def _size(text: str) -> int:
    """Bytes, with an optional K/KiB/M/MiB/G/GiB suffix: 1MiB, 512k, 4096."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 1MiB, 512k or 4096")
    unit = match.group(2)[:1].lower()
    return int(match.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[unit]


def _chunk_size(text: str) -> int:
    size = _size(text)
    if size <= 0 or size % PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive multiple of {PAGE_SIZE}")
    return size


def _metrics_address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _read_secret(path: str) -> str:
    """The text of an ``@FILE`` argument (a secret kept out of argv)."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read @{path}: {exc}") from None


def _headers(text: str) -> list[tuple[str, str]]:
    """``'Name: value'``, or ``@FILE``: one such header a line (as ``curl -H @FILE``)."""
    lines = _read_secret(text[1:]).splitlines() if text.startswith("@") else [text]
    headers = []
    for line in filter(str.strip, lines):
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            shown = "a line of " + text if text.startswith("@") else repr(text)
            raise argparse.ArgumentTypeError(f"{shown} is not a header such as 'Name: value'")
        headers.append((name.strip(), value.strip()))
    return headers


def _store_option(text: str) -> tuple[str, str]:
    """``KEY=VALUE``, or ``KEY=@FILE`` (the value is FILE's first line: a secret kept out
    of argv). An error never shows the value."""
    key, equals, value = text.partition("=")
    key = key.strip()
    if not equals or not key or not key.replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(
            f"{key[:40]!r}... is not KEY=VALUE (VALUE not shown)"
            if equals
            else "not KEY=VALUE (the text is not shown: it may be a secret)"
        )
    if value.startswith("@"):
        lines = _read_secret(value[1:]).strip().splitlines()
        if not lines:
            raise argparse.ArgumentTypeError(f"{key}={value}: the file is empty")
        value = lines[0].strip()
    return key.lower(), value


#: SNAPSHOT left out: the URL (or path) is read from this variable, out of argv.
URL_ENV = "UFFD_ASYNC_URL"
#: Options of an HTTP source only: given with a file, they are refused, not ignored.
_HTTP_ONLY = {
    "chunk_size": DEFAULT_CHUNK_SIZE,
    "concurrency": DEFAULT_CONCURRENCY,
    "chunk_readahead": DEFAULT_READAHEAD_CHUNKS,
    "retries": DEFAULT_RETRIES,
    "http_timeout": DEFAULT_TIMEOUT,
    "header": [],
    "cache_size": DEFAULT_CACHE_BYTES,
    "cache_dir": None,
    "http2": False,
}
#: Of those, what a pack in a local directory takes too.
_PACK_TOO = {"cache_size", "cache_dir", "concurrency", "chunk_readahead"}
#: The host chunk cache's bound when --cache-dir is given without --cache-size.
DEFAULT_HOST_CACHE_BYTES = 4 << 30


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the usage itself is one ``--help`` away), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _usage_error(args: argparse.Namespace, message: str) -> int:
    print(f"{args.prog}: error: {message} (see --help)", file=sys.stderr)
    return 2


def _check_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse alone cannot check, before anything is opened: each error names its flag."""
    if args.socket is None and not os.environ.get("LISTEN_FDS"):
        parser.error("argument --socket: required (unless started by socket activation)")
    if args.snapshot is None:
        args.snapshot = os.environ.get(URL_ENV, "").strip()
        if not args.snapshot:
            parser.error(f"the SNAPSHOT is missing: give it, as @FILE, or in ${URL_ENV}")
    elif args.snapshot.startswith("@"):
        try:
            lines = _read_secret(args.snapshot[1:]).strip().splitlines()
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument SNAPSHOT: {exc}")
        if not lines:
            parser.error(f"argument SNAPSHOT: {args.snapshot} is empty")
        args.snapshot = lines[0].strip()
    args.header = [header for given in args.header or () for header in given]
    args.store_option = args.store_option or []
    if args.store_option and not is_object_url(args.snapshot):
        parser.error(
            "argument --store-option: applies only when SNAPSHOT is an s3://, gs:// or az:// URL"
        )
    if is_object_url(args.snapshot):
        try:
            parse_object_url(args.snapshot)
        except InvalidArgument as exc:
            parser.error(f"argument SNAPSHOT: {exc.strerror}")
        for flag, value in (("--header", args.header), ("--http2", args.http2)):
            if value:
                parser.error(f"argument {flag}: applies only when SNAPSHOT is an http(s):// URL")
        if args.layer:
            parser.error("argument --layer: needs SNAPSHOT to be a file, not a URL")
        if args.readahead:
            parser.error(
                "argument --readahead: does not apply to a URL (a fault brings its whole "
                "chunk): choose --chunk-size (and --chunk-readahead) instead"
            )
        if is_pack_url(args.snapshot) and args.chunk_size is not None:
            parser.error("argument --chunk-size: a pack's chunks are the size its index says")
    elif is_url(args.snapshot):
        problem = url_problem(args.snapshot)
        if problem:
            parser.error(f"argument SNAPSHOT: {display_url(args.snapshot)!r} {problem}")
        if args.layer:
            parser.error("argument --layer: needs SNAPSHOT to be a file, not a URL")
        if args.readahead:
            parser.error(
                "argument --readahead: does not apply to a URL (a fault brings its whole "
                "chunk): choose --chunk-size (and --chunk-readahead) instead"
            )
    else:
        pack = is_pack_index(args.snapshot)
        for name in _HTTP_ONLY:
            if getattr(args, name) not in (None, []) and not (pack and name in _PACK_TOO):
                flag = "--" + name.replace("_", "-")
                parser.error(f"argument {flag}: applies only when SNAPSHOT is an http(s):// URL")
        for flag, value in (("--on-source-error", args.on_source_error),
                            ("--source-deadline", args.source_deadline)):  # fmt: skip
            if value is not None and not pack:
                parser.error(
                    f"argument {flag}: applies only when SNAPSHOT is a URL or a pack index "
                    "(a snapshot file is not fetched: it cannot fail that way)"
                )
    if args.source_deadline is not None and args.on_source_error == "poison":
        parser.error("argument --source-deadline: applies with --on-source-error wait only")
    args.on_source_error = args.on_source_error or "wait"
    args.source_deadline = args.source_deadline or DEFAULT_SOURCE_DEADLINE
    args.host_cache_size = None
    if args.cache_dir is not None:  # --cache-size bounds the host cache then
        given = args.cache_size
        args.host_cache_size = DEFAULT_HOST_CACHE_BYTES if given is None else given
        args.cache_size = None  # and the in-memory one keeps its default
    for name, default in _HTTP_ONLY.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.record is not None:
        if args.readahead:
            parser.error(
                "argument --record: needs --readahead 0 (pages readahead brings in never "
                "fault, so they would be missing from the working set)"
            )
        try:
            check_record_path(args.record)
        except InvalidArgument as exc:
            parser.error(f"argument --record: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m uffd_async", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    probe_parser = commands.add_parser("probe", help="check whether and how userfaultfd works here")
    probe_parser.add_argument("--json", action="store_true", help="machine-readable output")
    probe_parser.set_defaults(run=_probe)
    serve_parser = commands.add_parser(
        "serve",
        help="serve a snapshot file to every process that hands its uffd over a Unix socket",
        description="Serve the page faults of every process that connects to SOCKET and sends "
        "its userfaultfd with Firecracker's JSON mappings, from the SNAPSHOT file (the "
        "mappings' offsets are positions in it). Stops on SIGINT; SIGTERM drains first: no "
        "new process is accepted and those connected are served until they exit (a second "
        "signal, or --drain-timeout, stops at once). Under socket activation (systemd, "
        "systemd-socket-activate) it serves on the passed socket and says READY=1. Secrets stay "
        "out of the command line, which every local user can read: give a presigned URL "
        f"as @FILE (the URL is FILE's first line) or in ${URL_ENV} (SNAPSHOT left out), "
        "and headers as --header @FILE. If the object behind a URL changes, no new process "
        "is accepted (the socket is removed), those being served are served until they "
        "exit (a page that still needs fetching gets SIGBUS, never another version's "
        "bytes), and serve exits with status 1: restart it with the new version.",
    )
    serve_parser.add_argument(
        "snapshot",
        metavar="SNAPSHOT",
        nargs="?",
        help="the memory snapshot: a file, an http:// or https:// URL (S3, GCS or MinIO, "
        "presigned or public) read by Range requests a chunk at a time, or an object in a "
        "cloud's store with its credentials (s3://BUCKET/KEY, gs://BUCKET/KEY, "
        "az://CONTAINER/BLOB; needs uffd_async[objectstore]); @FILE reads it from "
        f"FILE's first line; left out, it is read from ${URL_ENV}",
    )
    serve_parser.add_argument(
        "--socket",
        metavar="PATH",
        help="the Unix socket path to listen on (left out under socket activation: the "
        "passed socket named 'handoff', or the only one)",
    )
    serve_parser.add_argument(
        "--layer",
        action="append",
        metavar="LAYER",
        help="a layer file on top of SNAPSHOT (repeatable, oldest first; the newest holding "
        "a page wins); each must apply on top of what is below it",
    )
    serve_parser.add_argument(
        "--allow-uid",
        type=_at_least(0),
        action="append",
        metavar="UID",
        help="a uid peers may run as besides this process's own effective uid (repeatable): "
        "the uid a jailed Firecracker runs as",
    )
    serve_parser.add_argument(
        "--socket-mode",
        type=_octal_mode,
        metavar="MODE",
        help="the socket file's permission bits, in octal, e.g. 660 (default: from the umask, "
        "which lets only this user connect)",
    )
    serve_parser.add_argument(
        "--socket-group",
        type=_group,
        metavar="GROUP",
        help="the socket file's group (a name or a gid), e.g. the jailed Firecracker's",
    )
    serve_parser.add_argument(
        "--readahead",
        type=_at_least(0),
        metavar="PAGES",
        default=0,
        help="pages copied past each fault (default 0; snapshot files only)",
    )
    serve_parser.add_argument(
        "--record",
        metavar="WS_FILE",
        help="save the snapshot pages the processes fault on (a working set) to WS_FILE "
        "(written when a process's handoff ends and on exit; needs --readahead 0; its "
        "directory must exist; a set recorded for another snapshot is not overwritten)",
    )
    serve_parser.add_argument(
        "--prefetch",
        metavar="WS_FILE",
        help="copy that working set into each process ahead of its faults, demand faults "
        "first (with --record: the recording adds what the replay missed)",
    )
    serve_parser.add_argument(
        "--populate",
        choices=["all"],
        help="after the working set, copy in every other page too, so that each process "
        "becomes fully resident",
    )
    http = serve_parser.add_argument_group(
        "remote snapshots (SNAPSHOT is a URL; refused with a file)"
    )
    http.add_argument(
        "--chunk-size",
        type=_chunk_size,
        metavar="SIZE",
        help="bytes per request; a fault brings its whole chunk (default 1MiB)",
    )
    http.add_argument(
        "--concurrency",
        type=_at_least(1),
        metavar="N",
        help=f"requests at once (default {DEFAULT_CONCURRENCY})",
    )
    http.add_argument(
        "--chunk-readahead",
        type=_at_least(0),
        metavar="CHUNKS",
        help="chunks fetched ahead of faults that walk the chunks in order, so that one "
        f"thread reading in order is not one request at a time (default "
        f"{DEFAULT_READAHEAD_CHUNKS}; 0: none; --readahead is pages, for files only)",
    )
    http.add_argument(
        "--retries",
        type=_at_least(0),
        metavar="N",
        help="tries after the first for connection errors, timeouts, 5xx (default 5)",
    )
    http.add_argument(
        "--http-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="seconds to connect, and for each read (default 30)",
    )
    http.add_argument(
        "--header",
        type=_headers,
        action="append",
        metavar="'NAME: VALUE'",
        help="a header sent with every request, e.g. 'Authorization: Bearer ...' (repeatable); "
        "@FILE: one header a line from FILE, which keeps a secret out of the command line",
    )
    http.add_argument(
        "--cache-size",
        type=_size,
        metavar="SIZE",
        help="recent chunks kept for fork children and other processes (default 64MiB); "
        "with --cache-dir, the host chunk cache's bound (default 4GiB)",
    )
    http.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="a host chunk cache in DIR, shared by every serving process of this host and "
        "kept across restarts (chunks keyed by the object's version, checked on every read, "
        "least recently used evicted); --cache-size then bounds it (default 4GiB)",
    )
    http.add_argument(
        "--http2", action="store_true", default=None, help="HTTP/2 (needs uffd_async[http2])"
    )
    http.add_argument(
        "--on-source-error",
        choices=["wait", "poison"],
        help="what a fault does when its chunk still cannot be fetched after --retries "
        "(a connection error, a timeout, a 5xx; a pack's I/O error): wait (the default: its "
        "thread waits while the source is tried again, with backoff, until "
        "--source-deadline, then its page is poisoned: SIGBUS) or poison (SIGBUS at once). "
        "A 4xx, a changed object or a damaged chunk is never waited on",
    )
    http.add_argument(
        "--source-deadline",
        type=_seconds,
        metavar="SECONDS",
        help=f"seconds a fault waits on a failing source before its page is poisoned "
        f"(default {DEFAULT_SOURCE_DEADLINE:g}: a store's failover or an NFS restart fits)",
    )
    http.add_argument(
        "--store-option",
        type=_store_option,
        action="append",
        metavar="KEY=VALUE",
        help="a setting of an s3://, gs:// or az:// SNAPSHOT's store, by obstore's name "
        "(repeatable), e.g. endpoint=http://127.0.0.1:9000, region=eu-west-1, "
        "allow_http=true; KEY=@FILE reads the value from FILE (for a secret). Credentials "
        "otherwise come from the environment, as each cloud's tools read them "
        "(AWS_*, GOOGLE_*, AZURE_*); values are never shown",
    )
    serve_parser.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        default=5.0,
        help="seconds a connected peer has to send its uffd (default 5)",
    )
    serve_parser.add_argument(
        "--max-peers",
        type=_at_least(1),
        metavar="N",
        help="processes served at once; one more is refused with a warning and its "
        "connection closed (default: no limit)",
    )
    serve_parser.add_argument(
        "--takeover",
        action="store_true",
        help="take over from the server running on --socket: its listening socket, every "
        "process it serves and its counters and recording come over, with no fault lost or "
        "left waiting; it then exits 0 (same user only)",
    )
    serve_parser.add_argument(
        "--drain-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="after SIGTERM, stop at once if processes are still served after this long "
        "(default: wait for them all)",
    )
    serve_parser.add_argument(
        "--interval",
        type=_seconds,
        metavar="SECONDS",
        default=1.0,
        help="seconds between progress lines, more than 0 (default 1)",
    )
    serve_parser.add_argument(
        "--backend",
        choices=LOOPS,
        default="auto",
        help="the event loop: auto (asyncio on uvloop when installed, else asyncio), asyncio, "
        "uvloop (asyncio+uvloop; needs uffd_async[uvloop]) or trio",
    )
    serve_parser.add_argument(
        "--metrics",
        type=_metrics_address,
        metavar="HOST:PORT",
        help="serve Prometheus metrics there (needs uffd_async[metrics]); off by default",
    )
    serve_parser.add_argument(
        "--quiet", action="store_true", help="log only warnings and errors, not connections"
    )
    serve_parser.set_defaults(run=_serve)
    ws_parser = commands.add_parser("working-set", help="inspect a working-set file")
    ws_commands = ws_parser.add_subparsers(dest="ws_command", required=True)
    show_parser = ws_commands.add_parser("show", help="its size, pages, runs and snapshot")
    show_parser.add_argument("file", metavar="WS_FILE")
    show_parser.set_defaults(run=_show_working_set)
    layers_parser = commands.add_parser("layers", help="inspect and squash snapshot layers")
    layers_commands = layers_parser.add_subparsers(dest="layers_command", required=True)
    layer_show = layers_commands.add_parser(
        "show", help="its pages, runs, sizes, parent and identity"
    )
    layer_show.add_argument("file", metavar="LAYER")
    layer_show.add_argument(
        "--verify", action="store_true", help="also read every page and check the identity"
    )
    layer_show.set_defaults(run=_show_layer)
    squash_parser = layers_commands.add_parser(
        "squash",
        help="write the full image a base and its layers make",
        description="Write the image BASE and its LAYERs (oldest first) make to OUT, "
        "atomically, as one full snapshot file.",
    )
    squash_parser.add_argument("base", metavar="BASE")
    squash_parser.add_argument("layers", nargs="+", metavar="LAYER")
    squash_parser.add_argument("-o", "--output", required=True, metavar="OUT")
    squash_parser.add_argument(
        "--no-check",
        action="store_true",
        help="do not check that each layer applies on top of what is below it",
    )
    squash_parser.set_defaults(run=_squash)
    pack_parser = commands.add_parser(
        "pack",
        help="write a snapshot as zstd chunks named by their digest, or show a pack",
        description="pack SNAPSHOT DEST: write SNAPSHOT (a raw image file, with --layer "
        "files on top) into DEST (a directory, or an object-store prefix such as "
        "s3://BUCKET/PREFIX/, gs://, az://) as an index, DEST/NAME.index, and zstd "
        "chunks, DEST/chunks/<sha256>, that every index in DEST shares: a chunk DEST has "
        "already is not written again, and an all-zero chunk is not stored. The last "
        "line printed is the index's path or URL; serve it with `serve INDEX`. "
        "pack show INDEX: its sizes, chunk counts, dedup and compression ratios.",
    )
    pack_parser.add_argument("snapshot", metavar="SNAPSHOT|show")
    pack_parser.add_argument("dest", nargs="?", metavar="DEST|INDEX")
    pack_parser.add_argument(
        "--layer", action="append", default=[], metavar="LAYER",
        help="a layer file on top of SNAPSHOT (repeat, oldest first)",
    )  # fmt: skip
    pack_parser.add_argument(
        "--chunk-size", type=_chunk_size, default=DEFAULT_CHUNK_SIZE, metavar="BYTES",
        help="bytes per chunk, a multiple of the page size (default 1MiB)",
    )  # fmt: skip
    pack_parser.add_argument(
        "--level", type=int, default=DEFAULT_LEVEL, choices=range(-7, 23), metavar="L",
        help=f"zstd level, -7..22 (default {DEFAULT_LEVEL})",
    )  # fmt: skip
    pack_parser.add_argument("--name", help="the index's NAME (default: the SNAPSHOT file's name)")
    pack_parser.add_argument(
        "--uploads", type=int, default=DEFAULT_UPLOADS, choices=range(1, 257), metavar="N",
        help=f"chunks written at once (default {DEFAULT_UPLOADS})",
    )  # fmt: skip
    pack_parser.add_argument(
        "--store-option", type=_store_option, action="append", metavar="KEY=VALUE",
        help="a setting of an s3://, gs:// or az:// DEST's (or INDEX's) store, as serve's "
        "--store-option (repeatable; KEY=@FILE reads the value from FILE; never shown)",
    )  # fmt: skip
    pack_parser.set_defaults(run=_pack)
    args = parser.parse_args(argv)
    if args.run is _serve:
        _check_serve(serve_parser, args)
    args.prog = {
        _serve: serve_parser.prog,
        _squash: squash_parser.prog,
        _pack: pack_parser.prog,
    }.get(args.run, parser.prog)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
