"""Without privileges: what probe says, and that the user-mode-only path serves faults.

Three situations, each in a child process:

* **Nothing works**: a seccomp filter (installed with ``prctl(PR_SET_SECCOMP)``
  through ctypes, after ``PR_SET_NO_NEW_PRIVS``, so no privilege is needed)
  makes ``userfaultfd(2)`` fail, with or without UFFD_USER_MODE_ONLY, and the
  ``USERFAULTFD_IOC_NEW`` ioctl of /dev/userfaultfd fail too. probe must exit 1
  and name the cause.
* **Only user-mode-only works** (root only): CAP_SYS_PTRACE dropped (setpriv),
  ``vm.unprivileged_userfaultfd`` at 0 (set, and put back, if it was not), and
  the device's ioctl refused with EACCES by the filter, as the permission check
  refuses it to another user (root would pass that check as the device's owner).
* **This user**: when the suite runs unprivileged (``.ci/unprivileged`` runs it
  as nobody), probe and a real fault served through a user-mode-only uffd.
"""

from __future__ import annotations

import errno
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import uffd_async as ua
from uffd_async._core import _abi
from uffd_async._core._open import DEVICE_PATH, SYSCTL_PATH

from ._seccomp import (
    ALLOW,
    ARCH,
    ERRNO,
    JEQ,
    LD,
    MACHINE,
    NR,
    RET,
    Instruction,
    arg,
    installing,
)
from ._support import TIMEOUT, Lab, finished, pattern
from .conftest import needs_root

needs_seccomp_arch = pytest.mark.skipif(
    MACHINE is None, reason=f"no seccomp filter for {platform.machine()}"
)


def deny_userfaultfd(syscall_errno: int | None, device_errno: int) -> list[Instruction]:
    """userfaultfd(2) refused (or allowed, for None), and /dev/userfaultfd's ioctl refused."""
    assert MACHINE is not None
    refuse_syscall: Instruction = (RET, 0, 0, ERRNO | syscall_errno if syscall_errno else ALLOW)
    return [
        (LD, 0, 0, ARCH),
        (JEQ, 0, 7, MACHINE["arch"]),  # another ABI: allow
        (LD, 0, 0, NR),
        (JEQ, 0, 1, MACHINE["userfaultfd"]),
        refuse_syscall,
        (JEQ, 0, 3, MACHINE["ioctl"]),
        (LD, 0, 0, arg(1)),  # the request, low 32 bits
        (JEQ, 0, 1, _abi.USERFAULTFD_IOC_NEW & 0xFFFFFFFF),
        (RET, 0, 0, ERRNO | device_errno),
        (RET, 0, 0, ALLOW),
    ]


def run_filtered(
    code: str,
    *,
    syscall_errno: int | None,
    device_errno: int,
    prefix: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` in a child under the seccomp filter (after ``prefix``, e.g. setpriv)."""
    install = installing(deny_userfaultfd(syscall_errno, device_errno))
    return subprocess.run(
        [*prefix, sys.executable, "-c", install + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )


PROBE = """
from uffd_async.__main__ import main
sys.exit(main(["probe"]))
"""


@needs_seccomp_arch
@pytest.mark.parametrize("denied", [errno.ENOSYS, errno.EPERM], ids=["ENOSYS", "EPERM"])
def test_the_filter_refuses_every_way_in(denied: int) -> None:
    """The filter really blocks all three ways (else the probe tests prove nothing)."""
    result = run_filtered(
        """
        import errno
        from uffd_async._core import _open
        for method in _open.Method:
            try:
                _open.open_raw(method)
            except OSError as exc:
                print(method.name, errno.errorcode[exc.errno])
            else:
                print(method.name, "opened")
        """,
        syscall_errno=denied,
        device_errno=denied,
    )
    assert result.returncode == 0, result.stderr
    name = errno.errorcode[denied]
    lines = set(result.stdout.split("\n"))
    assert {f"SYSCALL {name}", f"USER_MODE_ONLY {name}"} <= lines, result.stdout
    if os.access(DEVICE_PATH, os.R_OK | os.W_OK):
        assert f"DEVICE {name}" in lines, result.stdout


@needs_seccomp_arch
def test_nothing_works_probe_exits_1_naming_seccomp() -> None:
    """userfaultfd(2) blocked as a kernel without it, or a seccomp profile, does (ENOSYS)."""
    result = run_filtered(PROBE, syscall_errno=errno.ENOSYS, device_errno=errno.ENOSYS)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith("userfaultfd: NOT available")
    assert "seccomp" in result.stdout and "allow `userfaultfd`" in result.stdout


@needs_seccomp_arch
def test_nothing_works_with_eperm_probe_names_seccomp() -> None:
    result = run_filtered(PROBE, syscall_errno=errno.EPERM, device_errno=errno.EPERM)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "seccomp" in result.stdout


@pytest.fixture
def sysctl_at_zero() -> Iterator[None]:
    """vm.unprivileged_userfaultfd=0 for the test, put back as it was even on failure."""
    path = Path(SYSCTL_PATH)
    if not path.exists():
        pytest.skip("no vm.unprivileged_userfaultfd on this kernel")
    old = path.read_text().strip()
    if old != "0":
        try:
            path.write_text("0")
        except OSError as exc:
            pytest.skip(f"cannot set vm.unprivileged_userfaultfd: {exc}")
    try:
        yield
    finally:
        if old != "0":
            path.write_text(old)


@needs_root
@needs_seccomp_arch
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_user_mode_only_is_all_probe_offers_and_it_says_how_to_get_more(
    sysctl_at_zero: None,
) -> None:
    without_ptrace = ("setpriv", "--bounding-set", "-sys_ptrace", "--inh-caps", "-sys_ptrace")
    result = run_filtered(
        PROBE, syscall_errno=None, device_errno=errno.EACCES, prefix=without_ptrace
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("userfaultfd: available (user-mode-only)"), result.stdout
    note = result.stdout.split("note: ", 1)[1]
    assert "EFAULT" in note  # what user-mode-only costs
    assert "sysctl -w vm.unprivileged_userfaultfd=1" in note and "CAP_SYS_PTRACE" in note
    assert DEVICE_PATH in note and "setfacl" in note


# -- this user, when the suite runs unprivileged ---------------------------------------


def unprivileged(test: Any) -> Any:
    """Runs in the unprivileged run (.ci/unprivileged); a permission refusal fails it."""
    skip = pytest.mark.skipif(
        os.geteuid() == 0, reason="runs in the unprivileged run (.ci/unprivileged)"
    )
    return pytest.mark.unprivileged(skip(test))


def only_user_mode() -> bool:
    return (
        Path(SYSCTL_PATH).exists()
        and Path(SYSCTL_PATH).read_text().strip() == "0"
        and not os.access(DEVICE_PATH, os.R_OK | os.W_OK)
    )


@unprivileged
def test_probe_for_this_user() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "uffd_async", "probe"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    if only_user_mode():
        assert result.stdout.startswith("userfaultfd: available (user-mode-only)")
        assert "vm.unprivileged_userfaultfd" in result.stdout
        assert DEVICE_PATH in result.stdout


@unprivileged
@pytest.mark.anyio
async def test_a_user_mode_only_uffd_serves_faults(lab: Lab) -> None:
    uffd = lab.uffd()
    if only_user_mode():
        assert uffd.method is ua.Method.USER_MODE_ONLY
    region = lab.anonymous(4)
    uffd.register(region.address, region.length)
    source = b"".join(pattern(n) for n in range(4))
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, ua.copy_from(source, base=region.address)):
            assert await finished(lab.run(lambda: region.read(0, region.length))) == source


@unprivileged
def test_event_fork_is_refused_naming_the_capability() -> None:
    with pytest.raises(ua.UffdPermissionError, match="CAP_SYS_PTRACE"):
        ua.Userfaultfd.open(ua.Feature.EVENT_FORK)
