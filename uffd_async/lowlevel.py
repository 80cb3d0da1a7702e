"""The wire level: the uffd handle, its ABI, raw events and the handoff message.

Most programs need only :func:`uffd_async.serve` or :func:`uffd_async.serve_handoffs` and a
resolver. This module is for the rest (as ``trio.lowlevel`` is): a handler of your own on
the :class:`Userfaultfd` handle, a reader of ``uffd_msg`` records, a peer speaking the
Firecracker handoff. Every name here is also importable from ``uffd_async`` itself, as it
always was; this module says which names belong to this level.
"""

from ._core._abi import PAGE_SIZE as PAGE_SIZE
from ._core._abi import FaultFlags as FaultFlags
from ._core._abi import Feature as Feature
from ._core._abi import Ioctl as Ioctl
from ._core._abi import Mode as Mode
from ._core._events import Event as Event
from ._core._events import Fork as Fork
from ._core._events import PageFault as PageFault
from ._core._events import Remap as Remap
from ._core._events import Remove as Remove
from ._core._events import Unmap as Unmap
from ._core._open import Method as Method
from ._core._open import Support as Support
from ._core._open import probe as probe
from ._core._reader import EventReader as EventReader
from ._core._uffd import Userfaultfd as Userfaultfd
from ._core._uffd import decode as decode
from ._handoff._transfer import Handoff as Handoff
from ._handoff._transfer import receive_uffd as receive_uffd
from ._handoff._transfer import send_uffd as send_uffd
from ._handoff._wire import GuestMapping as GuestMapping
from ._handoff._wire import MessageShape as MessageShape
from ._handoff._wire import encode_mappings as encode_mappings
from ._handoff._wire import parse_mappings as parse_mappings

__all__ = [
    "PAGE_SIZE",
    "Event",
    "EventReader",
    "FaultFlags",
    "Feature",
    "Fork",
    "GuestMapping",
    "Handoff",
    "Ioctl",
    "MessageShape",
    "Method",
    "Mode",
    "PageFault",
    "Remap",
    "Remove",
    "Support",
    "Unmap",
    "Userfaultfd",
    "decode",
    "encode_mappings",
    "parse_mappings",
    "probe",
    "receive_uffd",
    "send_uffd",
]
