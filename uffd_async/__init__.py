"""Serve Linux page faults from async Python: userfaultfd under anyio (asyncio and trio)."""

from ._abi import PAGE_SIZE as PAGE_SIZE
from ._abi import FaultFlags as FaultFlags
from ._abi import Feature as Feature
from ._abi import Ioctl as Ioctl
from ._abi import Mode as Mode
from ._errors import DecodeError as DecodeError
from ._errors import InvalidArgument as InvalidArgument
from ._errors import MappingChanged as MappingChanged
from ._errors import PageExists as PageExists
from ._errors import ProcessExited as ProcessExited
from ._errors import UffdClosed as UffdClosed
from ._errors import UffdError as UffdError
from ._errors import UffdPermissionError as UffdPermissionError
from ._errors import UnsupportedFeature as UnsupportedFeature
from ._events import Event as Event
from ._events import Fork as Fork
from ._events import PageFault as PageFault
from ._events import Remap as Remap
from ._events import Remove as Remove
from ._events import Unmap as Unmap
from ._events import decode as decode
from ._memory import Region as Region
from ._memory import touch as touch
from ._open import Method as Method
from ._open import Support as Support
from ._open import probe as probe
from ._uffd import Userfaultfd as Userfaultfd

__all__ = [
    "PAGE_SIZE",
    "DecodeError",
    "Event",
    "FaultFlags",
    "Feature",
    "Fork",
    "InvalidArgument",
    "Ioctl",
    "MappingChanged",
    "Method",
    "Mode",
    "PageExists",
    "PageFault",
    "ProcessExited",
    "Region",
    "Remap",
    "Remove",
    "Support",
    "UffdClosed",
    "UffdError",
    "UffdPermissionError",
    "Unmap",
    "UnsupportedFeature",
    "Userfaultfd",
    "decode",
    "probe",
    "touch",
]

__version__ = "0.1.0"
