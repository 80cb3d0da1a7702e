"""Opening a userfaultfd: the ways in, the handshake, and the remedies."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import pytest

import uffd_async as ua
from uffd_async._core import _open
from uffd_async._core._native import libc

from ._support import TIMEOUT, Lab

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
needs_setpriv = pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")


def run_without_ptrace(code: str) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as this user minus CAP_SYS_PTRACE (as a non-root user would be)."""
    return subprocess.run(
        ["setpriv", "--bounding-set", "-sys_ptrace", "--inh-caps", "-sys_ptrace",
         sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_probe_reports_what_the_kernel_offers() -> None:
    support = ua.probe()
    assert support.available
    assert support.method in set(ua.Method)
    assert support.features & ua.Feature.MISSING_SHMEM
    assert support.ioctls & (ua.Ioctl.API | ua.Ioctl.REGISTER | ua.Ioctl.COPY | ua.Ioctl.WAKE)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        support.available = False  # type: ignore[misc]


def test_open_is_nonblocking_and_cloexec(lab: Lab) -> None:
    uffd = lab.uffd()
    fdinfo = Path(f"/proc/self/fdinfo/{uffd.fileno()}").read_text()
    flags = int(fdinfo.split("flags:")[1].split()[0], 8)
    assert flags & os.O_NONBLOCK
    assert flags & os.O_CLOEXEC
    assert uffd.read_events() == []  # never blocks


def test_requested_features_are_enabled(lab: Lab) -> None:
    wanted = ua.Feature.THREAD_ID | ua.Feature.EVENT_REMOVE
    uffd = lab.uffd(wanted)
    assert uffd.features == wanted
    assert uffd.available_features & wanted == wanted
    assert uffd.available_features & ua.Feature.MOVE


def test_wp_async_implies_wp_unpopulated(lab: Lab) -> None:
    uffd = lab.uffd(ua.Feature.WP_ASYNC)
    assert uffd.features == ua.Feature.WP_ASYNC | ua.Feature.WP_UNPOPULATED


def test_unknown_feature_is_named_and_nothing_leaks() -> None:
    newer = ua.Feature((1 << 40) | int(ua.Feature.THREAD_ID))
    with pytest.raises(ua.UnsupportedFeature) as info:
        ua.Userfaultfd.open(newer)
    assert int(info.value.missing) == 1 << 40
    assert "0x10000000000" in str(info.value)
    # no_leaks (autouse) checks that both the real and the throwaway fd were closed


@pytest.mark.parametrize("method", [ua.Method.SYSCALL, ua.Method.USER_MODE_ONLY])
def test_the_handshake_succeeds_once_per_fd(method: ua.Method) -> None:
    """On a full uffd and on the user-mode-only one (all an unprivileged user gets;
    the full one is skipped there)."""
    fd = _open.open_raw(method)
    try:
        _open.api(fd, 0)
        with pytest.raises(OSError) as info:
            _open.api(fd, 0)
        assert info.value.errno == errno.EINVAL
    finally:
        os.close(fd)


def test_bad_feature_argument_types() -> None:
    with pytest.raises(TypeError):
        ua.Userfaultfd.open("THREAD_ID")  # type: ignore[arg-type]
    with pytest.raises(ua.InvalidArgument):
        ua.Userfaultfd.open(-1)


def test_close_is_idempotent_and_forgets_the_fd() -> None:
    uffd = ua.Userfaultfd.open()
    fd = uffd.fileno()
    with uffd:
        assert not uffd.closed
    assert uffd.closed
    uffd.close()
    with pytest.raises(ua.UffdClosed):
        uffd.fileno()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_user_mode_only_refuses_kernel_mode_faults(lab: Lab) -> None:
    """A read() into registered memory faults in the kernel: EFAULT, not a wait."""
    uffd = lab.uffd(user_mode_only=True)
    assert uffd.user_mode_only and uffd.method is ua.Method.USER_MODE_ONLY
    region = lab.anonymous(1)
    uffd.register(region.address, region.length)
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"hello")

        def kernel_write() -> int:
            result = libc.read(read_end, ctypes.c_void_p(region.address), 5)
            return -ctypes.get_errno() if result < 0 else int(result)

        assert lab.run(kernel_write).join(TIMEOUT) == -errno.EFAULT
    finally:
        os.close(read_end)
        os.close(write_end)


@needs_root
@needs_setpriv
def test_without_cap_sys_ptrace_a_full_uffd_comes_from_the_device() -> None:
    result = run_without_ptrace(
        """
        import uffd_async as ua
        with ua.Userfaultfd.open() as u:
            print(u.method.value)
        with ua.Userfaultfd.open(user_mode_only=True) as u:
            print(u.method.value)
        """
    )
    assert result.returncode == 0, result.stderr
    expected = "/dev/userfaultfd" if os.path.exists(_open.DEVICE_PATH) else "user-mode-only"
    if Path(_open.SYSCTL_PATH).read_text().strip() == "1":
        expected = "syscall"
    assert result.stdout.split() == [expected, "user-mode-only"]


@needs_root
@needs_setpriv
def test_event_fork_without_cap_sys_ptrace_names_the_capability() -> None:
    result = run_without_ptrace(
        """
        import uffd_async as ua
        try:
            ua.Userfaultfd.open(ua.Feature.EVENT_FORK)
        except ua.UffdPermissionError as exc:
            assert isinstance(exc, PermissionError)
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "CAP_SYS_PTRACE" in result.stdout


def test_remedy_names_every_knob() -> None:
    text = _open.remedy(
        {
            ua.Method.SYSCALL: OSError(errno.EPERM, "Operation not permitted"),
            ua.Method.DEVICE: OSError(errno.EACCES, "Permission denied"),
            ua.Method.USER_MODE_ONLY: OSError(errno.EPERM, "Operation not permitted"),
        }
    )
    assert "sysctl -w vm.unprivileged_userfaultfd=1" in text
    assert "CAP_SYS_PTRACE" in text
    assert "/dev/userfaultfd" in text and "setfacl" in text


def test_no_way_in_is_a_permission_error_with_the_remedy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every method refused (as for an unprivileged user in a locked-down box)."""

    def refuse(method: ua.Method) -> int:
        err = errno.EACCES if method is ua.Method.DEVICE else errno.EPERM
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(_open, "open_raw", refuse)
    with pytest.raises(ua.UffdPermissionError) as info:
        ua.Userfaultfd.open()
    assert "vm.unprivileged_userfaultfd" in str(info.value)
    support = ua.probe()
    assert not support.available and support.method is None
    assert "vm.unprivileged_userfaultfd" in support.reason
