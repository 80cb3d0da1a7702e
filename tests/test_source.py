"""The declared source interface (:mod:`uffd_async._restore._source`) and ``open_source``.

Each test pins one promise: every kind of snapshot source is a ``SnapshotSource`` and
answers its questions (size, identity, fetch unit, mappable, reading a span, its
copier); ``open_source`` decides the kind of a spec in one place and refuses a spec
that names nothing it can open; the prefetcher's protocol is what the copiers offer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import uffd_async as ua
from uffd_async._remote._chunked_copy import ChunkedCopy
from uffd_async._remote._open_source import check_source, open_source
from uffd_async._restore._prefetch import Prefetchable
from uffd_async._restore._source import SnapshotSource

from ._support import HttpObjectServer
from .test_layers import Chain, make_chain

pytestmark = pytest.mark.anyio

P = ua.PAGE_SIZE


@pytest.fixture
def chain(tmp_path: Path) -> Chain:
    return make_chain(tmp_path)


def a_mapping(pages: int) -> ua.GuestMapping:
    return ua.GuestMapping(
        base_host_virt_addr=0x7F00_0000_0000, size=pages * P, offset=0, page_size=P
    )


async def test_a_file_is_a_mapped_source(chain: Chain) -> None:
    image = chain.base.read_bytes()
    async with open_source(chain.base) as source:
        assert type(source) is ua.Snapshot and isinstance(source, SnapshotSource)
        assert (source.size, source.path) == (len(image), str(chain.base))
        assert source.mappable and source.fetch_unit == P
        assert await source.version() == source.identity
        assert await source.read(3 * P + 5, 100) == image[3 * P + 5 : 3 * P + 105]
        with pytest.raises(ua.InvalidArgument, match="past the source's"):
            await source.read(len(image) - 1, 2)
        assert isinstance(source.copier(a_mapping(4)), ua.resolvers.CopyFrom)
        with pytest.raises(ua.InvalidArgument, match="wp=True is not offered"):
            source.copier(a_mapping(4), wp=True)
    assert source.closed  # async with closed what open_source opened
    with pytest.raises(ua.SnapshotClosed):
        source.check_open()


async def test_a_base_with_layers_is_one_source_of_the_composed_image(chain: Chain) -> None:
    async with open_source(chain.base, layers=chain.layers) as source:
        assert type(source) is ua.LayeredSnapshot
        assert len(source.layers) == 2 and source.mappable
        assert await source.read(0, source.size) == chain.expected
        squashed = chain.base.parent / "squashed.mem"
        ua.squash(chain.base, chain.layers, squashed)
        with ua.Snapshot(squashed) as flat:  # the same bytes: the same identity
            assert await source.version() == await flat.version()
    assert source.closed and all(layer.closed for layer in source.layers)


async def test_a_url_is_a_source_fetched_by_chunks(
    http_server: HttpObjectServer, chain: Chain
) -> None:
    image = chain.base.read_bytes()
    http_server.put("snap", image)
    source = open_source(http_server.url("snap"), http={"chunk_size": 2 * P})
    assert type(source) is ua.HttpSource and isinstance(source, SnapshotSource)
    assert http_server.stats()["requests"] == 0  # made, not opened: async with opens it
    async with source:
        assert source.size == len(image) and not source.mappable
        assert source.fetch_unit == 2 * P
        with ua.Snapshot(chain.base) as local:  # the same bytes: the same identity
            assert await source.version() == local.identity
        assert await source.read(P, 10) == image[P : P + 10]
        copier = source.copier(a_mapping(4))
        assert isinstance(copier, ChunkedCopy) and copier.chunk_fill is copier
        with pytest.raises(ua.InvalidArgument, match="readahead does not apply"):
            source.copier(a_mapping(4), readahead=1)
    assert source.closed


async def test_a_source_is_its_own_spec(chain: Chain) -> None:
    with ua.Snapshot(chain.base) as snapshot:
        assert open_source(snapshot) is snapshot
        with pytest.raises(ua.InvalidArgument, match="layers apply to a snapshot file"):
            open_source(snapshot, layers=chain.layers)


async def test_what_names_no_source(tmp_path: Path) -> None:
    with pytest.raises(ua.InvalidArgument, match="not int"):
        open_source(42)  # type: ignore[arg-type]
    with pytest.raises(ua.InvalidArgument, match="not of a URL"):
        open_source("https://example.invalid/x.mem", layers=[tmp_path / "1.layer"])
    with pytest.raises(FileNotFoundError):
        open_source(tmp_path / "missing.mem")
    with pytest.raises(ua.InvalidArgument, match="readahead does not apply"):
        check_source("http://example.invalid/x.mem", readahead=4)
    check_source(tmp_path / "missing.mem", readahead=4)  # a file takes readahead: opened later


async def test_what_the_prefetcher_is_offered(chain: Chain) -> None:
    with ua.Snapshot(chain.base) as snapshot:
        from_memory = ua.copy_from(bytes(4 * P), base=0x7F00_0000_0000)
        resolver = snapshot.resolver([a_mapping(4)])
        for prefetchable in (from_memory, resolver):
            assert isinstance(prefetchable, Prefetchable)
            assert prefetchable.can_prefetch and prefetchable.chunk_fill is None
        assert resolver.populated_bytes() == (0, 4 * P)
        assert not isinstance(ua.zero_fill(), Prefetchable)
