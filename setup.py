"""Builds the plain C helper that uffd_async loads with ctypes (see uffd_async/_core/_native.py)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("uffd_async._core._native_lib", ["uffd_async/_core/_native_lib.c"], extra_compile_args=["-O2"]),
    ]
)
