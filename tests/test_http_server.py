"""The loopback HTTP object server HttpSource is tested against (tests/_http_server.py),
checked from a real httpx client: if the server got ranges, validators or its
misbehaviours wrong, HttpSource's tests would prove nothing."""

from __future__ import annotations

import email.utils
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from ._support import TIMEOUT, HttpObjectServer, source_bytes, start_http_server

DATA = source_bytes(3)
SIZE = len(DATA)
#: Spans several of the server's 1 MiB body pieces, and ends inside one.
BIG = source_bytes(640) + b"tail"


def connect(timeout: float = TIMEOUT) -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=timeout)


def ranged(client: httpx.Client, url: str, header: str, **headers: str) -> httpx.Response:
    return client.get(url, headers={"Range": header, **headers})


def validators(path: Path) -> tuple[str, str]:
    info = os.stat(path)
    etag = f'"{info.st_size:x}-{info.st_mtime_ns:x}-{info.st_ino:x}"'
    return etag, email.utils.formatdate(info.st_mtime_ns // 10**9, usegmt=True)


def earlier(http_date: str, seconds: int = 1) -> str:
    when = email.utils.parsedate_to_datetime(http_date).timestamp() - seconds
    return email.utils.formatdate(when, usegmt=True)


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [
        ("bytes=0-0", 0, 1),
        ("bytes=10-4105", 10, 4106),
        ("bytes=12000-", 12000, SIZE),
        ("bytes=-100", SIZE - 100, SIZE),
        ("bytes=12000-99999", 12000, SIZE),  # the end is clamped to the object
        ("bytes=-99999", 0, SIZE),  # so is a suffix
        ("bytes=0-12287", 0, SIZE),
    ],
)
def test_range(http_server: HttpObjectServer, header: str, start: int, stop: int) -> None:
    path = http_server.put("snapshot.mem", DATA)
    with connect() as client:
        response = ranged(client, http_server.url("snapshot.mem"), header)
    assert response.status_code == 206
    assert response.content == DATA[start:stop]
    assert response.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{SIZE}"
    assert response.headers["Content-Length"] == str(stop - start)
    assert response.headers["Accept-Ranges"] == "bytes"
    etag, last_modified = validators(path)
    assert response.headers["ETag"] == etag
    assert response.headers["Last-Modified"] == last_modified


def test_whole_object_and_ranges_across_pieces(http_server: HttpObjectServer) -> None:
    http_server.put("big", BIG)
    with connect() as client:
        whole = client.get(http_server.url("big"))
        assert whole.status_code == 200
        assert whole.headers["Content-Length"] == str(len(BIG))
        assert "Content-Range" not in whole.headers
        assert whole.content == BIG
        part = ranged(client, http_server.url("big"), "bytes=1048000-2097500")
        assert part.status_code == 206
        assert part.content == BIG[1048000:2097501]
        tail = ranged(client, http_server.url("big"), "bytes=-5")
        assert tail.content == BIG[-5:]


@pytest.mark.parametrize("header", ["bytes=12288-", "bytes=12288-20000", "bytes=-0"])
def test_unsatisfiable_range(http_server: HttpObjectServer, header: str) -> None:
    http_server.put("snapshot.mem", DATA)
    with connect() as client:
        response = ranged(client, http_server.url("snapshot.mem"), header)
    assert response.status_code == 416
    assert response.headers["Content-Range"] == f"bytes */{SIZE}"
    assert "ETag" in response.headers


@pytest.mark.parametrize("header", ["bytes=0-0", "bytes=-1", "bytes=0-"])
def test_nothing_to_range_over_in_an_empty_object(
    http_server: HttpObjectServer, header: str
) -> None:
    http_server.put("empty", b"")
    with connect() as client:
        assert ranged(client, http_server.url("empty"), header).status_code == 416
        whole = client.get(http_server.url("empty"))
    assert (whole.status_code, whole.content) == (200, b"")


@pytest.mark.parametrize(
    "header", ["bytes=9-5", "bytes=0-1,4-5", "items=0-1", "bytes=x-y", "bytes=-", "bytes=1"]
)
def test_ignored_range_gets_the_whole_object(http_server: HttpObjectServer, header: str) -> None:
    """Bad syntax, other units and multiple ranges are ignored, as RFC 9110 allows."""
    http_server.put("snapshot.mem", DATA)
    with connect() as client:
        response = ranged(client, http_server.url("snapshot.mem"), header)
    assert response.status_code == 200
    assert response.content == DATA


def test_head_gives_size_and_validators(http_server: HttpObjectServer) -> None:
    path = http_server.put("snapshot.mem", DATA)
    with connect() as client:
        head = client.head(http_server.url("snapshot.mem"))
        head_ranged = client.head(http_server.url("snapshot.mem"), headers={"Range": "bytes=0-0"})
    assert head.status_code == head_ranged.status_code == 200
    assert head.headers["Content-Length"] == str(SIZE)
    assert head.content == b""
    assert (head.headers["ETag"], head.headers["Last-Modified"]) == validators(path)


def test_missing_object(http_server: HttpObjectServer) -> None:
    with connect() as client:
        assert client.get(http_server.url("nothing")).status_code == 404
        assert ranged(client, http_server.url("nothing"), "bytes=0-0").status_code == 404


def test_if_match(http_server: HttpObjectServer) -> None:
    http_server.put("snapshot.mem", DATA)
    url = http_server.url("snapshot.mem")
    with connect() as client:
        etag = client.head(url).headers["ETag"]
        for matching in (etag, "*", f'"other", {etag}'):
            assert ranged(client, url, "bytes=0-9", **{"If-Match": matching}).status_code == 206
        for failing in ('"other"', f"W/{etag}"):  # a weak tag never matches strongly
            assert ranged(client, url, "bytes=0-9", **{"If-Match": failing}).status_code == 412


def test_replace_changes_the_validators(http_server: HttpObjectServer) -> None:
    http_server.put("snapshot.mem", DATA)
    url = http_server.url("snapshot.mem")
    with connect() as client:
        before = client.head(url).headers
        http_server.queue("replace")
        refused = ranged(client, url, "bytes=0-9", **{"If-Match": before["ETag"]})
        assert refused.status_code == 412
        assert refused.headers["ETag"] != before["ETag"]
        after = client.head(url).headers
        assert after["ETag"] == refused.headers["ETag"]
        assert email.utils.parsedate_to_datetime(
            after["Last-Modified"]
        ) > email.utils.parsedate_to_datetime(before["Last-Modified"])
        old_date = {"If-Unmodified-Since": before["Last-Modified"]}
        assert ranged(client, url, "bytes=0-9", **old_date).status_code == 412
        assert client.get(url).content == bytes(255 - byte for byte in DATA)
    assert http_server.stats()["log"][1]["action"] == "replace"


def test_if_unmodified_since(http_server: HttpObjectServer) -> None:
    http_server.put("snapshot.mem", DATA)
    url = http_server.url("snapshot.mem")
    with connect() as client:
        modified = client.head(url).headers["Last-Modified"]
        assert (
            ranged(client, url, "bytes=0-9", **{"If-Unmodified-Since": modified}).status_code == 206
        )
        before = {"If-Unmodified-Since": earlier(modified)}
        assert ranged(client, url, "bytes=0-9", **before).status_code == 412
        # An unreadable date is ignored; If-Match, when present, is what counts.
        garbled = {"If-Unmodified-Since": "yesterday"}
        assert ranged(client, url, "bytes=0-9", **garbled).status_code == 206
        assert ranged(client, url, "bytes=0-9", **before, **{"If-Match": "*"}).status_code == 206


def test_without_etags(http_server: HttpObjectServer) -> None:
    """The fallback validator: Last-Modified only."""
    http_server.put("snapshot.mem", DATA)
    url = http_server.url("snapshot.mem")
    with connect() as client:
        etag = client.head(url).headers["ETag"]
        http_server.etag(False)
        response = ranged(client, url, "bytes=0-9")
        assert response.status_code == 206
        assert "ETag" not in response.headers
        modified = response.headers["Last-Modified"]
        assert ranged(client, url, "bytes=0-9", **{"If-Match": etag}).status_code == 412
        assert (
            ranged(client, url, "bytes=0-9", **{"If-Unmodified-Since": modified}).status_code == 206
        )
        assert http_server.stats()["etag"] is False
        http_server.reset()
        assert client.head(url).headers["ETag"] == etag


def test_if_range(http_server: HttpObjectServer) -> None:
    http_server.put("snapshot.mem", DATA)
    url = http_server.url("snapshot.mem")
    with connect() as client:
        headers = client.head(url).headers
        etag, modified = headers["ETag"], headers["Last-Modified"]
        assert ranged(client, url, "bytes=0-9", **{"If-Range": etag}).status_code == 206
        assert ranged(client, url, "bytes=0-9", **{"If-Range": modified}).status_code == 206
        for stale in ('"other"', earlier(modified)):
            response = ranged(client, url, "bytes=0-9", **{"If-Range": stale})
            assert (response.status_code, response.content) == (200, DATA)


@pytest.mark.parametrize("status", [500, 503, 403])
def test_error_actions(http_server: HttpObjectServer, status: int) -> None:
    http_server.put("snapshot.mem", DATA)
    http_server.queue(str(status))
    with connect() as client:
        assert ranged(client, http_server.url("snapshot.mem"), "bytes=0-9").status_code == status
        assert ranged(client, http_server.url("snapshot.mem"), "bytes=0-9").status_code == 206
    first = http_server.stats()["ranges"][0]
    assert (first["action"], first["status"], first["start"], first["stop"]) == (
        str(status),
        status,
        0,
        10,
    )


def test_drop(http_server: HttpObjectServer) -> None:
    http_server.put("snapshot.mem", DATA)
    url = http_server.url("snapshot.mem")
    with connect() as client:
        assert ranged(client, url, "bytes=0-0").status_code == 206  # a pooled connection
        http_server.queue("drop")
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            ranged(client, url, "bytes=0-9")
        assert ranged(client, url, "bytes=0-9").content == DATA[:10]
    stats = http_server.wait_idle()
    assert stats["statuses"] == {"206": 2, "none": 1}
    assert stats["connections_total"] == 2  # the dropped one, then a new one


def test_full(http_server: HttpObjectServer) -> None:
    http_server.put("snapshot.mem", DATA)
    http_server.queue("full")
    with connect() as client:
        response = ranged(client, http_server.url("snapshot.mem"), "bytes=100-199")
    assert response.status_code == 200
    assert "Content-Range" not in response.headers
    assert response.content == DATA


def test_short(http_server: HttpObjectServer) -> None:
    http_server.put("big", BIG)
    http_server.queue("short")
    received = b""
    with connect() as client:
        with client.stream("GET", http_server.url("big"), headers={"Range": "bytes=10-"}) as r:
            assert r.status_code == 206
            assert r.headers["Content-Range"] == f"bytes 10-{len(BIG) - 1}/{len(BIG)}"
            assert r.headers["Content-Length"] == str(len(BIG) - 10)
            with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
                for piece in r.iter_raw():
                    received += piece
        # The client goes on, on a new connection.
        assert ranged(client, http_server.url("big"), "bytes=0-0").status_code == 206
    half = (len(BIG) - 10) // 2
    assert received == BIG[10 : 10 + half]
    assert http_server.stats()["ranges"][0]["sent"] == half


def test_short_declared(http_server: HttpObjectServer) -> None:
    http_server.put("snapshot.mem", DATA)
    http_server.queue("short_declared", "short_declared")
    with connect() as client:
        response = ranged(client, http_server.url("snapshot.mem"), "bytes=100-1099")
        one_byte = ranged(client, http_server.url("snapshot.mem"), "bytes=7-7")
    assert response.status_code == 206
    assert response.headers["Content-Range"] == f"bytes 100-599/{SIZE}"
    assert response.headers["Content-Length"] == "500"
    assert response.content == DATA[100:600]
    assert (one_byte.status_code, one_byte.content) == (206, DATA[7:8])  # cannot be halved


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [
        ("bytes=100-1099", 1100, 2100),  # the next range
        (f"bytes={SIZE - 1000}-", SIZE - 2000, SIZE - 1000),  # the previous one
        ("bytes=0-8191", SIZE - 8192, SIZE),  # neither fits: the tail
        ("bytes=0-", 1, SIZE),  # the whole object: one byte shorter
    ],
)
def test_wrong_range(http_server: HttpObjectServer, header: str, start: int, stop: int) -> None:
    http_server.put("snapshot.mem", DATA)
    http_server.queue("wrong_range")
    with connect() as client:
        response = ranged(client, http_server.url("snapshot.mem"), header)
    assert response.status_code == 206
    assert response.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{SIZE}"
    assert response.content == DATA[start:stop]


def test_which_requests_take_actions(http_server: HttpObjectServer) -> None:
    """By default only a ranged GET takes an action; ``on="any"`` lets any object
    request take it; ``path`` keeps it for one object; FIFO among those that apply."""
    http_server.put("a", DATA)
    http_server.put("b", DATA)
    http_server.queue("500", path="b")
    http_server.queue("503", "403")
    with connect() as client:

        def status(method: str, name: str, header: str | None = None) -> int:
            headers = {"Range": header} if header else {}
            return client.request(method, http_server.url(name), headers=headers).status_code

        assert status("HEAD", "a") == 200
        assert status("GET", "a") == 200
        assert status("GET", "a", "bytes=0-0") == 503
        assert status("GET", "b", "bytes=0-0") == 500
        assert status("GET", "b", "bytes=0-0") == 403
        assert status("GET", "a", "bytes=0-0") == 206
        http_server.queue("503", on="any")
        assert status("HEAD", "a") == 503
        http_server.queue("full", "short_declared", on="any")
        assert status("HEAD", "a") == 200  # a HEAD takes it, answered as usual
        assert status("HEAD", "a", "bytes=0-9") == 200
    assert http_server.stats()["actions_pending"] == []


def test_bad_actions_are_refused(http_server: HttpObjectServer) -> None:
    with pytest.raises(AssertionError, match="400"):
        http_server.queue("explode")
    with pytest.raises(AssertionError, match="400"):
        http_server.queue("500", on="sometimes")
    assert http_server.stats()["actions_pending"] == []


def test_delay_is_applied_to_concurrent_requests_together(http_server: HttpObjectServer) -> None:
    http_server.put("snapshot.mem", DATA)
    http_server.delay(300)
    url = http_server.url("snapshot.mem")
    with connect() as client:
        began = time.monotonic()
        assert ranged(client, url, "bytes=0-0").status_code == 206
        assert time.monotonic() - began >= 0.29  # a lower bound: never early
        with ThreadPoolExecutor(8) as pool:
            headers = [f"bytes={i * 100}-{i * 100 + 99}" for i in range(8)]
            responses = list(pool.map(lambda header: ranged(client, url, header), headers))
    assert [r.content for r in responses] == [DATA[i * 100 : i * 100 + 100] for i in range(8)]
    stats = http_server.wait_idle()
    assert stats["max_in_flight"] == 8
    assert stats["delay_ms"] == 300


def test_a_client_that_leaves_ends_the_delay(http_server: HttpObjectServer) -> None:
    """A request waiting out its delay ends once its client is gone: nothing keeps
    the server busy after a client timed out."""
    http_server.put("snapshot.mem", DATA)
    http_server.delay(60_000)
    with connect(timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
        ranged(client, http_server.url("snapshot.mem"), "bytes=0-0")
    stats = http_server.wait_idle()
    assert stats["log"][0]["status"] is None
    assert stats["statuses"] == {"none": 1}


def test_stats(http_server: HttpObjectServer) -> None:
    http_server.put("snapshot.mem", DATA)
    url = http_server.url("snapshot.mem")
    with connect() as client:
        client.head(url)
        client.get(url)
        ranged(client, url, "bytes=0-9")
        ranged(client, url, "bytes=-1")
        ranged(client, url, f"bytes={SIZE}-")
    stats = http_server.wait_idle()
    assert stats["requests"] == 5
    assert stats["methods"] == {"HEAD": 1, "GET": 4}
    assert stats["ranged"] == 3
    assert stats["statuses"] == {"200": 2, "206": 2, "416": 1}
    assert [(r["start"], r["stop"], r["status"]) for r in stats["ranges"]] == [
        (0, 10, 206),
        (SIZE - 1, SIZE, 206),
        (None, None, 416),
    ]
    assert stats["bytes_sent"] == SIZE + 10 + 1
    assert stats["connections_total"] == 1  # one pooled connection carried them all
    assert stats["max_in_flight"] == 1
    assert stats["log_dropped"] == 0
    brief = http_server.stats(log=False)
    assert "log" not in brief and "ranges" not in brief and brief["requests"] == 5
    http_server.reset()
    fresh = http_server.stats()
    assert (fresh["requests"], fresh["log"], fresh["bytes_sent"]) == (0, [], 0)
    assert fresh["connections_total"] == 0


def test_connections_are_counted_until_the_client_closes(http_server: HttpObjectServer) -> None:
    http_server.put("snapshot.mem", DATA)
    url = http_server.url("snapshot.mem")
    with connect() as client:
        ranged(client, url, "bytes=0-0")
        ranged(client, url, "bytes=0-0")
        stats = http_server.stats()  # its own connection is left out
        assert (stats["connections_open"], stats["sockets_open"]) == (1, 1)
        with client.stream("GET", url), client.stream("GET", url):
            stats = http_server.stats()
            assert (stats["connections_open"], stats["sockets_open"]) == (2, 2)
        assert http_server.stats()["connections_total"] == 2
    stats = http_server.wait_idle()
    assert (stats["connections_open"], stats["sockets_open"]) == (0, 0)
    assert stats["connections_total"] == 2


def test_sigterm_ends_the_server_cleanly(tmp_path: Path) -> None:
    """Even with a client's idle connection open."""
    with start_http_server(tmp_path) as server, connect() as client:
        server.put("x", b"x")
        assert client.get(server.url("x")).content == b"x"
        server.close()
        assert server.process.returncode == 0
        with pytest.raises(httpx.TransportError):
            client.get(server.url("x"))


def test_the_server_ends_with_the_process_it_watches(tmp_path: Path) -> None:
    """So a test run killed by its watchdog leaves no server behind."""
    watched = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.DEVNULL
    )
    try:
        with start_http_server(tmp_path, exit_with=watched.pid) as server:
            watched.kill()
            watched.wait()
            assert server.process.wait(TIMEOUT) == 0
    finally:
        watched.kill()
        watched.wait()
