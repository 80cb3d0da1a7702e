"""Packs in an object store (``s3://BUCKET/PREFIX/``, ``az://``), against the real peers of
``tests/_object_stores.py`` (moto with SigV4 checked, Azurite), on asyncio and trio.

Writing: a pack goes into a prefix with one listing and one conditional PUT per new
chunk, counted here by wrapping obstore's ``put``; a second snapshot into the same
prefix uploads only its new chunks. Reading: processes are restored from the index's
URL through a real handoff (``test_replay``'s peer compares every page it reads with
the raw image, and dies of SIGBUS on a poisoned page, never reading a wrong byte);
a chunk object damaged or deleted in the store is a typed error naming the chunk.
No credential in any output: errors, reprs, logs, the command line's stdout and
stderr. The host chunk cache keeps chunks by their digest, so two packs that share
chunks share its entries. Every wait is bounded.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import uffd_async as ua
from uffd_async._remote._closing_sockets import ClosingSockets
from uffd_async._remote._pack_format import PackError, chunk_name
from uffd_async._remote._pack_store import ObjectPackStore
from uffd_async._remote._pack_writer import summarize

from ._object_stores import Azurite, MotoS3, azurite, moto_s3
from ._support import TIMEOUT
from .test_firecracker import ends_soon, place, running
from .test_pack import (
    CHUNK,
    KINDS,
    ZERO,
    dies_of_sigbus_never_a_wrong_page,
    image,
    serve_once,
)
from .test_replay import TOUCH, peer_config, run_peer

__all__ = ["place"]  # a fixture, used by name

P = ua.PAGE_SIZE
NONZERO = len(set(KINDS) - {"zero"})  # distinct non-zero chunks of image(): 3


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    with moto_s3(tmp_path_factory.mktemp("moto")) as store:
        yield store


@pytest.fixture(scope="module")
def azure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    with azurite(tmp_path_factory.mktemp("azurite")) as store:
        yield store


@pytest.fixture
def puts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None]]:
    """Every obstore ``put`` this process sends: (path, mode)."""
    import obstore

    sent: list[tuple[str, str | None]] = []
    real = obstore.put

    def counting(store: Any, path: str, data: Any, **options: Any) -> Any:
        sent.append((path, options.get("mode")))
        return real(store, path, data, **options)

    monkeypatch.setattr(obstore, "put", counting)
    return sent


def pack(raw: Path, dest: str, options: dict[str, str], **more: Any) -> ua.PackResult:
    """``ua.pack_snapshot`` into ``dest``, then wait until its store's sockets are closed
    (obstore closes them a moment after the store is dropped; the leak check looks)."""
    sockets = ClosingSockets()
    try:
        return ua.pack_snapshot(raw, dest, chunk_size=CHUNK, options=options, **more)
    finally:
        anyio.run(sockets.wait)


async def apack(raw: Path, dest: str, options: dict[str, str], **more: Any) -> ua.PackResult:
    """:func:`pack` from a test on an event loop (the writer is synchronous: a thread)."""
    sockets = ClosingSockets()
    try:
        return await anyio.to_thread.run_sync(
            functools.partial(
                ua.pack_snapshot, raw, dest, chunk_size=CHUNK, options=options, **more
            )
        )
    finally:
        await sockets.wait()


def listed(s3: MotoS3, prefix: str) -> dict[str, int]:
    client = s3.client()
    try:
        answer = client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    finally:
        client.close()
    return {item["Key"][len(prefix) :]: item["Size"] for item in answer.get("Contents", [])}


def raw_image(
    place: Path, kinds: list[str] = KINDS, seed: int = 1, name: str = "guest.mem"
) -> Path:
    raw = place / name
    raw.write_bytes(image(kinds, seed=seed))
    raw.chmod(0o644)
    return raw


def later_kinds() -> list[str]:
    later = KINDS[:]
    later[5] = "random"  # a later version of the guest: one more chunk, of another seed
    return later


# -- writing ----------------------------------------------------------------------------


def test_a_second_snapshot_uploads_only_its_new_chunks(
    place: Path, s3: MotoS3, puts: list[tuple[str, str | None]]
) -> None:
    prefix = "fleet/"
    dest = f"s3://{s3.bucket}/{prefix}"
    first = pack(raw_image(place), dest, s3.options())
    assert first.index == f"{dest}guest.mem.index"
    assert (first.written, first.reused, first.zero) == (NONZERO, 1, len(ZERO))
    # One conditional create per distinct chunk, then the index, whole.
    assert sorted(mode or "" for _, mode in puts) == ["", *["create"] * NONZERO]
    assert puts[-1] == (f"{prefix}guest.mem.index", None)
    objects = listed(s3, prefix)
    assert len(objects) == NONZERO + 1 and "guest.mem.index" in objects
    puts.clear()
    second = pack(raw_image(place, later_kinds(), seed=2, name="later.mem"), dest, s3.options())
    # Its two random chunks are new (another seed); text and words were there already.
    assert (second.written, second.reused) == (2, 3)
    assert [mode for _, mode in puts] == ["create", "create", None]
    assert len(listed(s3, prefix)) == NONZERO + 2 + 2
    puts.clear()
    again = pack(raw_image(place), dest, s3.options())
    assert again.written == 0 and puts == [(f"{prefix}guest.mem.index", None)]
    # The index in the store is the one a local pack of the same image writes.
    local = ua.pack_snapshot(place / "guest.mem", place / "local", chunk_size=CHUNK)
    stored = listed(s3, prefix)
    assert stored["guest.mem.index"] == os.path.getsize(local.index)


def test_a_chunk_written_meanwhile_by_another_writer_is_taken_as_it_is(
    place: Path, s3: MotoS3
) -> None:
    store = ObjectPackStore(f"s3://{s3.bucket}/race/", options=s3.options())
    try:
        assert store.put_if_absent("chunks/ab", b"frame one") is None
        # A racing writer's create finds it (412): the size there is what the index records.
        assert store.put_if_absent("chunks/ab", b"a longer frame") == len(b"frame one")
        assert store.read("chunks/ab") == b"frame one"
        assert store.read("chunks/ab", 5) == b"frame"
        assert store.sizes("chunks/") == {"chunks/ab": len(b"frame one")}
        with pytest.raises(FileNotFoundError, match=r"no such object \(HTTP 404"):
            store.read("chunks/none")
    finally:
        store.close()
        anyio.run(store.closing.wait) if store.closing else None


def test_the_command_line_packs_into_a_prefix_and_shows_it(place: Path, s3: MotoS3) -> None:
    raw = raw_image(place)
    secret_file = place / "secret"
    secret_file.write_text(s3.secret + "\n")
    env = {**os.environ, **s3.env()}
    del env["AWS_SECRET_ACCESS_KEY"]  # from --store-option KEY=@FILE instead
    run = [sys.executable, "-m", "uffd_async", "pack"]
    option = ["--store-option", f"secret_access_key=@{secret_file}"]
    dest = f"s3://{s3.bucket}/cli/"
    done = subprocess.run(
        [*run, str(raw), dest, "--chunk-size", "64KiB", "--uploads", "2", *option],
        capture_output=True, text=True, timeout=TIMEOUT * 3, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    index = done.stdout.splitlines()[-1]
    assert index == f"{dest}guest.mem.index"
    assert f"{NONZERO} written" in done.stderr
    shown = subprocess.run(
        [*run, "show", index, *option], capture_output=True, text=True,
        timeout=TIMEOUT * 3, env=env,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert f"index: {index}" in shown.stdout
    assert "chunks: 8 of 65,536 bytes: 4 zero (50.0%), 3 distinct non-zero" in shown.stdout
    wrong = ["--store-option", "secret_access_key=wrongSECRETwrongSECRET0123"]
    refused = subprocess.run(
        [*run, "show", index, *wrong], capture_output=True, text=True,
        timeout=TIMEOUT * 3, env=env,
    )  # fmt: skip
    assert refused.returncode == 1 and "HTTP 403" in refused.stderr, refused.stderr
    for output in (done, shown, refused):
        text = output.stdout + output.stderr
        assert s3.secret not in text and "wrongSECRET" not in text, text
        assert s3.key_id not in text, text


def test_azure_packs_and_shows(place: Path, azure: Azurite) -> None:
    dest = f"az://{azure.container}/packs/"
    sockets = ClosingSockets()
    try:
        result = ua.pack_snapshot(raw_image(place), dest, chunk_size=CHUNK, options=azure.options())
        again = ua.pack_snapshot(raw_image(place), dest, chunk_size=CHUNK, options=azure.options())
        summary = summarize(result.index, options=azure.options())
    finally:
        anyio.run(sockets.wait)
    assert result.written == NONZERO and again.written == 0 and again.reused == NONZERO + 1
    assert summary.unique == NONZERO and summary.zero == len(ZERO)


# -- restoring ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_process_is_restored_byte_exact_from_an_s3_index(
    place: Path, s3: MotoS3, anyio_backend: str
) -> None:
    dest = f"s3://{s3.bucket}/serve-{anyio_backend}/"
    index = (await apack(raw_image(place), dest, s3.options())).index
    async with ua.PackSource(index, options=s3.options()) as source:
        assert source.size == len(image()) and source.path == index
        async with running(place, source) as server:
            await run_peer(peer_config(place, TOUCH, all=True))  # every page compared
            await ends_soon(server)
        stats = server.stats
        assert (stats.served, stats.failed, stats.errors) == (1, 0, 0)
        assert source.stats.reads == source.stats.chunks == 8 - len(ZERO)


@pytest.mark.anyio
async def test_a_process_is_restored_from_azure(
    place: Path, azure: Azurite, anyio_backend: str
) -> None:
    dest = f"az://{azure.container}/serve-{anyio_backend}/"
    index = (await apack(raw_image(place), dest, azure.options())).index
    async with ua.PackSource(index, options=azure.options()) as source:
        async with running(place, source) as server:
            await run_peer(peer_config(place, TOUCH, all=True))
            await ends_soon(server)
        assert server.stats.errors == 0


@pytest.mark.anyio
async def test_a_corrupted_chunk_object_is_refused_and_its_pages_poisoned(
    place: Path, s3: MotoS3, anyio_backend: str
) -> None:
    prefix = f"corrupt-{anyio_backend}/"
    index = (await apack(raw_image(place), f"s3://{s3.bucket}/{prefix}", s3.options())).index
    async with ua.PackSource(index, options=s3.options()) as source:
        victim = prefix + chunk_name(source.index.digests[4])  # "words": the peer reads 64
        client = s3.client()
        try:
            frame = bytearray(client.get_object(Bucket=s3.bucket, Key=victim)["Body"].read())
        finally:
            client.close()
        frame[len(frame) // 2] ^= 0xFF
        s3.put(victim, bytes(frame))
        with pytest.raises(PackError, match=r"chunk 4 .*(digest|zstd)") as caught:
            await source.chunk(4)
        assert caught.value.url == f"s3://{s3.bucket}/{victim}"
        await dies_of_sigbus_never_a_wrong_page(place, source)


@pytest.mark.anyio
async def test_a_missing_chunk_object_is_a_pack_error_naming_it(
    place: Path, s3: MotoS3, caplog: pytest.LogCaptureFixture, anyio_backend: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="uffd_async")
    prefix = f"missing-{anyio_backend}/"
    index = (await apack(raw_image(place), f"s3://{s3.bucket}/{prefix}", s3.options())).index
    # A fault waits out a chunk that cannot be read (an outage) by default: fail fast here.
    fail_fast = ua.SourcePolicy(on_error="poison")
    async with ua.PackSource(index, options=s3.options(), retries=0, outage=fail_fast) as source:
        name = chunk_name(source.index.digests[0])
        client = s3.client()
        try:
            client.delete_object(Bucket=s3.bucket, Key=prefix + name)
        finally:
            client.close()
        with pytest.raises(PackError) as caught:
            await source.read(0, P)
        error = caught.value
        assert str(error).startswith(f"s3://{s3.bucket}/{prefix}{name}: chunk 0 ")
        assert "cannot be read: no such object (HTTP 404" in str(error)
        assert error.url == f"s3://{s3.bucket}/{prefix}{name}" and isinstance(error, ua.FetchError)
    # No index there at all: a typed error naming it, when opened.
    gone = ua.PackSource(f"s3://{s3.bucket}/{prefix}none.index", options=s3.options())
    with pytest.raises(PackError, match=r"none\.index: cannot read the pack index: no such"):
        await gone.open()
    assert gone.closed
    # A wrong secret: refused, and shown nowhere.
    wrong = "wrongSECRETwrongSECRETwrongSECRET0123456"
    refused = ua.PackSource(index, options=s3.options(secret_access_key=wrong), retries=0)
    with pytest.raises(PackError, match="HTTP 403") as denied:
        await refused.open()
    for text in (str(error), repr(error), str(denied.value), repr(source), repr(refused),
                 caplog.text):  # fmt: skip
        for secret in (s3.secret, wrong, s3.key_id):
            assert secret not in text, text


# -- the host chunk cache, by digest ----------------------------------------------------------


@pytest.mark.anyio
async def test_two_packs_sharing_chunks_share_the_host_cache(
    place: Path, s3: MotoS3, tmp_path: Path, anyio_backend: str
) -> None:
    dest = f"s3://{s3.bucket}/cached-{anyio_backend}/"
    first = (await apack(raw_image(place), dest, s3.options())).index
    second = await apack(
        raw_image(place, later_kinds(), seed=2, name="later.mem"), dest, s3.options()
    )
    expected = [image(), image(later_kinds(), seed=2)]
    with ua.HostChunkCache(tmp_path / "cache", 1 << 30) as cache:
        async with ua.PackSource(first, options=s3.options(), host_cache=cache) as source:
            assert await source.read(0, source.size) == expected[0]
            # Its two text chunks are one: read once, then a hit by its digest.
            assert source.stats.reads == NONZERO and source.stats.host_hits == 1
        async with ua.PackSource(second.index, options=s3.options(), host_cache=cache) as other:
            assert await other.read(0, other.size) == expected[1]
            # Its text and words chunks were kept by digest: only its two new ones are read.
            assert other.stats.reads == 2
            assert other.stats.host_hits == 8 - 3 - 2  # 8 chunks, 3 zero, 2 new
        assert cache.stats.fetched == NONZERO + 2
        # A second restore of the first on this host: no read at all.
        async with ua.PackSource(first, options=s3.options(), host_cache=cache) as warm:
            assert await warm.read(0, warm.size) == expected[0]
            assert warm.stats.reads == 0 and warm.stats.host_damaged == 0


@pytest.mark.anyio
async def test_a_local_pack_uses_the_host_cache_too(place: Path, tmp_path: Path) -> None:
    index = ua.pack_snapshot(raw_image(place), place / "pack", chunk_size=CHUNK).index
    with ua.HostChunkCache(tmp_path / "cache", 1 << 30) as cache:
        for reads in (NONZERO, 0):
            async with ua.PackSource(index, host_cache=cache) as source:
                assert await source.read(0, source.size) == image()
                assert source.stats.reads == reads


def test_the_command_line_serves_an_s3_index_with_a_host_cache(
    place: Path, s3: MotoS3, tmp_path: Path
) -> None:
    index = pack(raw_image(place), f"s3://{s3.bucket}/clicache/", s3.options()).index
    cache = tmp_path / "cache"
    for _ in range(2):
        text = serve_once(place, [index, "--cache-dir", str(cache)], env=s3.env())
        assert (
            f"serving {index} (a pack: 524,288 bytes, 8 chunks of 64 KiB, 4 of them zero)" in text
        )
        assert s3.secret not in text and s3.key_id not in text
    assert len(list(cache.joinpath("chunks").rglob("*"))) >= NONZERO


def test_the_command_line_serves_a_local_pack_with_a_host_cache(
    place: Path, tmp_path: Path
) -> None:
    index = ua.pack_snapshot(raw_image(place), place / "pack", chunk_size=CHUNK).index
    cache = tmp_path / "cache"
    serve_once(place, [index, "--cache-dir", str(cache)], env={})
    assert len(list(cache.joinpath("chunks").rglob("*"))) >= NONZERO


@pytest.mark.anyio
async def test_the_host_cache_keeps_only_chunks_that_passed_their_check(
    place: Path, s3: MotoS3, tmp_path: Path, anyio_backend: str
) -> None:
    prefix = f"checked-{anyio_backend}/"
    index = (await apack(raw_image(place), f"s3://{s3.bucket}/{prefix}", s3.options())).index
    fail_fast = ua.SourcePolicy(on_error="poison")
    with ua.HostChunkCache(tmp_path / "cache", 1 << 30) as cache:
        async with ua.PackSource(
            index, options=s3.options(), host_cache=cache, outage=fail_fast
        ) as source:
            victim = prefix + chunk_name(source.index.digests[4])
            good = s3_object(s3, victim)
            s3.put(victim, good[:-1] + bytes([good[-1] ^ 1]))  # the same length, damaged
            with pytest.raises(PackError, match=r"chunk 4 .*(digest|zstd)"):
                await source.chunk(4)
            assert cache.stats.stored == 0  # never kept: another process would get it
        s3.put(victim, good)
        async with ua.PackSource(index, options=s3.options(), host_cache=cache) as source:
            assert await source.read(0, source.size) == image()
            assert source.stats.reads == NONZERO and cache.stats.stored == NONZERO


@pytest.mark.anyio
async def test_a_cache_entry_that_fails_the_digest_is_read_again_and_replaced(
    place: Path, tmp_path: Path
) -> None:
    """The cache's own checksum passes (the entry was stored so), the chunk's digest does
    not: the chunk is read from the pack, and the entry replaced for the next process."""
    from uffd_async._remote._chunk_cache_format import ChunkKey

    index = ua.pack_snapshot(raw_image(place), place / "pack", chunk_size=CHUNK).index
    with ua.HostChunkCache(tmp_path / "cache", 1 << 30) as cache:
        async with ua.PackSource(index, host_cache=cache) as source:
            digest, stored = source.index.digests[4], source.index.stored[4]
            key = ChunkKey(object=f"sha256:{digest.hex()}", version="zstd", chunk_size=stored,
                           index=0)  # fmt: skip
            assert cache.put(key, bytes(stored))  # whole, and wrong
            assert await source.chunk(4) == image()[4 * CHUNK : 5 * CHUNK]
            assert (source.stats.host_hits, source.stats.host_damaged) == (1, 1)
        async with ua.PackSource(index, host_cache=cache) as again:
            assert await again.chunk(4) == image()[4 * CHUNK : 5 * CHUNK]
            assert (again.stats.reads, again.stats.host_damaged) == (0, 0)


def test_a_store_that_cannot_be_reached_is_tried_again_then_an_os_error(s3: MotoS3) -> None:
    import socket

    # (s3: a module fixture, set up before the leak check looks: obstore's runtime is warm)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: connections refused
    options = {
        "endpoint": f"http://127.0.0.1:{port}", "region": "us-east-1", "allow_http": "true",
        "access_key_id": "AKIAEXAMPLE", "secret_access_key": "unreachableSECRET",
    }  # fmt: skip
    store = ObjectPackStore("s3://snaps/p/", options=options, retries=2, timeout=5)
    try:
        with pytest.raises(OSError, match=r"\(after 3 attempts\)$") as caught:
            store.read("x.index")
        assert store.requests["get"] == 3
        assert "unreachableSECRET" not in str(caught.value)
        assert not isinstance(caught.value, FileNotFoundError)
    finally:
        store.close()
        if store.closing is not None:
            anyio.run(store.closing.wait)


def s3_object(s3: MotoS3, key: str) -> bytes:
    client = s3.client()
    try:
        data: bytes = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    finally:
        client.close()
    return data


@pytest.mark.anyio
async def test_a_cache_file_damaged_on_disk_never_reaches_a_guest(
    place: Path, tmp_path: Path
) -> None:
    """A pack's hit skips the cache's own checksum (its SHA-256 is checked anyway): a file
    damaged in place is caught by that, read again from the pack, and replaced."""
    index = ua.pack_snapshot(raw_image(place), place / "pack", chunk_size=CHUNK).index
    with ua.HostChunkCache(tmp_path / "cache", 1 << 30) as cache:
        async with ua.PackSource(index, host_cache=cache) as source:
            await source.chunk(4)
        files = [p for p in (tmp_path / "cache" / "chunks").rglob("*") if p.is_file()]
        assert len(files) == 1
        entry = files[0]
        data = bytearray(entry.read_bytes())
        data[-10] ^= 0x55  # in the frame, past the header
        entry.write_bytes(bytes(data))
        async with ua.PackSource(index, host_cache=cache) as source:
            assert await source.chunk(4) == image()[4 * CHUNK : 5 * CHUNK]
            assert (source.stats.host_hits, source.stats.host_damaged, source.stats.reads) == (
                1, 1, 1,
            )  # fmt: skip
        async with ua.PackSource(index, host_cache=cache) as source:
            assert await source.chunk(4) == image()[4 * CHUNK : 5 * CHUNK]
            assert (source.stats.host_damaged, source.stats.reads) == (0, 0)
