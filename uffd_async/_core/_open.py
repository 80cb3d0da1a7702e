"""Getting a userfaultfd: the three ways in, the handshake, and what to say when none works.

Kernel facts this module relies on (``man 2 userfaultfd``,
admin-guide/mm/userfaultfd):

* ``userfaultfd(2)`` gives a full uffd to callers with CAP_SYS_PTRACE, or to
  anyone while ``vm.unprivileged_userfaultfd`` is 1. With the flag
  ``UFFD_USER_MODE_ONLY`` (Linux 5.11) anyone gets a uffd that only handles
  faults from user mode: a fault taken inside the kernel (say ``read()`` into
  a registered buffer) then fails with EFAULT instead of waiting.
* ``/dev/userfaultfd`` (Linux 6.1): whoever may open the device gets a full
  uffd from the ``USERFAULTFD_IOC_NEW`` ioctl, whatever the sysctl says.
* A uffd must be non-blocking (a blocking one makes poll() report POLLERR)
  and should be close-on-exec.
* ``UFFDIO_API`` succeeds once per fd. Asking for a feature the kernel lacks
  fails with EINVAL and zeroes the answer, so the missing bits are learned on
  a second, throwaway fd. The answer lists every *available* feature; only
  the requested ones (plus WP_UNPOPULATED, implied by WP_ASYNC) are enabled.
* ``UFFD_FEATURE_EVENT_FORK`` needs CAP_SYS_PTRACE: EPERM otherwise.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import os
import platform

import attrs

from . import _abi
from ._abi import Feature, Ioctl
from ._errors import UffdError, UffdPermissionError, UnsupportedFeature
from ._memory import MAP_ANONYMOUS, MAP_PRIVATE, map_memory
from ._native import libc

_SYSCALL_NUMBERS = {
    "x86_64": 323,
    "aarch64": 282,
    "arm64": 282,
    "riscv64": 282,
    "loongarch64": 282,
    "i386": 374,
    "i686": 374,
    "armv7l": 388,
    "ppc64le": 364,
    "ppc64": 364,
    "s390x": 355,
}

DEVICE_PATH = "/dev/userfaultfd"
SYSCTL_PATH = "/proc/sys/vm/unprivileged_userfaultfd"
_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK


class Method(str, enum.Enum):
    """How a userfaultfd was obtained."""

    #: userfaultfd(2): handles faults from user and kernel mode.
    SYSCALL = "syscall"
    #: userfaultfd(2) with UFFD_USER_MODE_ONLY: kernel-mode faults get EFAULT.
    USER_MODE_ONLY = "user-mode-only"
    #: ioctl USERFAULTFD_IOC_NEW on /dev/userfaultfd: a full uffd.
    DEVICE = "/dev/userfaultfd"


def methods_for(user_mode_only: bool | None) -> tuple[Method, ...]:
    if user_mode_only is None:
        # Full uffds first, whichever way they come: a user-mode-only one
        # turns every kernel-mode fault into EFAULT.
        return (Method.SYSCALL, Method.DEVICE, Method.USER_MODE_ONLY)
    if user_mode_only:
        return (Method.USER_MODE_ONLY,)
    return (Method.SYSCALL, Method.DEVICE)


def open_raw(method: Method) -> int:
    """A fresh, un-handshaken uffd opened by ``method``; OSError if refused."""
    if method is Method.DEVICE:
        device = os.open(DEVICE_PATH, os.O_RDWR | os.O_CLOEXEC)
        try:
            return fcntl.ioctl(device, _abi.USERFAULTFD_IOC_NEW, _FLAGS)
        finally:
            os.close(device)
    number = _SYSCALL_NUMBERS.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"userfaultfd syscall number unknown on {platform.machine()}")
    flags = _FLAGS | (_abi.UFFD_USER_MODE_ONLY if method is Method.USER_MODE_ONLY else 0)
    fd = int(libc.syscall(ctypes.c_long(number), ctypes.c_int(flags)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def api(fd: int, features: int) -> tuple[int, int]:
    """UFFDIO_API on ``fd``: (available features, ioctls), or OSError."""
    buf = bytearray(_abi.API.pack(_abi.UFFD_API, features, 0))
    fcntl.ioctl(fd, _abi.UFFDIO_API, buf, True)
    _, available, ioctls = _abi.API.unpack(buf)
    return available, ioctls


def available_features(method: Method) -> Feature:
    """What the kernel offers, learned on a throwaway fd."""
    fd = open_raw(method)
    try:
        return Feature(api(fd, 0)[0])
    finally:
        os.close(fd)


def feature_names(features: int) -> str:
    names = [f.name for f in Feature if f.name and features & f.value]
    unknown = features & ~sum(f.value for f in Feature)
    if unknown:
        names.append(f"{unknown:#x}")
    return "|".join(names) or "none"


def _unprivileged_sysctl() -> str | None:
    try:
        with open(SYSCTL_PATH) as f:
            return f.read().strip()
    except OSError:
        return None


def remedy(failures: dict[Method, OSError]) -> str:
    """Why no uffd could be had, and what exactly to change."""
    lines = []
    syscall = failures.get(Method.SYSCALL)
    user_mode = failures.get(Method.USER_MODE_ONLY)
    device = failures.get(Method.DEVICE)
    if syscall is not None:
        if syscall.errno == errno.ENOSYS:
            lines.append(
                "userfaultfd(2) is not available (ENOSYS): the kernel lacks CONFIG_USERFAULTFD, "
                "or a seccomp profile (a container's default one, for instance) blocks the "
                "syscall: allow `userfaultfd` in the profile"
            )
        elif syscall.errno == errno.EPERM:
            lines.append(
                f"userfaultfd(2) refused a full uffd (EPERM): vm.unprivileged_userfaultfd is "
                f"{_unprivileged_sysctl() or 'unknown'}. As root run "
                "`sysctl -w vm.unprivileged_userfaultfd=1`, or give this process "
                "CAP_SYS_PTRACE (e.g. `setcap cap_sys_ptrace+ep` on the interpreter)"
            )
        else:
            lines.append(f"userfaultfd(2) failed: {syscall.strerror}")
    if user_mode is not None:
        if user_mode.errno == errno.EPERM:
            lines.append(
                "even a user-mode-only uffd was refused (EPERM), which no sysctl does: a seccomp "
                "profile (a container's default one, for instance) or a security module blocks "
                "userfaultfd(2); allow the syscall in that profile"
            )
        elif user_mode.errno == errno.EINVAL:
            lines.append("UFFD_USER_MODE_ONLY is not known to this kernel (it needs Linux 5.11+)")
        else:
            lines.append(f"userfaultfd(2) with UFFD_USER_MODE_ONLY failed: {user_mode.strerror}")
    if device is not None:
        if device.errno == errno.ENOENT:
            lines.append(f"{DEVICE_PATH} does not exist (it needs Linux 6.1+)")
        elif device.errno in (errno.EACCES, errno.EPERM):
            lines.append(
                f"{DEVICE_PATH} is not accessible to uid {os.getuid()}: as root, grant it with "
                f"`setfacl -m u:{os.getuid()}:rw {DEVICE_PATH}`, or add the user to the "
                "device's group and make it group read-write"
            )
        else:
            lines.append(f"{DEVICE_PATH} failed: {device.strerror}")
    return "; ".join(lines) or "no way to open a userfaultfd was tried"


def open_fd(user_mode_only: bool | None) -> tuple[int, Method]:
    """The first uffd the allowed methods give; a typed error naming the remedy if none."""
    failures: dict[Method, OSError] = {}
    for method in methods_for(user_mode_only):
        try:
            return open_raw(method), method
        except OSError as exc:
            failures[method] = exc
    message = "cannot open a userfaultfd: " + remedy(failures)
    if all(exc.errno == errno.ENOSYS for exc in failures.values()):
        raise UffdError(errno.ENOSYS, message)
    if any(exc.errno in (errno.EPERM, errno.EACCES) for exc in failures.values()):
        raise UffdPermissionError(errno.EPERM, message)
    first = next(iter(failures.values()))
    raise UffdError(first.errno or errno.EIO, message)


def handshake(fd: int, method: Method, features: int) -> tuple[Feature, Feature, Ioctl]:
    """UFFDIO_API asking for ``features``: (enabled, available, ioctls).

    On refusal the caller still owns (and must close) ``fd``.
    """
    try:
        available, ioctls = api(fd, features)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            raise UffdPermissionError(
                errno.EPERM,
                "the kernel refused the handshake (EPERM): EVENT_FORK needs CAP_SYS_PTRACE; "
                "run with that capability (or as root) or do not ask for EVENT_FORK",
            ) from None
        if exc.errno != errno.EINVAL:
            raise UffdError(exc.errno or errno.EIO, f"UFFDIO_API failed: {exc.strerror}") from None
        offered = int(available_features(method))
        missing = features & ~offered
        raise UnsupportedFeature(
            Feature(missing),
            f"this kernel does not support {feature_names(missing)} "
            f"(it offers {feature_names(offered)})",
        ) from None
    enabled = features
    if enabled & Feature.WP_ASYNC:
        enabled |= Feature.WP_UNPOPULATED
    return Feature(enabled), Feature(available), Ioctl(ioctls)


@attrs.frozen(kw_only=True)
class Support:
    """What :func:`probe` found: whether, and how, this process can use userfaultfd."""

    #: A uffd could be opened and handshaken.
    available: bool
    #: How (None when not available).
    method: Method | None
    #: Features this process can enable (empty when not available): what the kernel
    #: offers, less EVENT_FORK without CAP_SYS_PTRACE.
    features: Feature
    #: ioctls the handshake and a scratch registration reported.
    ioctls: Ioctl
    #: Caveats when available; the remedy when not.
    reason: str


def probe() -> Support:
    """Find out, on a throwaway fd, whether and how a userfaultfd can be had here."""
    try:
        fd, method = open_fd(None)
    except UffdError as exc:
        return Support(
            available=False, method=None, features=Feature(0), ioctls=Ioctl(0), reason=str(exc)
        )
    try:
        try:
            _, available, ioctls = handshake(fd, method, 0)
        except UffdError as exc:
            return Support(
                available=False, method=None, features=Feature(0), ioctls=Ioctl(0), reason=str(exc)
            )
        ioctls |= _range_ioctls(fd, available)
    finally:
        os.close(fd)
    notes = []
    if available & Feature.EVENT_FORK and not _may_enable(method, Feature.EVENT_FORK):
        available &= ~Feature.EVENT_FORK
        notes.append("EVENT_FORK is offered but needs CAP_SYS_PTRACE, which this process lacks")
    if method is Method.USER_MODE_ONLY:
        failures: dict[Method, OSError] = {}
        for other in (Method.SYSCALL, Method.DEVICE):
            try:
                os.close(open_raw(other))
            except OSError as exc:
                failures[other] = exc
        reason = (
            "user-mode-only: faults taken in kernel code (a read() or recv() into registered "
            "memory) fail with EFAULT instead of waiting for the handler. For a full uffd: "
            + remedy(failures)
        )
    else:
        reason = f"full userfaultfd via {method.value}"
    reason = "; ".join([reason, *notes])
    return Support(available=True, method=method, features=available, ioctls=ioctls, reason=reason)


def _may_enable(method: Method, feature: Feature) -> bool:
    """Whether the handshake grants ``feature`` to this process (tried on a throwaway fd)."""
    try:
        fd = open_raw(method)
    except OSError:
        return False
    try:
        api(fd, int(feature))
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _range_ioctls(fd: int, available: Feature) -> Ioctl:
    """The range ioctls of an anonymous page registered with every mode it supports."""
    mode = _abi.Mode.MISSING | (
        _abi.Mode.WP if available & Feature.PAGEFAULT_FLAG_WP else _abi.Mode(0)
    )
    address = map_memory(_abi.PAGE_SIZE, MAP_PRIVATE | MAP_ANONYMOUS)
    try:
        buf = bytearray(_abi.REGISTER.pack(address, _abi.PAGE_SIZE, int(mode), 0))
        try:
            fcntl.ioctl(fd, _abi.UFFDIO_REGISTER, buf, True)
        except OSError:
            return Ioctl(0)
        return Ioctl(_abi.REGISTER.unpack(buf)[3])
    finally:
        libc.munmap(address, _abi.PAGE_SIZE)
