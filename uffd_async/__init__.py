"""Serve Linux page faults from async Python: userfaultfd under anyio (asyncio and trio)."""

from . import testing as testing
from ._abi import PAGE_SIZE as PAGE_SIZE
from ._abi import FaultFlags as FaultFlags
from ._abi import Feature as Feature
from ._abi import Ioctl as Ioctl
from ._abi import Mode as Mode
from ._errors import DecodeError as DecodeError
from ._errors import FetchError as FetchError
from ._errors import HandoffError as HandoffError
from ._errors import HandoffRefused as HandoffRefused
from ._errors import HandoffTimeout as HandoffTimeout
from ._errors import InvalidArgument as InvalidArgument
from ._errors import LayerError as LayerError
from ._errors import MappingChanged as MappingChanged
from ._errors import NoSourcePage as NoSourcePage
from ._errors import PageExists as PageExists
from ._errors import ProcessExited as ProcessExited
from ._errors import SnapshotClosed as SnapshotClosed
from ._errors import SourceChanged as SourceChanged
from ._errors import UffdClosed as UffdClosed
from ._errors import UffdError as UffdError
from ._errors import UffdPermissionError as UffdPermissionError
from ._errors import UnsupportedFeature as UnsupportedFeature
from ._errors import WorkingSetError as WorkingSetError
from ._events import Event as Event
from ._events import Fork as Fork
from ._events import PageFault as PageFault
from ._events import Remap as Remap
from ._events import Remove as Remove
from ._events import Unmap as Unmap
from ._events import decode as decode
from ._handoff import GuestMapping as GuestMapping
from ._handoff import MessageShape as MessageShape
from ._handoff import encode_mappings as encode_mappings
from ._handoff import parse_mappings as parse_mappings
from ._handoff_io import Handoff as Handoff
from ._handoff_io import receive_uffd as receive_uffd
from ._handoff_io import send_uffd as send_uffd
from ._handoff_server import HandoffServer as HandoffServer
from ._handoff_server import HandoffStats as HandoffStats
from ._handoff_server import serve_handoffs as serve_handoffs
from ._http_source import HttpSource as HttpSource
from ._http_source import HttpStats as HttpStats
from ._layers import ImageWriter as ImageWriter
from ._layers import Layer as Layer
from ._layers import LayeredSnapshot as LayeredSnapshot
from ._layers import LayerWriter as LayerWriter
from ._layers import squash as squash
from ._live_snapshot import LiveSnapshotStats as LiveSnapshotStats
from ._live_snapshot import snapshot_live as snapshot_live
from ._memory import Region as Region
from ._memory import touch as touch
from ._open import Method as Method
from ._open import Support as Support
from ._open import probe as probe
from ._prefetch import PrefetchStats as PrefetchStats
from ._prefetch import prefetch as prefetch
from ._server import DEFAULT_SPIN as DEFAULT_SPIN
from ._server import FaultServer as FaultServer
from ._server import OnError as OnError
from ._server import ServerStats as ServerStats
from ._server import serve as serve
from ._snapshot import Snapshot as Snapshot
from ._snapshot import SnapshotResolver as SnapshotResolver
from ._tracker import WriteTracker as WriteTracker
from ._uffd import Userfaultfd as Userfaultfd
from ._working_set import WorkingSet as WorkingSet
from ._working_set import WorkingSetRecorder as WorkingSetRecorder
from .reader import EventReader as EventReader
from .resolvers import Resolver as Resolver
from .resolvers import by_kind as by_kind
from .resolvers import continue_minor as continue_minor
from .resolvers import copy_from as copy_from
from .resolvers import unprotect as unprotect
from .resolvers import zero_fill as zero_fill

__all__ = [
    "DEFAULT_SPIN",
    "PAGE_SIZE",
    "DecodeError",
    "Event",
    "EventReader",
    "FaultFlags",
    "FaultServer",
    "Feature",
    "FetchError",
    "Fork",
    "GuestMapping",
    "Handoff",
    "HandoffError",
    "HandoffRefused",
    "HandoffServer",
    "HandoffStats",
    "HandoffTimeout",
    "HttpSource",
    "HttpStats",
    "ImageWriter",
    "InvalidArgument",
    "Ioctl",
    "Layer",
    "LayerError",
    "LayerWriter",
    "LayeredSnapshot",
    "LiveSnapshotStats",
    "MappingChanged",
    "MessageShape",
    "Method",
    "Mode",
    "NoSourcePage",
    "OnError",
    "PageExists",
    "PageFault",
    "PrefetchStats",
    "ProcessExited",
    "Region",
    "Remap",
    "Remove",
    "Resolver",
    "ServerStats",
    "Snapshot",
    "SnapshotClosed",
    "SnapshotResolver",
    "SourceChanged",
    "Support",
    "UffdClosed",
    "UffdError",
    "UffdPermissionError",
    "Unmap",
    "UnsupportedFeature",
    "Userfaultfd",
    "WorkingSet",
    "WorkingSetError",
    "WorkingSetRecorder",
    "WriteTracker",
    "by_kind",
    "continue_minor",
    "copy_from",
    "decode",
    "encode_mappings",
    "parse_mappings",
    "prefetch",
    "probe",
    "receive_uffd",
    "send_uffd",
    "serve",
    "serve_handoffs",
    "snapshot_live",
    "squash",
    "touch",
    "unprotect",
    "zero_fill",
]

__version__ = "0.1.0"
