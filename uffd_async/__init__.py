"""Serve Linux page faults from async Python: userfaultfd under anyio (asyncio and trio)."""

from . import lowlevel as lowlevel
from . import reader as reader
from . import resolvers as resolvers
from . import testing as testing
from ._capture._layer import Layer as Layer
from ._capture._layer_writer import ImageWriter as ImageWriter
from ._capture._layer_writer import LayerWriter as LayerWriter
from ._capture._live_snapshot import LiveSnapshotStats as LiveSnapshotStats
from ._capture._live_snapshot import snapshot_live as snapshot_live
from ._capture._squash import squash as squash
from ._capture._tracker import WriteTracker as WriteTracker
from ._core._abi import PAGE_SIZE as PAGE_SIZE
from ._core._abi import FaultFlags as FaultFlags
from ._core._abi import Feature as Feature
from ._core._abi import Ioctl as Ioctl
from ._core._abi import Mode as Mode
from ._core._errors import DecodeError as DecodeError
from ._core._errors import FetchError as FetchError
from ._core._errors import HandoffError as HandoffError
from ._core._errors import HandoffRefused as HandoffRefused
from ._core._errors import HandoffTimeout as HandoffTimeout
from ._core._errors import InvalidArgument as InvalidArgument
from ._core._errors import LayerError as LayerError
from ._core._errors import MappingChanged as MappingChanged
from ._core._errors import NoSourcePage as NoSourcePage
from ._core._errors import PageExists as PageExists
from ._core._errors import ProcessExited as ProcessExited
from ._core._errors import SnapshotClosed as SnapshotClosed
from ._core._errors import SourceChanged as SourceChanged
from ._core._errors import TakeoverError as TakeoverError
from ._core._errors import UffdClosed as UffdClosed
from ._core._errors import UffdError as UffdError
from ._core._errors import UffdPermissionError as UffdPermissionError
from ._core._errors import UnsupportedFeature as UnsupportedFeature
from ._core._errors import WorkingSetError as WorkingSetError
from ._core._events import Event as Event
from ._core._events import Fork as Fork
from ._core._events import PageFault as PageFault
from ._core._events import Remap as Remap
from ._core._events import Remove as Remove
from ._core._events import Unmap as Unmap
from ._core._memory import Region as Region
from ._core._memory import touch as touch
from ._core._open import Method as Method
from ._core._open import Support as Support
from ._core._open import probe as probe
from ._core._uffd import Userfaultfd as Userfaultfd
from ._core._uffd import decode as decode
from ._handoff._options import PeerPolicy as PeerPolicy
from ._handoff._options import ReplayOptions as ReplayOptions
from ._handoff._server import HandoffServer as HandoffServer
from ._handoff._server import HandoffStats as HandoffStats
from ._handoff._server import serve_handoffs as serve_handoffs
from ._handoff._transfer import Handoff as Handoff
from ._handoff._transfer import receive_uffd as receive_uffd
from ._handoff._transfer import send_uffd as send_uffd
from ._handoff._wire import MessageShape as MessageShape
from ._handoff._wire import encode_mappings as encode_mappings
from ._handoff._wire import parse_mappings as parse_mappings
from ._remote._chunk_cache import HostCacheStats as HostCacheStats
from ._remote._chunk_cache import HostChunkCache as HostChunkCache
from ._remote._chunk_cache_format import CacheLayoutError as CacheLayoutError
from ._remote._http_source import HttpSource as HttpSource
from ._remote._http_source import HttpStats as HttpStats
from ._remote._object_source import ObjectSource as ObjectSource
from ._remote._object_source import ObjectStats as ObjectStats
from ._remote._outage import SourcePolicy as SourcePolicy
from ._remote._pack_format import PackError as PackError
from ._remote._pack_source import PackSource as PackSource
from ._remote._pack_source import PackStats as PackStats
from ._remote._pack_writer import PackResult as PackResult
from ._remote._pack_writer import pack_snapshot as pack_snapshot
from ._restore._guest_mapping import GuestMapping as GuestMapping
from ._restore._layered import LayeredSnapshot as LayeredSnapshot
from ._restore._native_replay import native_replay as native_replay
from ._restore._prefetch import PrefetchStats as PrefetchStats
from ._restore._prefetch import prefetch as prefetch
from ._restore._snapshot import Snapshot as Snapshot
from ._restore._snapshot_resolver import SnapshotResolver as SnapshotResolver
from ._restore._source import SnapshotSource as SnapshotSource
from ._restore._working_set import WorkingSet as WorkingSet
from ._restore._working_set import WorkingSetRecorder as WorkingSetRecorder
from ._serve._server import DEFAULT_SPIN as DEFAULT_SPIN
from ._serve._server import FaultServer as FaultServer
from ._serve._server import OnError as OnError
from ._serve._server import ServeOptions as ServeOptions
from ._serve._server import ServerStats as ServerStats
from ._serve._server import serve as serve
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
    "CacheLayoutError",
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
    "HostCacheStats",
    "HostChunkCache",
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
    "ObjectSource",
    "ObjectStats",
    "OnError",
    "PackError",
    "PackResult",
    "PackSource",
    "PackStats",
    "PageExists",
    "PageFault",
    "PeerPolicy",
    "PrefetchStats",
    "ProcessExited",
    "Region",
    "Remap",
    "Remove",
    "ReplayOptions",
    "Resolver",
    "ServeOptions",
    "ServerStats",
    "Snapshot",
    "SnapshotClosed",
    "SnapshotResolver",
    "SnapshotSource",
    "SourceChanged",
    "SourcePolicy",
    "Support",
    "TakeoverError",
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
    "native_replay",
    "pack_snapshot",
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
