"""Snapshot layers: the file format, the writers, and a base image served with its layers.

Every image here is built twice: by the library (writers, then squash or real faults)
and by hand in Python (``overlay``), and the two must agree byte for byte. Faults are
real: threads touch registered memory through ctypes, or a separate process hands its
uffd over as Firecracker does. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import random
import re
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import attrs
import pytest

import uffd_async as ua
from uffd_async.__main__ import main
from uffd_async._capture._layer import compose
from uffd_async._capture._layer_file import HEADER_SIZE, LayerHeader

from ._processes import read_until
from ._support import TIMEOUT, Lab, finished
from .test_firecracker import cli_server, ends_soon, place, running, stop
from .test_prefetch import queued
from .test_replay import run_peer

__all__ = ["place"]  # a fixture, used by name

pytestmark = pytest.mark.anyio

P = ua.PAGE_SIZE
PAGES = 16


# -- building images by hand, and with the library -----------------------------------------


def random_pages(pages: Sequence[int], seed: int) -> dict[int, bytes]:
    rng = random.Random(seed)
    return {page: rng.randbytes(P) for page in pages}


def overlay(image: bytes, *layers: dict[int, bytes]) -> bytes:
    """The image with each layer's pages written over it, in order: what layers mean."""
    out = bytearray(image)
    for layer in layers:
        for page, data in layer.items():
            out[page * P : (page + 1) * P] = data
    return bytes(out)


def write_layer(
    path: Path, parent: bytes, pages: dict[int, bytes], image_size: int, seed: int = 0
) -> bytes:
    """A layer of ``pages``, written in a shuffled order; its identity."""
    order = list(pages)
    random.Random(seed).shuffle(order)
    with ua.LayerWriter(
        path, page_size=P, image_size=image_size, pages=order, parent=parent
    ) as writer:
        for page in order:
            writer.write_page(page, pages[page])
        return writer.commit()


@attrs.frozen
class Chain:
    base: Path
    layers: tuple[Path, ...]
    #: The pages of each layer, and the composed image, made by hand.
    contents: tuple[dict[int, bytes], ...]
    expected: bytes


#: Layer 1 and 2 overlap at pages 4 and 10 (layer 2 wins); page 15 ends the image.
LAYER_1 = [2, 3, 4, 9, 10]
LAYER_2 = [4, 5, 10, 15]


def make_chain(directory: Path, pages: int = PAGES, base_name: str = "base.mem") -> Chain:
    base = directory / base_name
    image = random.Random(1).randbytes(pages * P)
    base.write_bytes(image)
    base.chmod(0o644)
    with ua.Snapshot(base) as snapshot:
        parent = snapshot.identity
    first = random_pages([p for p in LAYER_1 if p < pages] + [pages - 3], seed=2)
    second = random_pages([p for p in LAYER_2 if p < pages] + [pages - 1], seed=3)
    identity = write_layer(directory / "1.layer", parent, first, pages * P, seed=4)
    write_layer(directory / "2.layer", identity, second, pages * P, seed=5)
    return Chain(
        base,
        (directory / "1.layer", directory / "2.layer"),
        (first, second),
        overlay(image, first, second),
    )


@pytest.fixture
def chain(tmp_path: Path) -> Chain:
    return make_chain(tmp_path)


@pytest.fixture
def layered(chain: Chain) -> Iterator[ua.LayeredSnapshot]:
    with ua.LayeredSnapshot(chain.base, *chain.layers) as opened:
        yield opened


def mapping(base: int, pages: int, offset_pages: int = 0) -> ua.GuestMapping:
    return ua.GuestMapping(
        base_host_virt_addr=base, size=pages * P, offset=offset_pages * P, page_size=P
    )


# -- the format -------------------------------------------------------------------------------


def test_a_layer_round_trips(tmp_path: Path, chain: Chain) -> None:
    with ua.Layer.open(chain.layers[1]) as layer, ua.Layer(chain.layers[0]) as below:
        assert layer.parent == below.identity and len(layer.identity) == 32
        assert layer.runs == ((4, 2), (10, 1), (15, 1))  # sorted, touching joined
        assert (layer.page_count, layer.page_size, layer.image_size) == (4, P, PAGES * P)
        layer.verify()
        data = bytes(layer._view(0, 4 * P))
    contents = chain.contents[1]
    assert data == b"".join(contents[page] for page in sorted(contents)), "not in index order"
    size = os.path.getsize(chain.layers[1])
    assert size == P + 4 * P, "the data starts at the first page boundary after the index"
    assert layer.closed and "closed" in repr(layer)


def test_the_header_without_io() -> None:
    header = LayerHeader(
        page_size=P, image_size=PAGES * P, parent=b"p" * 32, identity=b"i" * 32,
        runs=[(0, 2), (5, 1)],
    )  # fmt: skip
    data = header.to_bytes()
    assert data.startswith(b"UALAYER\n") and len(data) == HEADER_SIZE + 2 * 16 + 4
    assert LayerHeader.from_bytes(data) == header
    assert LayerHeader.from_bytes(data + bytes(P), file_size=P + 3 * P) == header
    assert (header.pages, header.data_offset) == (3, P)


def _damaged(data: bytes, how: str) -> bytes:
    if how == "truncated in the header":
        return data[:50]
    if how == "truncated in the index":
        return data[: HEADER_SIZE + 8]
    if how == "truncated in the data":
        return data[:-1]
    if how == "too long":
        return data + b"\0"
    if how == "bad magic":
        return b"UALAYEX\n" + data[8:]
    if how == "bad CRC":
        return (
            data[: HEADER_SIZE + 3] + bytes([data[HEADER_SIZE + 3] ^ 1]) + data[HEADER_SIZE + 4 :]
        )
    if how == "wrong version":
        return data[:8] + struct.pack("<H", 2) + data[10:]
    raise AssertionError(how)


DAMAGE = {
    "truncated in the header": "too short for a layer header",
    "truncated in the index": "too short for its header and index",
    "truncated in the data": "it is truncated",
    "too long": "it is too long",
    "bad magic": "not a layer file",
    "bad CRC": "damaged (CRC mismatch)",
    "wrong version": "layer version 2; this library reads 1",
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_every_damage_is_refused(tmp_path: Path, chain: Chain, how: str) -> None:
    damaged = tmp_path / "damaged.layer"
    damaged.write_bytes(_damaged(chain.layers[0].read_bytes(), how))
    with pytest.raises(ua.LayerError, match=re.escape(DAMAGE[how])) as raised:
        ua.Layer.open(damaged)
    assert str(damaged) in str(raised.value)
    assert isinstance(raised.value, ValueError)


def _crafted(tmp_path: Path, runs: list[tuple[int, int]], **fields: object) -> Path:
    """A layer file whose CRC is right but whose header says ``runs`` (and ``fields``)."""
    header = LayerHeader(
        page_size=P, image_size=PAGES * P, parent=bytes(32), runs=runs,
    )  # fmt: skip
    prefix = bytearray(header.to_bytes())
    for name, value in fields.items():
        offset, fmt = {"flags": (10, "<H"), "pages": (96, "<Q"), "data_offset": (104, "<Q")}[name]
        struct.pack_into(fmt, prefix, offset, value)
    struct.pack_into("<I", prefix, len(prefix) - 4, zlib.crc32(prefix[:-4]))
    path = tmp_path / "crafted.layer"
    path.write_bytes(bytes(prefix).ljust(header.data_offset, b"\0") + bytes(header.pages * P))
    return path


@pytest.mark.parametrize(
    ("runs", "fields", "message"),
    [
        ([(0, 4), (2, 2)], {}, "not sorted and disjoint"),
        ([(0, 4), (3, 2)], {}, "not sorted and disjoint"),  # one page held twice
        ([(0, 2), (6, 4), (9, 1)], {}, "not sorted and disjoint"),
        ([(5, 1), (0, 2)], {}, "not sorted and disjoint"),
        ([(3, 0)], {}, "is empty"),
        ([(14, 4)], {}, "outside the 65536-byte image"),
        ([(0, 1)], {"flags": 1}, "flags 0x1"),
        ([(0, 1)], {"pages": 2}, "says 2 pages, but its runs hold 1"),
        ([(0, 2)], {"pages": 1}, "says 1 pages, but its runs hold 2"),
        ([(0, 1)], {"data_offset": 8192}, "its data starts at 8192"),
    ],
)
def test_a_well_sealed_but_wrong_index_is_refused(
    tmp_path: Path, runs: list[tuple[int, int]], fields: dict[str, int], message: str
) -> None:
    with pytest.raises(ua.LayerError, match=message):
        ua.Layer.open(_crafted(tmp_path, runs, **fields))


def test_touching_runs_are_a_layer(tmp_path: Path) -> None:
    """Runs that touch (a writer joins them, another might not) hold no page twice."""
    with ua.Layer.open(_crafted(tmp_path, [(0, 2), (2, 1), (15, 1)])) as layer:
        assert layer.runs == ((0, 2), (2, 1), (15, 1)) and layer.page_count == 4


def test_what_cannot_be_a_layer(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ua.Layer.open(tmp_path / "missing")
    with pytest.raises(ua.LayerError, match="not a regular file"):
        ua.Layer.open(tmp_path)
    (tmp_path / "empty").touch()
    with pytest.raises(ua.LayerError, match="too short"):
        ua.Layer.open(tmp_path / "empty")


def test_damaged_page_data_is_found_by_verify(tmp_path: Path, chain: Chain) -> None:
    data = bytearray(chain.layers[0].read_bytes())
    data[-100] ^= 0xFF  # the CRC covers the header and index only
    damaged = tmp_path / "damaged.layer"
    damaged.write_bytes(bytes(data))
    with ua.Layer.open(damaged) as layer:
        with pytest.raises(ua.LayerError, match="page data is damaged"):
            layer.verify()


# -- the writers -----------------------------------------------------------------------------


def _left_behind(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".partial"))


def test_the_writer_takes_pages_in_any_order_and_again(tmp_path: Path) -> None:
    pages = random_pages([7, 1, 2, 3, 12], seed=9)
    path = tmp_path / "a.layer"
    with ua.LayerWriter(
        path, page_size=P, image_size=PAGES * P, pages=[7, 1, 2, 3, 12, 2, 7], parent=bytes(32)
    ) as writer:
        assert writer.runs == ((1, 3), (7, 1), (12, 1))
        assert writer.missing() == [1, 2, 3, 7, 12]
        writer.write_page(12, b"\1" * P)
        for page in [3, 12, 1, 7]:
            writer.write_page(page, memoryview(pages[page]))  # any bytes-like; 12 again wins
        assert writer.missing() == [2]
        with pytest.raises(ua.LayerError, match=r"1 of its 5 pages were never written .* page 2"):
            writer.commit()
        assert not path.exists() and not writer.closed  # still open: write it, commit
        writer.write_page(2, bytearray(pages[2]))
        identity = writer.commit()
        assert writer.closed and _left_behind(tmp_path) == []
        with pytest.raises(ua.InvalidArgument, match="committed or aborted"):
            writer.write_page(1, pages[1])
    with ua.Layer.open(path) as layer:
        assert layer.identity == identity
        layer.verify()
        assert bytes(layer._view(0, 5 * P)) == b"".join(pages[p] for p in sorted(pages))
    assert path.stat().st_mode & 0o777 == 0o600, "a process's memory: for its owner only"


def test_the_identity_does_not_depend_on_the_order(tmp_path: Path) -> None:
    pages = random_pages(range(0, PAGES, 3), seed=4)
    identities = {
        write_layer(tmp_path / f"{seed}.layer", b"x" * 32, pages, PAGES * P, seed=seed)
        for seed in range(3)
    }
    assert len(identities) == 1
    other = dict(pages)
    other[0] = b"\1" * P  # one page's bytes differ
    assert write_layer(tmp_path / "o.layer", b"x" * 32, other, PAGES * P) not in identities
    assert write_layer(tmp_path / "p.layer", b"y" * 32, pages, PAGES * P) not in identities


def test_the_writer_refuses_what_is_not_its_page(tmp_path: Path) -> None:
    with ua.LayerWriter(
        tmp_path / "a.layer", page_size=P, image_size=PAGES * P, pages=[2, 3], parent=bytes(32)
    ) as writer:
        with pytest.raises(ua.InvalidArgument, match="page 4 is not one of the layer's 2 pages"):
            writer.write_page(4, bytes(P))
        with pytest.raises(ua.InvalidArgument, match="page 2 is 4095 bytes"):
            writer.write_page(2, bytes(P - 1))
        with pytest.raises(TypeError):
            writer.write_page(True, bytes(P))
    refusals: list[tuple[dict[str, object], str]] = [
        ({"pages": [PAGES]}, "outside the 65536-byte image"),
        ({"pages": [-1]}, "each of pages must be a page index"),
        ({"parent": b"short"}, "parent must be 32 bytes"),
        ({"page_size": 1000}, "page_size must be a power of two from 4096 to 1 GiB"),
        ({"image_size": 0}, "image_size must be an int >= 1"),
    ]
    for bad, message in refusals:
        arguments: dict[str, object] = {
            "page_size": P, "image_size": PAGES * P, "pages": [1], "parent": bytes(32), **bad,
        }  # fmt: skip
        with pytest.raises(ua.InvalidArgument, match=message):
            ua.LayerWriter(tmp_path / "b.layer", **arguments)  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == [], "a refused or aborted writer leaves nothing"


def test_abort_and_exceptions_leave_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "a.layer"
    path.write_bytes(b"the old one")
    writer = ua.LayerWriter(path, page_size=P, image_size=PAGES * P, pages=[1], parent=bytes(32))
    assert len(_left_behind(tmp_path)) == 1
    writer.write_page(1, bytes(P))
    writer.abort()
    writer.abort()
    assert _left_behind(tmp_path) == [] and path.read_bytes() == b"the old one"
    with pytest.raises(RuntimeError, match="the snapshotter failed"):
        with ua.LayerWriter(
            path, page_size=P, image_size=PAGES * P, pages=[1], parent=bytes(32)
        ) as writer:
            writer.write_page(1, bytes(P))
            raise RuntimeError("the snapshotter failed")
    with ua.ImageWriter(path, PAGES * P, P) as image:
        image.write_page(0, bytes(P))  # left without commit(): discarded
    assert _left_behind(tmp_path) == [] and path.read_bytes() == b"the old one"


def test_the_image_writer(tmp_path: Path) -> None:
    image = random.Random(5).randbytes(PAGES * P)
    path = tmp_path / "full.mem"
    order = list(range(PAGES))
    random.Random(6).shuffle(order)
    with ua.ImageWriter(path, PAGES * P, P) as writer:
        for page in order[:-1]:
            writer.write_page(page, image[page * P : (page + 1) * P])
        assert writer.missing() == [order[-1]]
        with pytest.raises(ua.LayerError, match="never written"):
            writer.commit()
        with pytest.raises(ua.InvalidArgument, match="outside the image's 16 pages"):
            writer.write_page(PAGES, bytes(P))
        page = order[-1]
        writer.write_page(page, image[page * P : (page + 1) * P])
        identity = writer.commit()
    assert path.read_bytes() == image
    with ua.Snapshot(path) as snapshot:
        assert snapshot.identity == identity, "not what a layer on top of it names as parent"
    with ua.ImageWriter(tmp_path / "sparse.mem", PAGES * P, P) as writer:
        writer.write_page(3, image[3 * P : 4 * P])
        writer.commit(allow_missing=True)
    assert (tmp_path / "sparse.mem").read_bytes() == overlay(
        bytes(PAGES * P), {3: image[3 * P : 4 * P]}
    )
    with pytest.raises(ua.InvalidArgument, match="not a multiple of 4096"):
        ua.ImageWriter(tmp_path / "odd.mem", PAGES * P + 1, P)


# -- composing, checking the chain, squashing -------------------------------------------------


def test_newest_wins_and_squash_agrees(tmp_path: Path, chain: Chain) -> None:
    out = tmp_path / "squashed.mem"
    identity = ua.squash(chain.base, chain.layers, out)
    assert out.read_bytes() == chain.expected
    with ua.Snapshot(out) as squashed, ua.LayeredSnapshot(chain.base, *chain.layers) as layered:
        assert squashed.identity == layered.identity == identity
        assert layered._read(0, layered.size) == chain.expected
        assert layered.size == PAGES * P and layered.path == str(chain.base)
    with ua.Snapshot(chain.base) as base:
        assert base.identity != identity
    # Page 4 is in both layers: the newest one's bytes.
    assert chain.expected[4 * P : 5 * P] == chain.contents[1][4] != chain.contents[0][4]


def test_squashing_keeps_the_base_holes(tmp_path: Path) -> None:
    base = tmp_path / "sparse.mem"
    with open(base, "wb") as f:
        f.truncate(256 * P)
        f.seek(100 * P)
        f.write(b"\7" * P)
    with ua.Snapshot(base) as snapshot:
        parent = snapshot.identity
    write_layer(tmp_path / "1.layer", parent, {200: b"\1" * P}, 256 * P)
    ua.squash(base, [tmp_path / "1.layer"], tmp_path / "out.mem")
    data = (tmp_path / "out.mem").read_bytes()
    assert data == overlay(bytes(256 * P), {100: b"\7" * P, 200: b"\1" * P})
    assert os.stat(tmp_path / "out.mem").st_blocks * 512 < 64 * P, "the holes were filled"


def test_the_pieces_of_an_image() -> None:
    def header(runs: list[tuple[int, int]]) -> LayerHeader:
        return LayerHeader(page_size=P, image_size=PAGES * P, parent=bytes(32), runs=runs)

    pieces = compose(PAGES * P, [header([(2, 3), (9, 2)]), header([(4, 2), (10, 1)])])
    assert [(s // P, e // P, source, at // P) for s, e, source, at in pieces] == [
        (0, 2, 0, 0), (2, 4, 1, 0), (4, 6, 2, 0), (6, 9, 0, 6), (9, 10, 1, 3),
        (10, 11, 2, 2), (11, 16, 0, 11),
    ]  # fmt: skip
    assert compose(PAGES * P, []) == [(0, PAGES * P, 0, 0)]


def test_a_broken_chain_is_refused(chain: Chain, tmp_path: Path) -> None:
    first, second = chain.layers
    with pytest.raises(
        ua.LayerError, match=re.escape(f"{second}: the chain is broken here")
    ) as raised:
        ua.LayeredSnapshot(chain.base, second, first)
    assert "below it is the base" in str(raised.value)
    with pytest.raises(ua.LayerError, match=re.escape(f"below it is the layer '{first}'")):
        ua.LayeredSnapshot(chain.base, first, first)
    with pytest.raises(ua.LayerError, match="the chain is broken"):
        ua.squash(chain.base, [second], tmp_path / "out.mem")
    assert not (tmp_path / "out.mem").exists()
    other = tmp_path / "other.mem"
    other.write_bytes(bytes(PAGES * P))
    with pytest.raises(ua.LayerError, match=re.escape(f"{first}: the chain is broken here")):
        ua.LayeredSnapshot(other, first, second)
    with ua.LayeredSnapshot(other, second, first, check=False) as unchecked:
        assert unchecked._read(0, unchecked.size) == overlay(
            bytes(PAGES * P), *chain.contents[::-1]
        )
    smaller = tmp_path / "smaller.mem"
    smaller.write_bytes(bytes(P))
    with pytest.raises(ua.LayerError, match="overlays a 65536-byte image, but the base"):
        ua.LayeredSnapshot(smaller, first, check=False)
    bigger = tmp_path / "bigger.mem"  # a layer of a smaller image: it would leave a tail
    bigger.write_bytes(bytes(2 * PAGES * P))
    with pytest.raises(ua.LayerError, match="overlays a 65536-byte image, but the base"):
        ua.LayeredSnapshot(bigger, first, check=False)
    with pytest.raises(ua.LayerError, match="overlays a 65536-byte image, but the base"):
        ua.squash(bigger, [first], tmp_path / "out.mem", check=False)
    assert not (tmp_path / "out.mem").exists()


# -- serving from the layers: real faults -------------------------------------------------------


async def test_lazily_restored_memory_is_the_squashed_image(
    lab: Lab, chain: Chain, layered: ua.LayeredSnapshot, tmp_path: Path
) -> None:
    ua.squash(chain.base, chain.layers, tmp_path / "squashed.mem")
    region = lab.anonymous(PAGES)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    resolver = layered.resolver([mapping(region.address, PAGES)])
    order = list(range(PAGES))
    random.Random(3).shuffle(order)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver) as server:
            workers = [lab.touch(region.address + page * P, P, write=False) for page in order]
            for worker in workers:
                await finished(worker)
    assert region.read(0, region.length) == (tmp_path / "squashed.mem").read_bytes()
    assert region.read(0, region.length) == chain.expected
    assert server.stats.faults == server.stats.resolved == PAGES


async def test_readahead_stops_where_the_source_changes(
    lab: Lab, chain: Chain, layered: ua.LayeredSnapshot
) -> None:
    """Pieces: base 0-1, layer 1 2-3, layer 2 4-5, base 6-8, layer 1 9, layer 2 10, base
    11-12, layer 1 13, base 14, layer 2 15. A sequential read faults once per piece."""
    region = lab.anonymous(PAGES)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    resolver = layered.resolver([mapping(region.address, PAGES)], readahead=PAGES)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver) as server:
            await finished(lab.touch(region.address, region.length, write=False))
    assert region.read(0, region.length) == chain.expected
    assert server.stats.faults == 10
    assert server.stats.pages == PAGES


async def test_mappings_one_file_holds_keep_the_one_address_paths(
    lab: Lab, chain: Chain, layered: ua.LayeredSnapshot
) -> None:
    """Pages 4-5 come from layer 2 alone, 6-8 from the base alone: plain copiers."""
    region = lab.anonymous(8)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    mappings = [
        mapping(region.address, 2, 4),
        mapping(region.address + 2 * P, 3, 6),
        mapping(region.address + 5 * P, 3, 1),  # base, layer 1: in pieces
    ]
    resolver = layered.resolver(mappings)
    kinds = [type(part.copier).__name__ for part in resolver._parts]
    assert kinds == ["CopyFrom", "CopyFrom", "_LayeredCopy"]
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver):
            await finished(lab.touch(region.address, region.length, write=False))
    expected = chain.expected
    assert region.read(0, region.length) == expected[4 * P : 9 * P] + expected[P : 4 * P]


async def test_removed_pages_come_back_as_zeros(
    lab: Lab, chain: Chain, layered: ua.LayeredSnapshot
) -> None:
    region = lab.anonymous(PAGES)
    uffd = lab.uffd(ua.Feature.EVENT_REMOVE)
    uffd.register(region.address, region.length)
    resolver = layered.resolver([mapping(region.address, PAGES)], readahead=3)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver) as server:
            await finished(lab.touch(region.address, region.length, write=False))
            # Pages 1-5: base, layer 1 and layer 2 pages alike.
            await finished(lab.run(lambda: region.discard(P, 5 * P)))
            await finished(lab.touch(region.address, region.length, write=False))
    expected = chain.expected[:P] + bytes(5 * P) + chain.expected[6 * P :]
    assert region.read(0, region.length) == expected
    assert server.stats.events == 1


async def test_remapped_pages_keep_their_layer_bytes(
    lab: Lab, chain: Chain, layered: ua.LayeredSnapshot
) -> None:
    region = lab.anonymous(PAGES)
    uffd = lab.uffd(ua.Feature.EVENT_REMAP)
    uffd.register(region.address, region.length)
    resolver = layered.resolver([mapping(region.address, PAGES)], readahead=2)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver):
            await finished(lab.touch(region.address + 3 * P, P, write=False))
            new = await finished(lab.run(region.move))
            await finished(lab.touch(new, region.length, write=False))
    assert region.read(0, region.length) == chain.expected


@pytest.mark.parametrize("native", [True, False], ids=["native", "on-the-loop"])
async def test_populating_copies_each_piece_from_its_file(
    lab: Lab, chain: Chain, layered: ua.LayeredSnapshot, native: bool
) -> None:
    """Natively (one part a span, each from its own file) or on the loop: every page
    from the layer that holds it."""
    region = lab.anonymous(PAGES)
    uffd = lab.uffd(ua.Feature.EVENT_REMOVE)
    uffd.register(region.address, region.length)
    resolver = layered.resolver([mapping(region.address, PAGES)])
    with anyio.fail_after(TIMEOUT), ua.native_replay(native):
        async with ua.FaultServer(uffd, resolver) as server:
            stats = await ua.prefetch(uffd, resolver, None, populate=True)
            assert stats.populated
            data = await finished(lab.run(lambda: region.read(0, region.length)))
    assert data == chain.expected
    assert server.stats.faults == 0
    assert (sum(resolver.fill_ioctls().values()) == 0) == native  # the loop's are counted


async def test_a_working_set_replays_natively_from_every_layer(
    lab: Lab, chain: Chain, layered: ua.LayeredSnapshot
) -> None:
    """A set over every page, a fault queued far ahead: the thread answers it with the
    rest of its run, each page from its own layer, and the set from every layer."""
    region = lab.anonymous(PAGES)
    uffd = lab.uffd(ua.Feature.EVENT_REMOVE)
    uffd.register(region.address, region.length)
    resolver = layered.resolver([mapping(region.address, PAGES)])
    order = random.Random(3).sample(range(PAGES), PAGES)
    working_set = ua.WorkingSet(snapshot_size=layered.size, identity=layered.identity, pages=order)
    assert len(resolver.memory_parts() or []) > 2  # one part a span
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver) as server:
            toucher = lab.touch(region.address + order[-1] * P, P, write=False)
            queued(uffd)
            stats = await ua.prefetch(uffd, resolver, working_set)
            await finished(toucher)
            data = await finished(lab.run(lambda: region.read(0, region.length)))
    assert data == chain.expected
    assert (stats.faults_answered, server.stats.faults) == (1, 0)
    assert resolver.fill_ioctls() == {"COPY": 0, "ZEROPAGE": 0}


def test_huge_pages_must_come_from_one_file(tmp_path: Path) -> None:
    huge = 2 << 20
    base = tmp_path / "base.mem"
    with open(base, "wb") as f:
        f.truncate(2 * huge)
    with ua.Snapshot(base) as snapshot:
        parent = snapshot.identity
    write_layer(tmp_path / "small.layer", parent, {3: b"\1" * P}, 2 * huge)
    with ua.LayerWriter(
        tmp_path / "huge.layer", page_size=huge, image_size=2 * huge, pages=[1], parent=parent
    ) as writer:
        writer.write_page(1, b"\2" * huge)
        writer.commit()
    mappings = [
        ua.GuestMapping(base_host_virt_addr=0x7F00_0000_0000, size=2 * huge, offset=0,
                        page_size=huge)
    ]  # fmt: skip
    with ua.LayeredSnapshot(base, tmp_path / "small.layer") as layered:
        with pytest.raises(ua.InvalidArgument, match=r"page at offset 0x0 .* more than one file"):
            layered.resolver(mappings)
        layered.resolver([mapping(0x7F00_0000_0000, 512)])  # in 4 KiB pages: fine
    with ua.LayeredSnapshot(base, tmp_path / "huge.layer") as layered:
        parts = layered.resolver(mappings)._parts
        assert type(parts[0].copier).__name__ == "_LayeredCopy"


def test_a_closed_layered_snapshot_serves_nothing(lab: Lab, chain: Chain) -> None:
    layered = ua.LayeredSnapshot(chain.base, *chain.layers)
    resolver = layered.resolver([mapping(0x7F00_0000_0000, PAGES)])
    layers = layered.layers
    layered.close()
    layered.close()
    assert layered.closed and all(layer.closed for layer in layers)
    assert "closed" in repr(layered)
    fault = ua.PageFault(address=0x7F00_0000_0000, flags=ua.FaultFlags(0))
    with pytest.raises(ua.SnapshotClosed):
        resolver.resolve_now(fault, lab.uffd())
    with pytest.raises(ua.SnapshotClosed):
        layered.resolver([mapping(0x7F00_0000_0000, PAGES)])


# -- served to a process that hands its uffd over -----------------------------------------------

#: Snapshot pages the peer touches first (it then reads everything, and compares).
TOUCH = [4, 5, 10, 2, 20, 30, 31, 0, 15, 16]


def peer_config(place: Path, expected: Path, **extra: object) -> str:
    return json.dumps(
        {
            "socket": str(place / "uffd.sock"),
            "snapshot": str(expected),  # what every page it reads must equal
            "page_size": P,
            "pages": PAGES,
            "touch": TOUCH,
            "all": True,
            **extra,
        }
    )


async def test_served_to_a_handed_over_process(place: Path) -> None:
    """Two regions of 16 pages laid end to end: a 32-page image. A working set recorded on
    the layers is one of the squashed file's."""
    chain = make_chain(place, 2 * PAGES, base_name="guest.mem")
    squashed = place / "squashed.mem"
    ua.squash(chain.base, chain.layers, squashed)
    recorded = place / "boot.ws"
    with ua.LayeredSnapshot(chain.base, *chain.layers) as layered:
        async with running(place, layered, record=recorded, readahead=0) as server:
            await run_peer(peer_config(place, squashed))
            await ends_soon(server)
            stats = server.stats
    assert (stats.served, stats.refused, stats.failed, stats.errors) == (1, 0, 0, 0)
    assert stats.faults == 2 * PAGES
    working_set = ua.WorkingSet.load(recorded)
    assert working_set.pages[: len(TOUCH)] == tuple(TOUCH)
    with ua.Snapshot(squashed) as snapshot:
        assert working_set.matches(snapshot.size, snapshot.identity)


# -- the command line ------------------------------------------------------------------------


def test_the_command_line_squashes_and_shows(
    chain: Chain, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.mem"
    assert main(["layers", "squash", str(chain.base), *map(str, chain.layers), "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert out.read_bytes() == chain.expected
    with ua.Snapshot(out) as snapshot:
        assert f"into {out} (65,536 bytes, identity {snapshot.identity.hex()})" in said
    assert main(["layers", "show", str(chain.layers[1]), "--verify"]) == 0
    said = capsys.readouterr().out
    with ua.Layer.open(chain.layers[1]) as layer, ua.Layer.open(chain.layers[0]) as below:
        assert f"parent: {below.identity.hex()}" in said
        assert f"identity: {layer.identity.hex()}" in said
        assert layer.parent == below.identity
    assert "pages: 4 of 4096 bytes (0.0 MiB, 25.0% of the image) in 3 runs" in said
    assert "first runs (page+count): 4+2, 10+1, 15+1" in said
    assert "image: 65,536 bytes" in said and "verified" in said


def test_the_command_line_refuses_what_it_cannot_use(
    chain: Chain, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.mem"
    first, second = map(str, chain.layers)
    assert main(["layers", "squash", str(chain.base), second, first, "-o", str(out)]) == 1
    assert "cannot squash: " in capsys.readouterr().err and not out.exists()
    assert main(["layers", "squash", str(chain.base), second, "-o", str(out), "--no-check"]) == 0
    assert out.read_bytes() == overlay(chain.base.read_bytes(), chain.contents[1])
    assert main(["layers", "show", str(chain.base)]) == 1
    assert "cannot read the layer: " in capsys.readouterr().err


def test_the_command_line_serves_layers(place: Path) -> None:
    chain = make_chain(place, 2 * PAGES, base_name="guest.mem")
    squashed = place / "squashed.mem"
    ua.squash(chain.base, chain.layers, squashed)
    layers = [argument for layer in chain.layers for argument in ("--layer", str(layer))]
    with cli_server(place, *layers) as server:
        assert server.stderr is not None
        log = read_until(server.stderr, b"listening")
        anyio.run(run_peer, peer_config(place, squashed))
        log += read_until(server.stderr, b"connections 1 (0 active", timeout=TIMEOUT)
        log += stop(server)
    text = log.decode()
    assert f"serving {chain.base} with 2 layers on top" in text
    assert f"pages copied {2 * PAGES} " in text.rsplit("stopped;", 1)[1]


def test_serve_refuses_layers_on_a_url(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "uffd_async", "serve", "http://127.0.0.1:9/x.mem",
         "--socket", str(tmp_path / "s"), "--layer", str(tmp_path / "1.layer")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2  # a usage error, found before anything is opened
    assert "argument --layer: needs SNAPSHOT to be a file, not a URL" in result.stderr
