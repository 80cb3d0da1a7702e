"""The numbers in _abi, checked against the installed uapi header by a C compiler."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from uffd_async._core import _abi

HEADER_NAMES = [
    "UFFDIO_API", "UFFDIO_REGISTER", "UFFDIO_UNREGISTER", "UFFDIO_WAKE", "UFFDIO_COPY",
    "UFFDIO_ZEROPAGE", "UFFDIO_WRITEPROTECT", "UFFDIO_CONTINUE", "USERFAULTFD_IOC_NEW",
    "UFFD_API", "UFFD_USER_MODE_ONLY",
    "UFFD_EVENT_PAGEFAULT", "UFFD_EVENT_FORK", "UFFD_EVENT_REMAP", "UFFD_EVENT_REMOVE",
    "UFFD_EVENT_UNMAP",
]  # fmt: skip
# Newer than some headers: compared only when the header has them.
OPTIONAL_NAMES = ["UFFDIO_POISON", "UFFDIO_MOVE"]
STRUCTS = [
    "uffdio_api", "uffdio_range", "uffdio_register", "uffdio_copy", "uffdio_zeropage",
    "uffdio_writeprotect", "uffdio_continue", "uffd_msg",
]  # fmt: skip


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not Path("/usr/include/linux/userfaultfd.h").exists():
        pytest.skip("needs a C compiler and linux/userfaultfd.h")
    lines = [
        "#include <stdio.h>",
        "#include <sys/ioctl.h>",
        "#include <linux/userfaultfd.h>",
        "int main(void) {",
    ]
    for name in HEADER_NAMES:
        lines.append(f'printf("{name} %llu\\n", (unsigned long long)({name}));')
    for name in OPTIONAL_NAMES:
        lines += [f"#ifdef {name}", f'printf("{name} %llu\\n", (unsigned long long)({name}));']
        lines.append("#endif")
    for struct in STRUCTS:
        lines.append(f'printf("sizeof_{struct} %zu\\n", sizeof(struct {struct}));')
    lines += ["return 0; }"]
    tmp = tmp_path_factory.mktemp("abi")
    (tmp / "abi.c").write_text("\n".join(lines))
    subprocess.run([compiler, "-o", str(tmp / "abi"), str(tmp / "abi.c")], check=True)
    out = subprocess.run([str(tmp / "abi")], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def test_ioctl_numbers_match_header(header_values: dict[str, int]) -> None:
    assert header_values["UFFDIO_API"] == _abi.UFFDIO_API
    assert header_values["UFFDIO_REGISTER"] == _abi.UFFDIO_REGISTER
    assert header_values["UFFDIO_UNREGISTER"] == _abi.UFFDIO_UNREGISTER
    assert header_values["UFFDIO_WAKE"] == _abi.UFFDIO_WAKE
    assert header_values["UFFDIO_COPY"] == _abi.UFFDIO_COPY
    assert header_values["UFFDIO_ZEROPAGE"] == _abi.UFFDIO_ZEROPAGE
    assert header_values["UFFDIO_WRITEPROTECT"] == _abi.UFFDIO_WRITEPROTECT
    assert header_values["UFFDIO_CONTINUE"] == _abi.UFFDIO_CONTINUE
    assert header_values["USERFAULTFD_IOC_NEW"] == _abi.USERFAULTFD_IOC_NEW
    assert header_values["UFFD_API"] == _abi.UFFD_API
    assert header_values["UFFD_USER_MODE_ONLY"] == _abi.UFFD_USER_MODE_ONLY
    for name in OPTIONAL_NAMES:
        if name in header_values:
            assert header_values[name] == getattr(_abi, name)


def test_event_codes_match_header(header_values: dict[str, int]) -> None:
    assert header_values["UFFD_EVENT_PAGEFAULT"] == _abi.EVENT_PAGEFAULT
    assert header_values["UFFD_EVENT_FORK"] == _abi.EVENT_FORK
    assert header_values["UFFD_EVENT_REMAP"] == _abi.EVENT_REMAP
    assert header_values["UFFD_EVENT_REMOVE"] == _abi.EVENT_REMOVE
    assert header_values["UFFD_EVENT_UNMAP"] == _abi.EVENT_UNMAP


def test_struct_sizes_match_header(header_values: dict[str, int]) -> None:
    assert header_values["sizeof_uffdio_api"] == _abi.API.size
    assert header_values["sizeof_uffdio_range"] == _abi.RANGE.size
    assert header_values["sizeof_uffdio_register"] == _abi.REGISTER.size
    assert header_values["sizeof_uffdio_copy"] == _abi.COPY.size
    assert header_values["sizeof_uffdio_zeropage"] == _abi.ZEROPAGE.size
    assert header_values["sizeof_uffdio_writeprotect"] == _abi.WRITEPROTECT.size
    assert header_values["sizeof_uffdio_continue"] == _abi.CONTINUE.size
    assert header_values["sizeof_uffd_msg"] == _abi.MSG.size


def test_flag_values_are_the_kernels() -> None:
    import uffd_async as ua

    assert ua.Feature.WP_HUGETLBFS_SHMEM == 1 << 12
    assert ua.Feature.MOVE == 1 << 16
    assert ua.Ioctl.COPY == 1 << 3 and ua.Ioctl.API == 1 << 63
    assert int(ua.Mode.MINOR) == 4 and int(ua.FaultFlags.MINOR) == 4


def test_unknown_bits_are_kept() -> None:
    import uffd_async as ua

    newer = ua.Feature((1 << 40) | int(ua.Feature.MOVE))
    assert int(newer) == (1 << 40) | (1 << 16)
    assert int(ua.Ioctl(1 << 20)) == 1 << 20
