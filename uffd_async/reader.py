"""Reading a userfaultfd from the event loop: typed events, one reader at a time.

The reader lives in :mod:`uffd_async._core._reader`, beside the kernel facts it
relies on; this module is its public face.
"""

from ._core._reader import EventReader as EventReader

__all__ = ["EventReader"]
