"""Packs: ``python -m uffd_async pack``, and ``ua.PackSource`` serving real faults from one.

The image mixes what memory holds (zero chunks, text, pointer-like words, random
bytes) so that zero chunks, repeats and compression all happen. Processes restored
from it are ``test_replay``'s Firecracker-style peer (it compares every page it reads
with the raw image, and dies of SIGBUS on a poisoned page, never reading a wrong
byte); in-process restores read through threads of a ``Lab``. Reads of chunk files
are counted by the source's stats: a zero chunk is never read. Every wait is bounded.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

import uffd_async as ua
from uffd_async._remote._pack_format import PackError, encode_index, read_index, zstd

from ._processes import read_until
from ._support import TIMEOUT, Lab, finished
from .test_firecracker import ends_soon, place, running, stop
from .test_layers import make_chain
from .test_replay import (
    PAGES,
    RECORDED,
    REPLAY_PEER,
    TOUCH,
    peer_config,
    run_peer,
    run_waiting_peer,
)

__all__ = ["place"]  # a fixture, used by name

pytestmark = pytest.mark.anyio
P = ua.PAGE_SIZE
CHUNK = 64 * 1024  # 16 pages: the image (2 * PAGES pages) is 8 chunks
#: What each chunk of the image holds. The peer touches chunks 0, 1, 4, 6 and 7.
KINDS = ["text", "zero", "zero", "random", "words", "zero", "zero", "text"]
ZERO = {n for n, kind in enumerate(KINDS) if kind == "zero"}
TEXT = Path(ua.__file__).read_bytes()


def image(chunks: list[str] = KINDS, seed: int = 1) -> bytes:
    parts = []
    for n, kind in enumerate(chunks):
        if kind == "zero":
            parts.append(bytes(CHUNK))
        elif kind == "text":
            parts.append((TEXT * (CHUNK // len(TEXT) + 1))[:CHUNK])
        elif kind == "words":
            parts.append(b"".join((0x7F0000000000 + 16 * i).to_bytes(8, "little") + bytes(8)
                                  for i in range(CHUNK // 16)))  # fmt: skip
        else:
            parts.append(os.urandom(CHUNK) if seed is None else bytes(
                (seed * 131 + n * 31 + i * 7 + (i >> 7)) % 251 for i in range(CHUNK)))  # fmt: skip
    return b"".join(parts)


def packed(place: Path, data: bytes | None = None, **options: Any) -> Path:
    """``place/guest.mem`` (what the peer compares with) packed into ``place/pack``."""
    raw = place / "guest.mem"
    raw.write_bytes(image() if data is None else data)
    raw.chmod(0o644)
    result = ua.pack_snapshot(raw, place / "pack", chunk_size=CHUNK, **options)
    return Path(result.index)


def chunks_touched(pages: Any) -> set[int]:
    return {page * P // CHUNK for page in pages}


# -- writing ------------------------------------------------------------------------


async def dies_of_sigbus_never_a_wrong_page(place: Path, source: ua.SnapshotSource) -> None:
    """A peer served from ``source`` through a handoff server gets SIGBUS (its page
    poisoned) and never compares a wrong page; the server counts the error."""
    async with running(place, source) as server:
        with anyio.fail_after(TIMEOUT * 3):
            result = await anyio.run_process(
                [sys.executable, "-c", REPLAY_PEER, peer_config(place, TOUCH)],
                check=False, stderr=subprocess.STDOUT,
            )  # fmt: skip
        assert result.returncode == -signal.SIGBUS, result.stdout
        assert b"holds" not in result.stdout  # it never compared a wrong page
        await ends_soon(server)
        assert server.stats.errors >= 1


def test_zero_chunks_get_no_file_and_a_second_pack_writes_only_new_chunks(place: Path) -> None:
    index = packed(place)
    chunk_dir = place / "pack" / "chunks"
    # The two text chunks are one file; the zero chunks none.
    assert len(os.listdir(chunk_dir)) == len(set(KINDS) - {"zero"})
    described = read_index(index)
    assert [described.zero(n) for n in range(8)] == [n in ZERO for n in range(8)]
    with ua.Snapshot(place / "guest.mem") as raw:
        assert described.identity == raw.identity
    later = KINDS[:]
    later[5] = "random"  # a later version of the guest: one chunk changed
    second = place / "later.mem"
    second.write_bytes(image(later, seed=2))
    before = set(os.listdir(chunk_dir))
    result = ua.pack_snapshot(second, place / "pack", chunk_size=CHUNK)
    after = set(os.listdir(chunk_dir))
    # Its random chunks are new (another seed); text and words were there already.
    assert len(after - before) == result.written == 2
    assert result.zero == 3 and result.reused == 3
    assert all(os.stat(chunk_dir / name).st_mode & 0o777 == 0o600 for name in after)


def test_the_command_line_packs_and_shows(place: Path) -> None:
    raw = place / "guest.mem"
    raw.write_bytes(image())
    run = [sys.executable, "-m", "uffd_async", "pack"]
    done = subprocess.run(
        [*run, str(raw), str(place / "pack"), "--chunk-size", "64KiB", "--level", "5"],
        capture_output=True, text=True, timeout=TIMEOUT * 3, check=True,
    )  # fmt: skip
    index = done.stdout.splitlines()[-1]
    assert index == str(place / "pack" / "guest.mem.index")
    shown = subprocess.run(
        [*run, "show", index], capture_output=True, text=True, timeout=TIMEOUT * 3, check=True
    ).stdout
    assert (
        "chunks: 8 of 65,536 bytes: 4 zero (50.0%), 3 distinct non-zero, 0 of them shared" in shown
    )
    assert "dedup ratio 1.33" in shown
    bad = subprocess.run(
        [*run, "show", str(raw)], capture_output=True, text=True, timeout=TIMEOUT * 3
    )
    assert bad.returncode == 1 and f"{raw}: not a usable pack index" in bad.stderr


# -- damage -------------------------------------------------------------------------


DAMAGE = {
    "truncated": "truncated or extended",
    "flipped": "its checksum does not match",
    "extended": "truncated or extended",
    "not an index": "no pack index header",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_index_is_a_typed_error_naming_the_file(place: Path, damage: str) -> None:
    index = packed(place)
    data = bytearray(index.read_bytes())
    if damage == "truncated":
        data = data[:-41]
    elif damage == "flipped":
        data[70] ^= 1
    elif damage == "extended":
        data += bytes(40)
    else:
        data = bytearray(b"just some file")
    index.write_bytes(bytes(data))
    why = DAMAGE[damage]
    with pytest.raises(PackError, match=f"^{index}: not a usable pack index: .*{why}") as caught:
        ua.PackSource(index)
    assert isinstance(caught.value, ua.FetchError) and caught.value.url == str(index)


async def test_a_corrupted_chunk_is_refused_and_its_pages_poisoned(place: Path) -> None:
    index = packed(place)
    described = read_index(index)
    victim = Path(described.chunk_path(4))  # the "words" chunk, pages 64-79: the peer reads 64
    frame = bytearray(victim.read_bytes())
    frame[len(frame) // 2] ^= 0xFF
    victim.write_bytes(bytes(frame))
    async with ua.PackSource(index) as source:
        with pytest.raises(PackError, match=r"chunk 4 .*(digest|zstd)"):
            await source.chunk(4)
        await dies_of_sigbus_never_a_wrong_page(place, source)
        assert source.stats.failed >= 1


async def test_a_chunk_file_with_bytes_appended_is_refused(place: Path) -> None:
    index = packed(place)
    victim = Path(read_index(index).chunk_path(0))
    victim.write_bytes(victim.read_bytes() + b"more")  # zstd would stop at the frame's end
    async with ua.PackSource(index) as source:
        with pytest.raises(PackError, match=r"chunk 0 .* is \d+ bytes, the index says"):
            await source.chunk(0)


async def test_a_valid_frame_of_the_wrong_length_is_refused(place: Path) -> None:
    index = packed(place)
    described = read_index(index)
    frame = zstd().compress(b"short" * 100)
    Path(described.chunk_path(4)).write_bytes(frame)
    entries = [(d, len(frame) if n == 4 else s) for n, (d, s) in
               enumerate(zip(described.digests, described.stored, strict=True))]  # fmt: skip
    index.write_bytes(encode_index(chunk_size=CHUNK, size=described.size,
                                   identity=described.identity, entries=entries))  # fmt: skip
    async with ua.PackSource(index) as source:
        with pytest.raises(PackError, match=f"chunk 4 .* decompresses to 500 bytes, not {CHUNK}"):
            await source.chunk(4)


async def test_a_missing_chunk_file_is_a_pack_error(place: Path) -> None:
    index = packed(place)
    os.unlink(read_index(index).chunk_path(0))
    async with ua.PackSource(index) as source:
        # read() is not a fault: it fails now, however long a fault would wait (SourcePolicy).
        with (
            anyio.fail_after(TIMEOUT),
            pytest.raises(PackError, match=r"chunk 0 .* cannot be read"),
        ):
            await source.read(0, P)


# -- restoring ----------------------------------------------------------------------


async def test_a_process_is_restored_byte_exact_and_zero_chunks_are_never_read(
    place: Path,
) -> None:
    index = packed(place)
    async with ua.PackSource(index) as source:
        assert await source.version() == read_index(index).identity
        async with running(place, source) as server:
            await run_peer(peer_config(place, TOUCH, all=True))  # every page compared
            await ends_soon(server)
        stats = server.stats
        assert (stats.served, stats.failed, stats.errors) == (1, 0, 0)
        # Every non-zero chunk read once, the zero ones never.
        assert source.stats.reads == source.stats.chunks == 8 - len(ZERO)
        assert stats.pages == 2 * PAGES


@asynccontextmanager
async def restoring(lab: Lab, source: ua.PackSource) -> AsyncIterator[ua.Region]:
    region = lab.anonymous(2 * PAGES)
    uffd = lab.uffd()
    uffd.register(region.address, region.length, ua.Mode.MISSING)
    async with ua.FaultServer(uffd, ua.copy_from(source, base=region.address)):
        yield region


async def test_copy_from_a_pack_reads_only_the_chunks_touched(
    place: Path, lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = packed(place)
    raw = (place / "guest.mem").read_bytes()
    zeroed: list[tuple[int, int]] = []
    copied: list[tuple[int, int]] = []
    zeropage, copy = ua.Userfaultfd.zeropage, ua.Userfaultfd.copy

    def counting_zeropage(self: ua.Userfaultfd, start: int, length: int, **kw: Any) -> int:
        zeroed.append((start, length))
        return zeropage(self, start, length, **kw)

    def counting_copy(self: ua.Userfaultfd, dst: int, *args: Any, **kw: Any) -> int:
        copied.append((dst, args[1] if len(args) > 1 else kw["length"]))
        return copy(self, dst, *args, **kw)

    monkeypatch.setattr(ua.Userfaultfd, "zeropage", counting_zeropage)
    monkeypatch.setattr(ua.Userfaultfd, "copy", counting_copy)
    pages = [17, 18, 40, 3, 90, 125]  # chunks 1 (zero), 2 (zero), 0, 5 (zero), 7
    async with ua.PackSource(index) as source, restoring(lab, source) as region:
        for page in pages:
            got = await finished(lab.run(functools.partial(region.read, page * P, P)))
            assert got == raw[page * P : (page + 1) * P], page
        assert source.stats.reads == len(chunks_touched(pages) - ZERO) == 2
        # A zero chunk's other pages were mapped (zero pages) with the faulting one.
        assert await finished(lab.run(lambda: region.read(32 * P, 16 * P))) == bytes(16 * P)
        assert source.stats.reads == 2
        assert source.stats.zeros == 0, "a demand fault in a zero chunk asked for its bytes"
        base = region.address
    # Zero chunks: UFFDIO_ZEROPAGE of the whole chunk, once each; never a copy.
    assert sorted(zeroed) == [(base + n * CHUNK, CHUNK) for n in (1, 2, 5)]
    assert all((dst - base) // CHUNK not in ZERO for dst, _ in copied), copied


async def test_a_working_set_recorded_on_the_raw_image_replays_on_the_pack(
    place: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = packed(place)
    zeroed: list[int] = []
    zeropage = ua.Userfaultfd.zeropage

    def counting_zeropage(self: ua.Userfaultfd, start: int, length: int, **kw: Any) -> int:
        zeroed.append(length)
        return zeropage(self, start, length, **kw)

    ws_path = place / "boot.ws"
    with ua.Snapshot(place / "guest.mem") as raw:
        async with running(place, raw, record=ws_path) as server:
            await run_peer(peer_config(place, TOUCH))
            await ends_soon(server)
    assert ua.WorkingSet.load(ws_path).pages == RECORDED
    touched = chunks_touched(RECORDED)
    monkeypatch.setattr(ua.Userfaultfd, "zeropage", counting_zeropage)
    async with ua.PackSource(index) as source:
        async with running(place, source, prefetch=ws_path) as server:
            await run_waiting_peer(
                peer_config(place, TOUCH, wait=True),
                lambda: server.stats.prefetched >= len(touched) * CHUNK // P,
            )
            await ends_soon(server)
            stats = server.stats
        # The set's chunks, zero ones included (as zero pages), before the process ran.
        assert stats.prefetched == len(touched) * CHUNK // P and stats.errors == 0
        assert stats.faults == 0
        assert source.stats.reads == len(touched - ZERO)
        # The prefetched zero chunks were mapped as zero pages, whole, never copied.
        assert source.stats.zeros == len(touched & ZERO) == 2
        assert zeroed == [CHUNK] * 2


async def test_a_working_set_recorded_on_the_pack_names_every_page(place: Path) -> None:
    index = packed(place)
    ws_path = place / "boot.ws"
    async with ua.PackSource(index) as source:
        async with running(place, source, record=ws_path) as server:
            await run_peer(peer_config(place, TOUCH))
            await ends_soon(server)
    recorded = ua.WorkingSet.load(ws_path)
    assert recorded.pages == RECORDED  # zero chunks' pages too, one fault each
    with ua.Snapshot(place / "guest.mem") as raw:
        assert recorded.matches(raw.size, raw.identity)


def test_the_command_line_serves_an_index(place: Path) -> None:
    serve_once(place, [str(packed(place))], {})


def serve_once(place: Path, argv: list[str], env: dict[str, str]) -> str:
    """``serve ARGV...`` from the command line, a peer restored through it (every page
    compared), then SIGINT; what it wrote to stderr, once it exited with 0."""
    argv = ["serve", *argv, "--socket", str(place / "uffd.sock"), "--interval", "0.02"]
    with subprocess.Popen(
        [sys.executable, "-m", "uffd_async", *argv], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, env={**os.environ, **env},
    ) as server:  # fmt: skip
        try:
            assert server.stderr is not None
            log = read_until(server.stderr, b"listening")
            anyio.run(run_peer, peer_config(place, TOUCH, all=True))
            log += read_until(server.stderr, b"connections 1 (0 active")
            log += stop(server)
        finally:
            if server.poll() is None:
                server.kill()
            server.communicate(timeout=TIMEOUT)
    text = log.decode(errors="replace")
    assert server.returncode == 0, text
    return text


async def test_a_layered_chain_packs_as_the_image_it_makes(tmp_path: Path) -> None:
    chain = make_chain(tmp_path)
    result = ua.pack_snapshot(
        chain.base, tmp_path / "pack", layers=chain.layers, chunk_size=4 * P, name="top"
    )
    assert result.index == str(tmp_path / "pack" / "top.index")
    with ua.LayeredSnapshot(chain.base, *chain.layers) as layered:
        identity = layered.identity
    async with ua.PackSource(result.index) as source:
        assert await source.read(0, source.size) == chain.expected
        assert await source.version() == identity  # the squashed image's, as a working set's


async def test_mappings_that_split_a_chunk_are_filled_together(place: Path) -> None:
    """The peer's two regions of 56 pages meet inside chunk 3 (pages 48-63): a fault in
    the first region's part of it fills the second region's part too (``group``)."""
    pages = 56
    raw = place / "guest.mem"
    raw.write_bytes(image()[: 2 * pages * P])
    index = ua.pack_snapshot(raw, place / "pack", chunk_size=CHUNK).index
    async with ua.PackSource(index) as source:
        async with running(place, source) as server:
            # Page 50 is the first region's, 60 and 58 the second's: one fault for the three.
            await run_peer(peer_config(place, [50, 60, 58, 55, 63], pages=pages))
            await ends_soon(server)
            assert server.stats.faults == 1 and source.stats.reads == 1
            # And the other way round, every page compared, in a second process.
            await run_peer(peer_config(place, [57, 49], pages=pages, all=True))
            await ends_soon(server)
            assert (server.stats.served, server.stats.errors) == (2, 0)
