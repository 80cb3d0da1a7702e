"""``ua.ObjectSource``: snapshots in S3, Azure Blob and GCS, on real faults, against real
servers on loopback (``tests/_object_stores.py``: moto with SigV4 checked, Azurite, and
fake-gcs-server), on asyncio and trio.

Each test checks bytes (every one right, or the fault failed); a replaced object must
end in SourceChanged and never be mixed in; a credential given in the environment or
in options must never appear in an error, a log or a repr. Every wait is bounded.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import uffd_async as ua

from ._object_stores import Azurite, FakeGcs, MotoS3, azurite, fake_gcs, moto_s3
from ._support import Lab
from .test_http_source import CHUNK, PAGES, SOURCE, read_pages, restoring

pytestmark = pytest.mark.anyio
P = ua.PAGE_SIZE
NEW = bytes(reversed(SOURCE))


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    with moto_s3(tmp_path_factory.mktemp("moto")) as store:
        yield store


@pytest.fixture(scope="module")
def azure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    with azurite(tmp_path_factory.mktemp("azurite")) as store:
        yield store


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGcs]:
    with fake_gcs(tmp_path_factory.mktemp("gcs")) as store:
        yield store


async def restore_all(lab: Lab, source: ua.ObjectSource) -> None:
    """Every page of a region restored from ``source`` is the snapshot's."""
    async with restoring(lab, source) as (region, server):
        pages = range(0, PAGES, 7)
        got = await read_pages(lab, region, pages)
        for page in pages:
            assert got[page] == SOURCE[page * P : (page + 1) * P], page
        assert server.stats.errors == 0
    assert source.stats.chunks == len({page * P // CHUNK for page in pages})


# -- S3 (moto) -------------------------------------------------------------------------


async def test_s3_restores_with_credentials_from_options(
    s3: MotoS3, lab: Lab, anyio_backend: str
) -> None:
    s3.put(f"snap-{anyio_backend}", SOURCE)
    url = f"s3://{s3.bucket}/snap-{anyio_backend}"
    async with ua.ObjectSource(url, options=s3.options(), chunk_size=CHUNK) as source:
        assert source.size == len(SOURCE)
        assert "ETag" in (source.validator or "") and "version" in (source.validator or "")
        await restore_all(lab, source)
    assert source.closed


async def test_s3_reads_the_standard_environment(
    s3: MotoS3, lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    s3.put("env-snap", SOURCE)
    async with ua.ObjectSource(f"s3://{s3.bucket}/env-snap", chunk_size=CHUNK) as source:
        await restore_all(lab, source)


async def test_s3_a_wrong_secret_is_refused_and_never_shown(
    s3: MotoS3, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="uffd_async")
    s3.put("secret-snap", SOURCE)
    wrong = "wrongSECRETwrongSECRETwrongSECRET0123456"
    url = f"s3://{s3.bucket}/secret-snap"
    source = ua.ObjectSource(url, options=s3.options(secret_access_key=wrong), retries=0)
    with pytest.raises(ua.FetchError) as caught:
        await source.open()
    assert caught.value.status == 403  # a HEAD: no error body, so no S3 error code
    # The same from the environment, with a session token too.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "sessionTOKENsessionTOKEN")
    options = {k: v for k, v in s3.options().items() if k != "secret_access_key"}
    from_env = ua.ObjectSource(url, options=options, retries=0)
    with pytest.raises(ua.FetchError) as caught_env:
        await from_env.open()
    # The right secret, shown nowhere either.
    monkeypatch.undo()
    async with ua.ObjectSource(url, options=s3.options(), chunk_size=CHUNK) as good:
        await good.chunk(0)
    for text in (
        str(caught.value),
        repr(caught.value),
        str(caught_env.value),
        repr(source),
        repr(from_env),
        repr(good),
        str(vars(good).get("url")),
        caplog.text,
    ):
        for secret in (wrong, s3.secret, "sessionTOKEN"):
            assert secret not in text, text


async def test_s3_an_object_replaced_mid_restore_is_never_mixed_in(s3: MotoS3, lab: Lab) -> None:
    s3.put("moving", SOURCE)
    url = f"s3://{s3.bucket}/moving"
    async with ua.ObjectSource(url, options=s3.options(), chunk_size=CHUNK) as source:
        async with restoring(lab, source) as (region, _server):
            got = await read_pages(lab, region, [0])
            assert got[0] == SOURCE[:P]
            s3.put("moving", NEW)  # same size, new ETag and version
            # The version pinned at open is still there (versioning is on): served whole.
            assert await source.read(5 * CHUNK, P) == SOURCE[5 * CHUNK : 5 * CHUNK + P]
            s3.delete("moving", source.pinned)
            with pytest.raises(ua.SourceChanged) as caught:
                await source.read(6 * CHUNK, P)
            assert caught.value.status in (404, 412)
            requests = source.stats.requests
            with pytest.raises(ua.SourceChanged):  # sticky: nothing more is sent
                await source.read(0, P)
            assert source.stats.requests == requests
            assert await source.wait_changed() is caught.value


# -- what every answer and every error goes through (obstore's answers, altered) --------

SECRET_BODY = "<StringToSign>AWS4-HMAC-SHA256 sessionTOKENsessionTOKEN</StringToSign>"


@pytest.fixture
async def opened(s3: MotoS3) -> AsyncIterator[ua.ObjectSource]:
    """A source opened on moto, whose reads can then be given altered answers."""
    s3.put("altered", SOURCE)
    url = f"s3://{s3.bucket}/altered"
    async with ua.ObjectSource(url, options=s3.options(), chunk_size=CHUNK, retries=2) as source:
        yield source


def answering(source: ua.ObjectSource, *answers: Any) -> list[tuple[int, int]]:
    """Make ``source``'s reads get ``answers`` in turn (an exception is raised, a callable
    alters the real answer), then the real ones; returns the ranges asked for."""
    real, queue, asked = source._get, list(answers), []

    def get(start: int, end: int) -> tuple[bytes, Any, tuple[int, int]]:
        asked.append((start, end))
        answer = queue.pop(0) if queue else None
        if isinstance(answer, BaseException):
            raise answer
        data, meta, got = real(start, end)
        return answer(data, dict(meta), got) if answer else (data, meta, got)

    source._get = get  # type: ignore[method-assign]
    return asked


@pytest.mark.parametrize(
    "alter",
    [
        lambda data, meta, got: (data, {**meta, "size": meta["size"] + 1}, got),
        lambda data, meta, got: (data, {**meta, "e_tag": '"another"'}, got),
        lambda data, meta, got: (data, {**meta, "version": "another"}, got),
    ],
    ids=["size", "etag", "version"],
)
async def test_an_answer_of_another_version_stops_the_source(
    opened: ua.ObjectSource, alter: Any
) -> None:
    await opened.chunk(3)  # at hand, in the cache
    asked = answering(opened, alter)
    with pytest.raises(ua.SourceChanged):
        await opened.read(0, P)
    for index in (3, 4):  # sticky: nothing more is asked, nothing cached is served
        with pytest.raises(ua.SourceChanged):
            await opened.chunk(index)
    assert len(asked) == 1 and opened.stats.retries == 0


async def test_an_answer_of_other_bytes_is_an_error_never_bytes(opened: ua.ObjectSource) -> None:
    # Another range: final (the store answers another question than asked).
    answering(opened, lambda data, meta, got: (data, meta, (got[0] + P, got[1] + P)))
    with pytest.raises(ua.FetchError) as other:
        await opened.read(P, P)
    assert not isinstance(other.value, ua.SourceChanged) and opened.stats.retries == 0
    # A body cut short, every time: retried, then an error.
    short = lambda data, meta, got: (data[:-1], meta, got)  # noqa: E731
    answering(opened, short, short, short)
    with pytest.raises(ua.FetchError, match="after 3 attempts") as cut:
        await opened.read(0, P)
    assert not isinstance(cut.value, ua.SourceChanged) and opened.stats.retries == 2
    # Cut short once: the retry brings it whole.
    answering(opened, short)
    assert await opened.read(0, P) == SOURCE[:P]
    assert opened.stats.retries == 3


async def test_obstores_errors_are_classified_and_never_quoted(opened: ua.ObjectSource) -> None:
    from obstore import exceptions as oe

    def error(kind: type[Exception], status: str, code: str = "") -> Exception:
        body = f"<Error><Code>{code}</Code>{SECRET_BODY}</Error>" if code else SECRET_BODY
        return kind(f"Generic S3 error: {status} http://x/?X-Amz-Credential=AKIA {body}")

    seen: list[ua.FetchError] = []
    # A 5xx and a failed connection are retried; the third try succeeds.
    asked = answering(
        opened,
        error(oe.GenericError, "status: 503", "SlowDown"),
        oe.GenericError("error sending request: client error (Connect) " + SECRET_BODY),
    )
    assert await opened.read(0, P) == SOURCE[:P]
    assert len(asked) == 3 and opened.stats.retries == 2
    # Retried until the retries run out: the last error says what it was, in our words.
    answering(opened, *[error(oe.GenericError, "status: 500", "InternalError")] * 3)
    with pytest.raises(ua.FetchError, match=r"HTTP 500 \(InternalError\).*after 3") as failed:
        await opened.read(0, P)
    seen.append(failed.value)
    # A 4xx, a permission and an authentication error are final at once.
    for kind, status, code in (
        (oe.GenericError, 400, "InvalidRequest"),
        (oe.PermissionDeniedError, 403, "AccessDenied"),
        (oe.UnauthenticatedError, 401, "InvalidToken"),
    ):
        retries = opened.stats.retries
        answering(opened, error(kind, f"status: {status}", code))
        with pytest.raises(ua.FetchError) as final:
            await opened.read(0, P)
        assert final.value.status == status and f"({code})" in str(final.value)
        assert opened.stats.retries == retries, kind
        seen.append(final.value)
    for caught in seen:
        assert not isinstance(caught, ua.SourceChanged)
        chained: BaseException | None = caught
        while chained is not None:  # no obstore error (its text quotes the body) chained
            assert not isinstance(chained, oe.BaseError), repr(chained)
            chained = chained.__cause__ or chained.__context__
        for text in (str(caught), repr(caught)):
            assert "sessionTOKEN" not in text and "AKIA" not in text and "x/?" not in text
    # A failed precondition, and the pinned version gone: the object changed, for good.
    answering(opened, oe.PreconditionError("Generic S3 error: status: 412 " + SECRET_BODY))
    with pytest.raises(ua.SourceChanged) as changed:
        await opened.read(0, P)
    assert changed.value.status == 412 and "sessionTOKEN" not in str(changed.value)
    assert await opened.wait_changed() is changed.value


async def test_the_pinned_version_gone_stops_the_source(opened: ua.ObjectSource) -> None:
    from obstore import exceptions as oe

    asked = answering(opened, oe.NotFoundError("Object at location altered not found"))
    with pytest.raises(ua.SourceChanged) as gone:
        await opened.chunk(2)
    assert gone.value.status == 404 and len(asked) == 1


async def test_s3_a_missing_object_and_a_bad_url(s3: MotoS3) -> None:
    with pytest.raises(ua.FetchError) as caught:
        await ua.ObjectSource(f"s3://{s3.bucket}/absent", options=s3.options()).open()
    assert caught.value.status == 404
    with pytest.raises(ua.InvalidArgument) as bad:
        ua.ObjectSource("s3://AKIAXX:hunter2secret@bucket/key")
    assert "hunter2" not in str(bad.value)
    for url in ("s3://bucket", "s3://bucket/", "gs:///key", "s3://b/k?X-Amz-Signature=1"):
        with pytest.raises(ua.InvalidArgument):
            ua.ObjectSource(url)


# -- Azure (Azurite) -------------------------------------------------------------------


async def test_azure_restores_refuses_a_wrong_key_and_notices_a_change(
    azure: Azurite, lab: Lab, anyio_backend: str
) -> None:
    name = f"snap-{anyio_backend}"
    azure.put(name, SOURCE)
    url = f"az://{azure.container}/{name}"
    async with ua.ObjectSource(url, options=azure.options(), chunk_size=CHUNK) as source:
        await restore_all(lab, source)
        azure.put(name, NEW)
        with pytest.raises(ua.SourceChanged) as caught:
            await source.read(0, P)  # not the cache: a request
        assert caught.value.status == 412
    wrong = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXk="
    bad = ua.ObjectSource(url, options=azure.options(account_key=wrong), retries=0)
    with pytest.raises(ua.FetchError) as refused:
        await bad.open()
    assert refused.value.status == 403
    for text in (str(refused.value), repr(bad), repr(source)):
        assert wrong not in text and azure.options()["account_key"] not in text


async def test_aclose_returns_once_the_stores_connections_are_closed(azure: Azurite) -> None:
    """obstore closes a dropped store's connections a moment later, on its own threads:
    aclose waits for them, so that none is open when it returns (not even briefly).
    Azurite keeps connections alive (moto closes each after its answer)."""
    from uffd_async._remote._closing_sockets import ClosingSockets

    azure.put("pooled", SOURCE)
    url = f"az://{azure.container}/pooled"
    for _ in range(3):
        watch = ClosingSockets()
        source = ua.ObjectSource(url, options=azure.options(), chunk_size=CHUNK)
        async with source:
            async with anyio.create_task_group() as tg:
                for index in range(source.chunk_count):
                    tg.start_soon(source.chunk, index)
            assert watch.opened(), "the store's pool holds its connections while open"
        assert not watch.opened()


# -- GCS (fake-gcs-server) -------------------------------------------------------------


async def test_gcs_restores(gcs: FakeGcs, lab: Lab, anyio_backend: str) -> None:
    """Reads only: fake-gcs-server ignores if_match, so a change is not testable on it (the
    generation pinned at open is still sent with every read)."""
    gcs.put(f"snap-{anyio_backend}", SOURCE)
    url = f"gs://{gcs.bucket}/snap-{anyio_backend}"
    async with ua.ObjectSource(url, options=gcs.options(), chunk_size=CHUNK) as source:
        assert "version" in (source.validator or "")  # the generation
        await restore_all(lab, source)


# -- without the extra -----------------------------------------------------------------


def test_without_obstore_it_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "obstore", None)
    with pytest.raises(ImportError, match=r"uffd_async\[objectstore\]"):
        ua.ObjectSource("s3://bucket/key")


def test_a_pack_store_without_obstore_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "obstore", None)
    with pytest.raises(ImportError, match=r"packs in an object store need obstore: .*objectstore"):
        ua.PackSource("s3://bucket/packs/guest.mem.index")


@pytest.mark.parametrize("options", [{"region": 1}, {2: "x"}])
def test_client_options_are_strings_naming_strings(options: Any) -> None:
    for make in (
        lambda: ua.ObjectSource("s3://bucket/key", options=options),
        lambda: ua.PackSource("s3://bucket/packs/guest.mem.index", options=options),
    ):
        with pytest.raises(ua.InvalidArgument, match="must be a str naming a str value"):
            make()


def test_open_source_names_object_urls(tmp_path: Path) -> None:
    from uffd_async._remote._open_source import check_source, open_source

    source = open_source("gs://bucket/key", store={"bearer_token": "t"}, http={"retries": 1})
    assert isinstance(source, ua.ObjectSource) and source.retries == 1
    with pytest.raises(ua.InvalidArgument, match="readahead does not apply"):
        check_source("az://container/blob", readahead=4)
    with pytest.raises(ua.InvalidArgument, match="store options"):
        open_source(tmp_path / "file", store={"region": "x"})
