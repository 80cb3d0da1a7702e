"""Scenario 10's link: an object store on the far side of a network with a real shape.

:func:`open_link` builds, as root, what a host restoring from S3 or GCS sees:

* a network namespace (the store's side) joined to this one by a veth pair,
  addressed on a private /30, each end's egress shaped to 1 Gbit/s with
  ``tbf`` (the host's link, each way);
* in the namespace, nginx (Debian's) serving a directory from a config of its
  own in a temporary directory, on the namespace's loopback;
* in front of it, in the namespace, a small proxy (this module's ``proxy``
  command) that holds every response until 20 ms after its request arrived and
  paces each connection at 100 MB/s, as one S3 or GCS connection gives. It
  counts the requests and the bytes it sends; :meth:`Link.counters` reads them;
* with ``s3=True``, an S3 store too: ``moto[server]`` in the namespace (its
  signature checks off: the client signs every request all the same), behind
  a second proxy of the same shape, with a bucket ``S3_BUCKET``
  (:meth:`Link.s3_options` reaches it).

:func:`measure_shape` checks that the link has the shape asked for: time to
first byte, one connection's rate, and 16 connections' aggregate.

Everything (processes, namespace, veth) is removed on exit, on an error and on
Ctrl-C (SIGTERM is turned into the same); a namespace left by a run that was
killed outright is removed by the next run.

Kernel facts this module relies on:

* A veth pair is one device with two ends: deleting either end (or the
  namespace that holds one) deletes both.
* ``ip netns del`` only removes the name; the namespace goes when its last
  process has gone, so the processes in it are ended first.
* ``tbf`` shapes a device's egress: shaping both ends shapes the link each
  way. ``netem`` is not built into the kernel this was written on, so the
  first-byte delay is the proxy's job, not the kernel's.
* ``ip netns exec NS PROGRAM`` enters the namespace and then execs PROGRAM,
  so the process started is PROGRAM itself (its pid is the one to signal).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import attrs

ROOT = Path(__file__).parent.parent
PREFIX = "uffdnet"  # namespaces and veth ends are named PREFIX/ufh/ufn + this process's pid
NGINX_PORT = 18080  # on the namespace's loopback
PROXY_PORT = 18081  # on the namespace's end of the veth
MOTO_PORT = 18082  # in the namespace, reached directly (unshaped by the proxy) for uploads
S3_PROXY_PORT = 18083  # on the namespace's end of the veth
S3_BUCKET = "snapshots"
S3_REGION = "us-east-1"
PIECE = 64 << 10  # the proxy's read and paced write size


class LinkUnavailable(RuntimeError):
    """The link cannot be built here: not root, no ``ip``/``tc``/nginx, or a step failed."""


@attrs.frozen(kw_only=True)
class Shape:
    """What the link is asked to be."""

    link_bits: int = 1_000_000_000  # per second, each way
    first_byte_ms: float = 20.0  # before the first byte of every response
    connection_rate: int = 100_000_000  # bytes per second, one connection

    @property
    def link_bytes(self) -> float:
        return self.link_bits / 8

    def describe(self) -> str:
        return (
            f"{self.link_bits / 1e9:g} Gbit/s each way (tbf), {self.first_byte_ms:g} ms to the "
            f"first byte, {self.connection_rate / 1e6:g} MB/s per connection (proxy)"
        )


@attrs.frozen(kw_only=True)
class Link:
    """A running link: the store's URL, and what crossed it."""

    namespace: str
    host_device: str
    store_address: str
    control: Path  # the proxy's Unix socket (namespaces do not separate paths)
    shape: Shape
    proxy_pid: int
    nginx_pid: int
    s3_control: Path | None = None  # the S3 store's proxy (s3=True)

    def url(self, name: str) -> str:
        return f"http://{self.store_address}:{PROXY_PORT}/{name}"

    def s3_options(self, *, direct: bool = False) -> dict[str, str]:
        """ObjectSource options that reach the S3 store: moto through its proxy, or
        ``direct``ly (for uploads: the proxy shapes what comes back, not what goes)."""
        port = MOTO_PORT if direct else S3_PROXY_PORT
        return {
            "endpoint": f"http://{self.store_address}:{port}",
            "region": S3_REGION,
            "access_key_id": "AKIAIOSFODNN7EXAMPLE",
            "secret_access_key": "benchmark",
            "allow_http": "true",
        }

    def counters(self) -> dict[str, Any]:
        """Cumulative: requests and response bytes the proxies saw (both stores'), bytes
        the host's end of the link received (IP packets: headers included), the proxies'
        CPU seconds."""
        total: dict[str, Any] = {"requests": 0, "bytes": 0, "ranges": {}, "proxy_cpu_s": 0.0}
        for control in (self.control, self.s3_control):
            if control is None:
                continue
            proxy = _ask(control)
            for key in ("requests", "bytes", "proxy_cpu_s"):
                total[key] += proxy[key]
            for key, count in proxy["ranges"].items():
                total["ranges"][key] = total["ranges"].get(key, 0) + count
        rx = Path(f"/sys/class/net/{self.host_device}/statistics/rx_bytes").read_text()
        return {**total, "link_bytes": int(rx)}


def _ask(control: Path) -> dict[str, Any]:
    """A proxy's counters, from its control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(control))
        conn.sendall(b"stats\n")
        data = b""
        while piece := conn.recv(4096):
            data += piece
    answer: dict[str, Any] = json.loads(data)
    return answer


def refusal() -> str | None:
    """Why the link cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (a network namespace, a veth pair and tc)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs {' and '.join(missing)} (iproute2): apt-get install -y iproute2"
    return None


def ensure_nginx(say: Callable[[str], None]) -> str:
    """nginx's path; installed with apt-get (as root) when missing, which is said."""
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if Path(found).exists():
        return found
    if shutil.which("apt-get") is None:
        raise LinkUnavailable("needs nginx, and there is no apt-get to install it with")
    say("scenario 10: nginx is missing; installing it as root: apt-get install -y nginx")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "nginx"]):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        if result.returncode != 0:
            raise LinkUnavailable(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(found).exists():
        raise LinkUnavailable("apt-get installed nginx, but no nginx program was found")
    return found


def _ip(*args: str, namespace: str | None = None, check: bool = True) -> str:
    command = ["ip", "netns", "exec", namespace, *args] if namespace else list(args)
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise LinkUnavailable(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Remove the namespaces of earlier runs whose process is gone (killed outright)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    for line in listed.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(PREFIX + r"(\d+)", name)
        if match and not _alive(int(match.group(1))):
            _remove_namespace(name)


def _remove_namespace(name: str) -> None:
    pids = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30
    ).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def _addresses(pid: int) -> tuple[str, str]:
    """A /30 of 10.200.0.0/13 chosen by ``pid``: (the host's end, the store's end)."""
    block = pid % (1 << 17)  # /30 blocks in a /13
    base = (10 << 24) | (200 << 16) | (block << 2)

    def dotted(value: int) -> str:
        return ".".join(str((value >> shift) & 255) for shift in (24, 16, 8, 0))

    return dotted(base + 1), dotted(base + 2)


def _shape(device: str, shape: Shape, namespace: str | None = None) -> None:
    # A burst of 256 KiB: enough for a few GSO packets at 1 Gbit/s (2 ms of traffic).
    _ip(
        "tc", "qdisc", "replace", "dev", device, "root", "tbf",
        "rate", f"{shape.link_bits}bit", "burst", "256kb", "latency", "100ms",
        namespace=namespace,
    )  # fmt: skip


_NGINX_CONF = """\
worker_processes 2;
daemon off;
master_process on;
user root;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 600s;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def _wait_ready(process: subprocess.Popen[bytes], what: str, logs: list[Path]) -> None:
    """Wait for the line "ready" on ``process``'s stdout (it gives up by itself after 15 s)."""
    assert process.stdout is not None
    while line := process.stdout.readline():
        if line.strip() == b"ready":
            return
    _stop(process)
    said = [log.read_text(errors="replace").strip()[-2000:] for log in logs if log.exists()]
    raise LinkUnavailable(f"{what} did not start: " + "\n".join(said))


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, so that it cleans up as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def open_link(
    root: Path, shape: Shape = Shape(), *, say: Callable[[str], None] = print, s3: bool = False
) -> Iterator[Link]:
    """The shaped link, with nginx serving ``root`` behind the proxy (and with ``s3``, an
    S3 store behind another); removed on exit."""
    problem = refusal()
    if problem:
        raise LinkUnavailable(problem)
    nginx = ensure_nginx(say)
    remove_stale()
    pid = os.getpid()
    namespace, host_device, store_device = f"{PREFIX}{pid}", f"ufh{pid}", f"ufn{pid}"
    host_address, store_address = _addresses(pid)
    processes: list[subprocess.Popen[bytes]] = []
    with _sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="uffd-net-") as where:
        work = Path(where)
        try:
            _ip("ip", "netns", "add", namespace)
            _ip("ip", "link", "add", host_device, "type", "veth", "peer", "name", store_device)
            _ip("ip", "link", "set", store_device, "netns", namespace)
            _ip("ip", "addr", "add", f"{host_address}/30", "dev", host_device)
            _ip("ip", "link", "set", host_device, "up")
            _ip(
                "ip", "addr", "add", f"{store_address}/30", "dev", store_device, namespace=namespace
            )
            _ip("ip", "link", "set", store_device, "up", namespace=namespace)
            _ip("ip", "link", "set", "lo", "up", namespace=namespace)
            _shape(host_device, shape)
            _shape(store_device, shape, namespace=namespace)
            for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
                (work / sub).mkdir()
            conf = work / "nginx.conf"
            conf.write_text(_NGINX_CONF.format(work=work, port=NGINX_PORT, root=root.resolve()))
            server = subprocess.Popen(
                ["ip", "netns", "exec", namespace, nginx, "-e", str(work / "nginx-error.log"),
                 "-p", str(work), "-c", str(conf)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
            processes.append(server)
            control = work / "proxy.sock"
            proxy_log = work / "proxy.log"  # a file, not a pipe: nobody reads it while it runs
            with open(proxy_log, "wb") as log:
                proxy = subprocess.Popen(
                    ["ip", "netns", "exec", namespace, sys.executable, "-m", "benchmarks._network",
                     "proxy", store_address, str(PROXY_PORT), str(NGINX_PORT), str(control),
                     str(shape.first_byte_ms), str(shape.connection_rate)],
                    cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                    start_new_session=True,
                )  # fmt: skip
            processes.append(proxy)
            _wait_ready(
                proxy, "the proxy (or nginx behind it)", [proxy_log, work / "nginx-error.log"]
            )
            s3_control = None
            if s3:
                s3_control = work / "s3-proxy.sock"
                processes.extend(_start_s3(namespace, store_address, shape, work, s3_control))
            yield Link(
                namespace=namespace,
                host_device=host_device,
                store_address=store_address,
                control=control,
                shape=shape,
                proxy_pid=proxy.pid,
                nginx_pid=server.pid,
                s3_control=s3_control,
            )
        finally:
            for process in reversed(processes):
                _stop(process)
            _remove_namespace(namespace)
            subprocess.run(["ip", "link", "del", host_device], capture_output=True, timeout=30)


def _start_s3(
    namespace: str, address: str, shape: Shape, work: Path, control: Path
) -> list[subprocess.Popen[bytes]]:
    """moto in the namespace, its proxy in front, and the bucket made (through the proxy)."""
    started: list[subprocess.Popen[bytes]] = []
    with open(work / "moto.log", "wb") as log:
        moto = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-m", "moto.server",
             "-H", "0.0.0.0", "-p", str(MOTO_PORT)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    started.append(moto)
    with open(work / "s3-proxy.log", "wb") as log:
        proxy = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-m", "benchmarks._network",
             "proxy", address, str(S3_PROXY_PORT), str(MOTO_PORT), str(control),
             str(shape.first_byte_ms), str(shape.connection_rate)],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
            start_new_session=True,
        )  # fmt: skip
    started.append(proxy)
    try:
        logs = [work / "s3-proxy.log", work / "moto.log"]
        _wait_ready(proxy, "the S3 proxy (or moto behind it)", logs)
        conn = http.client.HTTPConnection(address, S3_PROXY_PORT, timeout=60)
        conn.request("PUT", f"/{S3_BUCKET}")
        answer = conn.getresponse()
        answer.read()
        conn.close()
        if answer.status != 200:
            raise LinkUnavailable(f"moto did not make the bucket: HTTP {answer.status}")
    except BaseException:
        for process in reversed(started):
            _stop(process)
        raise
    return started


def put_s3(link: Link, key: str, path: Path) -> None:
    """Upload the file ``path`` to the S3 store's bucket as ``key`` (one PUT, unsigned:
    moto checks no signature here), straight to moto."""
    conn = http.client.HTTPConnection(link.store_address, MOTO_PORT, timeout=600)
    with open(path, "rb") as body:
        size = os.fstat(body.fileno()).st_size
        conn.request("PUT", f"/{S3_BUCKET}/{key}", body=body, headers={"Content-Length": str(size)})
        answer = conn.getresponse()
        answer.read()
    conn.close()
    if answer.status != 200:
        raise LinkUnavailable(f"moto refused the upload of {key}: HTTP {answer.status}")


# -- measuring the shape ---------------------------------------------------------


def _get(conn: http.client.HTTPConnection, path: str, first: int, last: int) -> tuple[float, int]:
    """One ranged GET on ``conn``: (seconds to the response's head, body bytes)."""
    began = time.monotonic()
    conn.request("GET", path, headers={"Range": f"bytes={first}-{last}"})
    response = conn.getresponse()
    head = time.monotonic() - began
    if response.status != 206:
        raise LinkUnavailable(f"the store answered {response.status} to a ranged GET of {path}")
    got = 0
    while piece := response.read(1 << 20):
        got += len(piece)
    return head, got


def measure_shape(link: Link, name: str, size: int, *, connections: int = 16) -> dict[str, float]:
    """Time to first byte (median of 5 one-byte GETs), one connection's rate (one GET of
    up to 64 MiB) and ``connections`` connections' aggregate (each a share of the
    object, up to 16 MiB): what the link gives, as the runners see it."""
    path = f"/{name}"

    def connect() -> http.client.HTTPConnection:
        return http.client.HTTPConnection(link.store_address, PROXY_PORT, timeout=60)

    conn = connect()
    heads = [_get(conn, path, 0, 0)[0] for _ in range(5)]
    one = min(size, 64 << 20)
    began = time.monotonic()
    head, got = _get(conn, path, 0, one - 1)
    single = got / (time.monotonic() - began - head)
    conn.close()
    share = min(size // connections, 16 << 20)
    conns = [connect() for _ in range(connections)]
    for c in conns:
        c.connect()
    got_all = [0] * connections

    def fetch(index: int) -> None:
        first = index * share
        got_all[index] = _get(conns[index], path, first, first + share - 1)[1]

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(connections)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.monotonic() - began
    for c in conns:
        c.close()
    return {
        "first_byte_ms": statistics.median(heads) * 1e3,
        "one_connection_mb_s": single / 1e6,
        "connections": connections,
        "aggregate_mb_s": sum(got_all) / took / 1e6,
        "aggregate_mib": sum(got_all) / 2**20,
    }


# -- the proxy (run in the namespace: python -m benchmarks._network proxy ...) -----


@attrs.define
class _Counts:
    """What the proxy saw, since it started."""

    requests: int = 0
    bytes: int = 0
    #: How many times each "FIRST-LAST" byte range was asked for (which chunk, how often).
    ranges: dict[str, int] = attrs.field(factory=dict)


_RANGE = re.compile(rb"\r\nrange:\s*bytes=(\d+-\d+)", re.IGNORECASE)


async def _pump_requests(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    gate: list[float],
    delay: float,
    counts: _Counts,
) -> None:
    """Client to nginx. Each request head (GETs: no bodies) counts, and arms the gate: the
    response may start ``delay`` after it arrived (clients here do not pipeline)."""
    loop = asyncio.get_running_loop()
    pending = b""  # the request head being received
    while data := await reader.read(PIECE):
        *heads, pending = (pending + data).split(b"\r\n\r\n")
        pending = pending[-PIECE:]  # an upload's body is no head: never kept whole
        if heads:
            counts.requests += len(heads)
            gate[0] = loop.time() + delay
            gate[1] = 1.0
        for head in heads:
            found = _RANGE.search(head)
            if found:
                key = found.group(1).decode()
                counts.ranges[key] = counts.ranges.get(key, 0) + 1
        writer.write(data)
        await writer.drain()
    writer.close()


async def _pump_responses(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    gate: list[float],
    rate: float,
    counts: _Counts,
) -> None:
    """nginx to client: held until the gate, then paced at ``rate`` bytes per second."""
    loop = asyncio.get_running_loop()
    started, sent = loop.time(), 0
    while data := await reader.read(PIECE):
        if gate[1]:  # the first bytes of a response
            gate[1] = 0.0
            wait = gate[0] - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            started, sent = loop.time(), 0
        due = started + sent / rate - loop.time()
        if due > 0.001:
            await asyncio.sleep(due)
        writer.write(data)
        sent += len(data)
        counts.bytes += len(data)
        await writer.drain()
    writer.close()


async def _proxy(
    host: str, port: int, upstream: int, control: str, delay: float, rate: float
) -> None:
    counts = _Counts()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            writer.close()
            return
        gate = [0.0, 0.0]
        tasks = [
            asyncio.ensure_future(_pump_requests(reader, up_writer, gate, delay, counts)),
            asyncio.ensure_future(_pump_responses(up_reader, writer, gate, rate, counts)),
        ]
        with contextlib.suppress(OSError):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for stream in (writer, up_writer):
            stream.close()

    async def stats(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        now = {
            "requests": counts.requests,
            "bytes": counts.bytes,
            "ranges": counts.ranges,
            "proxy_cpu_s": usage.ru_utime + usage.ru_stime,
        }
        writer.write(json.dumps(now).encode())
        await writer.drain()
        writer.close()

    deadline = time.monotonic() + 15
    while True:  # nginx is up when it accepts
        try:
            _, probe = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        probe.close()
        break
    server = await asyncio.start_server(connection, host, port, backlog=1024)
    controller = await asyncio.start_unix_server(stats, control)
    print("ready", flush=True)
    async with server, controller:
        await asyncio.Event().wait()


def _proxy_main(argv: list[str]) -> None:
    host, port, upstream, control, delay_ms, rate = argv
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    main = _proxy(host, int(port), int(upstream), control, float(delay_ms) / 1e3, float(rate))
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def shape_lines(shape: Shape, measured: dict[str, float]) -> list[str]:
    """The shape asked for and the shape measured, for the table."""
    return [
        f"   link: {shape.describe()}",
        f"   measured: first byte {measured['first_byte_ms']:.1f} ms (median of 5), one "
        f"connection {measured['one_connection_mb_s']:.0f} MB/s, {measured['connections']:.0f} "
        f"connections {measured['aggregate_mb_s']:.0f} MB/s "
        f"({measured['aggregate_mib']:.0f} MiB)",
    ]


def _main(argv: list[str]) -> Any:
    if argv[:1] == ["proxy"]:
        return _proxy_main(argv[1:])
    raise SystemExit(
        "usage: python -m benchmarks._network proxy HOST PORT UPSTREAM CONTROL MS RATE"
    )


if __name__ == "__main__":
    _main(sys.argv[1:])
