"""Pins the public API: names are part of the contract."""

from __future__ import annotations

import importlib
import inspect

import attrs

import uffd_async as ua

EXPECTED = {
    "CacheLayoutError",
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
    "MessageShape",
    "Handoff",
    "HandoffError",
    "HandoffRefused",
    "HandoffServer",
    "HandoffStats",
    "HandoffTimeout",
    "HttpSource",
    "HostCacheStats",
    "HostChunkCache",
    "HttpStats",
    "ImageWriter",
    "InvalidArgument",
    "LiveSnapshotStats",
    "Ioctl",
    "Layer",
    "LayerError",
    "LayerWriter",
    "LayeredSnapshot",
    "MappingChanged",
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
    "native_replay",
    "pack_snapshot",
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
}


def test_all_is_exactly_the_public_api() -> None:
    assert set(ua.__all__) == EXPECTED
    for name in ua.__all__:
        assert hasattr(ua, name), name
    public = {name for name in vars(ua) if not name.startswith("_")}
    modules = {name for name in public if inspect.ismodule(getattr(ua, name))}
    assert public - modules == EXPECTED


def test_flag_members() -> None:
    assert [f.name for f in ua.Feature] == [
        "PAGEFAULT_FLAG_WP", "EVENT_FORK", "EVENT_REMAP", "EVENT_REMOVE",
        "MISSING_HUGETLBFS", "MISSING_SHMEM", "EVENT_UNMAP", "SIGBUS", "THREAD_ID",
        "MINOR_HUGETLBFS", "MINOR_SHMEM", "EXACT_ADDRESS", "WP_HUGETLBFS_SHMEM",
        "WP_UNPOPULATED", "POISON", "WP_ASYNC", "MOVE",
    ]  # fmt: skip
    assert [m.name for m in ua.Mode] == ["MISSING", "WP", "MINOR"]
    assert {i.name for i in ua.Ioctl} == {
        "REGISTER", "UNREGISTER", "API", "WAKE", "COPY", "ZEROPAGE", "WRITEPROTECT",
        "CONTINUE", "POISON", "MOVE",
    }  # fmt: skip
    assert [f.name for f in ua.FaultFlags] == ["WRITE", "WP", "MINOR"]


def test_handle_methods() -> None:
    for name in [
        "open", "fileno", "close", "register", "unregister", "copy", "zeropage",
        "writeprotect", "continue_", "poison", "move", "wake", "read_events", "lend_reads",
        "borrower_paused",
    ]:  # fmt: skip
        assert callable(getattr(ua.Userfaultfd, name)), name
    for name in ["closed", "features"]:
        assert isinstance(inspect.getattr_static(ua.Userfaultfd, name), property), name
    for name in ["anonymous", "shared", "hugetlb", "read", "write", "close"]:
        assert callable(getattr(ua.Region, name)), name


def test_error_hierarchy() -> None:
    assert issubclass(ua.UffdError, OSError)
    for cls in [
        ua.UnsupportedFeature, ua.PageExists, ua.UffdPermissionError, ua.DecodeError,
        ua.MappingChanged, ua.ProcessExited, ua.InvalidArgument, ua.UffdClosed,
    ]:  # fmt: skip
        assert issubclass(cls, ua.UffdError), cls
    assert issubclass(ua.PageExists, FileExistsError)
    assert issubclass(ua.UffdPermissionError, PermissionError)
    assert issubclass(ua.DecodeError, ValueError)
    assert issubclass(ua.InvalidArgument, ValueError)
    assert issubclass(ua.ProcessExited, ProcessLookupError)
    for cls in [ua.HandoffError, ua.HandoffRefused, ua.HandoffTimeout, ua.SnapshotClosed]:
        assert issubclass(cls, ua.UffdError), cls
    assert issubclass(ua.HandoffError, ValueError)
    assert issubclass(ua.HandoffRefused, ua.HandoffError)
    assert issubclass(ua.HandoffRefused, PermissionError)
    assert issubclass(ua.HandoffTimeout, ua.HandoffError)
    assert issubclass(ua.TakeoverError, ua.HandoffError)
    assert issubclass(ua.HandoffTimeout, TimeoutError)


def test_handoff_server_surface() -> None:
    for name in ["serve", "stats", "allowed_uids", "drain", "draining", "peers"]:
        assert hasattr(ua.HandoffServer, name), name
    for name in ["resolver", "close", "closed"]:
        assert hasattr(ua.Snapshot, name), name
    assert issubclass(ua.SnapshotResolver, ua.Resolver)
    assert [f.name for f in attrs.fields(ua.HandoffStats)] == [
        "connections", "served", "active", "refused", "over_limit", "failed",
        "faults", "resolved", "pages", "errors", "events", "forks", "prefetched",
        "faults_answered", "resident", "populated", "populated_pages", "mapped_pages", "draining",
    ]  # fmt: skip


def test_layers_surface() -> None:
    assert issubclass(ua.LayerError, ua.UffdError)
    assert issubclass(ua.LayerError, ValueError)
    assert issubclass(ua.LayeredSnapshot, ua.Snapshot)  # serves wherever a Snapshot does
    for source in [ua.Snapshot, ua.LayeredSnapshot, ua.HttpSource]:
        assert issubclass(source, ua.SnapshotSource), source
    for name in ["write_page", "missing", "commit", "abort"]:
        assert callable(getattr(ua.LayerWriter, name)), name
        assert callable(getattr(ua.ImageWriter, name)), name
    for name in ["open", "verify", "close"]:
        assert callable(getattr(ua.Layer, name)), name


def test_every_public_exception_is_in_the_tree() -> None:
    """One tree: ``except UffdError`` catches every exception the public modules offer."""
    modules = [
        importlib.import_module(f"uffd_async{m}") for m in ("", ".resolvers", ".reader", ".testing")
    ]
    exceptions = {
        value
        for module in modules
        for value in (getattr(module, name) for name in module.__all__)
        if isinstance(value, type) and issubclass(value, BaseException)
    }
    assert {ua.WorkingSetError, ua.NoSourcePage, ua.InvalidArgument} <= exceptions
    assert {cls for cls in exceptions if not issubclass(cls, ua.UffdError)} == set()
    assert issubclass(ua.WorkingSetError, ValueError)
    assert issubclass(ua.NoSourcePage, LookupError)


LOWLEVEL = {
    "PAGE_SIZE", "Event", "EventReader", "FaultFlags", "Feature", "Fork", "GuestMapping",
    "Handoff", "Ioctl", "MessageShape", "Method", "Mode", "PageFault", "Remap", "Remove",
    "Support", "Unmap", "Userfaultfd", "decode", "encode_mappings", "parse_mappings", "probe",
    "receive_uffd", "send_uffd",
}  # fmt: skip


def test_lowlevel_holds_the_wire_level_names() -> None:
    """``uffd_async.lowlevel`` names the level; each name is the same object at the top."""
    import uffd_async.lowlevel as lowlevel

    assert set(lowlevel.__all__) == LOWLEVEL
    assert ua.lowlevel is lowlevel
    for name in lowlevel.__all__:
        assert getattr(lowlevel, name) is getattr(ua, name), name


def test_public_modules_keep_their_names() -> None:
    """``uffd_async.resolvers`` and ``uffd_async.reader`` still offer what they always did."""
    import uffd_async.reader
    import uffd_async.resolvers

    assert uffd_async.reader.EventReader is ua.EventReader
    for name in [
        "AnyResolver", "AsyncSource", "ByKind", "ContinueMinor", "CopyFrom", "NoSourcePage",
        "Resolver", "ResolverFunction", "SyncSource", "Unprotect", "ZeroFill", "as_resolver",
        "by_kind", "continue_minor", "copy_from", "unprotect", "zero_fill", "zero_page",
    ]:  # fmt: skip
        assert hasattr(uffd_async.resolvers, name), name
    for name in ["Resolver", "by_kind", "continue_minor", "copy_from", "unprotect", "zero_fill"]:
        assert getattr(uffd_async.resolvers, name) is getattr(ua, name), name
